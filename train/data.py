"""Streams release shards (or precomputed latent shards) into training batches.

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
skipping costs no image reads and no decoding. The DataLoader's round-robin over
workers is preserved by rotating worker ids by the number of batches consumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import mmap
import os
import random
import tarfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
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
    except ValueError as exc:
        raise DataError(str(exc)) from exc


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


def slot_raw(spec: StreamSpec, slot: int, n_slots: int, epoch: int) -> Iterator[RawSample]:
    """This slot's share of one data epoch, before shuffling."""
    order = epoch_shard_order(spec, epoch)
    if len(order) >= n_slots:
        for shard in order[slot::n_slots]:
            yield from iter_tar(shard)
        return
    i = 0  # fewer shards than slots: split by sample
    for shard in order:
        for raw in iter_tar(shard):
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


def slot_epoch(spec: StreamSpec, slot: int, n_slots: int, epoch: int) -> Iterator[RawSample]:
    rng = random.Random(f"{spec.seed}:{epoch}:{slot}:{n_slots}:samples")
    return shuffle_buffer(slot_raw(spec, slot, n_slots, epoch), spec.shuffle_buffer, rng)


Position = tuple[int, int]  # (data epoch, samples consumed) or (data epoch, batches emitted)


def fixed_batches(
    spec: StreamSpec, slot: int, n_slots: int, batch_size: int, start: Position = (0, 0)
) -> Iterator[tuple[list[RawSample], Position]]:
    """Batches of `batch_size` over the slot's endless stream; position = next sample."""
    epoch, skip = start
    pending: list[RawSample] = []
    empty = 0
    while True:
        n = 0
        for i, raw in enumerate(slot_epoch(spec, slot, n_slots, epoch)):
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
) -> Iterator[tuple[list[RawSample], Position, tuple[int, int]]]:
    """Batches of one aspect bucket each; leftovers are dropped at each epoch end."""
    epoch, skip = start
    empty = 0
    while True:
        buckets: dict[tuple[int, int], list[RawSample]] = {}
        emitted = 0
        for raw in slot_epoch(spec, slot, n_slots, epoch):
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


# ---- resolution ------------------------------------------------------------------


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


def resize_crop(img: Image.Image, height: int, width: int) -> np.ndarray:
    """Cover (height, width) keeping the aspect ratio, then centre-crop: HWC uint8 (PIL path)."""
    if img.format == "JPEG":
        img.draft("RGB", (width, height))  # decode at a reduced scale when far larger
    img = img.convert("RGB")
    scale = max(width / img.width, height / img.height)
    nw, nh = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - width) // 2, (nh - height) // 2
    img = img.crop((left, top, left + width, top + height))
    return np.asarray(img, dtype=np.uint8)


_CV_REDUCED = {
    1: None,
    2: "IMREAD_REDUCED_COLOR_2",
    4: "IMREAD_REDUCED_COLOR_4",
    8: "IMREAD_REDUCED_COLOR_8",
}
_JPEG_SOI = b"\xff\xd8"


def decode_resize_crop(data: bytes, height: int, width: int) -> np.ndarray:
    """Image bytes -> covering resize + centre crop to (height, width), HWC uint8 RGB.

    JPEG goes through simplejpeg (libjpeg-turbo, accurate IDCT, decoding straight to
    RGB with DCT-domain 1/2..1/8 scaling when the image is that much larger than
    needed): 1.38x the OpenCV path per core, 2.5x PIL's (`bench/shard_read.py`).
    PNG/WebP go through OpenCV; anything neither decodes (CMYK JPEG, animated WebP,
    16-bit PNG) through the PIL path, `resize_crop`.
    """
    if data[:2] == _JPEG_SOI:
        arr = _decode_jpeg(data, height, width)
        if arr is not None:
            return _cover_crop(arr, height, width)
    return _decode_other(data, height, width)


