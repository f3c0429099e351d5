"""Caption cache: (image sha256, caption model + settings) -> captions, as parquet parts.

A rebuild or rerun must never recaption an unchanged image: captioning is the
most expensive step. Entries live next to the catalog as immutable parquet
part files, each written atomically by one worker (no cross-process locking;
two workers captioning the same image just write the same row twice). Query
them with DuckDB: `SELECT * FROM read_parquet('<cache_dir>/*.parquet')`.
`load` reads the rows of one caption model into a dict, once per worker.

Part names carry the writing host (`part-<ns>-<pid>-<id>@<host>.parquet`), so the
temporary of a write a kill interrupted (`.<part>.tmp-<pid>-<id>`, see
`ccurate.shardio.atomic_path`) can be told from a live writer's and removed
(`clear_stale_temporaries`).
"""

from __future__ import annotations

import atexit
import logging
import os
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ccurate.shardio import host_name, pid_alive, write_table_atomic

log = logging.getLogger("ccurate.captioning")

CACHE_SCHEMA = pa.schema(
    [
        ("image_sha256", pa.string()),
        ("caption_model", pa.string()),
        ("captions", pa.list_(pa.string())),
        ("created_at", pa.timestamp("s", tz="UTC")),
    ]
)


STALE_TMP_S = 3600.0
"""A temporary untouched this long is stale whoever wrote it: a part is written in seconds
(`compact` in minutes), and a live writer keeps touching its file."""


def _stale_tmp(tmp: Path, now: float) -> bool:
    """A temporary no live writer can still be filling: written on this host by a process
    that is gone (or by this one, which writes parts one at a time and calls this before
    it writes), or untouched for `STALE_TMP_S` (written elsewhere, or named before parts
    carried their host). The rule of `train/checkpoint.py`'s `_stale_tmp`."""
    final, _, suffix = tmp.name.partition(".tmp-")
    pid = suffix.split("-", 1)[0]
    host = final.rpartition("@")[2].removesuffix(".parquet") if "@" in final else None
    ours = host == host_name() and pid.isdigit()
    if ours and (int(pid) == os.getpid() or not pid_alive(int(pid))):
        return True
    try:
        return now - tmp.stat().st_mtime > STALE_TMP_S
    except OSError:
        return False


def clear_stale_temporaries(directory: str | Path) -> list[Path]:
    """Remove the temporaries of cache writes (`flush`, `compact`) a kill interrupted;
    returns them. Safe while other workers write: only `_stale_tmp` ones go. Without this
    they would pile up (`map_step` clears temporaries in step folders only)."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    now = time.time()
    stale = [
        p
        for p in folder.iterdir()
        if p.name.startswith(".") and ".tmp-" in p.name and p.is_file() and _stale_tmp(p, now)
    ]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.info("caption cache: removed %d stale temporaries in %s", len(stale), folder)
    return stale


def _part_name(stamp: str, middle: str) -> str:
    return f"part-{stamp}-{middle}-{uuid.uuid4().hex[:8]}@{host_name()}.parquet"


class CaptionCache:
    """Captions of one caption model, loaded from and appended to a folder of parquet parts."""

    def __init__(self, directory: str | Path, caption_model: str, flush_rows: int = 2048) -> None:
        self.directory = Path(directory)
        self.caption_model = caption_model
        self.flush_rows = max(1, flush_rows)
        self._entries: dict[str, list[str]] = {}
        self._pending: dict[str, list[str]] = {}
        self._registered = False

    def __len__(self) -> int:
        return len(self._entries)

    def load(self) -> int:
        """Read every part's rows for this caption model; unreadable parts are skipped loudly,
        rows without a non-empty caption are not reused (captioned again)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        clear_stale_temporaries(self.directory)
        parts = sorted(self.directory.glob("*.parquet"))
        for part in parts:
            try:
                table = pq.read_table(
                    part,
                    columns=["image_sha256", "captions"],
                    filters=[("caption_model", "=", self.caption_model)],
                )
            except Exception as exc:  # a foreign or damaged file must not stop the run
                log.warning("caption cache: skipping unreadable %s (%s)", part, exc)
                continue
            shas = table.column("image_sha256").to_pylist()
            caps = table.column("captions").to_pylist()
            for sha, c in zip(shas, caps, strict=True):
                kept = [x for x in c or [] if x]
                if sha and kept:
                    self._entries[sha] = kept
        if not self._registered:
            atexit.register(self.flush)  # pool workers exit without teardown
            self._registered = True
        log.info(
            "caption cache: %d entries for %s from %d parts in %s",
            len(self._entries),
            self.caption_model,
            len(parts),
            self.directory,
        )
        return len(self._entries)

    def get(self, image_sha256: str) -> list[str] | None:
        return self._entries.get(image_sha256)

    def put(self, image_sha256: str, captions: list[str]) -> None:
        self._entries[image_sha256] = list(captions)
        self._pending[image_sha256] = list(captions)
        if len(self._pending) >= self.flush_rows:
            self.flush()

    def flush(self) -> Path | None:
        """Write pending entries as one new part file (atomically); None when nothing is pending."""
        if not self._pending:
            return None
        shas = list(self._pending)
        now = int(time.time())
        table = pa.table(
            {
                "image_sha256": shas,
                "caption_model": [self.caption_model] * len(shas),
                "captions": [self._pending[s] for s in shas],
                "created_at": pa.array([now] * len(shas), type=pa.timestamp("s", tz="UTC")),
            },
            schema=CACHE_SCHEMA,
        )
        path = self.directory / _part_name(str(time.time_ns()), str(os.getpid()))
        write_table_atomic(path, table)
        self._pending.clear()
        return path

    def close(self) -> None:
        self.flush()
        if self._registered:
            atexit.unregister(self.flush)
            self._registered = False


def compact(directory: str | Path, min_parts: int = 64) -> int:
    """Merge the cache's part files into one once there are `min_parts` of them; returns
    how many were merged (0: left as they are).

    Every finished shard flushes its captions as a part (`CaptionStage.checkpoint`), and
    every worker's `load` reads every part: without merging, a cache rebuilt on a schedule
    grows a file per shard per run. Runs on the driver before any caption worker starts
    (`CaptionStage.prepare`). The merged file keeps each (image, caption model)'s newest
    row and sorts right after the newest part it holds, so `load` still lets newer parts
    win; unreadable parts are left in place."""
    folder = Path(directory)
    parts = sorted(folder.glob("part-*.parquet"))
    if len(parts) < max(2, min_parts):
        return 0
    tables: list[pa.Table] = []
    merged_parts: list[Path] = []
    for part in parts:
        try:
            tables.append(pq.read_table(part).select(CACHE_SCHEMA.names).cast(CACHE_SCHEMA))
        except Exception as exc:  # a damaged part: `load` skips it loudly, so does this
            log.warning("caption cache: not merging unreadable %s (%s)", part, exc)
            continue
        merged_parts.append(part)
    if len(merged_parts) < 2:
        return 0
    table = pa.concat_tables(tables)
    keys = zip(
        table.column("image_sha256").to_pylist(),
        table.column("caption_model").to_pylist(),
        strict=True,
    )
    newest = {key: i for i, key in enumerate(keys)}  # parts in name (time) order: last wins
    table = table.take(pa.array(sorted(newest.values()), pa.int64()))
    stamp = merged_parts[-1].name.split("-")[1]
    write_table_atomic(folder / _part_name(stamp, "compact"), table)
    for part in merged_parts:
        part.unlink(missing_ok=True)
    return len(merged_parts)
