"""The release gate: what of last generation's release input and this generation's new
shards goes into the next release.

Decisions (takedown matches and their near copies, opt-outs found by the re-check,
earlier removals, released records superseded by a fresh fetch) are computed once
per generation on the driver (`gate_decisions`, written to a parquet file), then
applied shard by shard by `ReleaseGateStage` on any executor. Released samples judged
under other safety settings or storing rules than now are judged again there
(`SafetyRejudge`): their
stored bytes are at hand, so blurring faces or a stricter NSFW rule needs no refetch.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ccurate.record import Decision, Sample
from ccurate.shardio import write_table_atomic
from ccurate.stage import Resources, Stage
from ccurate.takedown import TakedownEntry
from ccurate.takedown_match import MATCH_COLUMNS, Blocklist, match_index

if TYPE_CHECKING:
    from ccurate.captioning.config import CaptionConfig
    from ccurate.filters.license_filter import LicenseConfig
    from ccurate.filters.safety import SafetyConfig

log = logging.getLogger("ccurate.rebuild")  # the rebuild's log (rebuild.log), as before the split

REASONS: dict[str, str] = {
    "superseded": "an older record of a key fetched again in this generation (the new record "
    "replaces it; the diff reports what changed)",
    "<filter reason>": "an older record whose refetch is now dropped by a filter or dedup "
    "(e.g. license_not_allowed: the licence changed): withdrawn with the new reason",
    "optout_*": "an older record whose refetch or re-check found an opt-out",
    "license_not_allowed": "also: an older record whose stored licence the licence policy "
    "now configured does not admit (the policy changed since it was released)",
    **{
        reason: "also: an older record the safety filter now configured drops when it judges "
        "the released bytes again (its settings or storing rules changed since it was "
        "released, or the settings that judged it are unknown; `removed_because` says so)"
        for reason in ("nsfw", "nd_needs_blur", "decode_error", "decompression_bomb")
    },
    "takedown": "see ccurate.takedown.REASONS",
}

REJUDGED = (
    "judged again by the safety filter now configured: its settings or storing rules changed "
    "since it was released, or the settings that judged it are unknown"
)

SAFETY_STORE_REVISION = 2
"""Revision of the safety filter's storing rules (`ccurate.filters.safety`, "what ships is
what was judged"): what it leaves of a file kept as downloaded. 1: EXIF thumbnails, GPS, XMP
and later frames stayed; 2: the judged first frame only, with descriptive EXIF. Bump it when
those rules change, so a rebuild judges released files kept as downloaded again once."""

REJUDGE_CAUSES: dict[str, str] = {
    "settings": "the safety settings changed since they were released",
    "storing_rules": "they are stored as downloaded (`[ingest] keep_original`) and were "
    "judged under earlier storing rules of the safety filter, or before keep_original was "
    "switched",
    "unknown": "the settings that judged them are unknown (the generation that judged them "
    "is gone) or changed",
}
"""Why released samples are judged again (`ccurate.rebuild`): the words of the log, the
command's summary and the card."""


def rejudged_summary(again: dict[str, Any]) -> str:
    """One line on what judging released samples again did (log, command, card)."""
    because = again.get("because") or {}
    why = "; ".join(f"{n} because {REJUDGE_CAUSES.get(c, c)}" for c, n in sorted(because.items()))
    dropped = again.get("dropped") or {}
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items()))
    return (
        f"{again.get('judged', 0)} released samples judged again by the safety filter"
        + (f" ({why})" if why else "")
        + f"; faces blurred in {again.get('faces_blurred', 0)}, withdrawn "
        f"{sum(dropped.values())}" + (f" ({reasons})" if reasons else "")
    )


# scores that describe the stored bytes rather than the verdict: the bytes keep what an
# earlier judgement did to them (a blurred face stays blurred), so a judgement made again
# adds to them instead of forgetting them (the attribution states the blurring from them)
_STORED: dict[str, Callable[[float, float], float]] = {
    "faces_blurred": operator.add,
    "reencoded": max,
    "frames": max,
}


def judge_again(s: Sample, d: Decision) -> None:
    """Record `d` in place of the sample's earlier decision and scores of the same filter
    (one verdict per filter, where the first one stood), keeping what the stored bytes
    carry of the earlier one (`_STORED`)."""
    prefix = f"{d.filter}."
    before = {k: v for k, v in s.scores.items() if k.startswith(prefix)}
    for k in before:
        del s.scores[k]
    at = next((i for i, x in enumerate(s.decisions) if x.filter == d.filter), None)
    s.decisions = [x for x in s.decisions if x.filter != d.filter]
    s.record(d)
    if at is not None:
        s.decisions.insert(at, s.decisions.pop())
    for name, merge in _STORED.items():
        key = prefix + name
        if key in before:
            s.scores[key] = merge(before[key], s.scores.get(key, 0.0))


