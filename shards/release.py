"""Publish the kept samples of a run as a versioned, self-describing release.

Layout of `out_root/<name>/`:

    <split>/[res-<N>/]<split>-<n:06d>.tar          webdataset: {key}.<ext> {key}.txt {key}.json
    <split>/[res-<N>/]<split>-<n:06d>.parquet      img2dataset-compatible index (+ our columns)
    <split>/[res-<N>/]<split>-<n:06d>.stats.json   per-shard counts (img2dataset keys)
    manifest.parquet    one row per published (sample, split): shard, byte offset, licence, ...
    excluded.parquet    kept samples that were not published, with the reason
    ATTRIBUTION         credits grouped by licence (CC BY §3(a) terms)
    README.md           dataset card, every number from the data
    release.json        the card's numbers, machine-readable
    SHA256SUMS          `sha256sum -c` over every file above
    _SUCCESS            written last; readers check it

Publishing is atomic: everything is built in `out_root/.tmp-<name>-<pid>` and
renamed to `out_root/<name>` only when complete, so the final name never holds
a half release. A lock file (`out_root/.release.lock`, flock) makes one writer
per out_root; the kernel drops it when a writer dies, so the next writer knows any
build folder left behind is stale and removes it (those of other names too: a
scheduled rebuild names each generation anew), then builds. Output bytes
depend only on the inputs, the config, the name and run_info (no timestamps in
tar members, no timings in files), so a rerun gives the same SHA256SUMS.

A published release is immutable: `_SUCCESS` records the digest of the inputs it was
built from, and asking for an existing name with other inputs or settings is an error
(with the same ones it is a no-op that returns the release).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from ccurate.filters.license_filter import release_split
from ccurate.record import METADATA_SCHEMA, Sample
from ccurate.shardio import fsync_path, is_done, iter_samples, read_marker
from ccurate.tario import TarWriter, archive_size

from .attribution import SPLIT_SOURCE, license_link, license_name, one_line
from .card import count_drops, render_card
from .config import ShardsConfig
from .manifest import (
    EXCLUDED_SCHEMA,
    INDEX_SCHEMA,
    MANIFEST_SCHEMA,
    build_record,
    choose_text,
    hf_features,
    index_row,
    manifest_extra_cells,
    manifest_extras,
    manifest_row,
    prepare_image,
)

SUCCESS = "_SUCCESS"
SUMS = "SHA256SUMS"
LOCK = ".release.lock"
# test hook: seconds to sleep after each closed shard (lets a test SIGKILL a writer mid-release)
PAUSE_ENV = "CCURATE_SHARDS_PAUSE_AFTER_SHARD"
_BLOCK = 512
_MANIFEST_BATCH = 10_000  # manifest rows buffered per parquet write (memory bound)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # an object's memory address in an error
# excluded rows held as Python dicts before they become a compact Arrow batch
_EXCLUDED_CHUNK = 1024
# characters of credit lines buffered (all licences together) before they are appended
_CREDIT_BUFFER = 4 << 20
# in a build folder from `mkdir` until just before the rename: marks it as a release build
BUILD_MARKER = ".ccurate-release-build"


def is_release(path: str | Path) -> bool:
    """A directory is a release only with its `_SUCCESS` marker."""
    return (Path(path) / SUCCESS).is_file()


def bucket_for(short_side: int, buckets: list[int]) -> str:
    """`res-<largest bound <= short side>`; `res-0` below the first bound; "" without buckets."""
    if not buckets:
        return ""
    chosen = 0
    for b in buckets:
        if short_side >= b:
            chosen = b
    return f"res-{chosen}"


def _member_size(n: int) -> int:
    return _BLOCK + (n + _BLOCK - 1) // _BLOCK * _BLOCK


class _ShardSink:
    """The open shard of one (split, bucket) directory; rolls over by samples or bytes."""

    def __init__(self, root: Path, split: str, bucket: str, cfg: ShardsConfig) -> None:
        self.root = root
        self.split = split
        self.bucket = bucket
        self.cfg = cfg
        self.rel_dir = Path(split, bucket) if bucket else Path(split)
        (root / self.rel_dir).mkdir(parents=True, exist_ok=True)
        self.number = 0
        self.closed: list[dict[str, Any]] = []
        self._tar: TarWriter | None = None
        self._rows: list[dict[str, Any]] = []
        self._licenses: Counter[str] = Counter()
        self._sources: Counter[str] = Counter()

    @property
    def name(self) -> str:
        return f"{self.split}-{self.number:06d}"

    def add(self, members: list[tuple[str, bytes]], rec: dict[str, Any]) -> tuple[str, int]:
        """Write one sample's members; returns (tar path relative to the release, offset)."""
        need = sum(_member_size(len(d)) for _, d in members)
        if self._tar is not None and self._rows:
            full = len(self._rows) >= self.cfg.samples_per_shard
            over = bool(self.cfg.shard_max_bytes) and (
                # the size users see: end blocks and record padding included
                archive_size(self._tar.offset + need) > self.cfg.shard_max_bytes
            )
            if full or over:
                self.close()
        if self._tar is None:
            path = self.root / self.rel_dir / f"{self.name}.tar"
            self._tar = TarWriter(path)
        offset = self._tar.offset
        for member_name, data in members:
            self._tar.add(member_name, data)
        self._rows.append(index_row(rec, offset))
        self._licenses[rec["license"]] += 1
        self._sources[rec["caption_source"]] += 1
        return str(self.rel_dir / f"{self.name}.tar"), offset

    def close(self) -> None:
        assert self._tar is not None, "a sink is made for a sample and closed once per shard"
        self._tar.close()
        self._tar = None
        base = self.root / self.rel_dir / self.name
        fsync_path(base.with_suffix(".tar"))
        pq.write_table(
            pa.Table.from_pylist(self._rows, schema=INDEX_SCHEMA),
            base.with_suffix(".parquet"),
            compression="zstd",
        )
        stats = {
            "shard": f"{self.rel_dir / self.name}.tar",
            "split": self.split,
            "bucket": self.bucket,
            "samples": len(self._rows),
            # img2dataset's stats keys, for tools that read them
            "count": len(self._rows),
            "successes": len(self._rows),
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "status_dict": {"success": len(self._rows)},
            "tar_bytes": base.with_suffix(".tar").stat().st_size,
            "first_key": self._rows[0]["key"],
            "last_key": self._rows[-1]["key"],
            "licenses": dict(sorted(self._licenses.items())),
            "caption_source": dict(sorted(self._sources.items())),
        }
        (self.root / self.rel_dir / f"{self.name}.stats.json").write_text(
            json.dumps(stats, indent=1, sort_keys=True) + "\n"
        )
        self.closed.append(stats)
        self._rows = []
        self._licenses = Counter()
        self._sources = Counter()
        self.number += 1
        pause = os.environ.get(PAUSE_ENV)
        if pause:
            time.sleep(float(pause))


