"""The deterministic per-slot sample stream over release (or latent) shards.

The stream is a pure function of (seed, data epoch, slot), where a *slot* is one
DataLoader worker of one rank (`slot = rank * workers + worker`):

- every data epoch the shard list is permuted with the seed and the epoch, the
  same way on every rank; with at least as many shards as slots each slot takes
  every n-th shard, otherwise every slot reads all shards and keeps every n-th
  sample (skipping the others at the tar-member level);
- a seeded shuffle buffer mixes samples within the slot's epoch;
- batches are cut from the slot's endless concatenation of epochs, so no rank
  ever runs dry: every rank yields the same number of batches per training
  epoch (`with_epoch` semantics) and DDP never hangs at an epoch end.

A position is therefore just `(data epoch, samples consumed in it)` per slot
(`(epoch, batches emitted)` with aspect buckets, whose leftovers are dropped at
each epoch end). A resumed run replays the slot's epoch *lazily*: local tars are
scanned header by header and members are read only when a sample is used, so
skipping costs no image reads and no decoding. A broken shard (truncated, bad
header) is read up to the break and reported, not fatal. Nothing here decodes a member
(`ccurate.train.decode`) or runs workers (`ccurate.train.loader`).
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import random
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

LATENT_MANIFEST = "latents.json"
LATENT_FORMAT = "ccurate-latents/1"
MAX_EMPTY_EPOCHS = 8


class DataError(RuntimeError):
    """The data cannot feed the requested run (no shards, too few samples, bad files)."""


# ---- shard discovery ---------------------------------------------------------


def find_shards(data: str | Path | Sequence[str | Path]) -> list[str]:
    """Tar shards of a release: a directory (globbed `**/*.tar`), a file, a URL or a list.

    Hidden files (temporaries of unfinished shards) are ignored; the order is
    sorted, so every rank sees the same list.
    """
    items: list[str | Path] = [data] if isinstance(data, (str, Path)) else list(data)
    out: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                str(p)
                for p in path.glob("**/*.tar")
                if not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            out.extend(found)
        elif path.exists():
            out.append(str(path))
        elif isinstance(item, str) and ("://" in item or item.startswith("pipe:") or "{" in item):
            from webdataset.shardlists import expand_urls

            out.extend(expand_urls(item))
        else:
            raise DataError(f"no such shard or directory: {item}")
    if not out:
        raise DataError(f"no .tar shards found in {data}")
    return out


def find_manifest(data: str | Path | Sequence[str | Path]) -> Path | None:
    """The `latents.json` of a precomputed latent release, if `data` is one."""
    items: list[str | Path] = [data] if isinstance(data, (str, Path)) else list(data)
    if not items:
        return None
    first = Path(items[0])
    candidates = [first] if first.is_dir() else list(first.parents)[:3]
    for c in candidates:
        if (c / LATENT_MANIFEST).exists():
            return c / LATENT_MANIFEST
    return None


def count_samples(shard: str) -> int:
    """Samples in a shard: its parquet index or completion marker if present, else a header scan."""
    prefix = shard[: -len(".tar")] if shard.endswith(".tar") else shard
    if os.path.exists(prefix + ".parquet"):
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(prefix + ".parquet").metadata.num_rows)
    marker = prefix + ".done"
    if os.path.exists(marker):
        with open(marker) as fh:
            stats = json.load(fh)
        if isinstance(stats, dict) and isinstance(stats.get("samples"), int):
            return int(stats["samples"])
    return sum(1 for _ in iter_tar(shard))


# ---- lazy tar reading ----------------------------------------------------------


@dataclass
class Member:
    """One tar member: where its bytes are (local shards) or the bytes themselves (streams)."""

    shard: str
    offset: int
    size: int
    data: bytes | None = None


@dataclass
class RawSample:
    """A sample before decoding: key and members, nothing read yet for local shards."""

    key: str
    shard: str
    members: dict[str, Member] = field(default_factory=dict)


class MemberReader:
    """Reads member bytes by offset from memory-mapped shards (a few kept open per worker).

    A mapping instead of seek + read: no system call and no kernel copy per member, and
    `view` hands out members (`.npy` latents) without any copy at all."""

    def __init__(self, max_open: int = 16) -> None:
        self.max_open = max_open
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()

    def _map(self, shard: str) -> mmap.mmap:
        mm = self._maps.get(shard)
        if mm is None:
            with open(shard, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[shard] = mm
            if len(self._maps) > self.max_open:
                _unmap(self._maps.popitem(last=False)[1])
        else:
            self._maps.move_to_end(shard)
        return mm

    def view(self, m: Member) -> bytes | memoryview:
        """The member's bytes without a copy (valid until `close`)."""
        if m.data is not None:
            return m.data
        mm = self._map(m.shard)
        if m.offset + m.size > len(mm):
            raise DataError(f"{m.shard}: truncated member at offset {m.offset}")
        return memoryview(mm)[m.offset : m.offset + m.size]

    def read(self, m: Member) -> bytes:
        return bytes(self.view(m))

    def close(self) -> None:
        for mm in self._maps.values():
            _unmap(mm)
        self._maps.clear()

    def __del__(self) -> None:
        self.close()


