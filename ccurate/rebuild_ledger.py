"""The rebuild ledger: per key, what its last fetch gave, when, and after how many tries.

A rebuild plans from it (new keys, retries due, refetches due) instead of fetching
everything again, and writes the next one (`gen-NNNN/ledger.parquet`) with the
transient failures still worth retrying (`retry.parquet`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ccurate.record import samples_to_table
from ccurate.shardio import list_shards, write_table_atomic

if TYPE_CHECKING:
    from ccurate.rebuild import Generation, RebuildConfig

LEDGER_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("outcome", pa.string()),  # ok | dropped | transient
        ("reason", pa.string()),
        ("at", pa.float64()),  # epoch seconds of the last fetch attempt
        ("attempts", pa.int32()),  # fetch attempts so far
        ("checked_at", pa.float64()),  # last time its opt-out signals were seen allowing us
    ]
)


class Ledger:
    """What every key's last fetch gave, looked up vectorised (sorted uint64 keys).

    Keys are 16 hex digits (`make_key`), so 100M keys fit in 800 MB of uint64
    plus their columns; lookups are `np.searchsorted` over a batch.
    """

    def __init__(self, table: pa.Table) -> None:
        from ccurate.filters.hashing import hex_to_u64

        self.table = table
        codes, ok = hex_to_u64(table.column("key"))
        order = np.argsort(codes[ok], kind="stable")
        self.rows = np.flatnonzero(ok)[order]
        self.codes = codes[ok][order]
        self.outcome = np.asarray(table.column("outcome").to_pylist(), dtype=object)
        self.reason = np.asarray(table.column("reason").to_pylist(), dtype=object)
        self.at = np.asarray(table.column("at").fill_null(0).to_numpy(), np.float64)
        self.attempts = np.asarray(table.column("attempts").fill_null(0).to_numpy(), np.int64)
        self.checked_at = np.asarray(table.column("checked_at").fill_null(0).to_numpy(), np.float64)

    @classmethod
    def load(cls, gen: Generation | None) -> Ledger:
        path = gen.dir / "ledger.parquet" if gen is not None else None
        if path is None or not path.exists():
            return cls(LEDGER_SCHEMA.empty_table())
        try:
            table = pq.read_table(path, schema=LEDGER_SCHEMA)
        except (OSError, pa.ArrowException) as e:  # a damaged disk or a hand-made file
            from ccurate.pipeline import PipelineError

            raise PipelineError(
                f"{path}: unreadable ledger ({type(e).__name__}: {e}); the next rebuild "
                "plans from it: restore it from a backup"
            ) from None
        return cls(table)

    def __len__(self) -> int:
        return self.table.num_rows

    def find(self, keys: pa.Array | pa.ChunkedArray | list[str]) -> np.ndarray:
        """Row of each key in the ledger table, -1 when unknown."""
        from ccurate.filters.hashing import hex_to_u64

        codes, ok = hex_to_u64(keys if not isinstance(keys, list) else pa.array(keys, pa.string()))
        if not len(self.codes):
            return np.full(len(codes), -1, np.int64)
        pos = np.clip(np.searchsorted(self.codes, codes), 0, len(self.codes) - 1)
        found = ok & (self.codes[pos] == codes)
        return np.where(found, self.rows[pos], -1)


def fetch_due(
    ledger: Ledger, idx: np.ndarray, rcfg: RebuildConfig, now: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(new, retry due, retry waiting or given up, refetch due) masks for ledger rows `idx`."""
    known = idx >= 0
    safe = np.where(known, idx, 0)
    outcome = ledger.outcome[safe] if len(ledger) else np.array([None] * len(idx), object)
    at = ledger.at[safe] if len(ledger) else np.zeros(len(idx))
    attempts = ledger.attempts[safe] if len(ledger) else np.zeros(len(idx), np.int64)
    transient = known & (outcome == "transient")
    retry_due = (
        transient & (at <= now - rcfg.retry_after_hours * 3600.0) & (attempts < rcfg.max_attempts)
    )
    refetch = np.zeros(len(idx), bool)
    if rcfg.refetch_after_days is not None:
        refetch = known & ~transient & (at <= now - rcfg.refetch_after_days * 86400.0)
    return ~known, retry_due, transient & ~retry_due, refetch