class SafetyRejudge(Stage):
    """The safety filter now configured, run again on released samples judged under other
    safety settings or storing rules (`REJUDGE_CAUSES`): a face-blurring or NSFW policy
    reaches every released sample, as the licence policy does, without a refetch (the
    release input holds the bytes). Its verdict replaces the earlier one (`judge_again`).

    A sample whose faces it blurs loses the caption made from the unblurred pixels (the
    caption cache is keyed by image bytes, so it cannot come back): captioned again from the
    blurred bytes when a caption model is configured, else left without one."""

    name: ClassVar[str] = "safety"
    preserves_keys: ClassVar[bool] = True

    def __init__(self, safety: SafetyConfig, caption: CaptionConfig) -> None:
        from ccurate.captioning.stage import CaptionStage
        from ccurate.filters.safety import SafetyFilter

        self.filter = SafetyFilter(safety)
        self.captioner = CaptionStage(caption) if caption.model is not None else None
        self._captioning = False

    @property
    def resources(self) -> Resources:
        r = self.filter.resources
        c = self.captioner.resources if self.captioner is not None else Resources(0, 0, 0)
        return Resources(max(r.cpus, c.cpus), c.gpus, r.memory_gb + c.memory_gb)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_captioning": False}

    def prepare(self, inputs: list[str], scratch_dir: str) -> None:
        if self.captioner is not None:
            self.captioner.prepare(inputs, scratch_dir)

    def setup(self) -> None:
        self.filter.setup()  # BLIP-2 only once a caption is to be made again (`process`)

    def teardown(self) -> None:
        self.filter.teardown()
        if self.captioner is not None and self._captioning:
            self.captioner.teardown()
        self._captioning = False

    def checkpoint(self) -> None:
        if self._captioning:
            assert self.captioner is not None
            self.captioner.checkpoint()

    def process(self, batch: list[Sample]) -> list[Sample]:
        live = [s for s in batch if s.kept]
        if not live:
            return batch
        stale: list[Sample] = []
        for s, d in zip(live, self.filter.decide_batch(live), strict=True):
            judge_again(s, d)
            if not s.kept:
                s.extra["removed_because"] = REJUDGED
            elif d.scores.get("faces_blurred", 0.0) > 0 and s.caption_model is not None:
                s.caption = s.caption_model = None
                s.extra.pop("captions", None)
                stale.append(s)
        if stale and self.captioner is not None:
            if not self._captioning:
                self.captioner.setup()
                self._captioning = True
            self.captioner.process(stale)
        return batch

    def describe(self) -> dict[str, Any]:
        return {"safety": self.filter.describe(), "caption_again": self.captioner is not None}


class ReleaseGateStage(Stage):
    """Drops, from the release input, what the gate decided (takedowns, opt-outs, superseded).

    Decisions are computed once per generation on the driver (`gate_decisions`)
    and loaded by each worker in `setup`. `previous=True` marks the stage that
    reads last generation's release input: only there are superseded records
    dropped (the new record with the same key comes from this generation). `rejudge`
    then judges what stays again (shards judged under other safety settings).
    """

    name: ClassVar[str] = "takedown"
    preserves_keys: ClassVar[bool] = True
    batch_size: int = 256

    def __init__(
        self, decisions_path: str, previous: bool, rejudge: SafetyRejudge | None = None
    ) -> None:
        self.decisions_path = decisions_path
        self.previous = previous
        self.rejudge = rejudge
        self._decisions: dict[str, tuple[str, str, str]] | None = None

    @property
    def resources(self) -> Resources:
        if self.rejudge is None:
            return Resources(cpus=1.0, memory_gb=1.0)
        r = self.rejudge.resources
        return Resources(max(1.0, r.cpus), r.gpus, 1.0 + r.memory_gb)

    def prepare(self, inputs: list[str], scratch_dir: str) -> None:
        if self.rejudge is not None:
            self.rejudge.prepare(inputs, scratch_dir)

    def checkpoint(self) -> None:
        if self.rejudge is not None:
            self.rejudge.checkpoint()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_decisions"] = None
        return state

    def setup(self) -> None:
        t = pq.read_table(self.decisions_path)
        self._decisions = {
            k: (r, d, s)
            for k, r, d, s in zip(
                t.column("key").to_pylist(),
                t.column("reason").to_pylist(),
                t.column("detail").to_pylist(),
                t.column("scope").to_pylist(),
                strict=True,
            )
        }
        if self.rejudge is not None:
            self.rejudge.setup()

    def teardown(self) -> None:
        self._decisions = None
        if self.rejudge is not None:
            self.rejudge.teardown()

    def process(self, batch: list[Sample]) -> list[Sample]:
        if self._decisions is None:
            self.setup()
        assert self._decisions is not None
        for s in batch:
            d = self._decisions.get(s.key) if s.kept else None
            if d is None:
                continue
            reason, detail, scope = d
            if scope == "previous" and not self.previous:
                continue
            s.extra["removed_because"] = detail
            by = "takedown" if reason == "takedown" or reason.startswith("optout_") else "rebuild"
            s.record(Decision(by, False, reason))
        return self.rejudge.process(batch) if self.rejudge is not None else batch

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"decisions": self.decisions_path, "previous": self.previous}
        if self.rejudge is not None:
            out["rejudge"] = self.rejudge.describe()
        return out