@contextmanager
def _writer_lock(out_root: Path) -> Iterator[None]:
    """One release writer per out_root; released by the kernel if the writer dies."""
    fd = os.open(out_root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise RuntimeError(
                f"another release writer is running in {out_root} (holds {LOCK})"
            ) from e
        yield
    finally:
        os.close(fd)


def next_version(out_root: str | Path) -> str:
    """`v{N}`: one past the highest complete `v<int>` release under out_root."""
    out_root = Path(out_root)
    best = 0
    if out_root.exists():
        for p in out_root.iterdir():
            m = re.fullmatch(r"v(\d+)", p.name)
            if m and is_release(p):
                best = max(best, int(m.group(1)))
    return f"v{best + 1}"


# a key webdataset groups as one sample: its members are `{key}.{field}` and webdataset
# ends the key at the first dot (a `.` in a key splits the sample), `/` makes a folder,
# a leading `__` a metadata member; 64 characters keep `{key}.alt.txt` within the 100-byte
# tar name field. Pipeline keys are 16 hex characters (`ccurate.record.make_key`).
KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_key(key: object) -> None:
    """ValueError unless `key` can name a sample in a webdataset shard (`KEY_PATTERN`)."""
    if not isinstance(key, str) or KEY_PATTERN.fullmatch(key) is None:
        raise ValueError(
            f"sample key {key!r} cannot be published: a release key is 1-64 characters of "
            "A-Z a-z 0-9 _ - starting with a letter or digit (webdataset splits a key at its "
            "first dot, and tar names are limited); pipeline keys are 16 hex characters"
        )


def _scan_inputs(inputs: list[str]) -> tuple[list[str], list[str]]:
    """Score names and extra column names over all inputs (parquet only, no images); every
    key is checked first (`check_key`), so a bad key fails before any shard is written."""
    scores: set[str] = set()
    extras: set[str] = set()
    base = set(METADATA_SCHEMA.names)
    for prefix in inputs:
        if not is_done(prefix):
            raise ValueError(f"input shard {prefix} is unfinished (no .done marker)")
        pf = pq.ParquetFile(f"{prefix}.parquet")
        extras.update(n for n in pf.schema_arrow.names if n not in base)
        keys = pf.read(columns=["key"]).column("key")
        ok = pc.match_substring_regex(keys, f"^{KEY_PATTERN.pattern}$")
        bad = pc.invert(pc.fill_null(ok, False))
        if pc.any(bad).as_py():
            check_key(keys.filter(bad)[0].as_py())
        col = pf.read(columns=["scores"]).column("scores")
        for chunk in col.chunks:
            keys = chunk.keys if isinstance(chunk, pa.MapArray) else None
            if keys is not None and len(keys):
                scores.update(str(k) for k in pc.unique(keys).to_pylist() if k is not None)
    return sorted(scores), sorted(extras)


def input_labels(inputs: list[str]) -> dict[str, str]:
    """Each input prefix relative to the folder that holds all of them (`shard-00001`, or
    `40_caption/shard-00001` across stage folders): release files never name the builder's
    own paths (they are published, and their bytes must not depend on the work dir)."""
    if not inputs:
        return {}
    parents = [os.path.dirname(os.path.abspath(p)) for p in inputs]
    common = os.path.commonpath(parents)
    return {p: Path(os.path.relpath(os.path.abspath(p), common)).as_posix() for p in inputs}


def _image_size(data: bytes) -> tuple[int, int]:
    import io

    with Image.open(io.BytesIO(data)) as im:
        return im.size


def _release_date(run_info: dict[str, Any]) -> str:
    for k in ("release_date", "date", "finished_at"):
        if run_info.get(k):
            return str(run_info[k])[:10]
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%d")
    return datetime.now(UTC).strftime("%Y-%m-%d")


def _stale_builds(out_root: Path, name: str) -> list[Path]:
    """Build folders that killed writers left, whatever release they were building (a
    scheduled rebuild names each generation anew, so a same-name rerun never comes).

    Every writer holds the flock from before it makes its folder until after the rename,
    and the caller holds it now: no live writer owns any of them. A build's folder holds
    `BUILD_MARKER` (from `mkdir` until just before the rename, so a kill while the whole
    release is hashed and fsynced is covered), `.work` (a writer of an older version), is
    empty, or holds the `_SUCCESS` of the release its name says (a kill between removing
    the marker and the rename). Another tool's `.tmp-*` (an MDS export) is left alone."""
    out = []
    for p in out_root.glob(".tmp-*"):
        if not p.is_dir() or p.is_symlink():
            continue
        if (
            p.name.startswith(f".tmp-{name}-")
            or (p / BUILD_MARKER).is_file()
            or (p / ".work").is_dir()
            or not any(p.iterdir())
            or _success_name(p) == p.name[len(".tmp-") :].rpartition("-")[0]
        ):
            out.append(p)
    return out


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; {} when it is missing or holds something else."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _success_name(folder: Path) -> str | None:
    """The release name in `folder/_SUCCESS`, None without a readable one."""
    name = _json_object(folder / SUCCESS).get("release")
    return name if isinstance(name, str) else None


def inputs_digest(inputs: list[str], dropped: list[str]) -> str:
    """SHA-256 over what a release is built from: each kept shard's parquet index (it holds
    every record's hashes) and tar size, and each side output of dropped samples (the card
    counts them). Names, not paths, take part: the same inputs elsewhere give the same
    digest. The pipeline records it in release.json's run_info."""
    h = hashlib.sha256()
    for prefix in inputs:
        if not is_done(prefix):
            raise ValueError(f"input shard {prefix} is unfinished (no .done marker)")
    drops = [p if str(p).endswith(".parquet") else f"{p}.dropped.parquet" for p in dropped]
    for path in [*(f"{p}.parquet" for p in inputs), *drops]:
        h.update(f"{Path(path).name}\0".encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    for p in inputs:
        tar = Path(f"{p}.tar")
        h.update(f"{tar.name}:{tar.stat().st_size if tar.exists() else -1}\0".encode())
    return h.hexdigest()


def _check_unchanged(final: Path, digest: str, cfg: ShardsConfig) -> None:
    """FileExistsError unless the complete release `final` was built from inputs with this
    digest and with these settings: handing it back would report as published what is not
    (a retry's new samples) and keep published what must go (a takedown's). A release that
    recorded no digest (an older version) is checked on its settings only."""
    reasons = []
    recorded = _json_object(final / SUCCESS).get("inputs_digest")
    if recorded is not None and recorded != digest:
        reasons.append(
            f"other inputs (digest {str(recorded)[:12]}, now {digest[:12]}: samples were "
            "added, removed or changed since, e.g. by a retry, a takedown or opt-out, a "
            "licence fix or a caption rerun)"
        )
    built = _json_object(final / "release.json").get("config")
    if isinstance(built, dict):
        now = json.loads(json.dumps(cfg.model_dump(), default=str))
        defaults = json.loads(json.dumps(type(cfg)().model_dump(), default=str))
        # a setting the older writer did not have was at its default
        changed = sorted(k for k in now if built.get(k, defaults.get(k)) != now[k])
        if changed:
            reasons.append(f"other [shards] settings ({', '.join(changed)})")
    if reasons:
        raise FileExistsError(
            f"release {final.name!r} exists in {final.parent} and was built from "
            f"{' and '.join(reasons)}; a published release is immutable: pick a new release "
            f"name, or remove {final} first if it was never shared"
        )


def write_release(
    inputs: list[str],
    dropped: list[str],
    out_root: str | Path,
    cfg: ShardsConfig,
    *,
    name: str | None = None,
    run_info: dict[str, Any] | None = None,
    digest: str | None = None,
) -> Path:
    """Build a release from the final kept shards and publish it atomically.

    `inputs` are the kept shard prefixes (order matters for shard contents),
    `dropped` the `.dropped.parquet` paths of every stage (drop counts for the
    card), `run_info` the run's settings (filters, thresholds, caption model,
    stage stats, dates) for the card. Returns `out_root/<name>`; an existing
    complete release of that name is returned untouched when it was built from the
    same inputs (`inputs_digest`) and settings, else FileExistsError (releases are
    immutable; run_info is not compared: it describes the run). The card's date is
    `run_info["release_date" | "date" | "finished_at"]`, else SOURCE_DATE_EPOCH,
    else today (UTC): pass one for byte-identical rebuilds on another day.
    `digest` is `inputs_digest(inputs, dropped)` when the caller has it already (it reads
    every input index: the pipeline records it in run_info first).
    """
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    with _writer_lock(out_root):
        name = name or next_version(out_root)
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad release name {name!r}")
        digest = digest or inputs_digest(inputs, dropped)
        final = out_root / name
        if final.exists():
            if is_release(final):
                _check_unchanged(final, digest, cfg)
                return final
            raise FileExistsError(f"{final} exists but is not a complete release (no {SUCCESS})")
        for stale in _stale_builds(out_root, name):
            shutil.rmtree(stale)
        tmp = out_root / f".tmp-{name}-{os.getpid()}"
        tmp.mkdir()
        try:
            (tmp / BUILD_MARKER).touch()
            _build(tmp, inputs, dropped, cfg, name, stable_run_info(run_info or {}), digest)
            (tmp / BUILD_MARKER).unlink()
            fsync_path(tmp)  # the marker must not come back inside the published release
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a kill -9 leaves it: the next run removes it
            raise
        os.rename(tmp, final)
        fsync_path(out_root)
        return final


# timings, and how a run went (how many shards a resumed run found done): not facts about
# the data, and a release built after a kill must have an uninterrupted run's bytes
VOLATILE = frozenset({"seconds", "wall_seconds", "elapsed", "elapsed_seconds", "skipped_shards"})


def stable_run_info(info: Any) -> Any:
    """run_info without `VOLATILE` fields: they differ between reruns and would change the
    release bytes."""
    if isinstance(info, dict):
        return {k: stable_run_info(v) for k, v in info.items() if k not in VOLATILE}
    if isinstance(info, list | tuple):
        return [stable_run_info(v) for v in info]
    return info


class _Tally:
    """The release's numbers, gathered while writing (they feed the card and release.json)."""

    def __init__(self) -> None:
        self.seen = 0
        self.published_keys = 0
        self.rows_per_split: Counter[str] = Counter()
        self.rows_per_bucket: Counter[str] = Counter()
        self.per_license: Counter[str] = Counter()
        self.per_family: Counter[str] = Counter()
        self.caption_source: Counter[str] = Counter()
        self.caption_model: Counter[str] = Counter()
        self.excluded: Counter[str] = Counter()
        self.not_releasable_license: Counter[str] = Counter()
        self.page_evidence = 0
        self.resized = 0
        self.reencoded = 0
        self.faces_blurred = 0
        self.duplicates_merged = 0
        self.image_bytes = 0


_HEX_KEY = re.compile(r"[0-9a-f]{16}")
_HEX_KEYS = re.compile(r"[0-9a-f]*")


class _SeenKeys:
    """The sample keys met so far, exact, in about 8 B a key (16 B while two runs merge): a
    Python set of str costs ~100 B a key, ~10 GiB for a 100M-sample crawl.

    A pipeline key (16 lower-case hex digits, `make_key`) is stored as the uint64 it spells
    (one key, one number: exact, no hash) in sorted numpy runs merged like a binary
    counter (O(log n) runs, each key copied O(log n) times). Other keys (inputs not made by
    the pipeline; an upper-case hex key is another key) are kept as strings.
    """

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []  # sorted, disjoint; each over twice the next
        self._other: set[str] = set()

    def first_seen(self, keys: list[str]) -> list[bool]:
        """For each key, in order: True where it was met neither earlier in `keys` nor in
        an earlier call (what `if key not in seen: seen.add(key)` gives one by one)."""
        new = [False] * len(keys)
        joined = "".join(keys)
        # all pipeline keys (each of 16: "a"*15 + "a"*17 would read as two such keys)
        if all(len(k) == 16 for k in keys) and _HEX_KEYS.fullmatch(joined):
            where: Sequence[int] = range(len(keys))
            values = np.frombuffer(bytes.fromhex(joined), dtype=">u8").astype(np.uint64)
        else:
            where, parsed = [], []
            for i, k in enumerate(keys):
                if _HEX_KEY.fullmatch(k):
                    where.append(i)
                    parsed.append(int(k, 16))
                elif k not in self._other:
                    self._other.add(k)
                    new[i] = True
            values = np.array(parsed, dtype=np.uint64)
        if len(values):
            # first occurrence of each value in this batch, then those met in no earlier one
            uniq, first = np.unique(values, return_index=True)
            fresh = ~self._contains(uniq)
            for j in first[fresh]:
                new[where[j]] = True
            if fresh.any():
                self._add(uniq[fresh])
        return new

    def _contains(self, values: np.ndarray) -> np.ndarray:
        found = np.zeros(len(values), dtype=bool)
        for run in self._runs:
            i = np.minimum(np.searchsorted(run, values), len(run) - 1)
            found |= run[i] == values
        return found

    def _add(self, run: np.ndarray) -> None:
        self._runs.append(run)
        while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            b = self._runs.pop()
            a = self._runs.pop()
            merged = np.concatenate([a, b])
            del a, b
            merged.sort(kind="stable")  # two sorted runs: timsort merges them in O(n)
            self._runs.append(merged)


class _ExcludedRows:
    """excluded.parquet written as the build goes, in row groups of `_MANIFEST_BATCH` rows:
    a dict per excluded sample kept to the end cost ~400 B a sample. Rows wait as Python
    dicts only `_EXCLUDED_CHUNK` at a time, then as compact Arrow batches. A small file's
    bytes are those of one `pq.write_table` of all rows (one row group, no rows: one too)."""

    def __init__(self, path: Path) -> None:
        self._writer = pq.ParquetWriter(path, EXCLUDED_SCHEMA, compression="zstd")
        self._rows: list[dict[str, Any]] = []
        self._batches: list[pa.RecordBatch] = []
        self._pending = 0
        self._groups = 0

    def add(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if len(self._rows) >= _EXCLUDED_CHUNK:
            self._to_arrow()
            if self._pending >= _MANIFEST_BATCH:
                self._write()

    def _to_arrow(self) -> None:
        if self._rows:
            self._batches.append(pa.RecordBatch.from_pylist(self._rows, schema=EXCLUDED_SCHEMA))
            self._pending += len(self._rows)
            self._rows = []

    def _write(self) -> None:
        table = pa.Table.from_batches(self._batches, schema=EXCLUDED_SCHEMA).combine_chunks()
        self._writer.write_table(table)
        self._batches = []
        self._pending = 0
        self._groups += 1

    def close(self) -> None:
        """Write what is left and the footer."""
        self._to_arrow()
        if self._pending or not self._groups:
            self._write()
        self._writer.close()

    def abandon(self) -> None:
        """Close the file as it is (the build failed; its folder goes)."""
        if self._writer.is_open:
            self._writer.close()


class _CreditSpool:
    """ATTRIBUTION's entries per licence, spooled to one file each under `folder`, in order.

    Lines are buffered (`_CREDIT_BUFFER` characters for all licences together) and
    appended with one file open at a time: a file held open per licence id took a
    descriptor each, and the licence filter emits over 2,000 ids, past the usual
    1,024 limit (EMFILE near the end of a big build)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.paths: dict[str, Path] = {}
        self._buf: dict[str, list[str]] = {}
        self._size = 0

    def add(self, lid: str, line: str) -> None:
        if lid not in self.paths:
            self.paths[lid] = self.folder / f"{len(self.paths):05d}.txt"
        self._buf.setdefault(lid, []).append(line)
        self._size += len(line)
        if self._size >= _CREDIT_BUFFER:
            self.flush()

    def flush(self) -> None:
        for lid, lines in self._buf.items():
            with open(self.paths[lid], "a", encoding="utf-8") as fh:
                fh.writelines(lines)
        self._buf = {}
        self._size = 0


def _build(
    tmp: Path,
    inputs: list[str],
    dropped: list[str],
    cfg: ShardsConfig,
    name: str,
    run_info: dict[str, Any],
    digest: str,
) -> None:
    score_names, extra_names = _scan_inputs(inputs)
    input_names = input_labels(inputs)
    work = tmp / ".work"
    (work / "attribution").mkdir(parents=True)
    sinks: dict[tuple[str, str], _ShardSink] = {}
    tally = _Tally()
    seen = _SeenKeys()
    excluded = _ExcludedRows(tmp / "excluded.parquet")
    credits = _CreditSpool(work / "attribution")
    extra_cols = manifest_extras(
        [pq.read_schema(f"{p}.parquet") for p in inputs] if extra_names else [], extra_names
    )
    manifest_schema = pa.schema([*MANIFEST_SCHEMA, *extra_cols])
    manifest_writer = pq.ParquetWriter(
        tmp / "manifest.parquet", manifest_schema, compression="zstd"
    )
    manifest_buf: list[dict[str, Any]] = []

    def exclude(s: Sample, reason: str, detail: str = "") -> None:
        tally.excluded[reason] += 1
        excluded.add(
            {"key": s.key, "url": s.url, "license": s.license, "reason": reason, "detail": detail}
        )

    try:
        for prefix in inputs:
            for batch in iter_samples(prefix):
                fresh = seen.first_seen([s.key for s in batch])
                for s, is_new in zip(batch, fresh, strict=True):
                    tally.seen += 1
                    if not is_new:  # detail: the input, not where the builder's work lay
                        exclude(s, "duplicate_key", input_names[prefix])
                        continue
                    family = release_split(s.license) if s.license else None
                    if family is None:
                        tally.not_releasable_license[s.license or "none"] += 1
                        exclude(s, "not_releasable", s.license or "")
                        continue
                    targets = [family]
                    if cfg.noncommercial_includes_commercial and family == "commercial":
                        targets.append("noncommercial")
                    targets = [t for t in targets if t in cfg.splits]
                    if not targets:
                        exclude(s, "split_not_published", family)
                        continue
                    if s.image is None:
                        exclude(s, "image_missing")
                        continue
                    try:
                        data, reencoded, decoded = prepare_image(s.image, s.mime, cfg)
                        size = (
                            (s.width, s.height)
                            if s.width and s.height
                            else decoded or _image_size(s.image)
                        )
                    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                        # Pillow names the buffer by its address ('<_io.BytesIO object at
                        # 0x7f..>'): without it, excluded.parquet is the same bytes every run
                        why = _ADDRESS.sub("", f"{type(e).__name__}: {e}")
                        exclude(s, "image_error", why[:300])
                        continue
                    text, text_source = choose_text(cfg.caption_source, s.caption, s.alt_text)
                    rec = build_record(
                        s,
                        family=family,
                        text=text,
                        text_source=text_source,
                        image=data,
                        image_sha256=hashlib.sha256(data).hexdigest(),
                        reencoded_as=reencoded,
                        size=(int(size[0]), int(size[1])),
                        fmt=cfg.image_format,
                        score_names=score_names,
                        extra_names=extra_names,
                    )
                    members = [(f"{s.key}.{cfg.image_format}", data)]
                    members.append((f"{s.key}.txt", text.encode()))
                    if cfg.caption_source == "both":
                        members.append((f"{s.key}.alt.txt", rec["alt_text"].encode()))
                    members.append((f"{s.key}.json", json.dumps(rec, ensure_ascii=False).encode()))
                    bucket = bucket_for(min(rec["width"], rec["height"]), cfg.resolution_buckets)
                    for split in targets:
                        sink = sinks.get((split, bucket))
                        if sink is None:
                            sink = sinks[(split, bucket)] = _ShardSink(tmp, split, bucket, cfg)
                        shard, offset = sink.add(members, rec)
                        row = manifest_row(name, rec, split, bucket, shard, offset)
                        manifest_buf.append({**row, **manifest_extra_cells(s, extra_cols)})
                        tally.rows_per_split[split] += 1
                        if bucket:
                            tally.rows_per_bucket[f"{split}/{bucket}"] += 1
                    if len(manifest_buf) >= _MANIFEST_BATCH:
                        manifest_writer.write_table(
                            pa.Table.from_pylist(manifest_buf, schema=manifest_schema)
                        )
                        manifest_buf = []
                    lid = rec["license"]
                    credits.add(lid, f"- {one_line(rec['key'])}: {rec['attribution']}\n")
                    tally.published_keys += 1
                    tally.per_license[lid] += 1
                    tally.per_family[family] += 1
                    tally.caption_source[text_source] += 1
                    if text_source == "synthetic" or text_source == "synthetic_fallback":
                        tally.caption_model[rec["caption_model"] or "unrecorded"] += 1
                    if rec["license_rule"].endswith("@page"):
                        tally.page_evidence += 1
                    if "resized" in rec["modifications"]:
                        tally.resized += 1
                    if reencoded:
                        tally.reencoded += 1
                    if "faces blurred" in rec["modifications"]:
                        tally.faces_blurred += 1
                    if rec["duplicate_count"] > 1:
                        tally.duplicates_merged += rec["duplicate_count"] - 1
                    tally.image_bytes += len(data)
        for sink in sinks.values():
            sink.close()
        if manifest_buf:
            manifest_writer.write_table(pa.Table.from_pylist(manifest_buf, schema=manifest_schema))
        excluded.close()
        credits.flush()
    finally:
        manifest_writer.close()
        excluded.abandon()

    _write_attribution(tmp / "ATTRIBUTION", name, credits.paths, tally)
    shutil.rmtree(work)

    shard_stats = [st for sink in sinks.values() for st in sink.closed]
    summary = _summary(name, cfg, tally, shard_stats, dropped, inputs, run_info)
    summary["features"] = hf_features(
        cfg.image_format, score_names, extra_names, alt_txt=cfg.caption_source == "both"
    )
    (tmp / "release.json").write_text(
        json.dumps(summary, indent=1, sort_keys=True, default=str) + "\n"
    )
    (tmp / "README.md").write_text(render_card(summary), encoding="utf-8")
    sums = _sha256sums(tmp)
    (tmp / SUMS).write_text(sums)
    success = {
        "inputs_digest": digest,
        "release": name,
        "samples": tally.published_keys,
        "sha256sums": hashlib.sha256(sums.encode()).hexdigest(),
    }
    (tmp / SUCCESS).write_text(json.dumps(success, sort_keys=True) + "\n")
    for p in tmp.rglob("*"):
        if p.is_file():
            fsync_path(p)
    for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        fsync_path(d)


def _write_attribution(path: Path, name: str, files: dict[str, Path], tally: _Tally) -> None:
    """Credits grouped by licence (sorted by licence id), entries in publication order."""
    with open(path, "w", encoding="utf-8") as out:  # authors' names: not the locale's charset
        out.write(f"ATTRIBUTION — release {name}\n\n")
        out.write(
            "Every image in this release is credited below, grouped by licence: its key (as in\n"
            "manifest.parquet), title, author, the credit the licensor asked for (where the\n"
            "source gives one), source, image URL, licence name with a link to its deed, and\n"
            "whether we modified it.\n"
            "CC0 and Public Domain Mark works need no credit; they are listed as a courtesy.\n"
        )
        for lid in sorted(files):
            link = license_link(lid)
            out.write(f"\n## {license_name(lid)}\n")
            n = tally.per_license[lid]
            out.write(f"Licence id: {one_line(lid)}; deed: {link or 'see each entry'}; ")
            out.write(f"{n} {'work' if n == 1 else 'works'}\n\n")
            with open(files[lid], encoding="utf-8") as fh:
                shutil.copyfileobj(fh, out)


def _summary(
    name: str,
    cfg: ShardsConfig,
    tally: _Tally,
    shard_stats: list[dict[str, Any]],
    dropped: list[str],
    inputs: list[str],
    run_info: dict[str, Any],
) -> dict[str, Any]:
    """Everything the card says, as data (also written as release.json)."""
    stages = run_info.get("stages")
    if isinstance(stages, dict):  # the pipeline gives {step: stats}
        # the key names the row: a stats dict's own "stage" ("retry") would hide "retry-2"
        stages = [{**v, "stage": k} if isinstance(v, dict) else v for k, v in stages.items()]
    if not stages:
        stages = [read_marker(p) for p in inputs if is_done(p)]
        stages = _sum_stage_markers(stages)

    def top(c: Counter[str]) -> dict[str, int]:
        return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))

    return {
        "release": name,
        "date": _release_date(run_info),
        "config": cfg.model_dump(),
        "split_policy": SPLIT_SOURCE,
        "input_samples": tally.seen,
        "published_samples": tally.published_keys,
        "rows_per_split": top(tally.rows_per_split),
        "rows_per_bucket": top(tally.rows_per_bucket),
        "per_license": top(tally.per_license),
        "per_family": top(tally.per_family),
        "caption_source": top(tally.caption_source),
        "caption_model": top(tally.caption_model),
        "excluded": top(tally.excluded),
        "not_releasable_license": top(tally.not_releasable_license),
        "page_evidence": tally.page_evidence,
        "resized": tally.resized,
        "reencoded": tally.reencoded,
        "faces_blurred": tally.faces_blurred,
        "duplicates_merged": tally.duplicates_merged,
        "image_bytes": tally.image_bytes,
        "shards": len(shard_stats),
        "shards_per_split": top(Counter(st["split"] for st in shard_stats)),
        "drops": count_drops(dropped),
        "stages": stages,
        "run_info": run_info,
    }


def _sum_stage_markers(markers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last stage's shard markers summed (a fallback when run_info has no stage stats)."""
    total: dict[str, dict[str, Any]] = {}
    for m in markers:
        if "stage" not in m:
            continue
        t = total.setdefault(
            m["stage"], {"stage": m["stage"], "in": 0, "kept": 0, "dropped": 0, "drops": Counter()}
        )
        t["in"] += int(m.get("in", 0))
        t["kept"] += int(m.get("kept", 0))
        t["dropped"] += int(m.get("dropped", 0))
        t["drops"].update(m.get("drops", {}))
    return [{**t, "drops": dict(sorted(t["drops"].items()))} for t in total.values()]


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _sha256sums(root: Path) -> str:
    """`sha256sum -c` format over every file except SHA256SUMS and _SUCCESS, sorted paths."""
    lines = []
    for p in sorted(root.rglob("*"), key=lambda q: q.relative_to(root).as_posix()):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or rel in (SUMS, SUCCESS, BUILD_MARKER):
            continue
        lines.append(f"{_file_sha256(p)}  {rel}\n")
    return "".join(lines)


def listed_files(release_dir: str | Path) -> list[str]:
    """The files SHA256SUMS lists (paths relative to the release, in its order): what the
    release is. A file beside them that it does not list is no part of it."""
    text = (Path(release_dir) / SUMS).read_text(encoding="utf-8")
    return [line.split("  ", 1)[1] for line in text.splitlines() if "  " in line]


def verify(release_dir: str | Path) -> list[str]:
    """What breaks the release's SHA256SUMS (empty list: the release is intact): a listed
    path whose hash differs or that is missing, a file on disk that it does not list (a
    copy, a half-synced or injected shard: `release_shards` and the exports skip it, but
    the card's globs and other tools would read it), and SHA256SUMS itself when `_SUCCESS`
    records another digest of it."""
    root = Path(release_dir)
    bad = []
    listed = set()
    sums = (root / SUMS).read_bytes()
    for line in sums.decode("utf-8").splitlines():
        digest, rel = line.split("  ", 1)
        listed.add(rel)
        if not (root / rel).is_file() or _file_sha256(root / rel) != digest:
            bad.append(rel)
    try:
        recorded = json.loads((root / SUCCESS).read_text()).get("sha256sums")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded is not None and recorded != hashlib.sha256(sums).hexdigest():
        bad.append(SUMS)
    for p in sorted(root.rglob("*"), key=lambda q: q.relative_to(root).as_posix()):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in listed and rel not in (SUMS, SUCCESS):
            bad.append(rel)
    return bad
