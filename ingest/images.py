"""Decode, validate, normalise and resize downloaded images (img2dataset's resize modes).

Every downloaded body either becomes an encoded RGB image or a drop reason:

- `not_an_image`: the bytes are not a raster format Pillow knows (HTML, SVG,
  JSON, empty body) — judged on the bytes, not the claimed content type;
- `decode_error`: an image signature, but truncated or corrupt data;
- `decompression_bomb`: width x height above `max_pixels`, checked from the
  header before any pixel is decoded (a 1 KB PNG can claim 100k x 100k; an ICO/CUR
  by each frame's own PNG/BMP header, as Pillow decodes icons inside `Image.open`); also
  when the resize would produce that many (a 1 x 20000 strip with its short
  side scaled to 256);
- `image_too_small` / `image_too_large` / `image_bad_aspect`: only when the
  optional size filters are set (off by default: the quality filter decides).

Normalisation: EXIF orientation applied; CMYK, YCbCr, LAB converted; 16-bit
and 32-bit grey rescaled (Pillow's own conversion clips them); palette and
alpha images composited on white (as img2dataset does); animated images keep
their first frame. Sizes are reported after orientation (what a viewer shows).

Resize modes follow img2dataset: `keep_ratio` (smaller side -> image_size),
`keep_ratio_largest` (larger side -> image_size), `center_crop` (smaller side
-> image_size, then a centred square), `border` (larger side -> image_size,
padded to a black square), `no` (re-encode only). Filters: `area` (default,
img2dataset's: cv2 INTER_AREA to downscale, Lanczos to upscale), `lanczos`,
`bicubic` (Pillow). Large JPEGs are first decoded at 1/2, 1/4 or 1/8 scale by
libjpeg's scaled IDCT (`draft`), keeping at least `jpeg_draft_factor` (1.5) x
the target size (Pillow's `thumbnail` uses 2). Measured on 1024x768 photos
resized to 256 (PSNR, 8 images): 1/2-scale decode + area is 52 dB from
img2dataset's full decode + area and 50 dB from full decode + Lanczos (the
two full-decode filters are 52 dB apart); the decode costs ~3x less CPU. Upright
YCbCr/grey JPEGs downscaled with `area` (the usual case) skip Pillow altogether
(`_fast_jpeg`: libjpeg-turbo via simplejpeg straight into an array, at the finer
M/8 scales, then OpenCV); other images take the general Pillow path.

`keep_original` stores the downloaded bytes unchanged (after the same
validation) instead of a re-encoding: the stored image is then exactly the
publisher's file (EXIF orientation left in the file for viewers to apply; the
record's width/height are the upright size, and every later stage decodes the
pixels upright: `ccurate.pixels.upright_rgb`, `jpeg_orientation`).
"""

from __future__ import annotations

import hashlib
import io
import struct
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ccurate import pixels
from ccurate.pixels import exif_orientation, save_jpeg, to_rgb, upright_rgb

if TYPE_CHECKING:
    from ccurate.ingest.config import IngestConfig

OUTPUT_MIME = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
FORMAT_MIME = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "AVIF": "image/avif",
    "MPO": "image/jpeg",
    "ICO": "image/x-icon",
}
# leading bytes of formats we expect on the web: a file that starts like one of
# these but does not decode is broken (decode_error), anything else is not an image
_SIGNATURES = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"\x00\x00\x01\x00",
)