GATE_SCHEMA = pa.schema(
    [("key", pa.string()), ("reason", pa.string()), ("detail", pa.string()), ("scope", pa.string())]
)


def read_index(prefixes: list[str], columns: list[str]) -> pa.Table:
    tables = []
    for p in prefixes:
        names = pq.read_schema(f"{p}.parquet").names
        t = pq.read_table(f"{p}.parquet", columns=[c for c in columns if c in names])
        for c in columns:
            if c not in t.column_names:
                t = t.append_column(c, pa.nulls(t.num_rows, pa.string()))
        tables.append(t.select(columns).cast(pa.schema([(c, pa.string()) for c in columns])))
    if not tables:
        return pa.schema([(c, pa.string()) for c in columns]).empty_table()
    return pa.concat_tables(tables)


def dropped_duplicates(catalog_dir: Path, extra: list[str]) -> pa.Table:
    """Samples dropped as duplicates (catalog history + this generation): a URL takedown of
    one of them must also remove the released copy it was merged into."""
    tables = []
    db = catalog_dir / "catalog.duckdb"
    if db.exists():
        try:
            from ccurate.shards.catalog import Catalog

            with Catalog(catalog_dir, read_only=True) as cat:
                t = cat.query(
                    "SELECT key, url, page_url, NULL::VARCHAR AS author, sha256, pixel_sha256, "
                    "phash FROM samples WHERE status <> 'ok' AND duplicate_of IS NOT NULL"
                )
            tables.append(t.cast(pa.schema([(c, pa.string()) for c in MATCH_COLUMNS])))
        except Exception as e:  # a busy or foreign catalog must not stop a rebuild
            log.warning("catalog %s not read for takedown expansion: %s", db, e)
    for path in extra:
        t = pq.read_table(path)
        if "duplicate_of" not in t.column_names or t.num_rows == 0:
            continue
        t = t.filter(pc.is_valid(t.column("duplicate_of")))
        for c in MATCH_COLUMNS:
            if c not in t.column_names:
                t = t.append_column(c, pa.nulls(t.num_rows, pa.string()))
        tables.append(
            t.select(MATCH_COLUMNS).cast(pa.schema([(c, pa.string()) for c in MATCH_COLUMNS]))
        )
    if not tables:
        return pa.schema([(c, pa.string()) for c in MATCH_COLUMNS]).empty_table()
    return pa.concat_tables(tables)


def released_hashes(release: Path | None) -> pa.Table | None:
    """key, image_sha256 (the bytes the release holds) of a published release, if it has them."""
    manifest = release / "manifest.parquet" if release is not None else None
    if manifest is None or not manifest.exists():
        return None
    if "image_sha256" not in pq.read_schema(manifest).names:
        return None
    return pq.read_table(manifest, columns=["key", "image_sha256"])


def superseded_keys(
    old_inputs: list[str], outcomes: dict[str, tuple[str, str | None, str | None]]
) -> dict[str, str]:
    """What happens to released keys fetched again (a refetch or a retry of the same key).

    The new record's verdict stands: kept -> the old record is `superseded`;
    dropped by a filter or dedup (e.g. the licence changed) -> the old record is
    withdrawn with that reason. A fetch failure keeps the old record (a CC
    licence is not withdrawn by a timeout or a dead link), except an opt-out.
    """
    out: dict[str, str] = {}
    if not outcomes:
        return out
    for k in read_index(old_inputs, ["key"]).column("key").to_pylist():
        got = outcomes.get(k)
        fate = old_record_fate(*got) if got is not None else None
        if fate is not None:
            out[k] = fate
    return out


def old_record_fate(status: str, reason: str | None, by: str | None) -> str | None:
    """What a fresh record of a released key does to the released one: None (it stays: a
    fetch failure, a dead link), `superseded` (kept: it replaces it) or the drop reason
    (a filter, dedup or an opt-out withdraws it). One rule for the gate and dedup's
    `previous` (`ccurate.rebuild`), so a released record is never in neither."""
    if status == "ok":
        return "superseded"
    if reason and (reason.startswith("optout_") or by != "ingest"):
        return reason
    return None


