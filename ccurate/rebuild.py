"""Scheduled incremental rebuilds: the latest sources + what is known -> a new release.

A rebuild is one *generation* `work/gen-NNNN/`, holding the usual step folders
for the new work only:

    _GEN.json            number, start time, release name (fixed at creation)
    takedowns.jsonl      the takedown list as it was when the generation began
    00_sources/          the full plan of the configured sources (`plan_sources`)
    00_plan/             what this generation fetches: records never attempted,
                         transient failures whose retry is due, records due a refetch
    10_ingest .. 40_caption   the pipeline's steps on that plan (`Pipeline`)
    previous.parquet     hashes of the current release input (dedup's `previous`):
                         new copies of released images are dropped as duplicates
    45_recheck/          opt-out re-check of released samples checked too long ago
    50_release_input/    the *gate*: last generation's release input + this one's
                         captioned shards, minus takedowns, opt-outs, superseded records;
                         released samples judged under other safety settings or storing
                         rules are judged again (faces blurred, NSFW dropped, files kept as
                         downloaded re-encoded: `SafetyRejudge`)
    safety_judged.json   per release-input shard: the safety settings (and, for files kept
                         as downloaded, storing rules) that judged it
    ledger.parquet       per key: last outcome, when, attempts, last opt-out check
    retry.parquet        transient failures still to retry (full records)
    diff.json / .parquet added, removed (by reason), changed (which fields)
    rebuild.json         what this generation did; `_DONE` marks it finished

Each step is resumable (markers, as everywhere in ccurate): a killed rebuild
finishes on rerun, in the same generation. Stages run on any `Executor`
(local or Ray). Captions are reused through the caption cache (keyed by image
hash and model), and a released sample is never re-filtered: only new or
changed records go through the expensive stages. Two policies reach released samples
without a refetch: the licence policy (`policy_withdrawals`) and the safety filter
(`SafetyRejudge`, on the shards judged under other safety settings or storing rules).

Removed samples (takedowns, opt-outs) are persisted in the catalog directory
(`ccurate.takedown`), so they never come back: later plans skip their keys and
the gate drops their bytes, pixels and near copies anywhere.

The parts live beside this driver: the ledger in `ccurate.rebuild_ledger`, the
gate in `ccurate.release_gate`, the diff in `ccurate.release_diff`, takedown
matching in `ccurate.takedown_match`, the re-check stage in `ccurate.optout_recheck`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from ccurate.configbase import PERF_KEYS, Section
from ccurate.executor import Executor, ShardTask
from ccurate.rebuild_ledger import (
    Ledger,
    asked_again,
    dropped_records,
    fetch_due,
    fetch_outcomes,
    update_ledger,
)
from ccurate.record import Sample, samples_to_table
from ccurate.release_diff import diff_release_inputs
from ccurate.release_gate import (
    GATE_SCHEMA,
    SAFETY_STORE_REVISION,
    ReleaseGateStage,
    SafetyRejudge,
    dropped_duplicates,
    gate_decisions,
    old_record_fate,
    policy_withdrawals,
    read_index,
    rejudged_summary,
    released_hashes,
    superseded_keys,
)
from ccurate.shardio import list_shards, write_json_atomic, write_table_atomic
from ccurate.stage import Resources, Stage, StageStats
from ccurate.takedown import (
    REMOVAL_SCHEMA,
    REMOVALS_DIR,
    TakedownList,
    load_entries,
    load_removals,
    write_removals,
)
from ccurate.takedown_match import DEFAULT_RADIUS, MATCH_COLUMNS, Blocklist, match_index

if TYPE_CHECKING:
    from ccurate.captioning.config import CaptionConfig
    from ccurate.config import PipelineConfig
    from ccurate.pipeline import Pipeline

log = logging.getLogger("ccurate.rebuild")

LOCK_FILE = ".rebuild.lock"
GEN_FMT = "gen-{:04d}"
GEN_META = "_GEN.json"
GEN_DONE = "_DONE"
RELEASE_INPUT = "50_release_input"
RECHECK = "45_recheck"
SAFETY_JUDGED = "safety_judged.json"


class RebuildConfig(Section):
    """When to retry, re-check and refetch, and how to name releases ([rebuild] in the TOML)."""

    retry_after_hours: float = Field(default=24.0, ge=0.0)
    """Transient failures (timeout, connection_error, http_408/429/5xx) are fetched
    again by the first rebuild at least this long after the failure."""
    max_attempts: int = Field(default=5, ge=1)
    """Give up on a URL after this many transient failures in a row."""
    recheck_optout_days: float | None = Field(default=30.0, ge=0.0)
    """Re-check the opt-out signals (X-Robots-Tag, TDMRep, robots.txt, the page's meta
    robots) of released samples last checked longer ago than this. None (`false` in
    TOML): never."""
    recheck_threads: int = Field(default=16, ge=1, le=1024)
    refetch_after_days: float | None = Field(default=None, ge=0.0)
    """Fetch records again (pages and images) after this long, to catch changed licences
    and captions; None: a record fetched successfully is never fetched again."""
    takedown_radius: int = Field(default=DEFAULT_RADIUS, ge=0, le=32)
    """pHash bits within which near copies of takedowns and removals are dropped."""
    release_name: str = "{name}-r{gen:04d}"
    """Release name per generation; fields: name ([run] name), gen, date (YYYYMMDD)."""
    publish_unchanged: bool = False
    """Publish a release even when nothing was added, removed or changed."""
    report: bool = True
    """Write the HTML run report of the generation's new work (`gen-NNNN/report.html`)."""

    @field_validator("release_name")
    @classmethod
    def _name(cls, v: str) -> str:
        try:
            out = v.format(name="x", gen=1, date="20260101")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"bad release_name template {v!r}: {e}") from None
        if "{gen" not in v:
            raise ValueError("release_name must contain {gen} (one release per generation)")
        if "/" in out or out.startswith("."):
            raise ValueError(f"release_name {v!r} gives a bad directory name {out!r}")
        return v

    @field_validator("recheck_optout_days", "refetch_after_days", mode="before")
    @classmethod
    def _false_is_never(cls, v: object) -> object:
        """TOML has no null: `false` means never (pydantic would read it as 0 = always)."""
        if v is False:
            return None
        if v is True:
            raise ValueError("a number of days, or false for never")
        return v