def _unmap(mm: mmap.mmap) -> None:
    # a view of it still alive: it is unmapped when that one goes
    with contextlib.suppress(BufferError):
        mm.close()


def iter_tar(url: str) -> Iterator[RawSample]:
    """Samples of one shard in tar order, members grouped by key.

    Local files: headers parsed from an mmap (`ccurate.tario.iter_spans`), member
    bytes read later by offset. Other URLs (http, `pipe:`) are streamed through
    webdataset's `gopen` and read eagerly.
    """
    from ccurate.shards.read import group_members
    from ccurate.tario import iter_spans

    if os.path.exists(url):
        members: Iterator[tuple[str, Member]] = (
            (name, Member(url, offset, size)) for name, offset, size in iter_spans(url)
        )
    else:
        members = _stream_members(url)
    try:
        for key, fields in group_members(members, url):
            yield RawSample(key.rsplit("/", 1)[-1], url, fields)
    except (ValueError, tarfile.TarError) as exc:
        raise DataError(str(exc)) from exc


def shard_names(shards: Sequence[str]) -> list[str]:
    """Shard paths relative to their deepest common directory: the same names for a release
    and its precomputed latents (which keep the release's relative layout)."""
    if len(shards) == 1:
        return [shards[0].rsplit("/", 1)[-1]]
    dirs = [s.split("/")[:-1] for s in shards]
    common = 0
    while all(len(d) > common and d[common] == dirs[0][common] for d in dirs):
        common += 1
    return ["/".join(s.split("/")[common:]) for s in shards]


def _stream_members(url: str) -> Iterator[tuple[str, Member]]:
    """(name, member with its bytes) of the regular files of a streamed tar."""
    from webdataset import gopen

    stream = gopen(url, "rb")
    with tarfile.open(fileobj=stream, mode="r|*") as tf:
        while (info := tf.next()) is not None:
            cast(Any, tf).members.clear()  # do not accumulate headers of big shards
            if info.isreg():
                fh = tf.extractfile(info)
                data = fh.read() if fh else b""
                yield info.name, Member(url, info.offset_data, info.size, data)


# ---- the deterministic per-slot stream ------------------------------------------


@dataclass(frozen=True)
class StreamSpec:
    """What fixes the sample order: shards, seed, shuffling."""

    shards: tuple[str, ...]
    seed: int = 0
    shuffle_shards: bool = True
    shuffle_buffer: int = 1000


def epoch_shard_order(spec: StreamSpec, epoch: int) -> list[str]:
    order = list(spec.shards)
    if spec.shuffle_shards:
        random.Random(f"{spec.seed}:{epoch}:shards").shuffle(order)
    return order


def _readable(shard: str, errors: list[str] | None) -> Iterator[RawSample]:
    """The samples of `shard` up to where it is broken (truncated, bad header): the rest is
    skipped and the error appended to `errors` (raised when None). Deterministic, so a
    resumed run skips the same samples."""
    try:
        yield from iter_tar(shard)
    except DataError as exc:
        if errors is None:
            raise
        errors.append(str(exc))