def policy_withdrawals(old_inputs: list[str], cfg: LicenseConfig) -> dict[str, tuple[str, str]]:
    """key -> (reason, detail) of released records whose stored licence the licence policy in
    force does not admit: a policy change reaches released samples without a refetch.

    The licence filter's own code judges the stored licence id (`normalize`, then
    `policy_reason`); an id it cannot read is left alone (it was admitted once)."""
    from ccurate.filters.license_filter import policy_reason
    from ccurate.filters.licenses import normalize

    out: dict[str, tuple[str, str]] = {}
    if not cfg.enabled or not old_inputs:
        return out
    t = read_index(old_inputs, ["key", "license"])
    verdicts: dict[str, str | None] = {}
    for key, lic in zip(t.column("key").to_pylist(), t.column("license").to_pylist(), strict=True):
        if not lic:
            continue
        if lic not in verdicts:
            info = normalize(lic)
            verdicts[lic] = policy_reason(info, cfg) if info is not None else None
        reason = verdicts[lic]
        if reason is not None:
            out[key] = (
                reason,
                f"policy changed: {lic} is not admitted by the licence policy now configured "
                f"(policy={cfg.policy}, allow_nd={cfg.allow_nd})",
            )
    return out


def gate_decisions(
    out: Path,
    old_inputs: list[str],
    new_inputs: list[str],
    entries: list[TakedownEntry],
    removals: pa.Table,
    optouts: dict[str, str],
    superseded: dict[str, str],
    dup_tables: pa.Table,
    radius: int,
    released: pa.Table | None = None,
    policy: dict[str, tuple[str, str]] | None = None,
) -> pa.Table:
    """Decide, over every release-input candidate, what is dropped and why; write `out`.

    `released` (key, image_sha256: `released_hashes`) lets hash takedowns match the bytes
    a release holds, which differ from the fetched file's when ingest re-encoded it;
    `policy` (`policy_withdrawals`) withdraws old records the licence policy now refuses."""
    block = Blocklist()
    block.add_entries(entries, radius)
    block.add_removals(removals, radius)
    if released is not None and released.num_rows and block.hashes:
        for k, h in zip(
            released.column("key").to_pylist(),
            released.column("image_sha256").to_pylist(),
            strict=True,
        ):
            why = block.hashes.get(h) if h else None
            if why is not None:
                block.keys.setdefault(k, (why[0], f"{why[1]} (released bytes)"))
    for key, reason in optouts.items():
        found = "opt-out" if reason.startswith("optout_") else "redirect to a taken-down URL"
        block.keys.setdefault(key, (reason, f"{found} found by the re-check"))
    # URL- and author-level takedowns of samples merged away as duplicates: block their
    # images too (the released copy may credit someone else; the catalog's history keeps no
    # author, so authors are matched on this generation's duplicates)
    if dup_tables.num_rows and (block.urls or block.pages or block.domains or block.authors):
        direct = Blocklist(
            urls=block.urls, pages=block.pages, domains=block.domains, authors=block.authors
        )
        hits = match_index(dup_tables, direct, radius)
        if hits.num_rows:
            matched = dup_tables.filter(
                pc.is_in(dup_tables.column("key"), value_set=hits.column("key"))
            )
            for r in matched.to_pylist():
                why = ("takedown", f"image of {r['key']} {r['url']} (dropped duplicate)")
                for h in (r["sha256"], r["pixel_sha256"]):
                    if h:
                        block.hashes.setdefault(h, why)
                if r["phash"]:
                    block.codes.append((r["phash"], radius, *why))
    table = read_index([*old_inputs, *new_inputs], MATCH_COLUMNS)
    hits = match_index(table, block, radius)
    rows: dict[str, tuple[str, str, str]] = {}
    for k, r, d in zip(
        hits.column("key").to_pylist(),
        hits.column("reason").to_pylist(),
        hits.column("detail").to_pylist(),
        strict=True,
    ):
        rows[k] = (r, d, "all")
    for k, r in superseded.items():
        if k not in rows:
            detail = (
                "fetched again in this generation"
                if r == "superseded"
                else (f"fetched again: now {r}")
            )
            rows[k] = (r, detail, "previous")
    for k, (r, detail) in (policy or {}).items():  # old records the policy no longer admits
        if k not in rows:
            rows[k] = (r, detail, "previous")
    result = pa.table(
        {
            "key": pa.array(list(rows), pa.string()),
            "reason": pa.array([v[0] for v in rows.values()], pa.string()),
            "detail": pa.array([v[1] for v in rows.values()], pa.string()),
            "scope": pa.array([v[2] for v in rows.values()], pa.string()),
        },
        schema=GATE_SCHEMA,
    )
    write_table_atomic(out, result)
    return result
