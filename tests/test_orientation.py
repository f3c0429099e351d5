"""EXIF orientation: an image kept as downloaded (`keep_original`) is stored sideways with a
tag; its record holds the upright size, and every stage that decodes pixels for a model
(filters, dedup hashes, captioning, the trainer) must see it upright, as viewers do."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageOps

from ccurate.captioning.blip2 import load_image
from ccurate.filters.dedup_reference import hash_image
from ccurate.filters.hashing import image_hashes
from ccurate.filters.images import decode_rgb
from ccurate.filters.safety import reencode_blurred
from ccurate.ingest.images import ImageOptions, process_image
from ccurate.pixels import ORIENTATION_TAG, jpeg_orientation, jpeg_size
from ccurate.takedown import hash_image_bytes
from ccurate.train.decode import decode_resize_crop


def _raw_half_white(w: int = 160, h: int = 80) -> Image.Image:
    """Stored frame: left half white, right half black."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = 255
    return Image.fromarray(arr)


def _save(img: Image.Image, fmt: str, orientation: int | None, **kw: object) -> bytes:
    buf = io.BytesIO()
    if orientation is None:
        img.save(buf, fmt, **kw)
    else:
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = orientation
        img.save(buf, fmt, exif=exif.tobytes(), **kw)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_orientation_reads_every_value_like_pillow(orientation: int) -> None:
    data = _save(_raw_half_white(), "JPEG", orientation, quality=90)
    assert jpeg_orientation(data) == orientation
    assert jpeg_size(data) == (160, 80)  # the stored frame, not the displayed one


def test_jpeg_orientation_big_endian_absent_and_broken() -> None:
    plain = _save(_raw_half_white(), "JPEG", None)
    assert jpeg_orientation(plain) == 1
    # a Motorola-order (big-endian) EXIF block, as many cameras write: orientation 8
    tiff = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1)
    tiff += struct.pack(">HHIHH", ORIENTATION_TAG, 3, 1, 8, 0) + struct.pack(">I", 0)
    app1 = b"Exif\x00\x00" + tiff
    data = plain[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + plain[2:]
    assert jpeg_orientation(data) == 8
    with Image.open(io.BytesIO(data)) as im:  # Pillow agrees
        assert im.getexif().get(ORIENTATION_TAG) == 8
    assert jpeg_orientation(data[:30]) == 1  # cut inside the EXIF block
    assert jpeg_orientation(b"\x89PNG\r\n\x1a\n" + bytes(40)) == 1
    # an out-of-range value decodes as stored
    bad = data.replace(struct.pack(">HHIHH", ORIENTATION_TAG, 3, 1, 8, 0),
                       struct.pack(">HHIHH", ORIENTATION_TAG, 3, 1, 9, 0))  # fmt: skip
    assert jpeg_orientation(bad) == 1


def _top_bottom(arr: np.ndarray) -> tuple[float, float]:
    h = arr.shape[0]
    return float(arr[: h // 3].mean()), float(arr[-h // 3 :].mean())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_every_decoder_turns_a_rotated_image_upright(fmt: str) -> None:
    """Orientation 6 (rotate 90 degrees clockwise to display): the stored left half (white)
    is shown on top. Filters, captioning and the trainer all see white on top."""
    data = (
        _save(_raw_half_white(), fmt, 6, quality=95)
        if fmt != "PNG"
        else _save(_raw_half_white(), fmt, 6)
    )
    rgb = decode_rgb(data)
    assert rgb.size == (80, 160)
    top, bottom = _top_bottom(np.asarray(rgb))
    assert top > 200 and bottom < 50, (fmt, top, bottom)

    cap = load_image(data, 64, 64, Image.Resampling.BICUBIC)
    assert cap is not None
    top, bottom = _top_bottom(cap)
    assert top > 200 and bottom < 50, (fmt, top, bottom)

    px = decode_resize_crop(data, 64, 32)  # a portrait target: covers without cropping
    assert px.shape == (64, 32, 3)
    top, bottom = _top_bottom(px)
    assert top > 200 and bottom < 50, (fmt, top, bottom)


def test_trainer_pil_fallback_turns_cmyk_jpeg_upright() -> None:
    """CMYK JPEGs take the trainer's PIL path: it applies the orientation too."""
    data = _save(_raw_half_white().convert("CMYK"), "JPEG", 6, quality=95)
    px = decode_resize_crop(data, 64, 32)
    top, bottom = _top_bottom(px)
    assert top > 200 and bottom < 50, (top, bottom)


def test_dedup_recomputes_the_hashes_ingest_stored() -> None:
    """Dedup recomputes missing hashes from the stored bytes, and a takedown hashes the
    image it is sent: both must equal what ingest stored from the same kept-original bytes
    (rotated JPEG; PNG with transparency, which ingest composites on white)."""
    rgba = np.zeros((60, 90, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :45, 3] = 255  # right half transparent
    cases = [
        _save(_raw_half_white(), "JPEG", 6, quality=95),
        _save(Image.fromarray(rgba, "RGBA"), "PNG", None),
    ]
    opt = ImageOptions(keep_original=True, min_image_size=0)
    for data in cases:
        res = process_image(data, opt)
        stored = image_hashes(res.image)
        assert hash_image(data) == tuple(stored)
        # a takedown request with the same bytes hashes the same way
        request = hash_image_bytes(data)
        assert (request.pixel_sha256, request.phash) == (stored.pixel_sha256, stored.phash)


def test_face_blur_writes_the_blurred_image_upright() -> None:
    """The safety filter finds faces on upright pixels, so the blurred image is written
    upright with its orientation tag reset (other EXIF kept) and the blur lands where the
    box is in the upright frame."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray((rng.random((200, 300, 3)) * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    exif[0x010F] = "PhoneMaker"  # Make
    buf = io.BytesIO()
    noise.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    data = buf.getvalue()
    box = (20, 150, 60, 60, 0.9)  # x, y, w, h in the upright (200 x 300) frame
    out, _, n = reencode_blurred(data, [box])
    assert n == 1
    with Image.open(io.BytesIO(out)) as im:
        assert im.size == (200, 300)
        assert im.getexif().get(ORIENTATION_TAG) == 1
        assert im.getexif().get(0x010F) == "PhoneMaker"
        shown = np.asarray(ImageOps.exif_transpose(im).convert("L"), np.float64)
    inside = shown[160:200, 30:70].std()
    outside = shown[20:60, 120:160].std()
    assert inside < outside / 4, (inside, outside)
