"""Takedowns and removals: what must never be in a release again.

Two persistent lists live in the catalog directory, beside the catalog itself,
so they survive a wiped work directory:

- `takedowns.jsonl`: the takedown list, one validated JSON object a line
  (`id, kind, value, reason, added_at, added_by`, plus `phash`, `pixel_sha256`,
  `radius` and `source` for images). Kinds: `url` (image URL), `page_url`,
  `domain` (the host and its subdomains, image or page URL), `author`
  (case-insensitive), `sha256` (of the downloaded file, or of the released
  bytes), `phash` (64-bit perceptual hash, near matches within a radius) and
  `image` (a file: its sha256, pixel sha256 and phash). `ccurate takedown add`
  appends under an flock; an entry that is already listed is not added again.
- `removals/*.parquet`: every sample a rebuild removed (takedown or opt-out),
  with its hashes. Later rebuilds drop those keys, the same image bytes or
  pixels anywhere, and near copies (pHash within the radius), so a removed
  image does not come back under another URL.

`match_index` decides, vectorised over a parquet index (no image bytes), which
samples a blocklist removes: first direct matches (key, URL, page, domain,
author, exact hashes, pHash within radius), then the near copies of what was
matched (one hop: a copy of a copy is not chased, as in dedup's leader
clustering). Near search reuses dedup's exact multi-index hashing.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import io
import json
import os
import re
import socket
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from ccurate.record import Sample
from ccurate.shardio import write_table_atomic
from ccurate.stage import Resources, Stage

if TYPE_CHECKING:
    from ccurate.ingest.config import IngestConfig

TAKEDOWN_FILE = "takedowns.jsonl"
REMOVALS_DIR = "removals"
DEFAULT_RADIUS = 8
"""pHash bits for near matches of takedowns and removals. Dedup keeps 4 (precision);
a takedown errs towards removing: real re-posts land within 4, crops and heavy
recompression within 8, distinct photos rarely below 12 (bench/dedup_eval.py)."""

REASONS: dict[str, str] = {
    "takedown": "matches an entry of the takedown list (URL, page, domain, author, hash, or a "
    "near copy of an image), or is a copy of a sample removed for a takedown",
    "optout_<signal>": "the source now opts out (re-checked on schedule); the reason names the "
    "signal, as at ingest (optout_x_robots_tag, optout_robots_txt, optout_tdmrep, "
    "optout_meta_robots)",
}

Kind = Literal["url", "page_url", "domain", "author", "sha256", "phash", "image"]
KINDS: tuple[str, ...] = ("url", "page_url", "domain", "author", "sha256", "phash", "image")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOST = re.compile(rf"^{_LABEL}(\.{_LABEL})*$|^\[[0-9a-f:.]+\]$")
_SCHEME_HOST = r"^([A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*)"
_HOST_OF = r"^[A-Za-z][A-Za-z0-9+.\-]*://(?:[^@/?#]*@)?(?P<host>\[[^\]]*\]|[^:/?#]*)"


class TakedownError(ValueError):
    """A takedown entry or list that cannot be used; the message says where and why."""


# --------------------------------------------------------------------------- normalising


def normalize_url(url: str) -> str:
    """`scheme://host` lower-cased, fragment dropped: how URLs are compared here."""
    url = url.strip()
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise TakedownError(f"not an http(s) URL with a host: {url!r}")
    m = re.match(_SCHEME_HOST, url)
    assert m is not None
    out = m.group(1).lower() + url[m.end() :]
    return out.split("#", 1)[0]


def normalize_domain(value: str) -> str:
    """`example.com`, `*.example.com`, `.example.com` or a URL -> `example.com`."""
    v = value.strip().lower()
    if "://" in v:
        v = (urlsplit(v).hostname or "").lower()
    v = v.removeprefix("*.").lstrip(".").rstrip(".")
    if not v or not _HOST.match(v):
        raise TakedownError(f"not a domain name: {value!r} (expected e.g. example.com)")
    return v


def normalize_author(value: str) -> str:
    v = " ".join(value.split()).casefold()
    if not v:
        raise TakedownError("empty author")
    return v


def _hex(value: str, pattern: re.Pattern[str], what: str) -> str:
    v = value.strip().lower()
    if not pattern.match(v):
        raise TakedownError(f"not a {what}: {value!r}")
    return v


def _normalize(kind: str, value: str) -> str:
    if kind in ("url", "page_url"):
        return normalize_url(value)
    if kind == "domain":
        return normalize_domain(value)
    if kind == "author":
        return normalize_author(value)
    if kind in ("sha256", "image"):
        return _hex(value, _HEX64, "sha256 (64 hex digits)")
    if kind == "phash":
        return _hex(value, _HEX16, "64-bit perceptual hash (16 hex digits)")
    raise TakedownError(f"unknown takedown kind {kind!r}; expected one of {', '.join(KINDS)}")


# --------------------------------------------------------------------------- entries


def entry_id(kind: str, value: str) -> str:
    """Stable id: the same (kind, value) is one entry, however often it is requested."""
    return "td-" + hashlib.sha256(f"{kind}\0{value}".encode()).hexdigest()[:12]


class TakedownEntry(BaseModel):
    """One line of `takedowns.jsonl` (validated on load and on add)."""

    model_config = ConfigDict(extra="forbid")

    id: str = ""
    kind: Kind
    value: str
    reason: str = "takedown request"
    added_at: str = ""
    added_by: str = ""
    phash: str | None = None
    pixel_sha256: str | None = None
    radius: int | None = None
    source: str | None = None

    @field_validator("radius")
    @classmethod
    def _radius(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= 32:
            raise ValueError("radius must be within 0..32 bits")
        return v

    @model_validator(mode="after")
    def _check(self) -> TakedownEntry:
        self.value = _normalize(self.kind, self.value)
        if self.phash is not None:
            self.phash = _hex(self.phash, _HEX16, "phash (16 hex digits)")
        if self.pixel_sha256 is not None:
            self.pixel_sha256 = _hex(self.pixel_sha256, _HEX64, "pixel_sha256")
        if self.kind == "image" and self.phash is None:
            raise ValueError("an image entry needs its phash")
        if not self.reason.strip():
            raise ValueError("reason must not be empty")
        want = entry_id(self.kind, self.value)
        if self.id and self.id != want:
            raise ValueError(f"id {self.id!r} does not match kind and value (expected {want})")
        self.id = want
        return self


def _now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def _who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in some containers
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def make_entry(
    kind: str, value: str, reason: str | None = None, added_by: str | None = None, **more: Any
) -> TakedownEntry:
    """Validate one takedown; raises TakedownError with a message naming the problem."""
    try:
        return TakedownEntry(
            kind=kind,
            value=value,
            reason=reason or "takedown request",
            added_at=_now_iso(),
            added_by=added_by or _who(),
            **more,
        )
    except ValidationError as err:
        raise TakedownError(_first_error(err)) from None
    except TakedownError:
        raise


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    msg = str(e["msg"]).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


@dataclass(frozen=True)
class ImageHashes:
    """File sha256, decoded-pixel sha256 and pHash of an image file (as ingest hashes it)."""

    sha256: str
    pixel_sha256: str
    phash: str


def hash_image_bytes(data: bytes) -> ImageHashes:
    """Hashes as ingest makes them: EXIF orientation applied, RGB, pHash of the pixels."""
    from PIL import Image, ImageOps

    from ccurate.filters.hashing import compute_hashes

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            img = ImageOps.exif_transpose(im) or im
            pix, ph = compute_hashes(img.convert("RGB"))
    except Exception as e:  # any decoder failure: say which and why
        raise TakedownError(f"cannot decode image: {type(e).__name__}: {e}") from None
    return ImageHashes(hashlib.sha256(data).hexdigest(), pix, ph)


def hash_image_file(path: str | Path) -> ImageHashes:
    p = Path(path)
    if not p.is_file():
        raise TakedownError(f"image file not found: {p}")
    try:
        return hash_image_bytes(p.read_bytes())
    except TakedownError as e:
        raise TakedownError(f"{p}: {e}") from None


def image_entry(
    path: str | Path,
    reason: str | None = None,
    added_by: str | None = None,
    radius: int | None = None,
) -> TakedownEntry:
    """A takedown for an image file: its file sha256, pixel sha256 and pHash (near copies)."""
    h = hash_image_file(path)
    return make_entry(
        "image",
        h.sha256,
        reason,
        added_by,
        phash=h.phash,
        pixel_sha256=h.pixel_sha256,
        radius=radius,
        source=Path(path).name,
    )


# --------------------------------------------------------------------------- the list file


class TakedownList:
    """`catalog_dir/takedowns.jsonl`: validated on every load; appends hold an flock."""

    def __init__(self, catalog_dir: str | Path) -> None:
        self.dir = Path(catalog_dir)
        self.path = self.dir / TAKEDOWN_FILE

    def load(self) -> list[TakedownEntry]:
        if not self.path.exists():
            return []
        return load_entries(self.path)

    def add(self, entries: Iterable[TakedownEntry]) -> list[tuple[TakedownEntry, bool]]:
        """Append the entries not yet listed; returns (entry, added?) for each, in order."""
        self.dir.mkdir(parents=True, exist_ok=True)
        out: list[tuple[TakedownEntry, bool]] = []
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            have = {e.id for e in self.load()}
            lines = []
            for e in entries:
                new = e.id not in have
                out.append((e, new))
                if new:
                    have.add(e.id)
                    lines.append(e.model_dump_json(exclude_none=True) + "\n")
            if lines:
                with open(self.path, "rb") as fh:  # a previous writer died mid-line?
                    fh.seek(0, os.SEEK_END)
                    if fh.tell():
                        fh.seek(-1, os.SEEK_END)
                        if fh.read(1) != b"\n":
                            lines.insert(0, "\n")
                os.write(fd, "".join(lines).encode())
                os.fsync(fd)
        finally:
            os.close(fd)  # releases the flock
        return out


def load_entries(path: str | Path) -> list[TakedownEntry]:
    """Every entry of a takedown file; a bad line is an error naming file and line."""
    entries: list[TakedownEntry] = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise TakedownError("not a JSON object")
                entries.append(TakedownEntry.model_validate(obj))
            except json.JSONDecodeError as e:
                raise TakedownError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            except ValidationError as e:
                raise TakedownError(f"{path}:{n}: {_first_error(e)}") from None
            except TakedownError as e:
                raise TakedownError(f"{path}:{n}: {e}") from None
    return entries


# --------------------------------------------------------------------------- removals

REMOVAL_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("page_url", pa.string()),
        ("sha256", pa.string()),
        ("pixel_sha256", pa.string()),
        ("phash", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("generation", pa.int32()),
        ("removed_at", pa.string()),
    ]
)


def removal_files(catalog_dir: str | Path) -> list[Path]:
    d = Path(catalog_dir) / REMOVALS_DIR
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("*.parquet") if not p.name.startswith("."))


def load_removals(catalog_dir: str | Path, exclude: Iterable[Path] = ()) -> pa.Table:
    """Every removal recorded so far (one table; empty when none)."""
    skip = {Path(p).resolve() for p in exclude}
    files = [p for p in removal_files(catalog_dir) if p.resolve() not in skip]
    if not files:
        return REMOVAL_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=REMOVAL_SCHEMA) for f in files])


def write_removals(path: str | Path, table: pa.Table) -> None:
    write_table_atomic(path, table.select(REMOVAL_SCHEMA.names).cast(REMOVAL_SCHEMA))


# --------------------------------------------------------------------------- matching


@dataclass
class Blocklist:
    """What the release gate removes, compiled for vectorised matching.

    `keys`, `urls`, ... map a value to (reason, detail); hashes come from
    takedown entries and from earlier removals; `codes` are pHashes with their
    own radius.
    """

    keys: dict[str, tuple[str, str]] = field(default_factory=dict)
    urls: dict[str, tuple[str, str]] = field(default_factory=dict)
    pages: dict[str, tuple[str, str]] = field(default_factory=dict)
    domains: dict[str, tuple[str, str]] = field(default_factory=dict)
    authors: dict[str, tuple[str, str]] = field(default_factory=dict)
    hashes: dict[str, tuple[str, str]] = field(default_factory=dict)  # sha256 or pixel sha256
    codes: list[tuple[str, int, str, str]] = field(default_factory=list)  # phash, radius, why

    def __len__(self) -> int:
        return (
            len(self.keys)
            + len(self.urls)
            + len(self.pages)
            + len(self.domains)
            + len(self.authors)
            + len(self.hashes)
            + len(self.codes)
        )

    def add_entries(self, entries: Iterable[TakedownEntry], radius: int) -> None:
        for e in entries:
            why = ("takedown", f"{e.id} {e.kind}")
            if e.kind == "url":
                self.urls.setdefault(e.value, why)
            elif e.kind == "page_url":
                self.pages.setdefault(e.value, why)
            elif e.kind == "domain":
                self.domains.setdefault(e.value, why)
            elif e.kind == "author":
                self.authors.setdefault(e.value, why)
            elif e.kind == "sha256":
                self.hashes.setdefault(e.value, why)
            elif e.kind == "phash":
                self.codes.append((e.value, e.radius if e.radius is not None else radius, *why))
            elif e.kind == "image":
                self.hashes.setdefault(e.value, why)
                if e.pixel_sha256:
                    self.hashes.setdefault(e.pixel_sha256, why)
                assert e.phash is not None
                self.codes.append((e.phash, e.radius if e.radius is not None else radius, *why))

    def add_removals(self, removals: pa.Table, radius: int) -> None:
        """Removed keys, and their exact hashes and pHash: the image must not come back."""
        for r in removals.select(["key", "sha256", "pixel_sha256", "phash", "reason"]).to_pylist():
            why = (r["reason"] or "takedown", f"removed {r['key']}")
            self.keys.setdefault(r["key"], why)
            for h in (r["sha256"], r["pixel_sha256"]):
                if h:
                    self.hashes.setdefault(h, why)
            if r["phash"] and _HEX16.match(r["phash"]):
                self.codes.append((r["phash"], radius, *why))


MATCH_COLUMNS = ["key", "url", "page_url", "author", "sha256", "pixel_sha256", "phash"]
DECISION_SCHEMA = pa.schema(
    [("key", pa.string()), ("reason", pa.string()), ("detail", pa.string())]
)


def _col(t: pa.Table, name: str) -> pa.ChunkedArray:
    if name in t.column_names:
        return t.column(name).cast(pa.string())
    return pa.chunked_array([pa.nulls(t.num_rows, pa.string())])


def _hosts(col: pa.ChunkedArray) -> pa.ChunkedArray:
    host = pc.struct_field(pc.extract_regex(col, _HOST_OF), "host")
    return pc.utf8_lower(host)


class _Hits:
    """First match per row, vectorised: which rule table and entry matched, and how."""

    def __init__(self, n: int) -> None:
        self.src = np.full(n, -1, np.int32)  # index into self.rules
        self.pos = np.zeros(n, np.int64)  # entry within that rule table
        self.dist = np.full(n, -1, np.int32)  # pHash bits for near matches
        self.rules: list[tuple[list[tuple[str, str]], str]] = []  # ([(reason, detail)], label)

    @property
    def free(self) -> np.ndarray:
        return self.src < 0

    def add(
        self,
        mask: np.ndarray,
        pos: np.ndarray,
        whys: list[tuple[str, str]],
        label: str,
        dist: np.ndarray | None = None,
    ) -> None:
        m = mask & self.free
        if not m.any():
            return
        self.rules.append((whys, label))
        self.src[m] = len(self.rules) - 1
        self.pos[m] = pos[m]
        if dist is not None:
            self.dist[m] = dist[m]

    def lookup(
        self, values: pa.ChunkedArray, table: dict[str, tuple[str, str]], label: str
    ) -> None:
        """Rows whose value is a key of `table` (exact, via Arrow's hash lookup)."""
        if not table:
            return
        keys = list(table)
        idx = pc.index_in(values, value_set=pa.array(keys, pa.string()))
        pos = np.asarray(pc.fill_null(idx, -1).to_numpy(zero_copy_only=False), np.int64)
        self.add(pos >= 0, pos, [table[k] for k in keys], label)

    def near(
        self, codes: np.ndarray, ok: np.ndarray, refs: list[tuple[str, int, str, str]], label: str
    ) -> None:
        """Rows whose pHash is within each reference's own radius (closest reference wins)."""
        from ccurate.filters.dedup import near_pairs
        from ccurate.filters.hashing import hex_to_u64

        todo = ok & self.free
        if not refs or not todo.any():
            return
        ref_codes, ref_ok = hex_to_u64([r[0] for r in refs])
        radii = np.array([r[1] for r in refs], np.int64)
        good_refs = np.flatnonzero(ref_ok)
        if not len(good_refs):
            return
        rows = np.flatnonzero(todo)
        if len(good_refs) <= 64:
            # few references (the usual takedown list): a popcount scan per reference
            best_d = np.full(len(rows), 99, np.int64)
            best_j = np.zeros(len(rows), np.int64)
            sub = codes[rows]
            for jj in good_refs.tolist():
                dj = np.bitwise_count(sub ^ ref_codes[jj]).astype(np.int64)
                better = (dj <= radii[jj]) & (dj < best_d)
                best_d[better] = dj[better]
                best_j[better] = jj
            found = best_d < 99
            i, j, d = rows[found], best_j[found], best_d[found]
        else:
            # many (removals pile up): multi-index search, the rows as the index
            q, x, dd = near_pairs(
                ref_codes[good_refs], int(radii[good_refs].max()), index=codes[rows]
            )
            j = good_refs[q]
            d = dd.astype(np.int64)
            keep = d <= radii[j]
            i, j, d = rows[x[keep]], j[keep], d[keep]
            o = np.lexsort((j, d, i))
            i, j, d = i[o], j[o], d[o]
            first = np.ones(len(i), bool)
            first[1:] = i[1:] != i[:-1]
            i, j, d = i[first], j[first], d[first]
        mask = np.zeros(len(codes), bool)
        mask[i] = True
        pos = np.zeros(len(codes), np.int64)
        pos[i] = j
        dist = np.full(len(codes), -1, np.int64)
        dist[i] = d
        self.add(mask, pos, [(r[2], r[3]) for r in refs], label, dist)

    def explain(self, rows: np.ndarray) -> tuple[list[str], list[str]]:
        reasons, details = [], []
        for r in rows.tolist():
            whys, label = self.rules[self.src[r]]
            reason, detail = whys[self.pos[r]]
            d = int(self.dist[r])
            reasons.append(reason)
            details.append(f"{detail} ({label} {d} bits)" if d >= 0 else f"{detail} ({label})")
        return reasons, details


def _url_hits(
    hits: _Hits, col: pa.ChunkedArray, rules: dict[str, tuple[str, str]], label: str
) -> None:
    """URL rules: a fast lower-cased prefilter, then `normalize_url` on the few candidates."""
    low = pc.utf8_lower(col)
    if pc.any(pc.fill_null(pc.match_substring(col, "#"), False)).as_py():
        low = pc.replace_substring_regex(low, r"#.*$", "")
    lowered = {k.lower() for k in rules}
    cand = pc.fill_null(pc.is_in(low, value_set=pa.array(sorted(lowered), pa.string())), False)
    rows = np.flatnonzero(np.asarray(cand.to_numpy(zero_copy_only=False), bool) & hits.free)
    if not len(rows):
        return
    keys = list(rules)
    where = {k: i for i, k in enumerate(keys)}
    mask = np.zeros(len(low), bool)
    pos = np.zeros(len(low), np.int64)
    for r, raw in zip(rows.tolist(), col.take(pa.array(rows)).to_pylist(), strict=True):
        try:
            i = where.get(normalize_url(raw))
        except TakedownError:
            i = None
        if i is not None:
            mask[r], pos[r] = True, i
    hits.add(mask, pos, [rules[k] for k in keys], label)


def _domain_hits(
    hits: _Hits, col: pa.ChunkedArray, rules: dict[str, tuple[str, str]], label: str
) -> None:
    """Host = a listed domain or one of its subdomains; substring prefilter for short lists."""
    if len(rules) > 256:  # many domains: parse every host (vectorised)
        for level in _parent_domains(_hosts(col)):
            hits.lookup(level, rules, label)
        return
    low = pc.utf8_lower(col)
    cand = np.zeros(len(low), bool)
    for d in rules:
        cand |= np.asarray(
            pc.fill_null(pc.match_substring(low, d), False).to_numpy(zero_copy_only=False), bool
        )
    rows = np.flatnonzero(cand & hits.free)
    if not len(rows):
        return
    sub = col.take(pa.array(rows))
    inner = _Hits(len(rows))
    for level in _parent_domains(_hosts(sub)):
        inner.lookup(level, rules, label)
    found = ~inner.free
    if found.any():
        mask = np.zeros(len(low), bool)
        mask[rows[found]] = True
        pos = np.zeros(len(low), np.int64)
        pos[rows[found]] = inner.pos[found]
        hits.add(mask, pos, inner.rules[0][0], label)


def _parent_domains(hosts: pa.ChunkedArray, depth: int = 8) -> list[pa.ChunkedArray]:
    """`a.b.example.org` -> [a.b.example.org, b.example.org, example.org, org] (vectorised)."""
    out = [hosts]
    h = hosts
    for _ in range(depth):
        has_dot = pc.fill_null(pc.match_substring(h, "."), False)
        if not pc.any(has_dot).as_py():
            break
        h = pc.if_else(
            has_dot, pc.replace_substring_regex(h, r"^[^.]*\.", ""), pa.scalar(None, pa.string())
        )
        out.append(h)
    return out


def match_index(table: pa.Table, block: Blocklist, radius: int = DEFAULT_RADIUS) -> pa.Table:
    """Rows of `table` (a parquet index) the blocklist removes: key, reason, detail.

    Direct matches first, then near copies of the matched rows (exact hash or
    pHash within `radius`) among the others, with the reason of what they copy.
    Vectorised (Arrow hash lookups, multi-index pHash search): millions of rows
    a second; Python only touches the matched rows.
    """
    from ccurate.filters.hashing import hex_to_u64

    n = table.num_rows
    if n == 0 or not len(block):
        return DECISION_SCHEMA.empty_table()
    hits = _Hits(n)
    hits.lookup(_col(table, "key"), block.keys, "key")
    for col, rules in (("url", block.urls), ("page_url", block.pages)):
        if rules:
            _url_hits(hits, _col(table, col), rules, col)
    if block.domains:
        for col in ("url", "page_url"):
            _domain_hits(hits, _col(table, col), block.domains, f"{col} host")
    if block.authors:
        authors = pc.utf8_lower(pc.utf8_trim_whitespace(_col(table, "author")))
        hits.lookup(authors, block.authors, "author")
    if block.hashes:
        hits.lookup(_col(table, "sha256"), block.hashes, "sha256")
        hits.lookup(_col(table, "pixel_sha256"), block.hashes, "pixel_sha256")
    codes, ok = hex_to_u64(_col(table, "phash"))
    hits.near(codes, ok, block.codes, "phash")
    # near copies of what matched directly: one hop
    seeds = np.flatnonzero(~hits.free)
    if len(seeds):
        keys = _col(table, "key").take(pa.array(seeds)).to_pylist()
        reasons, _ = hits.explain(seeds)
        copies = Blocklist()
        for col in ("sha256", "pixel_sha256"):
            vals = _col(table, col).take(pa.array(seeds)).to_pylist()
            for v, k, r in zip(vals, keys, reasons, strict=True):
                if v:
                    copies.hashes.setdefault(v, (r, f"copy of {k}"))
        phs = _col(table, "phash").take(pa.array(seeds)).to_pylist()
        for i, ph, k, r in zip(seeds.tolist(), phs, keys, reasons, strict=True):
            if ph and ok[i]:
                copies.codes.append((ph, radius, r, f"copy of {k}"))
        hits.lookup(_col(table, "sha256"), copies.hashes, "sha256")
        hits.lookup(_col(table, "pixel_sha256"), copies.hashes, "pixel_sha256")
        hits.near(codes, ok, copies.codes, "phash")
    rows = np.flatnonzero(~hits.free)
    reasons, details = hits.explain(rows)
    return pa.table(
        {
            "key": _col(table, "key").take(pa.array(rows, pa.int64())).combine_chunks(),
            "reason": pa.array(reasons, pa.string()),
            "detail": pa.array(details, pa.string()),
        },
        schema=DECISION_SCHEMA,
    )


# --------------------------------------------------------------------------- opt-out re-check

_STOP = "_headers_seen"  # header_check verdict that ends a re-check GET before the body


class OptoutRecheckStage(Stage):
    """Re-checks the opt-out signals of released samples: a GET of the image stopped after
    its headers, the origin's robots.txt / tdmrep.json, and the page (headers and meta).

    Uses the ingest fetcher (`HttpClient`: SSRF guard, per-host limits, retries,
    politeness) and opt-out checkers (`ccurate.ingest.optout`) with the same
    `IngestConfig`, so a re-check honours exactly what ingest honours. Each
    sample gets `extra["optout_recheck"]`: `ok`, the opt-out reason (the sample
    is dropped with it), `gone:<reason>` (404 and friends: a CC licence is not
    withdrawn by a dead link, the sample stays) or `transient:<reason>` (stays,
    checked again next time). A robots.txt answering 429/5xx means "come back
    later" here, not an opt-out.
    """

    name: ClassVar[str] = "optout_recheck"
    preserves_keys: ClassVar[bool] = True
    batch_size: int = 256

    def __init__(self, config: IngestConfig | None = None, threads: int = 16) -> None:
        from ccurate.ingest.config import IngestConfig

        self.config = config or IngestConfig()
        self.threads = threads
        self._client: Any = None
        self._policies: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._pages: dict[str, Future[str]] = {}
        self._lock = threading.Lock()
        self._policy_status: dict[str, int | None] = {}

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1.0, memory_gb=1.0)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in ("_client", "_policies", "_pool", "_lock"):
            state[k] = None
        state["_pages"] = {}
        state["_policy_status"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def setup(self) -> None:
        if self._client is not None:
            return
        from ccurate.ingest.optout import open_client

        self._client, self._policies = open_client(self.config, self.threads, self._saw_policy)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="recheck")

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._client is not None:
            self._client.close()
        self._client = self._policies = self._pool = None
        self._pages = {}

    def process(self, batch: list[Sample]) -> list[Sample]:
        if self._pool is None:
            self.setup()
        assert self._pool is not None
        futures = {self._pool.submit(self.check, s.url, s.page_url): s for s in batch if s.kept}
        for fut, s in futures.items():
            outcome = fut.result()
            s.extra["optout_recheck"] = outcome
            if outcome.startswith("optout_"):
                s.drop(outcome, "takedown")
        for s in batch:
            s.extra.setdefault("optout_recheck", None)
        return batch

    # -- checks ------------------------------------------------------------------
    def check(self, url: str, page_url: str | None) -> str:
        """`ok`, an opt-out reason, `gone:<reason>` or `transient:<reason>` for one sample."""
        outcome = self._check_image(url)
        if outcome == "ok" and page_url and page_url != url:
            with self._lock:
                fut = self._pages.get(page_url)
                mine = fut is None
                if fut is None:
                    fut = self._pages[page_url] = Future()
            if mine:
                try:
                    fut.set_result(self._check_page(page_url))
                except BaseException as e:
                    fut.set_exception(e)
                    raise
            outcome = fut.result()
        return outcome

    def _classify(self, reason: str | None, url: str) -> str:
        from ccurate.ingest.stage import is_transient

        if reason is None or reason == _STOP:
            return "ok"
        if reason == "optout_robots_txt":
            origin = _origin(url)
            status = self._policy_status.get(origin)
            if status is not None and (status == 429 or status >= 500):
                return f"transient:robots_http_{status}"
        if reason.startswith("optout_"):
            return reason
        if is_transient(reason):
            return f"transient:{reason}"
        return f"gone:{reason}"

    def _check_image(self, url: str) -> str:
        res = self._client.get(
            url,
            accept="image/*,*/*;q=0.5",
            max_bytes=self.config.max_bytes,
            hop_check=self._hop_check,
            header_check=lambda status, headers: self._header_optout(headers) or _STOP,
        )
        return self._classify(res.reason, url)

    def _check_page(self, url: str) -> str:
        from ccurate.ingest.html import extract_images

        c = self.config
        res = self._client.get(
            url,
            accept="text/html,application/xhtml+xml;q=0.9,*/*;q=0.5",
            max_bytes=c.max_page_bytes,
            hop_check=self._hop_check,
            header_check=lambda status, headers: self._header_optout(headers),
            gzip_ok=True,
        )
        if not res.ok:
            return self._classify(res.reason, url)
        try:
            optout = extract_images(res.body, res.url, user_agent_token=c.robots_token).optout
        except Exception:  # an unparsable page says nothing new about opting out
            return "ok"
        if optout == "optout_meta_robots" and c.respect_meta_robots:
            return optout
        if optout == "optout_tdmrep" and c.respect_tdmrep:
            return optout
        return "ok"

    def _header_optout(self, headers: dict[str, list[str]]) -> str | None:
        from ccurate.ingest.optout import header_optout

        return header_optout(headers, self.config)

    def _hop_check(self, target: Any) -> str | None:
        if self._policies is None:
            return None
        result: str | None = self._policies.check(target.origin, target.path)
        return result

    def _saw_policy(self, url: str, got: Any) -> None:
        if url.endswith("/robots.txt"):
            self._policy_status[_origin(url)] = got.status


def _origin(url: str) -> str:
    p = urlsplit(url)
    return f"{p.scheme.lower()}://{(p.netloc or '').lower()}"