class RebuildLocked(RuntimeError):
    """Another rebuild of the same work directory holds the lock."""

    def __init__(self, path: Path, pid: str | None) -> None:
        who = f"pid {pid}" if pid else "a process whose pid is not recorded yet"
        super().__init__(
            f"another rebuild of this dataset is running: {path} is locked by {who}; "
            "wait for it to finish (the lock is released when that process exits)"
        )
        self.path = path
        self.pid = pid


@contextmanager
def rebuild_lock(work_dir: str | Path) -> Iterator[Path]:
    """One rebuild per work directory (`fcntl.flock`; the kernel releases it if we die)."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 64, 0).decode(errors="replace").strip() or None
            raise RebuildLocked(path, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- config


def load_rebuild_config(path: str | Path) -> tuple[PipelineConfig, RebuildConfig]:
    """The pipeline config plus its `[rebuild]` table (validated like every section)."""
    from ccurate.config import load_config

    cfg = load_config(path)
    return cfg, cfg.rebuild


# --------------------------------------------------------------------------- generations


@dataclass
class Generation:
    number: int
    dir: Path
    started_at: float
    release_name: str

    @property
    def done(self) -> bool:
        return (self.dir / GEN_DONE).exists()

    def step(self, name: str) -> Path:
        return self.dir / name

    def info(self) -> dict[str, Any]:
        p = self.dir / "rebuild.json"
        return json.loads(p.read_text()) if p.exists() else {}


def generations(work_dir: str | Path) -> list[Generation]:
    """Every generation with its metadata, oldest first."""
    out = []
    for d in sorted(Path(work_dir).glob("gen-[0-9][0-9][0-9][0-9]")):  # none: no folder yet
        meta = d / GEN_META
        if not meta.exists():
            continue
        m = json.loads(meta.read_text())
        out.append(Generation(int(m["generation"]), d, float(m["started_at"]), m["release"]))
    return out


def _open_generation(
    work: Path, cfg: PipelineConfig, rcfg: RebuildConfig, now: float
) -> tuple[Generation, Generation | None]:
    """(this generation, the last finished one): resume an unfinished one or start the next."""
    gens = generations(work)
    done = [g for g in gens if g.done]
    prev = done[-1] if done else None
    if gens and not gens[-1].done:
        gen = gens[-1]
        log.info("resuming unfinished generation %s", gen.dir.name)
        return gen, prev
    n = gens[-1].number + 1 if gens else 1
    d = work / GEN_FMT.format(n)
    if d.exists():  # a generation that died before writing its metadata
        shutil.rmtree(d)
    d.mkdir(parents=True)
    date = datetime.fromtimestamp(now, UTC).strftime("%Y%m%d")
    name = rcfg.release_name.format(name=cfg.run.name, gen=n, date=date)
    snapshot = d / "takedowns.jsonl"
    entries = TakedownList(cfg.run.catalog).load()  # validated: a bad list stops here
    with open(snapshot, "w", encoding="utf-8") as fh:  # load_entries reads UTF-8
        for e in entries:
            fh.write(e.model_dump_json(exclude_none=True) + "\n")
    write_json_atomic(d / GEN_META, {"generation": n, "started_at": now, "release": name})
    return Generation(n, d, now, name), prev


# --------------------------------------------------------------------------- planning

PLAN_MARKER = "_PLANNED"


def _write_parts(out: Path, tables: Iterator[pa.Table], size: int) -> list[str]:
    """Re-chunk record tables into `part-NNNNN` partitions with `.done` markers."""
    parts: list[str] = []
    buf: list[pa.Table] = []
    n = 0

    def flush() -> None:
        nonlocal buf, n
        if not n:
            return
        t = pa.concat_tables(buf, promote_options="permissive")
        prefix = out / f"part-{len(parts):05d}"
        for lo in range(0, t.num_rows, size):
            chunk = t.slice(lo, size)
            prefix = out / f"part-{len(parts):05d}"
            write_table_atomic(f"{prefix}.parquet", chunk)
            stats = StageStats("plan", n_in=chunk.num_rows, n_kept=chunk.num_rows, shards=1)
            write_json_atomic(f"{prefix}.done", stats.to_json())
            parts.append(str(prefix))
        buf, n = [], 0

    for t in tables:
        if t.num_rows == 0:
            continue
        buf.append(t)
        n += t.num_rows
        if n >= size:
            flush()
    flush()
    return parts


def _set_dropped(t: pa.Table, reason: str, by: str) -> pa.Table:
    n = t.num_rows
    for name, value in (("status", "dropped"), ("drop_reason", reason), ("dropped_by", by)):
        col = pa.array([value] * n, pa.string())
        if name in t.column_names:
            t = t.set_column(t.column_names.index(name), name, col)
        else:
            t = t.append_column(name, col)
    return t


def never_fetch(block: Blocklist) -> Blocklist:
    """What a rebuild never requests: taken-down URLs, pages and domains, removed keys
    (hash and pHash entries need the image, so they apply after the fetch)."""
    return Blocklist(urls=block.urls, pages=block.pages, domains=block.domains, keys=block.keys)


def plan_generation(
    cfg: PipelineConfig,
    rcfg: RebuildConfig,
    gen: Generation,
    prev: Generation | None,
    ledger: Ledger,
    block: Blocklist,
    now: float,
    retry_reasons: frozenset[str] = frozenset(),
) -> tuple[list[str], dict[str, Any]]:
    """This generation's partitions to fetch, and the counts behind the choice.

    From the full source plan: keys never attempted, transient failures whose
    retry is due, records due a refetch, records last dropped for one of
    `retry_reasons` (`--retry-reason`); plus the pending retries of image
    records found on pages (`retry.parquet` of the last generation) and, for
    `retry_reasons`, the dropped image records of the generations still on disk.
    Removed keys are skipped; records matching a URL, page or domain takedown are
    not fetched at all (dropped here as `takedown`).
    """
    from ccurate.ingest.sources import PLANNED_DROPPED, plan_sources

    out = gen.step("00_plan")
    marker = out / PLAN_MARKER
    if marker.exists():
        m = json.loads(marker.read_text())
        return [str(out / p) for p in m["partitions"]], m["counts"]
    out.mkdir(parents=True, exist_ok=True)
    from ccurate.pipeline import PipelineError

    try:  # a missing or unreadable list is a "cannot run" (exit 3), as in `ccurate ingest`
        full = plan_sources(list(cfg.sources), gen.step("00_sources"), cfg.run.partition_size)
    except ValueError as err:
        raise PipelineError(str(err)) from None
    url_block = never_fetch(block)
    counts: Counter[str] = Counter()
    dropped: list[pa.Table] = []
    planned_keys: set[str] = set()

    def select(t: pa.Table, origin: str) -> pa.Table:
        idx = ledger.find(t.column("key"))
        new, retry, waiting, refetch = fetch_due(ledger, idx, rcfg, now)
        again = asked_again(ledger, idx, retry_reasons) & ~(new | retry | refetch)
        if planned_keys:
            again &= np.array([k not in planned_keys for k in t.column("key").to_pylist()], bool)
        counts[f"{origin}_records"] += t.num_rows
        counts["new"] += int(new.sum())
        counts["retry_due"] += int(retry.sum())
        counts["retry_waiting_or_given_up"] += int(waiting.sum())
        counts["refetch_due"] += int(refetch.sum())
        counts["retry_reason"] += int(again.sum())
        take = new | retry | refetch | again
        counts["already_done"] += int((~take & ~waiting).sum())
        if planned_keys:
            seen = np.array([k in planned_keys for k in t.column("key").to_pylist()], bool)
            take &= ~seen
        t = t.filter(pa.array(take))
        if t.num_rows == 0 or not len(url_block):
            return t
        hits = match_index(t.select([c for c in MATCH_COLUMNS if c in t.column_names]), url_block)
        if not hits.num_rows:
            return t
        blocked = pc.is_in(t.column("key"), value_set=hits.column("key"))
        gone = t.filter(blocked)
        removed = np.array([k in block.keys for k in gone.column("key").to_pylist()], bool)
        counts["removed_skipped"] += int(removed.sum())
        counts["takedown_not_fetched"] += int((~removed).sum())
        if (~removed).any():
            dropped.append(_set_dropped(gone.filter(pa.array(~removed)), "takedown", "takedown"))
        return t.filter(pc.invert(blocked))

    def source_tables() -> Iterator[pa.Table]:
        for prefix in full:
            t = select(pq.read_table(f"{prefix}.parquet"), "source")
            planned_keys.update(t.column("key").to_pylist())
            yield t
        if prev is not None and (prev.dir / "retry.parquet").exists():
            t = pq.read_table(prev.dir / "retry.parquet")
            t = select(t, "pending_retry")
            planned_keys.update(t.column("key").to_pylist())
            yield t
        asked = dropped_records(generations(gen.dir.parent), retry_reasons)
        if asked is not None:
            t = select(asked, "dropped_record")
            planned_keys.update(t.column("key").to_pylist())
            yield t

    parts = _write_parts(out, source_tables(), cfg.run.partition_size)
    # plan-level drops of keys never seen before (bad_url, duplicate_url...), and takedowns
    src_drops = gen.step("00_sources") / PLANNED_DROPPED
    if src_drops.exists():
        t = pq.read_table(src_drops)
        if t.num_rows:
            t = t.filter(pa.array(ledger.find(t.column("key")) < 0))
            dropped.insert(0, t)
    drop_table = (
        pa.concat_tables(dropped, promote_options="permissive") if dropped else samples_to_table([])
    )
    write_table_atomic(out / PLANNED_DROPPED, drop_table)
    counts["planned"] = sum(pq.read_metadata(f"{p}.parquet").num_rows for p in parts)
    if retry_reasons:
        everywhere = asked_again(ledger, np.arange(len(ledger)), retry_reasons)
        lost = int(everywhere.sum()) - counts["retry_reason"]
        if lost > 0:
            counts["retry_reason_without_record"] = lost
            log.warning(
                "%d keys last dropped as %s have no record left to fetch again (no source "
                "lists them and the generation that fetched them was deleted): set "
                "refetch_after_days for one rebuild to fetch their pages again",
                lost,
                "/".join(sorted(retry_reasons)),
            )
    counts["plan_dropped"] = drop_table.num_rows
    result = dict(sorted(counts.items()))
    write_json_atomic(marker, {"partitions": [Path(p).name for p in parts], "counts": result})
    return parts, result


# --------------------------------------------------------------------------- opt-out re-check


def _recheck(
    executor: Executor,
    cfg: PipelineConfig,
    rcfg: RebuildConfig,
    gen: Generation,
    old_inputs: list[str],
    ledger: Ledger,
    skip: set[str],
    now: float,
    block: Blocklist | None = None,
) -> tuple[dict[str, str], list[str], dict[str, int]]:
    """(opted-out key -> reason, keys seen allowing us, counts) for released samples due.

    Not re-checked: `skip` (fetched in this generation) and what `block` matches (the gate
    removes it anyway, and a taken-down URL, page or host is not requested again)."""
    from ccurate.optout_recheck import OptoutRecheckStage

    counts: Counter[str] = Counter()
    if rcfg.recheck_optout_days is None or not old_inputs:
        return {}, [], {}
    base = gen.step(RECHECK)
    marker = base / "in" / PLAN_MARKER
    if marker.exists():  # resumed: the same parts, and the due counts of the first try
        m = json.loads(marker.read_text())
        parts = [str(base / "in" / p) for p in m["partitions"]]
        counts.update(m.get("counts", {}))
    else:
        idx_cols = ["key", "url", "page_url"]
        if block is not None and len(block):
            hits = match_index(read_index(old_inputs, MATCH_COLUMNS), block, rcfg.takedown_radius)
            blocked = set(hits.column("key").to_pylist()) - skip
            if blocked:
                counts["takedown_not_checked"] = len(blocked)
                skip = skip | blocked

        def due_tables() -> Iterator[pa.Table]:
            for p in old_inputs:
                t = pq.read_table(f"{p}.parquet", columns=idx_cols)
                rows = ledger.find(t.column("key"))
                checked = np.where(
                    rows >= 0, ledger.checked_at[np.maximum(rows, 0)] if len(ledger) else 0.0, 0.0
                )
                due = checked <= now - rcfg.recheck_optout_days * 86400.0  # type: ignore[operator]
                if skip:
                    due &= np.array([k not in skip for k in t.column("key").to_pylist()], bool)
                counts["due"] += int(due.sum())
                counts["not_due"] += int((~due).sum())
                yield t.filter(pa.array(due))

        (base / "in").mkdir(parents=True, exist_ok=True)
        parts = _write_parts(base / "in", due_tables(), max(1, cfg.run.partition_size))
        write_json_atomic(
            marker, {"partitions": [Path(p).name for p in parts], "counts": dict(counts)}
        )
    if not parts:
        return {}, [], dict(counts)
    out_dir = base / "out"
    tasks = [ShardTask(p, str(out_dir / Path(p).name)) for p in parts]
    stats = executor.map(
        OptoutRecheckStage(
            cfg.ingest, rcfg.recheck_threads, never_fetch(block) if block is not None else None
        ),
        tasks,
        label="optout recheck",
    )
    counts["checked"] = stats.n_in
    optouts: dict[str, str] = {}
    ok: list[str] = []
    for t in tasks:
        d = pq.read_table(f"{t.dst}.dropped.parquet", columns=["key", "drop_reason"])
        for k, r in zip(
            d.column("key").to_pylist(), d.column("drop_reason").to_pylist(), strict=True
        ):
            optouts[k] = r
            counts[r] += 1
        kept = pq.read_table(f"{t.dst}.parquet")
        if "optout_recheck" in kept.column_names:
            for k, o in zip(
                kept.column("key").to_pylist(),
                kept.column("optout_recheck").to_pylist(),
                strict=True,
            ):
                counts[f"result_{(o or 'ok').split(':')[0]}"] += 1
                if o is None or not o.startswith("transient"):
                    ok.append(k)
    return optouts, ok, dict(counts)


# --------------------------------------------------------------------------- the rebuild


@dataclass
class RebuildResult:
    generation: int
    dir: Path
    release: Path | None
    info: dict[str, Any]


def _gen_pipeline(
    cfg: PipelineConfig, gen: Generation, executor: Executor, previous_ref: Path | None
) -> Pipeline:
    from ccurate.pipeline import Pipeline

    g = cfg.model_copy(deep=True)
    g.run.work_dir = str(gen.dir)
    g.run.catalog_dir = str(cfg.run.catalog)
    g.run.train_dir = str(cfg.run.train_out)
    if previous_ref is not None:
        g.dedup.previous = [*cfg.dedup.previous, str(previous_ref)]
        g.dedup.previous_own_key_kept = True
    return Pipeline(g, executor)


# dhash: dedup's default `verify = "dhash"` matches a row without one only within pHash 4,
# so crops of released images would come back (older release inputs without it: nulls)
PREVIOUS_COLUMNS = ["key", "sha256", "pixel_sha256", "phash", "dhash"]


def _previous_reference(
    gen: Generation, old_inputs: list[str], policy: dict[str, tuple[str, str]]
) -> Path | None:
    """Dedup's `previous`: what stays released after this generation, as far as the filter
    step knows (written once, after the filter step).

    The rule is the gate's (`old_record_fate`, then `policy`: `policy_withdrawals`): a
    released record whose refetch failed stays (and keeps its hashes here, so a new copy
    of it is a duplicate); one that a filter, an opt-out or the licence policy now in
    force withdraws leaves (a new copy under an admitted licence is then released, not
    dropped as the duplicate of a withdrawn one); one whose fresh record passed the filter
    is listed with the fresh hashes under its own key, which dedup does not count as a
    copy of itself (`previous_own_key_kept`): a new copy elsewhere is dropped as its
    duplicate instead of replacing a long-released sample. A released record the gate's
    safety re-judgement drops (`SafetyRejudge`, after dedup) stays listed: its new copies
    were judged by the same safety settings here, and at worst a near copy the filter
    passes is not released in its stead (never an unsafe one released)."""
    if not old_inputs:
        return None
    path = gen.dir / "previous.parquet"
    if path.exists():
        return path
    t = read_index(old_inputs, PREVIOUS_COLUMNS)
    outcomes = fetch_outcomes(gen, through="20_filter")
    fates = {k: old_record_fate(*v) for k, v in outcomes.items()}
    gone = [k for k, f in fates.items() if f is not None]
    gone += [k for k in policy if k not in fates or fates[k] is None]  # as the gate does
    if gone:
        t = t.filter(pc.invert(pc.is_in(t.column("key"), value_set=pa.array(gone, pa.string()))))
    fresh = [f"{p}" for p in list_shards(gen.step("20_filter"))]
    if fresh:
        again = read_index(fresh, PREVIOUS_COLUMNS)
        released = read_index(old_inputs, ["key"]).column("key")
        t = pa.concat_tables([t, again.filter(pc.is_in(again.column("key"), value_set=released))])
    write_table_atomic(path, t)
    return path


PREGATE = "35_pregate"


class _WithholdStage(Stage):
    """`inner` (the caption stage) never sees the samples the decisions list (takedown and
    removal matches): they pass through uncaptioned, and the gate drops them as before."""

    name: ClassVar[str] = "caption"
    preserves_keys: ClassVar[bool] = True

    def __init__(self, inner: Stage, decisions_path: str) -> None:
        self.inner = inner
        self.decisions_path = decisions_path
        self.batch_size = inner.batch_size
        self._withheld: set[str] | None = None

    @property
    def resources(self) -> Resources:
        return self.inner.resources

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_withheld": None}

    def prepare(self, inputs: list[str], scratch_dir: str) -> None:
        self.inner.prepare(inputs, scratch_dir)

    def setup(self) -> None:
        keys = pq.read_table(self.decisions_path, columns=["key"]).column("key").to_pylist()
        self._withheld = set(keys)
        self.inner.setup()
        self.batch_size = self.inner.batch_size

    def teardown(self) -> None:
        self.inner.teardown()
        self._withheld = None

    def checkpoint(self) -> None:
        self.inner.checkpoint()

    def process(self, batch: list[Sample]) -> list[Sample]:
        if self._withheld is None:
            self.setup()
        assert self._withheld is not None
        held = [s for s in batch if s.key in self._withheld]
        if not held:
            return self.inner.process(batch)
        out = self.inner.process([s for s in batch if s.key not in self._withheld])
        return [*out, *held]

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


def _caption(pipe: Pipeline, gen: Generation, block: Blocklist, radius: int) -> None:
    """The caption step, withholding from the model what the takedown list and the removals
    match by key, URL, page, domain, hash or pHash (near copies included), decided once on
    dedup's output: no GPU time or cache entry for what the gate is bound to drop."""
    from ccurate.captioning.stage import CaptionStage

    path = gen.step(PREGATE) / "decisions.parquet"
    if not path.exists():
        inputs = [str(p) for p in list_shards(gen.step("30_dedup"))]
        hits = match_index(read_index(inputs, MATCH_COLUMNS), block, radius)
        table = hits.append_column("scope", pa.array(["all"] * hits.num_rows, pa.string()))
        write_table_atomic(path, table.cast(GATE_SCHEMA))
    stage = _WithholdStage(CaptionStage(_caption_config(pipe.cfg)), str(path))
    pipe.map_step("caption", stage, pipe.finished_inputs("caption"))


