"""Shards on disk between stages: webdataset tar + parquet index, published atomically.

A shard is named by a *prefix* (e.g. `work/20_filter/shard-00003`) and made of:

- `{prefix}.tar`            kept samples (webdataset): `{key}.{ext}` image + `{key}.json` record
- `{prefix}.parquet`        the kept records without image bytes (img2dataset-style index)
- `{prefix}.dropped.parquet` dropped records, with their reason (and image bytes, for reports)
- `{prefix}.done`           completion marker holding the shard's stats, written last

Every file is written under a temporary name and renamed into place, and the
marker comes last: a shard without a marker is unfinished, whatever else is
there, and a rerun redoes it. Tar members carry fixed metadata (mtime 0, uid 0)
so the same samples always give the same bytes.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from ccurate.record import Sample, row_json, rows_to_table, samples_to_table, table_to_samples
from ccurate.tario import TarWriter, iter_members

MIME_EXT = {
    "image/jpeg": "jpg",
    "image/png": "png",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/avif": "avif",
}
EXT_MIME = {v: k for k, v in MIME_EXT.items()} | {"jpeg": "image/jpeg"}
MARKER = ".done"


def ext_for(mime: str | None) -> str:
    return MIME_EXT.get(mime or "", "bin")


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def host_name() -> str:
    """This machine's name as a temporary's name carries it (letters, digits, `.` and `_`
    only: names are split on `-`, `@` and `/`), so a cleaner can tell its own host's
    writers, whose liveness it can check (`pid_alive`), from other machines'."""
    return "".join(c if c.isalnum() or c in "._" else "_" for c in socket.gethostname()) or "host"


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine with `pid` runs: True when it cannot be probed
    (another user's process), so that its files are kept."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        # the data is durable before its name, and the name before whatever is written
        # next (a marker): a crash must never leave a marker naming an empty file
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    with atomic_path(path) as tmp, open(tmp, mode) as fh:  # atomic_path syncs it once closed
        yield fh


def write_json_atomic(path: str | Path, data: Any) -> None:
    with atomic_open(path, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True, default=str)


def write_table_atomic(path: str | Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def is_done(prefix: str | Path) -> bool:
    return Path(f"{prefix}{MARKER}").exists()


def read_marker(prefix: str | Path) -> dict[str, Any]:
    with open(f"{prefix}{MARKER}") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def clear_shard(prefix: str | Path) -> None:
    """Remove every file of an unfinished shard (and stray temporaries) before redoing it."""
    prefix = Path(prefix)
    if not prefix.parent.exists():
        return
    for p in prefix.parent.iterdir():
        n = p.name
        if n.startswith(prefix.name + ".") or n.startswith(f".{prefix.name}."):
            p.unlink()


def clear_temporaries(directory: str | Path) -> list[Path]:
    """Remove the temporaries (`.{name}.tmp-*`, see `atomic_path`) a killed writer left
    directly in `directory`; returns them. Only for a folder no live writer is using, e.g.
    a step's own folders as the step starts (as `clear_shard` does for one shard)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [
        p
        for p in directory.iterdir()
        if p.name.startswith(".") and ".tmp-" in p.name and p.is_file()
    ]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class ShardWriter:
    """Collects the samples of one output shard and publishes them atomically.

    Kept samples go to the tar + parquet index, dropped ones to the side output.
    Nothing is visible under the final names until `commit` renames it; the
    completion marker is written last by `commit` with the given stats.
    """

    def __init__(self, prefix: str | Path, keep_dropped_images: bool = True) -> None:
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.keep_dropped_images = keep_dropped_images
        self._tmp_tar = self.prefix.with_name(
            f".{self.prefix.name}.tar.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        self._tar: TarWriter | None = TarWriter(self._tmp_tar)
        self._kept: list[dict[str, Any]] = []  # rows without image bytes
        self._dropped: list[Sample] = []
        self._keys: set[str] = set()

    def write(self, sample: Sample) -> None:
        if sample.key in self._keys:
            raise ValueError(f"duplicate key {sample.key} in shard {self.prefix}")
        self._keys.add(sample.key)
        if not sample.kept:
            if not self.keep_dropped_images:
                sample.image = None
            self._dropped.append(sample)
            return
        assert self._tar is not None
        if sample.image is not None:
            self._tar.add(f"{sample.key}.{ext_for(sample.mime)}", sample.image)
        row = sample.to_row(with_image=False)
        self._tar.add(f"{sample.key}.json", row_json(row).encode())
        # image bytes live in the tar; keep only metadata in memory
        self._kept.append(row)

    def commit(self, stats: dict[str, Any]) -> None:
        assert self._tar is not None
        self._tar.close()
        self._tar = None
        fsync_path(self._tmp_tar)
        write_table_atomic(f"{self.prefix}.parquet", rows_to_table(self._kept))
        write_table_atomic(
            f"{self.prefix}.dropped.parquet",
            samples_to_table(self._dropped, with_image=self.keep_dropped_images),
        )
        os.replace(self._tmp_tar, f"{self.prefix}.tar")
        fsync_path(self.prefix.parent)  # the tar's name is durable before the marker's
        write_json_atomic(f"{self.prefix}{MARKER}", stats)

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self._tmp_tar.exists():
            self._tmp_tar.unlink()


def read_index(prefix: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The kept records of a shard without image bytes (fast: parquet only)."""
    return pq.read_table(f"{prefix}.parquet", columns=columns)


def read_dropped(prefix: str | Path) -> pa.Table:
    return pq.read_table(f"{prefix}.dropped.parquet")


def _tar_images(prefix: str | Path) -> Iterator[tuple[str, bytes]]:
    """(key, image bytes) in tar order, skipping the json members."""
    path = f"{prefix}.tar"
    if not os.path.exists(path):
        return
    for name, data in iter_members(path):
        if not name.endswith(".json"):
            yield name.rsplit(".", 1)[0], data


def iter_samples(prefix: str | Path, batch_size: int = 64) -> Iterator[list[Sample]]:
    """Stream the kept samples of a shard in batches, image bytes attached.

    Memory stays bounded by the batch: the parquet index is read in row
    batches and the tar is walked in step with it (same order by construction).
    A shard written without images (e.g. planned ingest partitions) is
    parquet-only and yields records with `image=None`.
    """
    pf = pq.ParquetFile(f"{prefix}.parquet")
    images = _tar_images(prefix)
    pending: dict[str, bytes] = {}
    for rb in pf.iter_batches(batch_size=batch_size):
        batch = table_to_samples(pa.Table.from_batches([rb]))
        for s in batch:
            if s.mime is None and s.key not in pending:
                continue
            while s.key not in pending:
                nxt = next(images, None)
                if nxt is None:
                    break
                pending[nxt[0]] = nxt[1]
            s.image = pending.pop(s.key, None)
        yield batch


def write_partition(prefix: str | Path, samples: list[Sample]) -> None:
    """Write a parquet-only shard (records without images), e.g. planned ingest input."""
    write_table_atomic(f"{prefix}.parquet", samples_to_table(samples))


def list_shards(directory: str | Path, done_only: bool = True) -> list[Path]:
    """Shard prefixes in a stage directory, sorted (deterministic order)."""
    directory = Path(directory)
    if not directory.exists():
        return []
    prefixes = sorted(
        directory / p.name[: -len(".parquet")]
        for p in directory.glob("*.parquet")
        if not p.name.endswith(".dropped.parquet") and not p.name.startswith(".")
    )
    if done_only:
        prefixes = [p for p in prefixes if is_done(p)]
    return prefixes


def shards_in_completion_order(directory: str | Path) -> list[Path]:
    """Finished shards, oldest completion marker first (later shards hold newer outcomes)."""
    return sorted(
        list_shards(directory, done_only=True),
        key=lambda p: (Path(f"{p}{MARKER}").stat().st_mtime, str(p)),
    )