def asked_again(ledger: Ledger, idx: np.ndarray, reasons: frozenset[str]) -> np.ndarray:
    """Mask of ledger rows `idx` whose last fetch was dropped for one of `reasons`: fetched
    again on request (`ccurate rebuild --retry-reason`), e.g. `decode_error` after an
    upgrade that decodes more images."""
    if not reasons or not len(ledger):
        return np.zeros(len(idx), bool)
    safe = np.maximum(idx, 0)
    chosen = np.isin(ledger.reason[safe].astype(str), sorted(reasons))
    return (idx >= 0) & (ledger.outcome[safe] == "dropped") & chosen


def dropped_records(gens: list[Generation], reasons: frozenset[str]) -> pa.Table | None:
    """Ingest records dropped for one of `reasons` in the generations still on disk, newest
    first and one per key, as planned input: an image found on a page is fetched again
    directly, as a transient failure's is (`retry.parquet`), without its page."""
    if not reasons:  # the usual rebuild reads no old generation
        return None
    tables: list[pa.Table] = []
    for gen in reversed(gens):
        d = gen.step("10_ingest")
        for p in sorted(d.glob("*.dropped.parquet")) if d.exists() else []:
            t = pq.read_table(p)
            if not t.num_rows:
                continue
            mask = pc.and_(
                pc.is_in(t.column("drop_reason"), value_set=pa.array(sorted(reasons), pa.string())),
                pc.equal(t.column("dropped_by"), "ingest"),
            )
            t = t.filter(pc.fill_null(mask, False))
            if t.num_rows:
                tables.append(_as_planned(t))
    if not tables:
        return None
    t = pa.concat_tables(tables, promote_options="permissive")
    first: dict[str, int] = {}
    for i, k in enumerate(t.column("key").to_pylist()):
        first.setdefault(k, i)
    return t.take(pa.array(sorted(first.values()), pa.int64()))


FETCH_STEPS = ("10_ingest", "20_filter", "30_dedup", "40_caption")


def fetch_outcomes(
    gen: Generation, through: str = "40_caption"
) -> dict[str, tuple[str, str | None, str | None]]:
    """key -> (final status, reason, dropped_by) of every record this generation fetched.

    `through` stops at an earlier step: its kept records count as `ok` (so far)."""
    out: dict[str, tuple[str, str | None, str | None]] = {}
    for step in FETCH_STEPS[: FETCH_STEPS.index(through) + 1]:
        d = gen.step(step)
        for p in sorted(d.glob("*.dropped.parquet")) if d.exists() else []:
            t = pq.read_table(p, columns=["key", "drop_reason", "dropped_by"])
            for k, r, by in zip(
                t.column("key").to_pylist(),
                t.column("drop_reason").to_pylist(),
                t.column("dropped_by").to_pylist(),
                strict=True,
            ):
                out[k] = ("dropped", r, by)
    for p in list_shards(gen.step(through)):
        for k in pq.read_table(f"{p}.parquet", columns=["key"]).column("key").to_pylist():
            out[k] = ("ok", None, None)
    return out


def ingest_observed(gen: Generation) -> pa.Table:
    """key, url, page_url, drop_reason of every record ingest output in this generation."""
    tables = []
    cols = ["key", "url", "page_url", "drop_reason"]
    d = gen.step("10_ingest")
    for p in list_shards(d):
        t = pq.read_table(f"{p}.parquet", columns=["key", "url", "page_url"])
        tables.append(t.append_column("drop_reason", pa.nulls(t.num_rows, pa.string())))
        t = pq.read_table(f"{p}.dropped.parquet", columns=cols)
        tables.append(t)
    if not tables:
        return pa.schema([(c, pa.string()) for c in cols]).empty_table()
    return pa.concat_tables([t.cast(pa.schema([(c, pa.string()) for c in cols])) for t in tables])


