"""The deterministic per-slot sample stream over release (or latent) shards.

The stream is a pure function of (seed, data epoch, slot), where a *slot* is one
DataLoader worker of one rank (`slot = rank * workers + worker`):

- every data epoch the shard list is permuted with the seed and the epoch, the
  same way on every rank, and cut by sample counts into one contiguous part per
  slot, of equal size within one sample (`slot_raw`): the slots of a data epoch
  show every sample exactly once and end it together, whatever the shard sizes;
- a seeded shuffle buffer mixes samples within the slot's epoch;
- batches are cut from the slot's endless concatenation of epochs, so no rank
  ever runs dry: every rank yields the same number of batches per training
  epoch (`with_epoch` semantics) and DDP never hangs at an epoch end.

A position is therefore just `(data epoch, samples consumed in it)` per slot
(`(epoch, batches emitted)` with aspect buckets, whose leftovers end each epoch
in one padded batch per bucket: `bucket_batches`). A resumed run replays the slot's
epoch *lazily*: local tars are scanned header by header and members are read only
when a sample is used, so skipping costs no image reads and no decoding. A broken
shard (truncated, bad header) is read up to the break and reported, not fatal.
Nothing here decodes a member (`ccurate.train.decode`) or runs workers
(`ccurate.train.loader`).
"""

from __future__ import annotations

import contextlib
import itertools
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

from ccurate.train.config import DEFAULT_SPLITS

LATENT_MANIFEST = "latents.json"
LATENT_FORMAT = "ccurate-latents/1"
MAX_EMPTY_EPOCHS = 8


class DataError(RuntimeError):
    """The data cannot feed the requested run (no shards, too few samples, bad files)."""


# ---- shard discovery ---------------------------------------------------------


RELEASE_SUCCESS = "_SUCCESS"  # a release's completion marker (ccurate.shards.release)
RELEASE_SPLITS = ("commercial", "noncommercial")


def _tars_under(path: Path) -> list[str]:
    return sorted(
        str(p)
        for p in path.glob("**/*.tar")
        if not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def _release_root(path: Path) -> Path | None:
    """The release a path lies in (the path itself or one of its 3 parents), if any."""
    for root in [path, *list(path.absolute().parents)[:3]]:
        if (root / RELEASE_SUCCESS).is_file():
            return root
    return None


def _superset_splits(root: Path) -> bool:
    """Whether the release's noncommercial split repeats its commercial samples."""
    try:
        info = json.loads((root / "release.json").read_text())
    except (OSError, ValueError):
        return False
    return bool((info.get("config") or {}).get("noncommercial_includes_commercial"))


def _release_shards(root: Path, splits: Sequence[str]) -> list[str]:
    """The shards of the chosen splits of a release (`<split>/[res-N/]*.tar`)."""
    have = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name in RELEASE_SPLITS)
    missing = [s for s in splits if s not in have]
    if missing:
        raise DataError(
            f"release {root} has no {' or '.join(map(repr, missing))} split (it has "
            f"{have or 'none'}): set train.splits to the splits to train on"
        )
    if len(set(splits)) > 1 and _superset_splits(root):
        raise DataError(
            f"the noncommercial split of release {root} already holds every commercial sample "
            "(shards.noncommercial_includes_commercial): reading both would train each "
            "commercial sample twice; set train.splits = ['noncommercial'] to train on both"
        )
    tars = [t for s in dict.fromkeys(splits) for t in _tars_under(root / s)]
    if (root / "SHA256SUMS").is_file():  # what the release is: a stray tar beside it is not
        from ccurate.shards.release import listed_files

        listed = {str(root / rel) for rel in listed_files(root)}
        tars = [t for t in tars if t in listed]
    return sorted(tars)


def _check_split(path: Path, splits: Sequence[str]) -> None:
    """A shard or folder picked inside a release must belong to a chosen split."""
    root = _release_root(path.parent if path.is_file() else path)
    if root is None or root == path:
        return
    split = path.absolute().relative_to(root.absolute()).parts[0]
    if split in RELEASE_SPLITS and split not in splits:
        raise DataError(
            f"{path} is in the {split!r} split of release {root}, but train.splits = "
            f"{list(splits)}: add {split!r} to train.splits to train on it"
        )


