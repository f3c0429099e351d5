"""Decode `sample.image` once for the pixel filters (quality, watermark, safety, CLIP).

Several filters of one chain look at the same pixels. `FilterStage` runs them
filter by filter over a batch, so a small cache keyed on the identity of the
bytes object lets them share one decode per sample without touching the record.
The cache holds a reference to the bytes, so an id cannot be reused while cached;
a replaced `sample.image` (face blurring) is a new object and misses.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

import numpy as np
from PIL import Image

MAX_CACHE_PIXELS = 64 * 1024 * 1024
"""Pixel budget of the cache (~192 MB RGB): a default batch of 64 at 1024^2 fits."""

_cache: OrderedDict[int, tuple[bytes, Image.Image]] = OrderedDict()
_cache_pixels = 0
_lock = threading.Lock()


class DecodeError(ValueError):
    """The bytes are not an image Pillow can decode (the filters drop `decode_error`)."""


def decode_rgb(data: bytes | None) -> Image.Image:
    """The image as RGB (alpha composited on white). Shared: callers must not mutate it."""
    global _cache_pixels
    if not data:
        raise DecodeError("no image bytes")
    key = id(data)
    with _lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] is data:
            _cache.move_to_end(key)
            return hit[1]
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        rgb = to_rgb(im)
    except Exception as e:  # Pillow raises many types for bad input
        raise DecodeError(f"{type(e).__name__}: {e}") from e
    with _lock:
        _cache[key] = (data, rgb)
        _cache_pixels += rgb.width * rgb.height
        while _cache_pixels > MAX_CACHE_PIXELS and len(_cache) > 1:
            _, (_, old) = _cache.popitem(last=False)
            _cache_pixels -= old.width * old.height
    return rgb


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded image as 8-bit RGB, the one rule for ingest and the filters: alpha and
    transparency keys composited on white; 16-bit and 32-bit grey scaled to 8 bits (Pillow's
    `convert` clips them at 255: nearly white); float images in [0, 1] scaled by 255."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            if lo >= 0.0 and hi <= 1.0:
                arr = arr * 255.0
            out = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
        else:
            arr = arr.astype(np.int64)
            if mode != "I" or int(arr.max(initial=0)) > 255:
                arr = (np.clip(arr, 0, 65535) * 255 + 32767) // 65535
            out = np.clip(arr, 0, 255).astype(np.uint8)
        return Image.fromarray(out, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode in ("L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def image_format(data: bytes) -> str | None:
    """Pillow's format name (JPEG, PNG, ...) read from the header only."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format
    except Exception:
        return None


def clear_cache() -> None:
    """Forget cached decodes (tests, or a worker that wants its memory back)."""
    global _cache_pixels
    with _lock:
        _cache.clear()
        _cache_pixels = 0