def update_ledger(
    gen: Generation,
    prev: Generation | None,
    ledger: Ledger,
    planned: list[str],
    rechecked_ok: list[str],
    now: float,
    max_attempts: int,
) -> pa.Table:
    """The cumulative ledger after this generation (written to `gen/ledger.parquet`), and the
    transient failures still worth retrying (`gen/retry.parquet`)."""
    from ccurate.ingest.stage import is_transient

    observed = ingest_observed(gen)
    rows: dict[str, tuple[str, str | None]] = {}
    for prefix in planned:  # planned records that produced no record of their own: pages
        for k in pq.read_table(f"{prefix}.parquet", columns=["key"]).column("key").to_pylist():
            rows[k] = ("ok", None)
    for k, r in zip(
        observed.column("key").to_pylist(), observed.column("drop_reason").to_pylist(), strict=True
    ):
        if r is None:
            rows[k] = ("ok", None)
        else:
            rows[k] = ("transient" if is_transient(r) else "dropped", r)
    plan_drops = gen.step("00_plan") / "planned-dropped.parquet"
    if plan_drops.exists():
        t = pq.read_table(plan_drops, columns=["key", "drop_reason"])
        for k, r in zip(
            t.column("key").to_pylist(), t.column("drop_reason").to_pylist(), strict=True
        ):
            rows.setdefault(k, ("dropped", r))
    keys = list(rows)
    idx = ledger.find(keys)
    old_attempts = np.where(idx >= 0, ledger.attempts[np.maximum(idx, 0)] if len(ledger) else 0, 0)
    outcome = [v[0] for v in rows.values()]
    attempts = [
        int(a) + 1 if o == "transient" and i >= 0 and ledger.outcome[i] == "transient" else 1
        for a, o, i in zip(old_attempts.tolist(), outcome, idx.tolist(), strict=True)
    ]
    delta = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "outcome": pa.array(outcome, pa.string()),
            "reason": pa.array([v[1] for v in rows.values()], pa.string()),
            "at": pa.array([gen.started_at] * len(keys), pa.float64()),
            "attempts": pa.array(attempts, pa.int32()),
            "checked_at": pa.array([gen.started_at] * len(keys), pa.float64()),
        },
        schema=LEDGER_SCHEMA,
    )
    old = ledger.table
    if rechecked_ok and old.num_rows:
        checked = pc.is_in(old.column("key"), value_set=pa.array(rechecked_ok, pa.string()))
        old = old.set_column(
            old.column_names.index("checked_at"),
            "checked_at",
            pc.if_else(checked, pa.scalar(now, pa.float64()), old.column("checked_at")),
        )
    if keys and old.num_rows:
        old = old.filter(pc.invert(pc.is_in(old.column("key"), value_set=delta.column("key"))))
    table = pa.concat_tables([old.cast(LEDGER_SCHEMA), delta])
    write_table_atomic(gen.dir / "ledger.parquet", table)
    # transient image records to retry later (pages are retried from their source)
    pending: list[pa.Table] = []
    for p in list_shards(gen.step("10_ingest")):
        t = pq.read_table(f"{p}.dropped.parquet")
        if t.num_rows:
            mask = [is_transient(r) for r in t.column("drop_reason").to_pylist()]
            t = t.filter(pa.array(mask, pa.bool_()))
        if t.num_rows:
            pending.append(_as_planned(t))
    if prev is not None and (prev.dir / "retry.parquet").exists():
        t = pq.read_table(prev.dir / "retry.parquet")
        done = set(keys)
        rows_in = ledger.find(t.column("key"))
        tries = np.where(
            rows_in >= 0, ledger.attempts[np.maximum(rows_in, 0)] if len(ledger) else 0, 0
        )
        alive = [
            k not in done and int(a) < max_attempts
            for k, a in zip(t.column("key").to_pylist(), tries.tolist(), strict=True)
        ]
        t = t.filter(pa.array(alive, pa.bool_()))  # retried now, or given up: not carried
        if t.num_rows:
            pending.insert(0, t)
    retry = (
        pa.concat_tables(pending, promote_options="permissive") if pending else samples_to_table([])
    )
    if retry.num_rows:  # one row per key, the latest
        ks = retry.column("key").to_pylist()
        last = {k: i for i, k in enumerate(ks)}
        retry = retry.take(pa.array(sorted(last.values()), pa.int64()))
    write_table_atomic(gen.dir / "retry.parquet", retry)
    return table


def _as_planned(t: pa.Table) -> pa.Table:
    """Dropped ingest records back into planned input: kept, no image, no reason."""
    if "image" in t.column_names:
        t = t.drop_columns(["image"])
    n = t.num_rows
    for name, value in (("status", "ok"), ("drop_reason", None), ("dropped_by", None)):
        col = pa.array([value] * n, pa.string())
        t = (
            t.set_column(t.column_names.index(name), name, col)
            if name in t.column_names
            else t.append_column(name, col)
        )
    html = pc.fill_null(pc.starts_with(pc.fill_null(t.column("mime"), ""), "text/html"), False)
    t = t.set_column(
        t.column_names.index("mime"),
        "mime",
        pc.if_else(html, t.column("mime"), pa.scalar(None, pa.string())),
    )
    return t
