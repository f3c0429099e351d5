"""The one sample record every stage reads and writes, and its Arrow schema.

A `Sample` is one image-text pair with everything a user needs to explain it:
where it came from, the licence evidence it was admitted on, its attribution,
hashes, every filter's scores and decisions, and the synthetic caption.
Between stages samples live on disk as Arrow/parquet rows (metadata) plus
webdataset tar members (image bytes); `to_row`/`from_row` are the only
conversions, so no stage invents its own format.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import pyarrow as pa

KEEP = "ok"
DROPPED = "dropped"
Status = Literal["ok", "dropped"]

EvidenceScope = Literal["image", "container", "page", "metadata", "input"]


def make_key(url: str, page_url: str | None = None) -> str:
    """Stable 16-hex key from the source URLs, so reruns and rebuilds agree.

    The page URL takes part because the same image URL on two pages carries two
    sets of licence evidence; exact dedup later merges them with a reason.
    """
    h = hashlib.sha256(url.encode("utf-8", "surrogatepass"))
    if page_url:
        h.update(b"\0")
        h.update(page_url.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


@dataclass
class LicenseEvidence:
    """One raw piece of licence evidence, recorded faithfully by ingest.

    `scope` says how tightly it is tied to the image: the image element itself,
    its container (figure/div), the whole page, structured metadata (Flickr,
    Wikimedia) or a column of the input list. `kind` names the markup form
    (e.g. `rel_license`, `link_rel_license`, `cc_link`, `ccrel`, `flickr`,
    `wikimedia`, `text`, `column`); `value` is the raw string (URL, id or name).
    """

    scope: str
    kind: str
    value: str

    @staticmethod
    def arrow_type() -> pa.DataType:
        return pa.struct([("scope", pa.string()), ("kind", pa.string()), ("value", pa.string())])


@dataclass
class Decision:
    """A filter's verdict on one sample: keep, or drop with a reason, plus scores."""

    filter: str
    keep: bool
    reason: str | None = None
    scores: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def arrow_type() -> pa.DataType:
        return pa.struct(
            [
                ("filter", pa.string()),
                ("keep", pa.bool_()),
                ("reason", pa.string()),
            ]
        )


@dataclass
class Sample:
    """One image-text pair as it flows through ingest -> filters -> captions -> shards."""

    key: str
    url: str
    page_url: str | None = None
    alt_text: str | None = None
    # licence: normalised id (set by the licence filter) + the raw evidence (set by ingest)
    license: str | None = None
    license_url: str | None = None
    license_rule: str | None = None
    license_evidence: list[LicenseEvidence] = field(default_factory=list)
    # attribution
    author: str | None = None
    title: str | None = None
    # the attribution the licensor asks for, verbatim (CC BY 4.0 §3(a)(1)(A)(i): "in any
    # reasonable manner requested"): Commons `Attribution`; None if none given
    credit: str | None = None
    source_url: str | None = None
    # image
    image: bytes | None = None
    mime: str | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    sha256: str | None = None
    pixel_sha256: str | None = None
    phash: str | None = None
    dhash: str | None = None  # 64-bit difference hash: dedup's check of wide pHash matches
    # filters
    scores: dict[str, float] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    status: str = KEEP
    drop_reason: str | None = None
    dropped_by: str | None = None
    duplicate_of: str | None = None
    duplicate_count: int = 1
    # captions
    caption: str | None = None
    caption_model: str | None = None
    # columns from the input we do not know about, carried through untouched
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> bool:
        return self.status == KEEP

    def drop(self, reason: str, by: str) -> None:
        """Mark dropped; the runner moves it to the side output, never discards it."""
        self.status = DROPPED
        self.drop_reason = reason
        self.dropped_by = by

    def record(self, decision: Decision) -> None:
        """Record one filter's decision and scores (and drop on a negative verdict)."""
        self.decisions.append(Decision(decision.filter, decision.keep, decision.reason))
        for name, value in decision.scores.items():
            self.scores[f"{decision.filter}.{name}"] = float(value)
        if not decision.keep:
            self.drop(decision.reason or f"{decision.filter}_rejected", decision.filter)

    # ---- Arrow conversion -------------------------------------------------
    def to_row(self, with_image: bool = True) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            if f.name == "image" and not with_image:
                continue
            value = getattr(self, f.name)
            if f.name == "license_evidence":
                value = [asdict(e) for e in value]
            elif f.name == "decisions":
                value = [{"filter": d.filter, "keep": d.keep, "reason": d.reason} for d in value]
            elif f.name == "scores":
                value = list(value.items())
            row[f.name] = value
        for name, value in self.extra.items():
            row[name] = value
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Sample:
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for name, value in row.items():
            if name not in known or name == "extra":
                extra[name] = value
                continue
            if name == "license_evidence":
                value = [LicenseEvidence(**e) for e in (value or [])]
            elif name == "decisions":
                value = [Decision(**d) for d in (value or [])]
            elif name == "scores":
                value = dict(value or [])
            elif name == "duplicate_count" and value is None:
                value = 1
            elif name == "status" and value is None:
                value = KEEP
            kwargs[name] = value
        return cls(**kwargs, extra=extra)

    def metadata_json(self) -> str:
        """The record without image bytes, as the `{key}.json` member of a shard."""
        return row_json(self.to_row(with_image=False))