def _caption_config(cfg: PipelineConfig) -> CaptionConfig:
    """[caption] as Pipeline.caption sets it up (the cache in the catalog folder by default)."""
    cap = cfg.caption
    if cap.cache_dir is None:
        cap = cap.model_copy(update={"cache_dir": str(cfg.run.catalog / "caption_cache")})
    return cap


def _map_gate(
    executor: Executor,
    gen: Generation,
    decisions: Path,
    old: list[str],
    new: list[str],
    rejudge: SafetyRejudge | None = None,
    stale: frozenset[str] = frozenset(),
) -> StageStats:
    """The gate over old and new shards; `rejudge` judges the old shards named in `stale`
    again (`_safety_judged`)."""
    out = gen.step(RELEASE_INPUT)
    out.mkdir(parents=True, exist_ok=True)
    total = StageStats("takedown")
    old_tasks = [ShardTask(p, str(out / Path(p).name)) for p in old]
    new_tasks = [ShardTask(p, str(out / f"g{gen.number:04d}-{Path(p).name}")) for p in new]
    again = [t for t in old_tasks if Path(t.src).name in stale]
    for tasks, stage in (
        ([t for t in old_tasks if t not in again], ReleaseGateStage(str(decisions), True)),
        (again, ReleaseGateStage(str(decisions), True, rejudge)),
        (new_tasks, ReleaseGateStage(str(decisions), False)),
    ):
        if tasks:
            total.add(executor.map(stage, tasks, label="takedown"))
    write_json_atomic(out / "_COMPLETE", {"shards": len(old) + len(new), "stats": total.to_json()})
    return total