def slot_raw(
    spec: StreamSpec, slot: int, n_slots: int, epoch: int, errors: list[str] | None = None
) -> Iterator[RawSample]:
    """This slot's share of one data epoch, before shuffling; broken shards go to `errors`."""
    order = epoch_shard_order(spec, epoch)
    if len(order) >= n_slots:
        for shard in order[slot::n_slots]:
            yield from _readable(shard, errors)
        return
    i = 0  # fewer shards than slots: split by sample (slot 0 alone reports a broken shard)
    for shard in order:
        for raw in _readable(shard, errors if errors is None or slot == 0 else []):
            if i % n_slots == slot:
                yield raw
            i += 1


def shuffle_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Classic reservoir shuffle; deterministic for a given rng state."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        out, buf[j] = buf[j], item
        yield out
    rng.shuffle(buf)
    yield from buf


def slot_epoch(
    spec: StreamSpec, slot: int, n_slots: int, epoch: int, errors: list[str] | None = None
) -> Iterator[RawSample]:
    rng = random.Random(f"{spec.seed}:{epoch}:{slot}:{n_slots}:samples")
    raws = slot_raw(spec, slot, n_slots, epoch, errors)
    return shuffle_buffer(raws, spec.shuffle_buffer, rng)


Position = tuple[int, int]  # (data epoch, samples consumed) or (data epoch, batches emitted)


def fixed_batches(
    spec: StreamSpec,
    slot: int,
    n_slots: int,
    batch_size: int,
    start: Position = (0, 0),
    errors: list[str] | None = None,
) -> Iterator[tuple[list[RawSample], Position]]:
    """Batches of `batch_size` over the slot's endless stream; position = next sample."""
    epoch, skip = start
    pending: list[RawSample] = []
    empty = 0
    while True:
        n = 0
        for i, raw in enumerate(slot_epoch(spec, slot, n_slots, epoch, errors)):
            n += 1
            if i < skip:
                continue
            pending.append(raw)
            if len(pending) == batch_size:
                yield pending, (epoch, i + 1)
                pending = []
        empty = empty + 1 if n == 0 else 0
        if empty >= MAX_EMPTY_EPOCHS:
            raise DataError(
                f"slot {slot}/{n_slots} got no samples in {empty} data epochs: "
                f"too few samples for {n_slots} loader slots; use fewer workers or ranks"
            )
        epoch, skip = epoch + 1, 0


def bucket_batches(
    spec: StreamSpec,
    slot: int,
    n_slots: int,
    batch_size: int,
    bucket_of: Callable[[RawSample], tuple[int, int]],
    start: Position = (0, 0),
    errors: list[str] | None = None,
) -> Iterator[tuple[list[RawSample], Position, tuple[int, int]]]:
    """Batches of one aspect bucket each; leftovers are dropped at each epoch end."""
    epoch, skip = start
    empty = 0
    while True:
        buckets: dict[tuple[int, int], list[RawSample]] = {}
        emitted = 0
        for raw in slot_epoch(spec, slot, n_slots, epoch, errors):
            b = bucket_of(raw)
            group = buckets.setdefault(b, [])
            group.append(raw)
            if len(group) == batch_size:
                del buckets[b]
                emitted += 1
                if emitted > skip:
                    yield group, (epoch, emitted), b
        empty = empty + 1 if emitted == 0 else 0
        if empty >= MAX_EMPTY_EPOCHS:
            raise DataError(
                f"slot {slot}/{n_slots} filled no aspect bucket in {empty} data epochs: "
                "too few samples per bucket; lower batch_size or disable aspect_buckets"
            )
        epoch, skip = epoch + 1, 0


# ---- aspect buckets ----------------------------------------------------------------


def make_buckets(resolution: int, multiple: int, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) pairs of about resolution² pixels, sides multiples of `multiple`."""
    area = resolution * resolution
    out: set[tuple[int, int]] = set()
    w = multiple
    while w <= resolution * max_aspect:
        h = max(multiple, int(area / w) // multiple * multiple)
        if max(h / w, w / h) <= max_aspect:
            out.add((h, w))
        w += multiple
    return sorted(out)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    aspect = math.log(max(width, 1) / max(height, 1))
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))