def find_shards(
    data: str | Path | Sequence[str | Path], splits: Sequence[str] = DEFAULT_SPLITS
) -> list[str]:
    """Tar shards of a release: a directory (globbed `**/*.tar`), a file, a URL or a list.

    A release directory (one with `_SUCCESS`) gives only the shards of `splits`: a
    release also publishes a noncommercial split, which a commercial run must not read,
    and with `noncommercial_includes_commercial` that split repeats the commercial samples
    (choosing both splits of such a release is refused). A folder or file inside a release
    must belong to a chosen split; other folders are read whole. Hidden files (temporaries
    of unfinished shards) are ignored; the order is sorted, so every rank sees the same list.
    """
    items: list[str | Path] = [data] if isinstance(data, (str, Path)) else list(data)
    out: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            if (path / RELEASE_SUCCESS).is_file():
                out.extend(_release_shards(path, splits))
            else:
                _check_split(path, splits)
                out.extend(_tars_under(path))
        elif path.exists():
            _check_split(path, splits)
            out.append(str(path))
        elif isinstance(item, str) and ("://" in item or item.startswith("pipe:") or "{" in item):
            from webdataset.shardlists import expand_urls

            out.extend(expand_urls(item))
        else:
            raise DataError(f"no such shard or directory: {item}")
    if not out:
        raise DataError(f"no .tar shards found in {data}")
    _check_shard_splits(out, splits)
    return out


def _check_shard_splits(shards: Sequence[str], splits: Sequence[str]) -> None:
    """The split rule on every local shard, whatever form `data` took (a brace pattern, a
    list of files or of split folders): a shard in a release split must be of a chosen
    split, and the two splits of a release whose noncommercial split repeats the commercial
    samples must not both be read. One release lookup per folder, not per shard."""
    roots: dict[Path, Path | None] = {}
    seen: dict[Path, set[str]] = {}
    for shard in shards:
        if "://" in shard or shard.startswith("pipe:") or not os.path.exists(shard):
            continue
        path = Path(shard).absolute()
        if path.parent not in roots:
            roots[path.parent] = _release_root(path.parent)
        root = roots[path.parent]
        if root is None:
            continue
        parts = path.relative_to(root).parts
        if len(parts) < 2 or parts[0] not in RELEASE_SPLITS:
            continue
        if parts[0] not in splits:
            raise DataError(
                f"{shard} is in the {parts[0]!r} split of release {root}, but train.splits = "
                f"{list(splits)}: add {parts[0]!r} to train.splits to train on it"
            )
        seen.setdefault(root, set()).add(parts[0])
    for root, got in seen.items():
        if len(got) > 1 and _superset_splits(root):
            raise DataError(
                f"the noncommercial split of release {root} already holds every commercial "
                "sample (shards.noncommercial_includes_commercial): reading both would train "
                "each commercial sample twice; read only its noncommercial split"
            )


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


_COUNTS: dict[tuple[str, int, int], tuple[int, str]] = {}  # (shard, bytes, mtime_ns) ->


def _stamp(shard: str) -> tuple[str, int, int]:
    try:
        st = os.stat(shard)
    except OSError:  # a URL: its name is all there is
        return (shard, -1, -1)
    return (shard, st.st_size, st.st_mtime_ns)


def _count(shard: str) -> tuple[int, str]:
    """(samples, "") by `count_samples`; a shard with no index that breaks: (samples up to
    the break, the error)."""
    try:
        return count_samples(shard), ""
    except DataError:
        pass
    n = 0
    try:
        for _ in iter_tar(shard):
            n += 1
    except DataError as exc:
        return n, str(exc)
    return n, ""


def countable(shards: Sequence[str]) -> bool:
    """Whether every shard is a local file, counted cheaply (index, marker or header scan)
    before training. A URL or `pipe:` shard can only be counted by reading it whole, so a
    stream with one is never counted: its slots split each data epoch by whole shards
    (`slot_raw`), and the trainer takes its epoch length from `epoch_samples`."""
    return all(os.path.exists(s) for s in shards)


def shard_counts(
    shards: Sequence[str], known: Sequence[tuple[int, str]] | None = None
) -> list[tuple[int, str]]:
    """(samples, error) per shard (`_count`), cached per process by path, size and mtime;
    `known` (counted in the parent process) fills the cache of a loader worker. Every slot
    splits each data epoch by these counts, so all must agree on them."""
    out = []
    for i, shard in enumerate(shards):
        stamp = _stamp(shard)
        got = _COUNTS.get(stamp)
        if got is None:
            got = (int(known[i][0]), str(known[i][1])) if known is not None else _count(shard)
            _COUNTS[stamp] = got
        out.append(got)
    return out


