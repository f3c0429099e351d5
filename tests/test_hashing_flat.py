"""pHash of flat and one-axis images: their zero AC coefficients used to be float rounding
noise, so the bits depended on the grey level (and on BLAS), not on the picture."""

from __future__ import annotations

import io

import imagehash
import numpy as np
import pytest
from PIL import Image

from ccurate.filters.hashing import hamming, phash


def _gradient(w: int, h: int, vertical: bool) -> Image.Image:
    im = Image.fromarray(np.tile(np.linspace(30, 220, w).astype(np.uint8), (h, 1))).convert("RGB")
    return im.transpose(Image.Transpose.ROTATE_90) if vertical else im


def _half_jpeg(im: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    im.resize((im.width // 2, im.height // 2)).save(buf, "JPEG", quality=90)
    return Image.open(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("grey", [1, 127, 128, 129, 200, 255])
@pytest.mark.parametrize("size", [(640, 480), (33, 17)])
def test_a_flat_image_hashes_as_imagehash_does(grey: int, size: tuple[int, int]) -> None:
    im = Image.new("RGB", size, (grey, grey, grey))
    assert phash(im) == str(imagehash.phash(im)) == "8000000000000000"


def test_a_black_image_has_no_bits() -> None:
    assert phash(Image.new("RGB", (64, 48))) == "0000000000000000"


@pytest.mark.parametrize("vertical", [False, True])
def test_a_gradient_and_its_half_size_copy_agree(vertical: bool) -> None:
    """Were 12 (horizontal) and 6 bits apart, imagehash's 1 and 2: the noise set the bits
    of the zero coefficients, and the horizontal copy was missed at radius 4."""
    g = _gradient(640, 480, vertical)
    copy = _half_jpeg(g)
    assert hamming(phash(g), phash(copy)) <= imagehash.phash(g) - imagehash.phash(copy) + 1