class ImageDrop(Exception):
    """The body cannot become a sample; `reason` is an ingest drop reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageOptions:
    """Decode/resize settings (from `IngestConfig`)."""

    image_size: int = 512
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = False
    output_format: str = "jpg"
    encode_quality: int = 95
    keep_original: bool = False
    max_pixels: int = 89_478_485
    min_image_size: int = 0
    max_image_size: int = 0
    max_aspect_ratio: float = 0.0
    jpeg_draft: bool = True
    jpeg_draft_factor: float = 1.5
    resize_filter: str = "area"

    @classmethod
    def from_config(cls, c: IngestConfig) -> ImageOptions:
        """The image settings of an ingest config (every field here has its namesake there)."""
        return cls(**{f.name: getattr(c, f.name) for f in fields(cls)})


@dataclass
class ImageResult:
    """An accepted image: encoded bytes plus what the record stores about it."""

    data: bytes
    mime: str
    width: int
    height: int
    original_width: int
    original_height: int
    sha256: str  # of the downloaded bytes
    image: Image.Image  # the RGB pixels that were encoded (for hashing)


def looks_like_image(data: bytes) -> bool:
    head = data[:16]
    if head.startswith(_SIGNATURES):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return head[4:8] == b"ftyp"  # AVIF / HEIF


def configure_pillow(max_pixels: int) -> None:
    """Ingest's process-wide set-up (call in `setup`, before any decode thread starts):
    Pillow's limit raised to `max_pixels` when above the shared default, never lowered
    (`ccurate.pixels.configure_pillow`: other stages may share the process); a smaller cap
    is ingest's own, checked on the headers before decoding (`_icon_pixels` for ICO/CUR,
    whose frames Pillow decodes inside `Image.open`, and the size after opening)."""
    pixels.configure_pillow(max_pixels)
    import cv2

    cv2.setNumThreads(1)  # our threads already fill the cores; nested pools only contend


_ICON_MAGIC = (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00")  # ICO, CUR


def _icon_pixels(data: bytes) -> int:
    """The largest frame of an ICO/CUR body in pixels, from its directory and each frame's own
    PNG IHDR or BMP header (the directory's bytes say at most 256 x 256; the frame can claim
    anything); 0 for other formats. Pillow decodes an ICO frame inside `Image.open`, before
    `process_image` sees a size, so a hostile icon must be judged on these headers."""
    if data[:4] not in _ICON_MAGIC or len(data) < 6:
        return 0
    most = 0
    for k in range(int.from_bytes(data[4:6], "little")):
        entry = 6 + 16 * k
        if entry + 16 > len(data):
            break  # Pillow reports the cut directory
        w, h = data[entry] or 256, data[entry + 1] or 256
        off = int.from_bytes(data[entry + 12 : entry + 16], "little")
        frame = data[off : off + 24]
        if frame[:8] == b"\x89PNG\r\n\x1a\n" and len(frame) >= 24:
            w, h = struct.unpack(">II", frame[16:24])
        elif len(frame) >= 12 and int.from_bytes(frame[:4], "little") == 12:  # OS/2 core
            w, h = struct.unpack("<HH", frame[4:8])
        elif len(frame) >= 12:  # BITMAPINFOHEADER: the height counts the AND mask too
            w, h = (abs(v) for v in struct.unpack("<ii", frame[4:12]))
        most = max(most, w * h)
    return most


def _open(data: bytes) -> Image.Image:
    if not data:
        raise ImageDrop("not_an_image", "empty body")
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageDrop("decompression_bomb", str(e)) from None
    except UnidentifiedImageError:
        if looks_like_image(data):
            raise ImageDrop("decode_error", "image signature but unreadable header") from None
        raise ImageDrop("not_an_image", f"unrecognised bytes {data[:8]!r}") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
        raise ImageDrop("decode_error", f"{type(e).__name__}: {e}") from None


def _scaled_dims(w: int, h: int, opt: ImageOptions) -> tuple[int, int] | None:
    """Output size before crop/pad for a (display-oriented) w x h image; None = unchanged."""
    s = opt.image_size
    mode = opt.resize_mode
    if mode == "no":
        return None
    by_small = mode in ("keep_ratio", "center_crop")
    side = min(w, h) if by_small else max(w, h)
    if opt.resize_only_if_bigger and side <= s:
        return None
    if side == s:
        return None
    f = s / side
    if by_small:
        dims = (s, max(1, round(h * f))) if w <= h else (max(1, round(w * f)), s)
    else:
        dims = (max(1, round(w * f)), s) if h >= w else (s, max(1, round(h * f)))
    if dims[0] * dims[1] > opt.max_pixels:
        # scaling the short side up (keep_ratio, center_crop) of a 1 x 20000 strip would
        # allocate gigabytes before any crop: a bomb on the output side
        raise ImageDrop(
            "decompression_bomb",
            f"resizing {w}x{h} to {dims[0]}x{dims[1]} exceeds {opt.max_pixels} pixels",
        )
    return dims


def _draft(img: Image.Image, opt: ImageOptions) -> None:
    """Ask libjpeg for a 1/2..1/8-scale decode that stays >= factor x the target."""
    if img.format != "JPEG" or not opt.jpeg_draft or opt.resize_mode == "no":
        return
    w, h = img.size
    side = min(w, h) if opt.resize_mode in ("keep_ratio", "center_crop") else max(w, h)
    # factor >= 1 (IngestConfig): a side <= image_size is never reduced, whatever
    # resize_only_if_bigger says
    reduce = int(side // (opt.jpeg_draft_factor * opt.image_size))
    if reduce < 2:
        return
    reduce = 8 if reduce >= 8 else 4 if reduce >= 4 else 2
    # Pillow picks the largest scale s <= min(w // rw, h // rh)
    img.draft(None, (max(1, w // reduce), max(1, h // reduce)))


def _check_size_filters(w: int, h: int, opt: ImageOptions) -> None:
    if opt.min_image_size and min(w, h) < opt.min_image_size:
        raise ImageDrop("image_too_small", f"{w}x{h} < {opt.min_image_size}")
    if opt.max_image_size and max(w, h) > opt.max_image_size:
        raise ImageDrop("image_too_large", f"{w}x{h} > {opt.max_image_size}")
    if opt.max_aspect_ratio and max(w, h) / max(1, min(w, h)) > opt.max_aspect_ratio:
        raise ImageDrop("image_bad_aspect", f"{w}x{h} aspect > {opt.max_aspect_ratio}")


# Rows of the source converted to RGB at a time when a big downscale works in bands
_BAND_PX = 1 << 20
# only images above this take the banded paths (below it the full-size copies are small)
_PREREDUCE_MIN_PX = 1 << 22
# modes that `to_rgb` converts pixel by pixel (no whole-image statistics, unlike I and F)
_BANDABLE = frozenset(("1", "L", "P", "LA", "PA", "La", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr"))
_BANDABLE |= {"LAB", "HSV", "I;16", "I;16L", "I;16B", "I;16N"}


def _prereduce(w: int, h: int, mode: str, opt: ImageOptions) -> tuple[int, int] | None:
    """How a big downscale of a w x h image works in bands of rows, converting only a band
    to RGB at a time, or None (the whole image to RGB, then `_resize`). (fx, fy): box-reduce
    by these integers first, exactly what the resize starts with (`area` at an integer
    factor; Pillow's `reducing_gap=3` for `lanczos`/`bicubic`). (1, 1): `area` at another
    factor, as separable passes (`_area_in_bands`). Both give the old pixels (tests)."""
    if w * h <= _PREREDUCE_MIN_PX or mode not in _BANDABLE:
        return None
    dims = _scaled_dims(w, h, opt)
    if dims is None or dims[0] > w or dims[1] > h:
        return None
    k = w // dims[0]
    if opt.resize_filter == "area" and (w, h) == (dims[0] * k, dims[1] * k) and k > 1:
        return (k, k)
    if dims[0] * 3 > w or dims[1] * 3 > h:
        return None  # a small factor: the narrow float pass would outweigh the copies saved
    if opt.resize_filter == "area":
        return (1, 1)
    fx, fy = int(w / dims[0] / 3) or 1, int(h / dims[1] / 3) or 1  # Pillow's reducing_gap=3
    return (fx, fy) if fx > 1 or fy > 1 else None


def _rgb_reduced(img: Image.Image, fx: int, fy: int) -> Image.Image:
    """`to_rgb(img).reduce((fx, fy))` with only a band of rows in RGB at a time: the same
    pixels (box averages never straddle bands of a multiple of fy rows) without the
    full-size conversion copies (an 8000^2 RGBA PNG: 1.2 GB -> 0.27 GB)."""
    w, h = img.size
    if img.mode in ("RGB", "L") and "transparency" not in img.info:
        return to_rgb(img.reduce((fx, fy)))  # grey to RGB commutes with averaging
    out = Image.new("RGB", (-(-w // fx), -(-h // fy)))
    rows = max(1, _BAND_PX // (w * fy)) * fy
    for top in range(0, h, rows):
        band = to_rgb(img.crop((0, top, w, min(h, top + rows))))
        out.paste(band.reduce((fx, fy)), (0, top // fy))
    return out


def _area_in_bands(img: Image.Image, dims: tuple[int, int]) -> Image.Image:
    """cv2 INTER_AREA of `to_rgb(img)` to dims, a band of rows at a time: each band's
    horizontal pass in float32 (as cv2's own row buffer), then the vertical pass on the
    narrow result, rounded once as cv2 rounds. Holds h x dims[0] x 12 bytes, not the
    full-size RGB and its array copies."""
    import cv2

    w, h = img.size
    rows = max(1, _BAND_PX // w)
    narrow = np.empty((h, dims[0], 3), np.float32)
    for top in range(0, h, rows):
        band = np.asarray(to_rgb(img.crop((0, top, w, min(h, top + rows)))), np.float32)
        size = (dims[0], band.shape[0])
        narrow[top : top + band.shape[0]] = cv2.resize(band, size, interpolation=cv2.INTER_AREA)
    out = cv2.resize(narrow, dims, interpolation=cv2.INTER_AREA)
    del narrow
    np.clip(np.rint(out, out=out), 0, 255, out=out)
    return Image.fromarray(out.astype(np.uint8), "RGB")


def _upright_resized(img: Image.Image, opt: ImageOptions) -> Image.Image:
    """`_resize(upright_rgb(img))`; a big downscale converts to RGB in bands."""
    if exif_orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    w, h = img.size
    plan = _prereduce(w, h, img.mode, opt)
    if plan is None:
        return _resize(to_rgb(img), opt)
    if plan == (1, 1):
        dims = _scaled_dims(w, h, opt)
        assert dims is not None
        return _resize(_area_in_bands(img, dims), opt, (w, h, 1, 1))
    return _resize(_rgb_reduced(img, *plan), opt, (w, h, *plan))


def _resize(
    img: Image.Image, opt: ImageOptions, reduced: tuple[int, int, int, int] | None = None
) -> Image.Image:
    """Resize (and crop or pad) RGB pixels. `reduced` = (w, h, fx, fy): `img` is a w x h
    image already box-reduced by (fx, fy) (`_prereduce`)."""
    w, h, fx, fy = reduced if reduced is not None else (*img.size, 1, 1)
    dims = _scaled_dims(w, h, opt)
    if reduced is not None and img.size == dims:
        pass  # `area`: the banded pass was the whole resize
    elif reduced is not None and opt.resize_filter == "area":
        import cv2

        img = Image.fromarray(
            cv2.resize(np.asarray(img), dims, interpolation=cv2.INTER_AREA), "RGB"
        )
    elif reduced is not None:
        assert dims is not None
        f = Image.Resampling.BICUBIC if opt.resize_filter == "bicubic" else Image.Resampling.LANCZOS
        img = img.resize(dims, f, box=(0, 0, w / fx, h / fy))  # as reducing_gap would
    elif dims is not None and dims != (w, h):
        down = dims[0] <= w and dims[1] <= h
        k = w // dims[0]
        if down and opt.resize_filter == "area" and (w, h) == (dims[0] * k, dims[1] * k):
            # integer factor (the usual case after JPEG draft): Pillow's box reduce is
            # exactly cv2's INTER_AREA here, and 2x faster (no numpy round trip)
            img = img.reduce(k)
        elif down and opt.resize_filter == "area":
            import cv2  # lazily: the driver process never resizes

            # cv2's SIMD area average (img2dataset's default), ~2x faster than Pillow's Lanczos
            arr = cv2.resize(np.asarray(img), dims, interpolation=cv2.INTER_AREA)
            img = Image.fromarray(arr, "RGB")
        else:
            f = (
                Image.Resampling.BICUBIC
                if opt.resize_filter == "bicubic"
                else (Image.Resampling.LANCZOS)
            )
            gap = 3.0 if down and dims[0] * 3 <= w and dims[1] * 3 <= h else None
            img = img.resize(dims, f, reducing_gap=gap)
    box = _square_box(img.size[0], img.size[1], opt)
    if box is not None and opt.resize_mode == "center_crop":
        img = img.crop(box)
    elif box is not None:
        canvas = Image.new("RGB", (opt.image_size, opt.image_size), (0, 0, 0))
        canvas.paste(img, box[:2])
        img = canvas
    return img


def _square_box(w: int, h: int, opt: ImageOptions) -> tuple[int, int, int, int] | None:
    """center_crop: the centred square to keep; border: where the image goes on the black
    square. None when the mode does neither to a w x h image."""
    s = opt.image_size
    if (w, h) == (s, s):
        return None
    if opt.resize_mode == "center_crop" and w >= s and h >= s:
        left, top = (w - s) // 2, (h - s) // 2
        return left, top, left + s, top + s
    if opt.resize_mode == "border" and w <= s and h <= s:
        left, top = (s - w) // 2, (s - h) // 2
        return left, top, left + w, top + h
    return None


def _dct_scale(w: int, h: int, min_w: int, min_h: int) -> int:
    """The smallest M of libjpeg-turbo's M/8 IDCT scales (M = 1..8) whose output still
    covers min_w x min_h (libjpeg rounds scaled sizes up)."""
    for m in range(1, 8):
        if -(-w * m // 8) >= min_w and -(-h * m // 8) >= min_h:
            return m
    return 8


def _fast_jpeg(
    data: bytes, w0: int, h0: int, opt: ImageOptions, budget: PixelBudget | None
) -> np.ndarray | None:
    """The common case without Pillow: an upright YCbCr/grey JPEG downscaled with the `area`
    filter. libjpeg-turbo (simplejpeg) decodes straight to an RGB array at the M/8 scale
    keeping `jpeg_draft_factor` x the target (finer steps than Pillow's 1/2, 1/4, 1/8),
    OpenCV's INTER_AREA does the rest. Measured on 1024x768 photos to 256: 2.2 ms less
    CPU per image than the Pillow path (no `tobytes` round trip), output 52 dB from it.
    Returns the pixels, or None to take the general path."""
    import cv2
    import simplejpeg

    dims = _scaled_dims(w0, h0, opt)
    if dims is None or dims[0] > w0 or dims[1] > h0:
        return None  # no resize or an upscale (Lanczos): the general path
    f = opt.jpeg_draft_factor if opt.jpeg_draft else 8.0
    m = _dct_scale(w0, h0, min(w0, int(dims[0] * f)), min(h0, int(dims[1] * f)))
    dw, dh = -(-w0 * m // 8), -(-h0 * m // 8)
    with budget.hold(dw * dh * 3) if budget is not None else nullcontext():  # the RGB array
        try:
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=dw, min_height=dh)
        except ValueError:
            return None  # corrupt or unsupported: the general path says which
        if (arr.shape[1], arr.shape[0]) != dims:
            arr = cv2.resize(arr, dims, interpolation=cv2.INTER_AREA)
    box = _square_box(dims[0], dims[1], opt)
    if box is not None and opt.resize_mode == "center_crop":
        arr = np.ascontiguousarray(arr[box[1] : box[3], box[0] : box[2]])
    elif box is not None:
        canvas = np.zeros((opt.image_size, opt.image_size, 3), np.uint8)
        canvas[box[1] : box[3], box[0] : box[2]] = arr
        arr = canvas
    return arr


def encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        save_jpeg(img, buf, quality)
    elif fmt == "png":
        img.save(buf, "PNG", compress_level=min(9, max(0, quality if quality <= 9 else 6)))
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=quality)
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    return buf.getvalue()


class PixelBudget:
    """Caps the decode memory that the `threads` of one worker hold at once.

    Sized in pixels (`decode_pixel_budget`) of `BYTES_PER_PIXEL` bytes each, held in bytes:
    every decode holds its measured peak (`_peak_bytes`: pixels x bytes per pixel of its
    mode and path), not its pixel count, which undercounted real memory by 3-7x.

    Lets every thread decode while images are ordinary (all cores busy, even
    on a shared machine) yet serialises huge ones, so memory stays bounded
    by the budget rather than by threads x max_pixels. Ordinary images (up to
    `free` = budget / (2 x threads) bytes each; a thread decodes one image at a
    time) pass without taking the lock: all threads together hold at most half
    the budget that way, and bigger images share the rest. With 32 threads
    the lock on every image cost ~0.8 ms CPU per image (10 %) in contention.
    One image larger than that rest still proceeds, alone among the big ones.
    """

    BYTES_PER_PIXEL = 4  # a budget of N pixels is 4 N bytes (64 M pixels: 256 MB)

    def __init__(self, max_pixels: int, threads: int = 1) -> None:
        threads = max(1, threads)
        budget = max_pixels * self.BYTES_PER_PIXEL
        self.free = budget // (2 * threads)
        self.limit = budget - self.free * threads
        self.used = 0  # bytes held by big images
        self._cond = threading.Condition()

    def hold(self, nbytes: int) -> AbstractContextManager[None]:
        return nullcontext() if nbytes <= self.free else self._hold(nbytes)

    @contextmanager
    def _hold(self, nbytes: int) -> Iterator[None]:
        with self._cond:
            while self.used and self.used + nbytes > self.limit:
                self._cond.wait()
            self.used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()


# Peak memory per source pixel, measured on 8000^2 bodies (fresh process, peak RSS; before
# these paths: 10-28 B/px). Pillow stores 1, L and P in 1 byte a pixel, 16-bit grey in 2,
# everything else (RGB too) in 4. A big downscale (`_prereduce`) holds little more than that:
# RGB 4.1, RGBA/LA 4.2, L 1.1, P 1.3, I;16 2.3, WebP RGBA 16.0 B/px. Otherwise the full-size
# `to_rgb` adds `_CONVERT_BPP` (keep_original: RGBA/LA 8, P+tRNS 9, L 5, I;16 12, CMYK 8)
# and a resize `_RESIZE_BPP` (np.asarray for OpenCV: RGB 10, RGBA 14, L 11 B/px in all).
_STORED_BPP = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# decoders holding their own buffers while they fill Pillow's (WebP: libwebp's two frame
# buffers and the frame's bytes); AVIF and TIFF are estimates
_DECODE_EXTRA_BPP = {"WEBP": 12, "AVIF": 8, "TIFF": 4}
_CONVERT_BPP = {"RGB": 0, "L": 4, "P": 8, "LA": 4, "RGBA": 4, "1": 4, "I": 20, "F": 16}
_CONVERT_BPP.update(dict.fromkeys(("I;16", "I;16L", "I;16B", "I;16N"), 10))
_KEYED_BPP = 8  # RGB/L with a transparency key: RGBA, then the RGB canvas
_RESIZE_BPP = 6  # np.asarray of the RGB image (tobytes joins its chunks: 2 x 3 bytes)
_ICON_BPP = 24  # an ICO frame: BMP alpha bytes + RGBA conversion + the rest (icons are tiny)


def _peak_bytes(img: Image.Image, opt: ImageOptions, orientation: int) -> int:
    """The peak memory (bytes) of decoding and normalising an opened image: its pixels x
    the bytes per pixel measured for its mode and path (an upper bound: the sum of the
    copies, of which some are freed before others are made)."""
    w, h = img.size
    stored = _STORED_BPP.get(img.mode, 4)
    bpp = stored + _DECODE_EXTRA_BPP.get(img.format or "", 0)
    if orientation != 1:
        bpp += stored  # the transposed copy
    plan = None if opt.keep_original else _prereduce(w, h, img.mode, opt)
    if plan is not None:
        band = _BAND_PX * 32  # a band's crop, conversions, RGB and float32 copies
        dims = _scaled_dims(w, h, opt) or (w, h)
        narrow = h * dims[0] * 12 if plan == (1, 1) else 0  # `_area_in_bands`
        return w * h * bpp + band + narrow
    keyed = img.mode in ("L", "RGB") and "transparency" in img.info
    bpp += _KEYED_BPP if keyed else _CONVERT_BPP.get(img.mode, 8)
    if opt.keep_original:
        return w * h * bpp
    dims = _scaled_dims(w, h, opt) or (w, h)
    return w * h * (bpp + _RESIZE_BPP) + dims[0] * dims[1] * 4


def process_image(data: bytes, opt: ImageOptions, budget: PixelBudget | None = None) -> ImageResult:
    """Validate and normalise one downloaded body; raises `ImageDrop` with the reason."""
    icon = _icon_pixels(data)
    if icon > opt.max_pixels:
        raise ImageDrop("decompression_bomb", f"icon frame of {icon} > {opt.max_pixels} pixels")
    if icon:  # decoded inside Image.open: held for the whole call (decoded RGBA + the rest)
        with budget.hold(icon * _ICON_BPP) if budget is not None else nullcontext():
            return _process(data, opt, None)
    return _process(data, opt, budget)


def _process(data: bytes, opt: ImageOptions, budget: PixelBudget | None) -> ImageResult:
    """`_normalise` with the opened image closed afterwards, unless the result holds it:
    an upright RGB image that needs no new pixels (`keep_original`, or already at the
    target size) is returned as it was opened, and closing it broke hashing."""
    img = _open(data)
    res: ImageResult | None = None
    try:
        res = _normalise(img, data, opt, budget)
        return res
    finally:
        if res is None or res.image is not img:
            img.close()


def _normalise(
    img: Image.Image, data: bytes, opt: ImageOptions, budget: PixelBudget | None
) -> ImageResult:
    """Checks, decode and resize of an opened body (`process_image`)."""
    fmt_name = img.format or ""
    w0, h0 = img.size
    if w0 <= 0 or h0 <= 0:
        raise ImageDrop("decode_error", f"bad size {w0}x{h0}")
    if w0 * h0 > opt.max_pixels:
        raise ImageDrop("decompression_bomb", f"{w0}x{h0} > {opt.max_pixels} pixels")
    orientation = exif_orientation(img)
    if orientation in (5, 6, 7, 8):
        w0, h0 = h0, w0
    _check_size_filters(w0, h0, opt)
    if (
        not opt.keep_original
        and opt.resize_filter == "area"
        and fmt_name == "JPEG"
        and img.mode in ("RGB", "L")
        and orientation == 1
    ):
        fast = _fast_jpeg(data, w0, h0, opt, budget)
        if fast is not None:
            return _encoded(Image.fromarray(fast, "RGB"), data, w0, h0, opt)
    if not opt.keep_original:
        _draft(img, opt)
    peak = _peak_bytes(img, opt, orientation)
    with budget.hold(peak) if budget is not None else nullcontext():
        try:
            img.load()  # first frame of animations
        except Image.DecompressionBombError as e:
            raise ImageDrop("decompression_bomb", str(e)) from None
        except (
            OSError,
            SyntaxError,
            ValueError,
            struct.error,
            EOFError,
            IndexError,
            TypeError,
            MemoryError,
        ) as e:
            raise ImageDrop("decode_error", f"{type(e).__name__}: {e}") from None
        if opt.keep_original:
            mime = FORMAT_MIME.get(fmt_name, "application/octet-stream")
            sha = hashlib.sha256(data).hexdigest()
            return ImageResult(data, mime, w0, h0, w0, h0, sha, upright_rgb(img))
        return _encoded(_upright_resized(img, opt), data, w0, h0, opt)


def _encoded(out: Image.Image, data: bytes, w0: int, h0: int, opt: ImageOptions) -> ImageResult:
    """The resized pixels encoded in the output format, with what the record stores
    (`data` is the downloaded body, `w0` x `h0` its upright size)."""
    encoded = encode(out, opt.output_format, opt.encode_quality)
    sha = hashlib.sha256(data).hexdigest()
    mime = OUTPUT_MIME[opt.output_format]
    return ImageResult(encoded, mime, out.width, out.height, w0, h0, sha, out)