def slot_raw(
    spec: StreamSpec, slot: int, n_slots: int, epoch: int, errors: list[str] | None = None
) -> Iterator[RawSample]:
    """This slot's share of one data epoch, before shuffling; broken shards go to `errors`.

    The epoch's shards, in their permuted order, are one sequence of N samples (counted by
    `shard_counts`), cut into `n_slots` contiguous parts of N // n_slots or one more samples;
    the slot takes part `(slot + epoch) % n_slots`, so which slots get the longer parts
    rotates and no slot runs through its epochs faster than the others. The slots of one
    data epoch thus show every sample exactly once, and all slots end their epochs together
    whatever the shard sizes: a training epoch (`TrainLoader`, batches round-robin over
    workers) is exactly one data epoch when N is a multiple of batch size x workers x ranks,
    otherwise it ends less than a batch per slot away from one. A slot reads only the
    shards its part overlaps; the samples before its part in its first shard are skipped by
    their headers, reading no member. A broken shard is reported by one slot only: the one
    whose part holds the first sample missing (a shard shorter than its index says), or its
    last readable sample (a shard without index, counted up to its break). Streamed shards
    (URL, `pipe:`) are never read to be counted: `_slot_raw_by_shard` splits by shard.
    """
    order = epoch_shard_order(spec, epoch)
    if not _countable(spec.shards):
        yield from _slot_raw_by_shard(order, slot, n_slots, epoch, errors)
        return
    counts = dict(zip(spec.shards, shard_counts(spec.shards), strict=True))
    total = sum(counts[shard][0] for shard in order)
    part = (slot + epoch) % n_slots
    lo, hi = part * total // n_slots, (part + 1) * total // n_slots
    offset = 0
    for shard in order:
        size, broken = counts[shard]
        if broken and lo <= min(offset + max(size - 1, 0), total - 1) < hi:
            if errors is None:
                raise DataError(broken)
            errors.append(broken)
        first, last = max(lo - offset, 0), min(hi - offset, size)
        offset += size
        if first >= last:
            if offset >= hi:
                return
            continue
        samples = iter_tar(shard)
        stage = 0
        try:
            next(itertools.islice(samples, first, first), None)  # header scans only
            stage = 1  # the break, if any, is now at a sample of this part: ours to report
            yield from itertools.islice(samples, last - first)
        except DataError as exc:
            if errors is None:
                raise
            if stage:
                errors.append(str(exc))


_COUNTABLE: dict[tuple[str, ...], bool] = {}


def _countable(shards: tuple[str, ...]) -> bool:
    got = _COUNTABLE.get(shards)
    if got is None:
        got = _COUNTABLE[shards] = countable(shards)
    return got


def _readable(shard: str, errors: list[str] | None) -> Iterator[RawSample]:
    try:
        yield from iter_tar(shard)
    except DataError as exc:
        if errors is None:
            raise
        errors.append(str(exc))


def _slot_raw_by_shard(
    order: list[str], slot: int, n_slots: int, epoch: int, errors: list[str] | None
) -> Iterator[RawSample]:
    """`slot_raw` for streamed (URL, `pipe:`) shards, which are not counted: the slot reads
    whole shards, every `n_slots`-th of the epoch's order from part `(slot + epoch) %
    n_slots`, or, with fewer shards than slots, every `n_slots`-th sample (one part alone
    reports a broken shard). A data epoch still shows every sample once, but slots end it
    together only when the shards are even: with uneven shards a training epoch is not
    exactly one pass (`epoch_samples` sets its length)."""
    part = (slot + epoch) % n_slots
    if len(order) >= n_slots:
        for shard in order[part::n_slots]:
            yield from _readable(shard, errors)
        return
    i = 0
    for shard in order:
        for raw in _readable(shard, errors if errors is None or part == 0 else []):
            if i % n_slots == part:
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
) -> Iterator[tuple[list[RawSample], Position, tuple[int, int], int]]:
    """(batch, position, bucket, padded): batches of one aspect bucket each.

    Every sample of the slot's data epoch trains in it: at the epoch's end each bucket
    that holds leftovers (fewer than `batch_size`, e.g. a rare aspect whose share of the
    slot never fills a batch) gives one last batch, filled up to `batch_size` (a fixed
    shape for DDP and compiled models) with repeats: samples of that bucket's last full
    batch of the epoch, else the leftovers themselves in turn. `padded` is the number of
    repeated rows (the loader counts them as `bucket_padding`): a repeat trains a sample
    twice in the epoch; a bucket far below `batch_size` gets its few samples weighted up.
    """
    epoch, skip = start
    empty = 0
    while True:
        buckets: dict[tuple[int, int], list[RawSample]] = {}
        full: dict[tuple[int, int], list[RawSample]] = {}  # each bucket's last full batch
        emitted = 0
        for raw in slot_epoch(spec, slot, n_slots, epoch, errors):
            b = bucket_of(raw)
            group = buckets.setdefault(b, [])
            group.append(raw)
            if len(group) == batch_size:
                del buckets[b]
                full[b] = group
                emitted += 1
                if emitted > skip:
                    yield group, (epoch, emitted), b, 0
        for b, group in buckets.items():  # in the order the buckets were first met
            fill = full.get(b) or list(group)
            padded = batch_size - len(group)
            group.extend(fill[i % len(fill)] for i in range(padded))
            emitted += 1
            if emitted > skip:
                yield group, (epoch, emitted), b, padded
        empty = empty + 1 if emitted == 0 else 0
        if empty >= MAX_EMPTY_EPOCHS:
            raise DataError(
                f"slot {slot}/{n_slots} got no samples in {empty} data epochs: "
                f"too few samples for {n_slots} loader slots; use fewer workers or ranks"
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