def safety_digest(section: dict[str, Any], store_revision: int | None = None) -> str:
    """Digest of the [filters.safety] settings that judge a record (`_judging`), with the
    revision of its storing rules (`SAFETY_STORE_REVISION`) only where the stored bytes may
    be files kept as downloaded (`[ingest] keep_original`): ingest's own encode holds no
    metadata and one frame, which every revision stores alike, so a default configuration
    judges nothing again when the rules change (a pass of NudeNet over the whole release)."""
    from ccurate.filters.safety import SafetyConfig

    # a setting this version added is at its default in the settings an earlier one
    # recorded: the same judgement, not a change (nor a pass over the whole release)
    full = {**SafetyConfig().model_dump(mode="json"), **section}
    digest = _json_digest(_judging(full))
    return digest if store_revision is None else f"{digest}/r{store_revision}"


def current_safety_digest(cfg: PipelineConfig) -> str:
    """`safety_digest` of the settings and storing rules this run judges under."""
    revision = SAFETY_STORE_REVISION if cfg.ingest.keep_original else None
    return safety_digest(cfg.filters.safety.model_dump(mode="json"), revision)


def _safety_judged(work: Path, prev: Generation | None, old_inputs: list[str]) -> dict[str, str]:
    """Release-input shard name -> `safety_digest` its samples were judged under ("" unknown:
    the generation that judged them is gone): the last generation's `safety_judged.json`,
    else (a generation from before it was written) the filter settings of the generation
    that made the shard, whose files kept as downloaded were stored under revision 1 of the
    storing rules (`SAFETY_STORE_REVISION`)."""
    known: dict[str, str] = {}
    if prev is not None and (prev.dir / SAFETY_JUDGED).exists():
        known = json.loads((prev.dir / SAFETY_JUDGED).read_text())
    out: dict[str, str] = {}
    for p in old_inputs:
        name = Path(p).name
        if name not in known and name[:1] == "g" and name[1:5].isdigit():
            made = work / GEN_FMT.format(int(name[1:5])) / "20_filter" / "_SETTINGS"
            if made.exists():
                settings = json.loads(made.read_text())
                section = settings.get("filters", {}).get("safety")
                kept = bool((settings.get("ingest") or {}).get("keep_original"))
                known[name] = (
                    safety_digest(section, 1 if kept else None) if isinstance(section, dict) else ""
                )
        out[name] = known.get(name, "")
    return out