def row_json(row: dict[str, Any]) -> str:
    """A `Sample.to_row` row as the json a shard stores (`Sample.metadata_json`)."""
    return json.dumps(row, ensure_ascii=False, default=str)


SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("page_url", pa.string()),
        ("alt_text", pa.string()),
        ("license", pa.string()),
        ("license_url", pa.string()),
        ("license_rule", pa.string()),
        ("license_evidence", pa.list_(LicenseEvidence.arrow_type())),
        ("author", pa.string()),
        ("title", pa.string()),
        ("credit", pa.string()),
        ("source_url", pa.string()),
        ("image", pa.binary()),
        ("mime", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
        ("pixel_sha256", pa.string()),
        ("phash", pa.string()),
        ("dhash", pa.string()),
        ("scores", pa.map_(pa.string(), pa.float64())),
        ("decisions", pa.list_(Decision.arrow_type())),
        ("status", pa.string()),
        ("drop_reason", pa.string()),
        ("dropped_by", pa.string()),
        ("duplicate_of", pa.string()),
        ("duplicate_count", pa.int32()),
        ("caption", pa.string()),
        ("caption_model", pa.string()),
    ]
)
"""Arrow schema of the known columns; extra input columns are appended as found."""

METADATA_SCHEMA = pa.schema([f for f in SCHEMA if f.name != "image"])


def samples_to_table(samples: list[Sample], with_image: bool = False) -> pa.Table:
    """Samples -> Arrow table with the fixed schema first, extra columns inferred after."""
    return rows_to_table([s.to_row(with_image=with_image) for s in samples], with_image)


def rows_to_table(rows: list[dict[str, Any]], with_image: bool = False) -> pa.Table:
    """`Sample.to_row` rows -> Arrow table (see `samples_to_table`): a writer that already
    made each row (for its json) converts it once."""
    base = SCHEMA if with_image else METADATA_SCHEMA
    if not rows:
        return pa.Table.from_pylist([], schema=base)
    known = set(base.names)
    extra_names: list[str] = []
    for r in rows:
        for name in r:
            if name not in known:
                known.add(name)
                extra_names.append(name)
    columns: dict[str, pa.Array] = {}
    for f in base:
        columns[f.name] = pa.array([r.get(f.name) for r in rows], type=f.type)
    for name in extra_names:
        columns[name] = pa.array([r.get(name) for r in rows])
    return pa.table(columns)


def table_to_samples(table: pa.Table) -> list[Sample]:
    return [Sample.from_row(r) for r in table.to_pylist()]
