"""Caption cache: (image sha256, caption model + settings) -> captions, as parquet parts.

A rebuild or rerun must never recaption an unchanged image: captioning is the
most expensive step. Entries live next to the catalog as immutable parquet
part files, each written atomically by one worker (no cross-process locking;
two workers captioning the same image just write the same row twice). Query
them with DuckDB: `SELECT * FROM read_parquet('<cache_dir>/*.parquet')`.
`load` reads the rows of one caption model into a dict, once per worker.
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

from ccurate.shardio import write_table_atomic

log = logging.getLogger("ccurate.captioning")

CACHE_SCHEMA = pa.schema(
    [
        ("image_sha256", pa.string()),
        ("caption_model", pa.string()),
        ("captions", pa.list_(pa.string())),
        ("created_at", pa.timestamp("s", tz="UTC")),
    ]
)


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
        """Read every part's rows for this caption model; unreadable parts are skipped loudly."""
        self.directory.mkdir(parents=True, exist_ok=True)
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
                if sha and c:
                    self._entries[sha] = list(c)
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
        name = f"part-{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        path = self.directory / name
        write_table_atomic(path, table)
        self._pending.clear()
        return path

    def close(self) -> None:
        self.flush()
        if self._registered:
            atexit.unregister(self.flush)
            self._registered = False