def rejudge_cause(judged: str, now: str) -> str | None:
    """Why a shard judged under digest `judged` is judged again under `now` (a key of
    `REJUDGE_CAUSES`), None when it need not be."""
    if judged == now:
        return None
    if not judged:
        return "unknown"
    if judged.split("/")[0] != now.split("/")[0]:
        return "settings"
    return "storing_rules"


def _rejudged_counts(
    gen: Generation, stale: dict[str, str], old_inputs: list[str], blur: bool
) -> dict[str, Any]:
    """What judging the `stale` shards (name -> cause) again did, read back from the gate's
    output: samples judged (by cause), dropped by reason, images whose faces this judgement
    blurred (`blur`: their `safety.faces_blurred` grew over the released record's), and
    what became of the captions made from their unblurred pixels."""
    out = gen.step(RELEASE_INPUT)
    source = {Path(p).name: p for p in old_inputs}
    counts: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    because: Counter[str] = Counter()
    for name, cause in sorted(stale.items()):
        side = out / f"{name}.dropped.parquet"
        judged = 0
        if side.exists():
            d = pq.read_table(side, columns=["drop_reason", "dropped_by"]).to_pylist()
            mine = [r["drop_reason"] for r in d if r["dropped_by"] == "safety"]
            dropped.update(mine)
            judged += len(mine)
        kept = pq.read_table(out / f"{name}.parquet", columns=["key", "scores", "caption_model"])
        judged += kept.num_rows
        because[cause] += judged
        counts["judged"] += judged
        if not blur or name not in source:
            continue
        was = pq.read_table(f"{source[name]}.parquet", columns=["key", "scores"]).to_pylist()
        before = {r["key"]: dict(r["scores"] or []).get("safety.faces_blurred", 0.0) for r in was}
        for r in kept.to_pylist():
            now = dict(r["scores"] or []).get("safety.faces_blurred", 0.0)
            if now > before.get(r["key"], 0.0):
                counts["faces_blurred"] += 1
                counts["captioned_again" if r["caption_model"] else "without_caption"] += 1
    return {
        "shards": len(stale),
        **{k: counts[k] for k in ("judged", "faces_blurred", "captioned_again")},
        "blurred_without_caption": counts["without_caption"],
        "dropped": dict(sorted(dropped.items())),
        "because": dict(sorted(because.items())),
    }


