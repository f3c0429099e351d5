"""Raw samples into batch arrays: pixels and captions, or latents and text embeddings.

Everything a worker spends its time on per sample lives here: JPEG decoding at a
reduced DCT scale, the covering resize + crop, the caption pick, and `.npy`
members viewed without a copy. Arrays are written straight into one flat buffer
per batch that the caller allocates (shared memory in loader workers), so
handing a batch to the trainer moves no data.

A sample whose image does not decode costs its whole sample: its row trains on the
pixels *and* caption (or latent and embedding) of a good sample of the same batch, listed
in the batch's `bad`; a batch with no good sample raises `BadBatch` and the loader skips
it (counted). A sample with no caption at all (`pick_caption` -> "empty") is kept and
trains unconditionally, on the empty caption: the same null-condition training that
caption dropout does for classifier-free guidance (Ho & Salimans, 2022), and its image
still teaches the image prior; each batch counts them in `empty`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import orjson
import torch
from PIL import Image, ImageOps
from torch.utils.data import get_worker_info

from ccurate.pixels import exif_orientation, jpeg_orientation, to_rgb
from ccurate.train.stream import DataError, Member, MemberReader, RawSample, nearest_bucket

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


# ---- pixels ----------------------------------------------------------------------


def resize_crop(img: Image.Image, height: int, width: int) -> np.ndarray:
    """Cover (height, width) keeping the aspect ratio, then centre-crop: HWC uint8 (PIL path)."""
    if img.format == "JPEG":
        img.draft("RGB", (width, height))  # decode at a reduced scale when far larger
    img = to_rgb(ImageOps.exif_transpose(img))
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


class DecodeBuffer:
    """A reused output buffer for JPEG decoding: a fresh 250 KB array per image costs a
    large allocation and its page faults every time (~5 % of a 256-px decode). What
    `decode_resize_crop` returns with one is a view into it, valid until the next call."""

    def __init__(self) -> None:
        self._buf = np.empty(0, np.uint8)

    def get(self, nbytes: int) -> np.ndarray:
        if self._buf.size < nbytes:
            self._buf = np.empty(nbytes, np.uint8)
        return self._buf


def decode_resize_crop(
    data: bytes,
    height: int,
    width: int,
    *,
    fast: bool = False,
    buffer: DecodeBuffer | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Image bytes -> covering resize + centre crop to (height, width), HWC uint8 RGB.

    JPEG goes through simplejpeg (libjpeg-turbo, decoding straight to RGB with
    DCT-domain 1/2..1/8 scaling when the image is that much larger than needed):
    1.38x the OpenCV path per core, 2.5x PIL's (`bench/shard_read.py`). `fast` uses
    libjpeg-turbo's fast integer IDCT and chroma upsampling (what FFCV trains with): 11 %
    less decode time on 256-px release JPEGs, pixels 45 dB PSNR from the accurate decode.
    With `buffer` the JPEG is decoded into it (see `DecodeBuffer`); with `out` (a C-contiguous
    (height, width, 3) uint8 array), a JPEG already of that size is decoded straight into
    it and `out` returned: a release written at the training size needs no copy at all.
    PNG/WebP go through OpenCV; anything neither decodes (CMYK JPEG, animated WebP,
    16-bit PNG) through the PIL path, `resize_crop`. EXIF orientation is applied (a
    kept-original phone photo is stored sideways with a tag): a JPEG that has one other
    than 1 takes the OpenCV path, which applies it.
    """
    if data[:2] == _JPEG_SOI:
        arr = _decode_jpeg(data, height, width, fast, buffer, out)
        if arr is not None:
            return arr if arr is out else _cover_crop(arr, height, width)
    return _decode_other(data, height, width)


def _decode_jpeg(
    data: bytes, height: int, width: int, fast: bool, buffer: DecodeBuffer | None, out: Any
) -> np.ndarray | None:
    """RGB pixels at the smallest DCT scale still covering (height, width); None when
    simplejpeg cannot decode it (CMYK/YCCK, corrupt data: the PIL path decides) or the
    image carries an EXIF rotation or flip (the OpenCV path applies it)."""
    import simplejpeg

    if jpeg_orientation(data) != 1:
        return None
    try:
        h0, w0, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("Gray", "YCbCr", "RGB"):
            return None
        scale = max(width / w0, height / h0)
        # already the wanted size: decoded where the caller wants it
        direct = (
            out is not None
            and (h0, w0) == (height, width) == out.shape[:2]
            and out.shape[2:] == (3,)
            and out.dtype == np.uint8
            and out.flags.c_contiguous
        )
        into = out if direct else None
        if not direct and buffer is not None:
            into = buffer.get(h0 * w0 * 3)  # the full size: a scaled decode is never larger
        arr: np.ndarray = simplejpeg.decode_jpeg(
            data,
            colorspace="RGB",
            fastdct=fast,
            fastupsample=fast,
            min_height=min(h0, math.ceil(h0 * scale)),
            min_width=min(w0, math.ceil(w0 * scale)),
            buffer=into,
        )
        return out if direct else arr
    except ValueError:
        return None


