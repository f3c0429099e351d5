"""Decode `sample.image` once for the pixel filters (quality, watermark, safety, CLIP).

Several filters of one chain look at the same pixels. `FilterStage` runs them
filter by filter over a batch, so a small cache keyed on the identity of the
bytes object lets them share one decode per sample without touching the record.
The cache holds a reference to the bytes, so an id cannot be reused while cached;
a replaced `sample.image` (face blurring) is a new object and misses.

Pixels come upright (EXIF orientation applied): a kept-original phone photo is stored
sideways with an orientation tag, and a face detector, OCR or CLIP must see it as
viewers do; the hashes ingest stored were taken from the upright pixels too.

Images above `ccurate.pixels.MAX_PIXELS` are refused before decoding (`decode_error`),
whatever Pillow's process-wide limit is (`open_image`).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

from PIL import Image

from ccurate.pixels import open_image, upright_rgb

MAX_CACHE_PIXELS = 64 * 1024 * 1024
"""Pixel budget of the cache (~192 MB RGB): a default batch of 64 at 1024^2 fits."""

_cache: OrderedDict[int, tuple[bytes, Image.Image]] = OrderedDict()
_cache_pixels = 0
_lock = threading.Lock()


class DecodeError(ValueError):
    """The bytes are not an image Pillow can decode (the filters drop `decode_error`)."""


def decode_rgb(data: bytes | None) -> Image.Image:
    """The image as upright RGB (alpha composited on white), without the file's metadata
    (`info`). Shared: callers must not mutate it."""
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
        im = open_image(data)
        im.load()
        rgb = upright_rgb(im)  # may be `im` itself: not closed
        rgb.info = {}  # pixels only: the file's metadata must not ride into a re-encode
    except Exception as e:  # Pillow raises many types for bad input
        raise DecodeError(f"{type(e).__name__}: {e}") from e
    with _lock:
        _cache[key] = (data, rgb)
        _cache_pixels += rgb.width * rgb.height
        while _cache_pixels > MAX_CACHE_PIXELS and len(_cache) > 1:
            _, (_, old) = _cache.popitem(last=False)
            _cache_pixels -= old.width * old.height
    return rgb


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