def _removal_path(gen: Generation, catalog: Path) -> Path:
    stamp = datetime.fromtimestamp(gen.started_at, UTC).strftime("%Y%m%dT%H%M%S")
    return catalog / REMOVALS_DIR / f"{stamp}-{gen.dir.name}.parquet"


def _removals_from_gate(gen: Generation, catalog: Path) -> Path | None:
    """Persist what the gate removed for a takedown or an opt-out (never to come back)."""
    files = sorted(gen.step(RELEASE_INPUT).glob("*.dropped.parquet"))
    rows = []
    for f in files:
        t = pq.read_table(f)
        for r in t.to_pylist():
            reason = r.get("drop_reason") or ""
            if reason == "takedown" or reason.startswith("optout_"):
                rows.append(
                    {
                        "key": r["key"],
                        "url": r.get("url"),
                        "page_url": r.get("page_url"),
                        "sha256": r.get("sha256"),
                        "pixel_sha256": r.get("pixel_sha256"),
                        "phash": r.get("phash"),
                        "reason": reason,
                        "detail": r.get("removed_because"),
                        "generation": gen.number,
                        "removed_at": datetime.fromtimestamp(gen.started_at, UTC).isoformat(),
                    }
                )
    path = _removal_path(gen, catalog)
    if not rows:
        return None
    write_removals(path, pa.Table.from_pylist(rows, schema=REMOVAL_SCHEMA))
    return path


def rebuild(
    cfg: PipelineConfig,
    rcfg: RebuildConfig | None = None,
    executor: Executor | None = None,
    now: float | None = None,
    retry_reasons: frozenset[str] = frozenset(),
) -> RebuildResult:
    """Run one incremental rebuild (see the module doc). Raises `RebuildLocked` when another
    rebuild of the same work directory is running, `PipelineError` when nothing can run.
    `retry_reasons`: ingest drop reasons whose records are fetched again (a new generation
    only: a resumed one keeps its plan)."""
    from ccurate.executor import LocalExecutor
    from ccurate.pipeline import PipelineError

    rcfg = rcfg or RebuildConfig()
    executor = executor or LocalExecutor(cfg.run.workers)
    work = Path(cfg.run.work_dir)
    if not cfg.sources:
        raise PipelineError("no [[sources]] configured: nothing to rebuild from")
    with rebuild_lock(work):
        now = time.time() if now is None else now
        gen, prev = _open_generation(work, cfg, rcfg, now)
        now = gen.started_at  # a resumed generation keeps its clock: same plan, same answers
        return _run_generation(cfg, rcfg, executor, gen, prev, now, retry_reasons)