def _decode_other(data: bytes, height: int, width: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as probe:  # header only: size and format
            w0, h0 = probe.size
            fmt = probe.format
            mode = probe.mode
            if exif_orientation(probe) in (5, 6, 7, 8):
                w0, h0 = h0, w0  # OpenCV returns the upright image
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


def parse_record(data: bytes) -> dict[str, Any]:
    """A sample's `.json` member as a dict, {} when unreadable. orjson parses a release
    record (~1.7 KB) in 4 us against the standard library's 14 us, ~2 % of a loader
    worker's time per sample; json that orjson refuses but Python accepts (NaN, Infinity
    written by `json.dumps`) takes the standard parser."""
    try:
        rec = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            rec = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):  # nested past 1,024
            return {}
    return rec if isinstance(rec, dict) else {}


def unit_hash(*parts: Any) -> float:
    """A deterministic uniform in [0, 1) from the parts (no process-dependent hashing)."""
    return _unit_of(":".join(map(str, parts)))


def _unit_of(text: str) -> float:
    """`unit_hash` of parts already joined: a batch builds the `seed:epoch:` prefix once."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _text_field(record: dict[str, Any], name: str) -> str:
    """A caption field, stripped; "" when absent or not a string (a hand-edited shard's
    `"caption": 5` must cost one caption, not the training run)."""
    value = record.get(name)
    return value.strip() if isinstance(value, str) else ""


def pick_caption(
    record: dict[str, Any], txt: str | None, policy: str, mix: float = 0.5, u: float = 0.0
) -> tuple[str, str]:
    """(caption, source) per policy: `synthetic` (json `caption`), `alt_text`, or `mix`.

    Falls back to the other field and then to the `.txt` member when the wanted
    one is empty; `u` is the sample's uniform draw that decides `mix`.
    """
    synthetic, alt = _text_field(record, "caption"), _text_field(record, "alt_text")
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


# ---- batches -----------------------------------------------------------------------


def shared_uint8(n: int) -> torch.Tensor:
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
    return shared_uint8(nbytes)


class BadBatch(DataError):
    """No sample of a batch is usable: the loader skips the batch and counts `keys`."""

    def __init__(self, keys: list[str], error: str) -> None:
        super().__init__(f"every sample of a batch is unreadable: {error}")
        self.keys = keys


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
    # libjpeg-turbo's fast IDCT and upsampling (see `decode_resize_crop`)
    fast_jpeg: bool = False
    # leave device-decodable JPEGs undecoded, bytes in the batch, for the trainer's
    # process to decode on its GPU (`ccurate.train.device_decode`)
    defer_jpeg: bool = False

    def __post_init__(self) -> None:
        self._buffer = DecodeBuffer()  # per process: each loader worker has its own copy

    def record(self, raw: RawSample, reader: MemberReader) -> dict[str, Any]:
        m = raw.members.get("json")
        return parse_record(reader.read(m)) if m is not None else {}

    def text(self, raw: RawSample, reader: MemberReader) -> str | None:
        m = raw.members.get("txt")
        return reader.read(m).decode("utf-8", "replace") if m is not None else None

    def _image(
        self, raw: RawSample, reader: MemberReader, h: int, w: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        m = find_image(raw)
        if m is None:
            raise DataError(f"{raw.key}: no image member ({', '.join(raw.members)})")
        return decode_resize_crop(
            reader.read(m),
            h,
            w,
            fast=self.fast_jpeg,
            buffer=self._buffer,
            out=out,
        )

    def _captions(self, group: list[RawSample], prefix: str, reader: MemberReader) -> list[str]:
        mix = self.caption_source == "mix"
        captions = []
        for raw in group:
            rec = self.record(raw, reader)
            # the draw decides only `mix` (a blake2b per sample is ~3 % of a worker's time)
            u = _unit_of(f"{prefix}{raw.key}:caption") if mix else 0.0
            captions.append(
                pick_caption(rec, self.text(raw, reader), self.caption_source, self.caption_mix, u)[
                    0
                ]
            )
        return captions

    def _flips(self, prefix: str, key: str) -> bool:
        return self.random_flip and _unit_of(f"{prefix}{key}:flip") < 0.5

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
        prefix = f"{self.seed}:{epoch}:"  # unit_hash(seed, epoch, key, what), joined once
        captions = self._captions(group, prefix, reader)
        if self.defer_jpeg:
            return self._decode_deferred(group, prefix, reader, h, w, alloc, captions)
        # one NHWC buffer filled in place; the batch is its NCHW view (channels-last
        # strides: no transposing copy here, the model's first conv takes either layout)
        batch = alloc(len(group) * h * w * 3).view(len(group), h, w, 3)
        pixels = batch.numpy()
        ok, bad_rows, bad, first_error = self._fill(
            group, list(range(len(group))), prefix, reader, pixels
        )
        if bad_rows:
            if not ok:  # nothing to train on: no black images with real captions
                raise BadBatch([r.key for r in group], first_error)
            # the whole sample is a stand-in: a good sample's pixels *and* caption
            pixels[bad_rows] = pixels[ok[0]]
            for i in bad_rows:
                captions[i] = captions[ok[0]]
        return self._with_text({"pixels": batch.permute(0, 3, 1, 2)}, group, bad, captions)

    def _with_text(
        self, out: dict[str, Any], group: list[RawSample], bad: list[str], captions: list[str]
    ) -> dict[str, Any]:
        """`out` completed with what every pixel batch carries: keys, bad keys, the count of
        empty captions (trained unconditionally, see the module docstring), the captions and
        their token ids."""
        out.update(keys=[r.key for r in group], bad=bad, empty=captions.count(""))
        if self.tokenizer is not None:
            out["input_ids"] = self.tokenizer(captions)
        out["captions"] = captions
        return out

    def _fill(
        self,
        group: list[RawSample],
        rows: list[int],
        prefix: str,
        reader: MemberReader,
        pixels: np.ndarray,
    ) -> tuple[list[int], list[int], list[str], str]:
        """Decode `group[rows[j]]` into `pixels[j]` (flipped per sample): (ok rows, bad
        rows, bad keys, the first error)."""
        ok: list[int] = []
        bad_rows: list[int] = []
        bad: list[str] = []
        first_error = ""
        h, w = int(pixels.shape[1]), int(pixels.shape[2])
        for j, i in enumerate(rows):
            raw = group[i]
            try:
                slot = pixels[j]
                img = self._image(raw, reader, h, w, slot)
                if img is not slot:
                    slot[...] = img
                if self._flips(prefix, raw.key):
                    # in place on the contiguous slot: 3x faster than flipping the strided
                    # crop across (numpy's copy of a mirrored view: 50x slower)
                    cv2.flip(slot, 1, dst=slot)
                ok.append(i)
            except Exception as exc:  # undecodable image: keep the batch shape, count it
                first_error = first_error or f"{raw.key}: {exc}"
                bad.append(raw.key)
                bad_rows.append(i)
        return ok, bad_rows, bad, first_error

    def _decode_deferred(
        self,
        group: list[RawSample],
        prefix: str,
        reader: MemberReader,
        h: int,
        w: int,
        alloc: Callable[[int], torch.Tensor],
        captions: list[str],
    ) -> dict[str, Any]:
        """A batch whose device-decodable JPEGs stay bytes (`DeviceJpegDecoder` finishes
        it): one flat buffer holds the rows decoded here (NHWC) and then those bytes."""
        from ccurate.train.device_decode import defer_to_device, device_jpeg_size

        jpeg_rows: list[int] = []
        views: list[bytes | memoryview] = []
        cpu_rows: list[int] = []
        for i, raw in enumerate(group):
            m = find_image(raw)
            data = reader.view(m) if m is not None else None  # no member: bad (below)
            if data is not None and defer_to_device(device_jpeg_size(data), h, w):
                jpeg_rows.append(i)
                views.append(data)
            else:  # no image member is decoded (and counted bad) by the workers' path
                cpu_rows.append(i)
        npix = len(cpu_rows) * h * w * 3
        start = -(-npix // 64) * 64
        flat = alloc(start + sum(len(v) for v in views))
        pixels = flat[:npix].view(len(cpu_rows), h, w, 3)
        ok, bad_rows, bad, first_error = self._fill(group, cpu_rows, prefix, reader, pixels.numpy())
        if not ok and not jpeg_rows:  # nothing to train on (see `decode`)
            raise BadBatch([r.key for r in group], first_error)
        jpeg = flat[start:]
        buf = jpeg.numpy()
        spans: list[tuple[int, int]] = []
        pos = 0
        for v in views:
            buf[pos : pos + len(v)] = np.frombuffer(v, np.uint8)
            spans.append((pos, len(v)))
            pos += len(v)
        # stand-ins for bad rows are chosen (and `empty` recounted) once the device decode
        # shows which rows are good
        out: dict[str, Any] = {
            "pixels": pixels.permute(0, 3, 1, 2),
            "jpeg": jpeg,
            "deferred": {
                "hw": [h, w],
                "pixel_rows": cpu_rows,
                "bad_rows": bad_rows,
                "jpeg_rows": jpeg_rows,
                "jpeg_spans": spans,
                "flip_rows": [i for i in jpeg_rows if self._flips(prefix, group[i].key)],
                "error": first_error,
            },
        }
        return self._with_text(out, group, bad, captions)

    def _decode_latent(
        self,
        group: list[RawSample],
        epoch: int,
        reader: MemberReader,
        alloc: Callable[[int], torch.Tensor] = batch_buffer,
    ) -> dict[str, Any]:
        latents: list[np.ndarray | None] = []
        embs: list[np.ndarray | None] = []
        bad: list[str] = []
        first_error = ""
        for raw in group:
            try:
                lat = npy_view(reader.view(_need(raw, "latent.npy")), raw.key)
                u = unit_hash(self.seed, epoch, raw.key, "caption")
                want = {"synthetic": "emb.npy", "alt_text": "alt.npy"}.get(self.caption_source)
                if want is None:  # mix
                    want = "emb.npy" if u < self.caption_mix else "alt.npy"
                m = (
                    raw.members.get(want)
                    or raw.members.get("emb.npy")
                    or raw.members.get("alt.npy")
                )
                if m is None:
                    raise DataError(f"{raw.shard}: sample {raw.key} has no text embedding member")
                emb = npy_view(reader.view(m), raw.key)
            except DataError as exc:  # one bad sample: keep the batch shape, count it
                first_error = first_error or str(exc)
                bad.append(raw.key)
                latents.append(None)
                embs.append(None)
                continue
            latents.append(lat)
            embs.append(emb)
        good = next((i for i, a in enumerate(latents) if a is not None), None)
        if good is None:
            raise BadBatch([r.key for r in group], first_error)
        lat_ok = [a if a is not None else latents[good] for a in latents]
        emb_ok = [e if e is not None else embs[good] for e in embs]
        lat_t, emb_t = stack_into([lat_ok, emb_ok], alloc)  # type: ignore[list-item]
        return {"latents": lat_t, "emb": emb_t, "keys": [r.key for r in group], "bad": bad}


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


def find_image(raw: RawSample) -> Member | None:
    """The sample's image member, by `IMAGE_EXTS` order; None when it has none."""
    return next((raw.members[e] for e in IMAGE_EXTS if e in raw.members), None)


def _need(raw: RawSample, ext: str) -> Member:
    m = raw.members.get(ext)
    if m is None:
        raise DataError(f"{raw.shard}: sample {raw.key} has no .{ext} member")
    return m


# ---- .npy members -------------------------------------------------------------------


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


# ---- aspect buckets of raw samples ----------------------------------------------------


def bucket_reader(
    mode: str, buckets: Sequence[tuple[int, int]], vae_factor: int
) -> Callable[[RawSample, MemberReader], tuple[int, int]]:
    """How a raw sample finds its bucket cheaply: json sizes, else the image header."""

    def bucket_of(raw: RawSample, reader: MemberReader) -> tuple[int, int]:
        m = raw.members.get("json")
        rec = parse_record(reader.read(m)) if m is not None else {}
        if mode == "latent":
            lat = rec.get("latent_hw")
            if (
                isinstance(lat, list)
                and len(lat) == 2
                and all(isinstance(v, int) and v > 0 for v in lat)
            ):
                return lat[0] * vae_factor, lat[1] * vae_factor
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
