"""Image hashes for dedup: exact pixel SHA-256 and 64-bit perceptual hashes.

`image_hashes` is called once per image at decode time (ingest) so dedup can
work from the parquet index alone, without re-reading image bytes. It stores
the pHash (the near-search key) and the dHash (an independent check: dedup's
`verify = "dhash"` confirms wide-radius pHash matches with it, see
`ccurate.filters.dedup`); the dHash costs one 9x8 resize of the RGB image.

The perceptual hashes follow `imagehash` bit for bit in layout (row-major bits,
most significant first, 16 hex chars) so hashes made by other tools with
`imagehash` can be compared with ours (e.g. an evaluation set to decontaminate
against). The only difference is the downscale: PIL's `reducing_gap=2.0`
first box-reduces big images by an integer factor and then applies the same
Lanczos filter, which is ~3-4x faster on photo-sized images; on real photos the
result matches `imagehash.phash` to within a bit or two (see tests).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from ccurate.pixels import to_rgb

HASH_BITS = 64
_REDUCING_GAP = 2.0
_LANCZOS = Image.Resampling.LANCZOS


@lru_cache(maxsize=1)
def _dct_rows() -> np.ndarray:
    """The 8 lowest DCT-II basis rows for 32 samples (scale does not matter: median threshold)."""
    n = np.arange(32)
    k = np.arange(8)[:, None]
    return np.cos(np.pi * k * (2 * n + 1) / 64.0)


def _bits_to_hex(bits: np.ndarray) -> str:
    """Row-major bits, first bit most significant: the `imagehash` string layout."""
    packed = np.packbits(bits.reshape(-1).astype(np.uint8))
    return packed.tobytes().hex()


def _grey(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    if img.mode != "L":
        img = img.convert("L")
    small = img.resize(size, _LANCZOS, reducing_gap=_REDUCING_GAP)
    return np.asarray(small, dtype=np.float64)


# AC coefficients below this share of the DC are zeroed: a flat image's are rounding noise
# at ~1e-16 of it; zeroing a real photo's rare tiny one flips no bit unless the median
# lies between it and 0 (bench/dedup_eval.py figures unchanged)
_NOISE = 1e-6


def phash(img: Image.Image) -> str:
    """64-bit DCT perceptual hash (8x8 low frequencies of a 32x32 grey image > their median).

    Flat and one-axis images have mostly zero AC coefficients; left as rounding noise
    their signs (BLAS- and CPU-dependent) would set the bits, so negligible ones are zeroed
    first and such images hash as `imagehash` does (flat: 8000000000000000)."""
    m = _dct_rows()
    low = m @ _grey(img, (32, 32)) @ m.T
    low[np.abs(low) < _NOISE * max(1.0, abs(float(low[0, 0])))] = 0.0
    return _bits_to_hex(low > np.median(low))


def dhash(img: Image.Image) -> str:
    """64-bit difference hash (9x8 grey image, is each pixel brighter than its left neighbour)."""
    px = _grey(img, (9, 8))
    return _bits_to_hex(px[:, 1:] > px[:, :-1])


def pixel_sha256(img: Image.Image) -> str:
    """SHA-256 of the decoded RGB pixels and the size: equal for re-encodes that keep the pixels.

    PNG vs lossless WebP vs re-saved metadata give different file bytes but the
    same pixels, so this catches exact duplicates that the file SHA-256 misses.
    Alpha is composited on white (`to_rgb`, as ingest stores it), as the pipeline trains on RGB.
    """
    rgb = to_rgb(img)
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


class ImageHashes(NamedTuple):
    pixel_sha256: str
    phash: str
    dhash: str


def image_hashes(img: Image.Image) -> ImageHashes:
    """pixel SHA-256, pHash and dHash of a decoded image, converting to RGB and grey once."""
    rgb = to_rgb(img)
    grey = rgb.convert("L")
    return ImageHashes(pixel_sha256(rgb), phash(grey), dhash(grey))


def compute_hashes(img: Image.Image) -> tuple[str, str]:
    """(pixel_sha256, phash) of a decoded image, converting to RGB once for both."""
    rgb = to_rgb(img)
    return pixel_sha256(rgb), phash(rgb)


def hamming(a: str, b: str) -> int:
    """Number of differing bits between two hex hashes of the same length."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


_HEX_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_LUT[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_LUT[_c] = 10 + _i


def hex_to_u64(
    hexes: list[str | None] | pa.Array | pa.ChunkedArray,
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised 16-hex-char hashes -> (uint64 codes, valid mask); None/malformed are invalid.

    Millions of index rows are converted at once through Arrow buffers, with no
    per-row Python work.
    """
    arr = hexes if isinstance(hexes, pa.Array | pa.ChunkedArray) else pa.array(hexes, pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], pa.string())
    arr = arr.cast(pa.string())
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.uint64), np.zeros(0, bool)
    ok = pc.fill_null(pc.equal(pc.binary_length(arr), 16), False)
    filled = pc.if_else(ok, arr, pa.scalar("0" * 16))
    # every value is now 16 bytes and non-null: the data buffer is one contiguous run
    offsets = np.frombuffer(filled.buffers()[1], dtype=np.int32)
    start = int(offsets[filled.offset])
    data = np.frombuffer(filled.buffers()[2], dtype=np.uint8)[start : start + 16 * n]
    nib = _HEX_LUT[data.reshape(n, 16)]
    valid = np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool) & (nib != 255).all(axis=1)
    nib[nib == 255] = 0
    packed = np.ascontiguousarray((nib[:, 0::2] << 4) | nib[:, 1::2])
    codes = packed.view(">u8").reshape(n).astype(np.uint64)
    codes[~valid] = 0
    return codes, valid


def u64_to_hex(code: int | np.integer) -> str:
    return f"{int(code):016x}"