def _run_generation(
    cfg: PipelineConfig,
    rcfg: RebuildConfig,
    executor: Executor,
    gen: Generation,
    prev: Generation | None,
    now: float,
    retry_reasons: frozenset[str] = frozenset(),
) -> RebuildResult:
    t0 = time.perf_counter()
    catalog = Path(cfg.run.catalog)
    entries = load_entries(gen.dir / "takedowns.jsonl")
    this_removals = [_removal_path(gen, catalog)]
    removals = load_removals(catalog, exclude=this_removals)
    ledger = Ledger.load(prev)
    block = Blocklist()
    block.add_entries(entries, rcfg.takedown_radius)
    block.add_removals(removals, rcfg.takedown_radius)

    # 1. plan and the pipeline on the new work only
    planned, plan_counts = plan_generation(cfg, rcfg, gen, prev, ledger, block, now, retry_reasons)
    old_inputs = [str(p) for p in list_shards(prev.step(RELEASE_INPUT))] if prev else []
    # released records the licence policy in force withdraws: one set for the gate and
    # dedup's `previous`, so an image is never withdrawn and its admitted copy deduped away
    policy = policy_withdrawals(old_inputs, cfg.filters.license)
    steps: dict[str, Any] = {}
    pipe = None
    if planned:
        from ccurate.ingest.stage import IngestStage

        pipe = _gen_pipeline(cfg, gen, executor, None)
        if not (gen.step("10_ingest") / "_COMPLETE").exists():
            pipe.map_step("ingest", IngestStage(cfg.ingest, never_fetch(block)), planned)
        pipe.filter()
        ref = _previous_reference(gen, old_inputs, policy)  # needs the filter's verdicts
        done = pipe.results
        pipe = _gen_pipeline(cfg, gen, executor, ref)
        pipe.results.extend(done)
        pipe.dedup()
        _caption(pipe, gen, block, rcfg.takedown_radius)
        pipe.write_summary()
        if rcfg.report:
            from ccurate.report import write_report

            write_report(gen.dir)
        steps = {r.step: r.to_json() for r in pipe.results}
        ing = gen.step("10_ingest") / "_COMPLETE"
        if ing.exists():
            steps = {"ingest": json.loads(ing.read_text())["stats"], **steps}
    new_inputs = [str(p) for p in list_shards(gen.step("40_caption"))] if planned else []

    # 2. opt-out re-check of released samples, then the gate over everything
    outcomes = fetch_outcomes(gen) if planned else {}
    superseded = superseded_keys(old_inputs, outcomes)
    optouts, rechecked_ok, recheck_counts = _recheck(
        executor, cfg, rcfg, gen, old_inputs, ledger, set(outcomes), now, block
    )
    last_release = _last_release(gen.dir.parent, gen)
    decisions_path = gen.step("50_gate") / "decisions.parquet"
    if decisions_path.exists():
        decisions = pq.read_table(decisions_path)
    else:
        dup_files = sorted(str(p) for p in gen.step("30_dedup").glob("*.dropped.parquet"))
        decisions = gate_decisions(
            decisions_path,
            old_inputs,
            new_inputs,
            entries,
            removals,
            optouts,
            superseded,
            dropped_duplicates(catalog, dup_files),
            rcfg.takedown_radius,
            released_hashes(last_release),
            policy,
        )
    # released samples judged under other safety settings or storing rules (or unknown
    # ones: the generation that judged them was deleted) are judged again by the gate
    safety = cfg.filters.safety
    now_safety = current_safety_digest(cfg)
    judged_by = _safety_judged(gen.dir.parent, prev, old_inputs)
    causes = {n: rejudge_cause(d, now_safety) for n, d in judged_by.items()}
    stale = {n: c for n, c in causes.items() if c is not None and safety.enabled}
    rejudge = SafetyRejudge(safety, _caption_config(cfg)) if stale else None
    gate_stats = _map_gate(
        executor, gen, decisions_path, old_inputs, new_inputs, rejudge, frozenset(stale)
    )
    safety_counts = _rejudged_counts(gen, stale, old_inputs, safety.blur_faces)
    if safety_counts["judged"]:
        log.warning("%s", rejudged_summary(safety_counts))
    removal_path = _removals_from_gate(gen, catalog)

    # 3. diff, release, catalog, ledger
    release_inputs = [str(p) for p in list_shards(gen.step(RELEASE_INPUT))]
    gate_dropped = sorted(str(p) for p in gen.step(RELEASE_INPUT).glob("*.dropped.parquet"))
    diff = diff_release_inputs(
        old_inputs,
        release_inputs,
        gate_dropped,
        prev.dir / "ledger.parquet" if prev else None,
        gen.dir,
    )
    # a judgement made again changes no field the diff compares, but may change the stored
    # bytes (faces blurred, a file kept as downloaded re-encoded): a release without it
    # would leave the latest release holding what the safety filter has not judged
    changed = bool(diff["added"] or diff["removed"] or diff["changed"] or safety_counts["judged"])
    digest = settings_digest(cfg)
    judged = _judged_settings(gen, digest, release_inputs, safety_counts["judged"])
    judged["safety_judged_again"] = safety_counts
    names = [Path(p).name for p in release_inputs]  # new shards: judged by this generation
    write_json_atomic(
        gen.dir / SAFETY_JUDGED,
        {n: now_safety if n in stale else judged_by.get(n, now_safety) for n in names},
    )
    release: Path | None = None
    if changed or last_release is None or rcfg.publish_unchanged:
        release = _publish(
            cfg,
            gen,
            release_inputs,
            _gen_dropped(gen),
            steps,
            diff,
            decisions.num_rows,
            judged,
            _replaced(gen, release_inputs, superseded),
        )
    _record_catalog(cfg, gen, release_inputs, _gen_dropped(gen), release)
    update_ledger(gen, prev, ledger, planned, rechecked_ok, now, rcfg.max_attempts)
    info = {
        "generation": gen.number,
        "started_at": datetime.fromtimestamp(gen.started_at, UTC).isoformat(),
        "seconds": round(time.perf_counter() - t0, 3),
        "plan": plan_counts,
        "fetched_records": int(steps.get("ingest", {}).get("in", 0)),
        "steps": steps,
        "recheck": recheck_counts,
        "settings_digest": digest,
        "settings": judged,
        "gate": gate_stats.to_json(),
        "removals_file": str(removal_path) if removal_path else None,
        "diff": {k: v for k, v in diff.items() if k != "examples"},
        "release": str(release) if release else None,
        "release_name": gen.release_name if release else None,
        "latest_release": str(release or last_release) if (release or last_release) else None,
        "published": release is not None,
    }
    write_json_atomic(gen.dir / "rebuild.json", info)
    write_json_atomic(gen.dir / GEN_DONE, {"finished_at": time.time()})
    log.info("rebuild %s done: %s", gen.dir.name, info["diff"])
    return RebuildResult(gen.number, gen.dir, release, info)