def _decode_jpeg(data: bytes, height: int, width: int) -> np.ndarray | None:
    """RGB pixels at the smallest DCT scale still covering (height, width); None when
    simplejpeg cannot decode it (CMYK/YCCK, corrupt data: the PIL path decides)."""
    import simplejpeg

    try:
        h0, w0, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("Gray", "YCbCr", "RGB"):
            return None
        scale = max(width / w0, height / h0)
        arr: np.ndarray = simplejpeg.decode_jpeg(
            data,
            colorspace="RGB",
            min_height=min(h0, math.ceil(h0 * scale)),
            min_width=min(w0, math.ceil(w0 * scale)),
        )
        return arr
    except ValueError:
        return None


def _decode_other(data: bytes, height: int, width: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as probe:  # header only: size and format
            w0, h0 = probe.size
            fmt = probe.format
            mode = probe.mode
    except Exception as exc:
        raise DataError(f"not a decodable image: {exc}") from exc
    scale = max(width / w0, height / h0)
    arr = None
    if mode in ("RGB", "L", "RGBA", "P", "LA") and fmt in ("JPEG", "PNG", "WEBP"):
        factor = 1
        if fmt == "JPEG":
            while factor < 8 and scale * factor * 2 <= 1.0:
                factor *= 2
        name = _CV_REDUCED[factor]
        flag = getattr(cv2, name) if name else cv2.IMREAD_COLOR
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if arr is None:
        with Image.open(io.BytesIO(data)) as img:
            return resize_crop(img, height, width)
    return _cover_crop(cv2.cvtColor(arr, cv2.COLOR_BGR2RGB), height, width)


def _cover_crop(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize HWC pixels to cover (height, width) keeping the aspect ratio, centre-crop."""
    h1, w1 = arr.shape[:2]
    s = max(width / w1, height / h1)
    nw, nh = max(width, round(w1 * s)), max(height, round(h1 * s))
    if (nw, nh) != (w1, h1):
        interp = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
        arr = cv2.resize(arr, (nw, nh), interpolation=interp)
    left, top = (nw - width) // 2, (nh - height) // 2
    return arr[top : top + height, left : left + width]


# ---- captions ----------------------------------------------------------------------


def unit_hash(*parts: Any) -> float:
    """A deterministic uniform in [0, 1) from the parts (no process-dependent hashing)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def pick_caption(
    record: dict[str, Any], txt: str | None, policy: str, mix: float = 0.5, u: float = 0.0
) -> tuple[str, str]:
    """(caption, source) per policy: `synthetic` (json `caption`), `alt_text`, or `mix`.

    Falls back to the other field and then to the `.txt` member when the wanted
    one is empty; `u` is the sample's uniform draw that decides `mix`.
    """
    synthetic = (record.get("caption") or "").strip()
    alt = (record.get("alt_text") or "").strip()
    text = (txt or "").strip()
    if policy == "synthetic":
        order = [("synthetic", synthetic), ("txt", text), ("alt_text", alt)]
    elif policy == "alt_text":
        order = [("alt_text", alt), ("txt", text), ("synthetic", synthetic)]
    elif policy == "mix":
        first = ("synthetic", synthetic) if u < mix else ("alt_text", alt)
        second = ("alt_text", alt) if u < mix else ("synthetic", synthetic)
        order = [first, second, ("txt", text)]
    else:
        raise ValueError(f"unknown caption policy {policy!r}")
    for source, value in order:
        if value:
            return value, source
    return "", "empty"


# ---- decoding ----------------------------------------------------------------------


def _shared_uint8(n: int) -> torch.Tensor:
    """A 1-D uint8 tensor of `n` bytes in a fresh shared-memory segment."""
    storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(n)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def batch_buffer(nbytes: int) -> torch.Tensor:
    """An uninitialised flat uint8 tensor for a batch's arrays. In a DataLoader worker it
    is allocated in shared memory, as torch's default_collate does: handing the batch to
    the trainer then moves no data (otherwise pickling copies every batch into a fresh
    shared segment: one more pass over every byte, and its page faults)."""
    if get_worker_info() is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    return _shared_uint8(nbytes)


class BatchRing:
    """A loader worker's `depth` shared-memory batch buffers, reused in turn.

    A fresh shared segment per batch costs the kernel its page faults: 3,072 zeroed
    4-KiB pages per 64 x 256 x 256 batch, ~13 ms, about 0.2 ms per sample, a quarter
    of the worker's time per sample (`bench/shard_read.py`). Reuse is safe because of a
    handshake with `TrainLoader`: it copies each batch out (or the DataLoader's pinning
    thread already did) before the trainer sees it, then counts it in `released`, a
    counter per worker in shared memory; the worker refills a buffer only once the
    batch that last used it is counted. Batch `seq` goes to buffer `seq % depth`.
    """

    CLOSED = 1 << 62  # `released` value that TrainLoader.close() sets: stop waiting

    def __init__(self, released: torch.Tensor, worker: int, depth: int) -> None:
        self.released = released
        self.worker = worker
        self.depth = max(1, depth)
        self.seq = 0
        self.issued: int | None = None
        self._slots: list[torch.Tensor | None] = [None] * self.depth
        self._parent = os.getppid()

    def buffer(self, nbytes: int) -> torch.Tensor:
        """The next batch's buffer, flat uint8 (`Decoder.decode` fills every byte it uses)."""
        seq, slot = self.seq, self.seq % self.depth
        self._wait_released(seq - self.depth + 1)
        flat = self._slots[slot]
        if flat is None or flat.numel() < nbytes:  # first use, or a bigger bucket
            flat = self._slots[slot] = _shared_uint8(nbytes)
        self.seq, self.issued = seq + 1, seq
        return flat[:nbytes]

    def tag(self, batch: dict[str, Any]) -> None:
        """Mark `batch` with its buffer and the entries that live in it, for the trainer to
        copy out and release; no-op when no buffer was taken."""
        if self.issued is None:
            return
        slot = self._slots[self.issued % self.depth]
        assert slot is not None
        ptr = slot.untyped_storage().data_ptr()
        views = [
            k
            for k, v in batch.items()
            if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() == ptr
        ]
        batch["ring"] = [self.worker, self.issued, views]
        self.issued = None

    def _wait_released(self, count: int) -> None:
        while int(self.released[self.worker]) < count:
            if os.getppid() != self._parent:
                raise DataError("the training process is gone")
            time.sleep(0.0005)


@dataclass
class Decoder:
    """Turns raw samples into a batch: pixels + token ids, or latents + text embeddings."""

    mode: str  # "image" or "latent"
    height: int
    width: int
    caption_source: str = "synthetic"
    caption_mix: float = 0.5
    seed: int = 0
    tokenizer: Callable[[Sequence[str]], torch.Tensor] | None = None
    # horizontal flip of half the images, fixed by (seed, data epoch, key): resumable
    random_flip: bool = False

    def record(self, raw: RawSample, reader: MemberReader) -> dict[str, Any]:
        m = raw.members.get("json")
        if m is None:
            return {}
        try:
            rec = json.loads(reader.read(m))
        except (ValueError, UnicodeDecodeError):
            return {}
        return rec if isinstance(rec, dict) else {}

    def text(self, raw: RawSample, reader: MemberReader) -> str | None:
        m = raw.members.get("txt")
        return reader.read(m).decode("utf-8", "replace") if m is not None else None

    def _image(self, raw: RawSample, reader: MemberReader, h: int, w: int) -> np.ndarray:
        for ext in IMAGE_EXTS:
            m = raw.members.get(ext)
            if m is not None:
                return decode_resize_crop(reader.read(m), h, w)
        raise DataError(f"{raw.key}: no image member ({', '.join(raw.members)})")

    def decode(
        self,
        group: list[RawSample],
        epoch: int,
        reader: MemberReader,
        hw: tuple[int, int] | None = None,
        alloc: Callable[[int], torch.Tensor] = batch_buffer,
    ) -> dict[str, Any]:
        """A batch of `group`; `alloc(nbytes)` gives the flat buffer its arrays are
        written into (a `BatchRing`'s in `TrainLoader` workers)."""
        h, w = hw or (self.height, self.width)
        if self.mode == "latent":
            return self._decode_latent(group, epoch, reader, alloc)
        # one NHWC buffer filled in place; the batch is its NCHW view (channels-last
        # strides: no transposing copy here, the model's first conv takes either layout)
        batch = alloc(len(group) * h * w * 3).view(len(group), h, w, 3)
        pixels = batch.numpy()
        ok: list[int] = []
        bad_rows: list[int] = []
        captions: list[str] = []
        bad: list[str] = []
        for i, raw in enumerate(group):
            rec = self.record(raw, reader)
            u = unit_hash(self.seed, epoch, raw.key, "caption")
            captions.append(
                pick_caption(rec, self.text(raw, reader), self.caption_source, self.caption_mix, u)[
                    0
                ]
            )
            try:
                img = self._image(raw, reader, h, w)
                if self.random_flip and unit_hash(self.seed, epoch, raw.key, "flip") < 0.5:
                    cv2.flip(img, 1, dst=pixels[i])  # numpy's copy of a mirrored view: 50x slower
                else:
                    pixels[i] = img
                ok.append(i)
            except Exception:  # undecodable image: keep the batch shape, count it
                bad.append(raw.key)
                bad_rows.append(i)
        if ok and bad_rows:  # stand-ins for the bad ones: a good image of the batch
            pixels[bad_rows] = pixels[ok[0]]
        elif bad_rows:
            pixels[:] = 0
        out: dict[str, Any] = {
            "pixels": batch.permute(0, 3, 1, 2),
            "keys": [r.key for r in group],
            "bad": bad,
        }
        if self.tokenizer is not None:
            out["input_ids"] = self.tokenizer(captions)
        out["captions"] = captions
        return out

    def _decode_latent(
        self,
        group: list[RawSample],
        epoch: int,
        reader: MemberReader,
        alloc: Callable[[int], torch.Tensor] = batch_buffer,
    ) -> dict[str, Any]:
        latents, embs = [], []
        for raw in group:
            latents.append(npy_view(reader.view(_need(raw, "latent.npy")), raw.key))
            u = unit_hash(self.seed, epoch, raw.key, "caption")
            want = {"synthetic": "emb.npy", "alt_text": "alt.npy"}.get(self.caption_source)
            if want is None:  # mix
                want = "emb.npy" if u < self.caption_mix else "alt.npy"
            m = raw.members.get(want) or raw.members.get("emb.npy") or raw.members.get("alt.npy")
            if m is None:
                raise DataError(f"{raw.shard}: sample {raw.key} has no text embedding member")
            embs.append(npy_view(reader.view(m), raw.key))
        lat_t, emb_t = stack_into([latents, embs], alloc)
        return {"latents": lat_t, "emb": emb_t, "keys": [r.key for r in group], "bad": []}


def stack_into(
    groups: Sequence[Sequence[np.ndarray]], alloc: Callable[[int], torch.Tensor]
) -> list[torch.Tensor]:
    """`np.stack` each group of equal-shape arrays into one flat `alloc` buffer: one copy per
    array, and the tensors share the buffer's (shared-memory) storage."""
    metas = []
    total = 0
    for arrays in groups:
        first = arrays[0]
        shape = (len(arrays), *first.shape)
        if any(a.shape != first.shape or a.dtype != first.dtype for a in arrays):
            raise DataError(f"arrays of a batch differ in shape or dtype: {shape}, {first.dtype}")
        dtype = torch.from_numpy(np.empty(0, first.dtype)).dtype
        n = math.prod(shape) * first.dtype.itemsize
        metas.append((total, n, shape, dtype))
        total += -(-n // 64) * 64  # 64-byte aligned
    flat = alloc(total)
    out = []
    for arrays, (off, n, shape, dtype) in zip(groups, metas, strict=True):
        t = flat[off : off + n].view(dtype).view(shape)
        np.stack(arrays, out=t.numpy())
        out.append(t)
    return out


def _need(raw: RawSample, ext: str) -> Member:
    m = raw.members.get(ext)
    if m is None:
        raise DataError(f"{raw.shard}: sample {raw.key} has no .{ext} member")
    return m


def npy_bytes(arr: np.ndarray) -> bytes:
    """An array as an `.npy` member (no pickle): what `npy_view` and `load_npy` read."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes | memoryview, key: str = "") -> np.ndarray:
    """An `.npy` member as a writable array of its own (`npy_view` copied)."""
    return np.array(npy_view(data, key))


def npy_view(data: bytes | memoryview, key: str = "") -> np.ndarray:
    """An `.npy` member as a read-only view of `data`: no copy. Object arrays (pickles)
    are refused."""
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:  # 3.0 (utf-8 field names): rare, numpy's reader takes it (with a copy)
            return np.load(io.BytesIO(data), allow_pickle=False)
        if dtype.hasobject:
            raise ValueError("object arrays cannot be loaded without pickle")
        arr = np.frombuffer(data, dtype, math.prod(shape), fp.tell())
        return arr.reshape(shape, order="F" if fortran else "C")
    except ValueError as exc:
        raise DataError(f"{key}: refused .npy member (pickled or malformed): {exc}") from exc


def bucket_reader(
    mode: str, buckets: Sequence[tuple[int, int]], vae_factor: int
) -> Callable[[RawSample, MemberReader], tuple[int, int]]:
    """How a raw sample finds its bucket cheaply: json sizes, else the image header."""

    def bucket_of(raw: RawSample, reader: MemberReader) -> tuple[int, int]:
        rec: dict[str, Any] = {}
        m = raw.members.get("json")
        if m is not None:
            try:
                rec = json.loads(reader.read(m))
            except ValueError:
                rec = {}
        if mode == "latent":
            lat = rec.get("latent_hw")
            if lat:
                return int(lat[0]) * vae_factor, int(lat[1]) * vae_factor
            arr = npy_view(reader.view(_need(raw, "latent.npy")), raw.key)
            return int(arr.shape[-2]) * vae_factor, int(arr.shape[-1]) * vae_factor
        w, h = rec.get("width"), rec.get("height")
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            for ext in IMAGE_EXTS:
                im = raw.members.get(ext)
                if im is not None:
                    try:
                        with Image.open(io.BytesIO(reader.read(im))) as img:
                            w, h = img.size
                    except Exception:
                        w, h = 1, 1
                    break
            else:
                w, h = 1, 1
        return nearest_bucket(int(w), int(h), buckets)

    return bucket_of


# ---- the dataset and the loader ------------------------------------------------------


class ShardDataset(IterableDataset[dict[str, Any]]):
    """One rank's endless batch stream; batching happens in the workers (`batch_size=None`)."""

    def __init__(
        self,
        spec: StreamSpec,
        decoder: Decoder,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
        buckets: Sequence[tuple[int, int]] | None = None,
        vae_factor: int = 1,
        start: dict[int, Position] | None = None,
        rotate: int = 0,
    ) -> None:
        self.spec = spec
        self.decoder = decoder
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.num_workers = num_workers
        self.buckets = list(buckets) if buckets else None
        self.vae_factor = vae_factor
        self.start = dict(start or {})
        self.rotate = rotate
        # set by TrainLoader: worker batch buffers are then reused (`BatchRing`)
        self.ring_released: torch.Tensor | None = None
        self.ring_depth = 0

    @property
    def n_logical(self) -> int:
        return max(1, self.num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        nw = self.n_logical
        lw = (physical + self.rotate) % nw
        slot, n_slots = self.rank * nw + lw, self.world * nw
        start = self.start.get(lw, (0, 0))
        reader = MemberReader()
        ring = None
        if info is not None and self.ring_released is not None:
            ring = BatchRing(self.ring_released, physical, self.ring_depth)
        alloc = ring.buffer if ring is not None else batch_buffer
        try:
            if self.buckets is None:
                for group, pos in fixed_batches(self.spec, slot, n_slots, self.batch_size, start):
                    batch = self.decoder.decode(group, pos[0], reader, alloc=alloc)
                    batch["pos"] = [lw, pos[0], pos[1]]
                    if ring is not None:
                        ring.tag(batch)
                    yield batch
            else:
                of = bucket_reader(self.decoder.mode, self.buckets, self.vae_factor)
                for group, pos, hw in bucket_batches(
                    self.spec, slot, n_slots, self.batch_size, lambda r: of(r, reader), start
                ):
                    batch = self.decoder.decode(group, pos[0], reader, hw, alloc)
                    batch["pos"] = [lw, pos[0], pos[1]]
                    if ring is not None:
                        ring.tag(batch)
                    yield batch
        finally:
            reader.close()


class TrainLoader:
    """A rank's loader: endless, with a fixed epoch length and a resumable position.

    `state()` is what a checkpoint stores; `TrainLoader(..., state=...)` resumes
    from it. Positions are taken from the batches actually handed out, never from
    what the workers prefetched. Its workers fill a ring of reused shared-memory
    buffers (`BatchRing`); each batch is copied out of its buffer (by the pinning
    thread with `pin_memory`, else here) before it is handed out, so a batch the
    trainer keeps never changes.
    """

    def __init__(
        self,
        dataset: ShardDataset,
        epoch_batches: int,
        pin_memory: bool = False,
        prefetch_factor: int = 4,
        state: dict[str, Any] | None = None,
        reuse_buffers: bool = True,
    ) -> None:
        """`reuse_buffers=False`: workers put every batch in a new shared-memory segment,
        the design before `BatchRing` (for comparisons)."""
        self.epoch_batches = max(1, epoch_batches)
        self.reuse_buffers = reuse_buffers
        self.batches = 0
        self.positions: dict[int, Position] = {}
        if state:
            self.batches = int(state["batches"])
            self.positions = {int(k): (int(v[0]), int(v[1])) for k, v in state["workers"].items()}
        dataset.start = dict(self.positions)
        dataset.rotate = self.batches % dataset.n_logical
        self.dataset = dataset
        nw = dataset.num_workers
        # a worker is at most prefetch_factor batches ahead of what was handed out here;
        # two more buffers and it never waits for a release
        dataset.ring_depth = prefetch_factor + 2
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=nw,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if nw > 0 else None,
            persistent_workers=False,
        )
        self._it: Iterator[dict[str, Any]] | None = None
        # the received ring buffers, kept mapped: torch then maps each buffer once instead of
        # on every batch (and its page faults with it)
        self._mapped: dict[tuple[int, int], torch.Tensor] = {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        """The next batch; it counts as consumed only once passed to `mark`."""
        if self._it is None:
            if self.reuse_buffers and self.dataset.num_workers > 0:
                counters = torch.zeros(self.dataset.num_workers, dtype=torch.int64)
                self.dataset.ring_released = counters.share_memory_()
            self._it = iter(self.loader)
        batch = next(self._it)
        ring = batch.pop("ring", None)
        if ring is not None:
            worker, seq, views = int(ring[0]), int(ring[1]), ring[2]
            for k in views:
                t = batch[k]
                if not t.is_pinned():  # pinning already copied it out of the shared buffer
                    self._mapped[(worker, seq % self.dataset.ring_depth)] = t
                    batch[k] = t.clone()  # keeps the strides (channels-last pixels)
            released = self.dataset.ring_released
            assert released is not None
            released[worker] = seq + 1
        return batch

    def mark(self, batch: dict[str, Any]) -> None:
        """Record `batch` as consumed (the trainer calls this when the step uses it)."""
        lw, epoch, n = batch.pop("pos")
        self.positions[int(lw)] = (int(epoch), int(n))
        self.batches += 1

    def epoch(self) -> Iterator[dict[str, Any]]:
        """Exactly `epoch_batches` batches: the same count on every rank."""
        for _ in range(self.epoch_batches):
            batch = next(self)
            self.mark(batch)
            yield batch

    @property
    def epoch_index(self) -> int:
        return self.batches // self.epoch_batches

    def state(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "workers": {str(k): list(v) for k, v in sorted(self.positions.items())},
            "num_workers": self.dataset.num_workers,
            "batch_size": self.dataset.batch_size,
        }

    def close(self) -> None:
        if self.dataset.ring_released is not None:
            self.dataset.ring_released.fill_(BatchRing.CLOSED)  # no worker waits on a release
            self.dataset.ring_released = None
        self._mapped.clear()
        self._it = None  # the DataLoader iterator shuts its workers down when collected