def _judging(section: dict[str, Any]) -> dict[str, Any]:
    """A settings table without its operational keys; a disabled one is just `enabled`."""
    if section.get("enabled") is False:
        return {"enabled": False}
    return {
        k: _judging(v) if isinstance(v, dict) else v
        for k, v in section.items()
        if k not in PERF_KEYS
    }


def settings_digest(cfg: PipelineConfig) -> str:
    """Digest of the settings that judge a record (filters, captioning): thread counts,
    devices and batch sizes, or the thresholds of a filter that is off, change nothing."""
    return _json_digest(
        {
            "filters": _judging(cfg.filters.model_dump(mode="json")),
            "caption": _judging(cfg.caption.model_dump(mode="json")),
        }
    )


def _json_digest(value: Any) -> str:
    """16 hex digits of the SHA-256 of `value` as sorted-key JSON: a settings digest."""
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _judged_settings(
    gen: Generation, digest: str, release_inputs: list[str], safety_again: int
) -> dict[str, Any]:
    """How many released samples were judged under other filter/caption settings than now
    (`safety_again`: how many of the released samples the safety filter judged again).

    A release-input shard keeps the name its generation gave it (`gNNNN-...`), and each
    finished generation records its digest in `rebuild.json`; a generation from before
    digests were recorded counts as unknown."""
    digests = {g.number: g.info().get("settings_digest") for g in generations(gen.dir.parent)}
    digests[gen.number] = digest
    earlier = unknown = 0
    for p in release_inputs:
        name = Path(p).name
        n = pq.read_metadata(f"{p}.parquet").num_rows
        g = int(name[1:5]) if name[:1] == "g" and name[1:5].isdigit() else None
        d = digests.get(g) if g is not None else None
        if d is None:
            unknown += n
        elif d != digest:
            earlier += n
    prev = [d for n, d in sorted(digests.items()) if n < gen.number and d]
    out: dict[str, Any] = {
        "digest": digest,
        "changed_since_last_generation": bool(prev) and prev[-1] != digest,
        "released_under_earlier_settings": earlier,
    }
    if unknown:
        out["released_under_unknown_settings"] = unknown
    if earlier:
        log.warning(
            "filter/caption settings differ from earlier generations': %d released samples "
            "were judged under earlier settings (the licence policy is applied to them again, "
            "%s; other filters and captions only on a refetch: set refetch_after_days)",
            earlier,
            f"the safety filter judged {safety_again} released samples again"
            if safety_again
            else "the safety filter judged none of them again",
        )
    return out


def _replaced(gen: Generation, release_inputs: list[str], superseded: dict[str, str]) -> int:
    """Released samples fetched again whose fresh record is in this release (replaced, not
    dropped: the card says so)."""
    keys = {k for k, v in superseded.items() if v == "superseded"}
    mine = [p for p in release_inputs if Path(p).name.startswith(f"g{gen.number:04d}-")]
    if not keys or not mine:
        return 0
    return sum(k in keys for k in read_index(mine, ["key"]).column("key").to_pylist())


def _last_release(work: Path, current: Generation) -> Path | None:
    for g in reversed(generations(work)):
        if g.number >= current.number or not g.done:
            continue
        rel = g.info().get("release")
        if rel:
            return Path(rel)
    return None


def _gen_dropped(gen: Generation) -> list[str]:
    """This generation's side outputs of dropped records: plan, steps, and the gate."""
    paths = []
    plan_drops = gen.step("00_plan") / "planned-dropped.parquet"
    if plan_drops.exists():
        paths.append(str(plan_drops))
    for step in ("10_ingest", "20_filter", "30_dedup", "40_caption", RELEASE_INPUT):
        paths += sorted(str(p) for p in gen.step(step).glob("*.dropped.parquet"))
    return paths


def _publish(
    cfg: PipelineConfig,
    gen: Generation,
    inputs: list[str],
    dropped: list[str],
    steps: dict[str, Any],
    diff: dict[str, Any],
    n_decisions: int,
    judged: dict[str, Any],
    replaced: int = 0,
) -> Path:
    from ccurate.config import portable_dump
    from ccurate.shards.release import write_release

    run_info = {
        "config": portable_dump(cfg),
        "stages": steps,
        "rebuild": {
            "generation": gen.number,
            "diff": {k: v for k, v in diff.items() if k != "examples"},
            "gate_decisions": n_decisions,
            "replaced": replaced,
            "settings": judged,
        },
        "release_date": datetime.fromtimestamp(gen.started_at, UTC).strftime("%Y-%m-%d"),
    }
    return write_release(
        inputs, dropped, cfg.run.release_dir, cfg.shards, name=gen.release_name, run_info=run_info
    )


def _record_catalog(
    cfg: PipelineConfig,
    gen: Generation,
    inputs: list[str],
    dropped: list[str],
    release: Path | None,
) -> None:
    """Record this generation's delta (its new kept records and every drop), and the release.

    Only the delta: the catalog keeps every sample's latest state, so a rebuild
    costs the catalog what it fetched, not the size of the dataset.
    """
    from ccurate.shards.catalog import Catalog

    mine = [p for p in inputs if Path(p).name.startswith(f"g{gen.number:04d}-")]
    catalog = Catalog(cfg.run.catalog)
    try:
        catalog.record_run(mine, dropped, run_id=gen.release_name)
        if release is not None:
            catalog.record_release(release)
    finally:
        catalog.close()
