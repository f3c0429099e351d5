"""Hostile image files against every decoder outside ingest (review findings F3-F6, F10).

One pixel cap whatever ran first in the process; bounded safety re-encodes; 16-bit greys
shipped as judged; nothing after an image's end shipped; a malformed EXIF tag re-encoded."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from ccurate.filters.images import DecodeError, clear_cache, decode_rgb
from ccurate.filters.safety import (
    REASONS,
    SafetyConfig,
    SafetyFilter,
    blur_image,
    blur_regions,
    safe_reencode,
)
from ccurate.ingest.images import ImageDrop, ImageOptions, configure_pillow, process_image
from ccurate.pixels import MAX_PIXELS, jpeg_end, open_image, png_end, to_rgb, webp_end
from ccurate.record import Sample
from ccurate.shards.config import ShardsConfig
from ccurate.shards.manifest import prepare_image


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def grey_bomb(w: int, h: int) -> bytes:
    """An 8-bit grey PNG of w x h zeros, written without allocating its pixels."""
    c = zlib.compressobj(9)
    row = b"\0" * (1 + w)
    idat = b"".join(c.compress(row) for _ in range(h)) + c.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def encoded(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


# ---- F3: one pixel cap, whatever ran first in the process ---------------------------------


def test_ingest_setup_does_not_change_what_other_stages_decode() -> None:
    """ingest's setup with a small `max_pixels` left Pillow's process-wide limit at it, so a
    reference image hashed in that process was 'undecodable' and hashed in a fresh one: the
    cap outside ingest is the same in both, and ingest still applies its own."""
    from ccurate.filters.dedup_reference import hash_image

    data = encoded(photo(), "PNG")
    clear_cache()
    try:
        configure_pillow(1000)  # ingest's setup, max_pixels = 1000
        assert decode_rgb(data).size == (64, 48)
        assert hash_image(data) is not None
        with pytest.raises(ImageDrop) as e:
            process_image(data, ImageOptions(image_size=32, max_pixels=1000))
        assert e.value.reason == "decompression_bomb"
    finally:
        configure_pillow(ImageOptions().max_pixels)
        clear_cache()


def test_images_above_the_cap_are_refused_before_decoding_whatever_pillows_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cap is checked by the readers themselves: with Pillow's own limit off (another
    process's state), a 90M-pixel header is refused, not decoded."""
    side = 9500  # 90.25M pixels > MAX_PIXELS; 9 KB of PNG
    assert side * side > MAX_PIXELS
    bomb = grey_bomb(side, side)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    clear_cache()
    with pytest.raises(DecodeError, match="DecompressionBombError"):
        decode_rgb(bomb)
    with pytest.raises(Image.DecompressionBombError):
        open_image(bomb)
    with pytest.raises(Image.DecompressionBombError):
        prepare_image(bomb, "image/png", ShardsConfig(image_format="jpg"))
    with pytest.raises(Image.DecompressionBombError):
        safe_reencode(bomb, [])


# ---- F4: a bounded safety re-encode ---------------------------------------------------------


def test_safety_refuses_to_reencode_above_its_pixel_cap_and_declares_the_memory() -> None:
    data = encoded(photo(), "PNG")  # 3072 pixels
    with pytest.raises(Image.DecompressionBombError):
        safe_reencode(data, [], max_pixels=3000)
    assert safe_reencode(data, [], max_pixels=3072)[1] == "image/png"

    f = SafetyFilter(SafetyConfig(blur_faces=True, max_pixels=3000))
    s = Sample(key="k", url="u", image=data, mime="image/png", license="by")
    s.sha256 = hashlib.sha256(data).hexdigest()  # kept as downloaded: must be re-encoded
    d = f.decide_batch([s])[0]
    assert (d.keep, d.reason) == (False, "decompression_bomb") and "decompression_bomb" in REASONS
    assert s.image is data  # nothing replaced

    # what Ray/Slurm size the task by covers a re-encode at the cap (>= 8 bytes a pixel)
    # when blur_faces re-encodes every downloaded original; without it, the usual 0.5 GB
    for cap in (MAX_PIXELS, 4 * MAX_PIXELS):
        memory = SafetyFilter(SafetyConfig(blur_faces=True, max_pixels=cap)).resources.memory_gb
        assert memory * 2**30 >= 8 * cap
        assert SafetyFilter(SafetyConfig(max_pixels=cap)).resources.memory_gb == 0.5


def test_blur_in_place_equals_the_array_blur_and_leaves_the_shared_decode_alone() -> None:
    boxes = [(10, 8, 20, 16, 0.9), (30, 20, 30, 30, 0.8), (500, 500, 9, 9, 0.9)]
    for mode in ("RGB", "RGBA"):
        img = photo().convert(mode)
        if mode == "RGBA":
            img.putalpha(Image.linear_gradient("L").resize(img.size))
        expected, n = blur_regions(np.asarray(img), boxes)
        assert blur_image(img, boxes) == n == 2
        assert np.array_equal(np.asarray(img), expected)

    data = encoded(photo(), "JPEG", quality=95)
    clear_cache()
    before = np.asarray(decode_rgb(data)).copy()
    out, _, n = safe_reencode(data, boxes[:1])
    assert n == 1 and np.array_equal(np.asarray(decode_rgb(data)), before)
    assert not np.array_equal(np.asarray(Image.open(io.BytesIO(out))), before)


def test_a_palette_gif_is_reencoded_without_quantising_or_losing_pixels() -> None:
    """A multi-frame GIF is re-encoded even without blurring: its first frame keeps its
    palette (quantising a big, mostly empty screen cost seconds and gigabytes)."""
    frames = [photo(40, 30, seed=k).quantize(16) for k in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], transparency=0)
    data = buf.getvalue()
    out, mime, _ = safe_reencode(data, [])
    shipped = Image.open(io.BytesIO(out))
    assert mime == "image/gif" and getattr(shipped, "n_frames", 1) == 1
    assert shipped.mode == "P"
    assert np.array_equal(np.asarray(to_rgb(shipped)), np.asarray(decode_rgb(data)))


# ---- F5: 16-bit greys ship as judged --------------------------------------------------------


def grey16(trns: bool) -> bytes:
    img = Image.fromarray(np.full((24, 32), 30000, np.uint16))  # 30000/65535 = 117/255
    assert img.mode == "I;16"
    return encoded(img, "PNG", **({"transparency": 0} if trns else {}))


@pytest.mark.parametrize("trns", [False, True])
def test_16bit_grey_ships_the_grey_the_filters_judged(trns: bool) -> None:
    data = grey16(trns)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    judged = decode_rgb(data).getpixel((5, 5))
    assert judged == (117, 117, 117)

    def shipped(b: bytes) -> tuple[int, ...]:
        with Image.open(io.BytesIO(b)) as im:
            im.load()
            return tuple(to_rgb(im).getpixel((5, 5)))  # type: ignore[arg-type]

    assert shipped(safe_reencode(data, [])[0]) == judged
    for fmt in ("jpg", "webp"):
        out, re_as, _ = prepare_image(data, "image/png", ShardsConfig(image_format=fmt))
        assert re_as == fmt
        assert max(abs(a - b) for a, b in zip(shipped(out), judged, strict=True)) <= 2
    tif = encoded(Image.open(io.BytesIO(data)), "TIFF")  # another type: re-encoded to png
    out, re_as, _ = prepare_image(tif, "image/tiff", ShardsConfig(image_format="png"))
    assert re_as == "png" and shipped(out) == judged


def test_a_release_reencode_carries_none_of_the_sources_metadata() -> None:
    """Encoders read a comment from the image's `info` too: a GIF's comment rode into the
    JPEG the release wrote."""
    data = encoded(photo().quantize(64), "GIF", comment=b"taken at 12 Example Street")
    assert b"Example Street" in data
    for fmt in ("jpg", "png", "webp"):
        out, re_as, _ = prepare_image(data, "image/gif", ShardsConfig(image_format=fmt))
        assert re_as == fmt and b"Example Street" not in out


# ---- F6: nothing after the judged image ships -----------------------------------------------


def _trailer() -> bytes:
    hidden = encoded(photo(120, 90, seed=7), "JPEG")  # stands for what was never judged
    return b"MotionPhoto_Data" + b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64 + hidden


@pytest.mark.parametrize(
    ("fmt", "mime", "kw"),
    [
        ("jpg", "image/jpeg", {}),
        ("jpg", "image/jpeg", {"progressive": True}),
        ("jpg", "image/jpeg", {"restart_marker_blocks": 2}),
        ("png", "image/png", {}),
        ("webp", "image/webp", {"quality": 80}),
    ],
)
def test_release_copies_a_file_only_up_to_the_end_of_its_image(
    fmt: str, mime: str, kw: dict[str, object]
) -> None:
    pil = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    image = encoded(photo(), pil, **kw)
    trailer = _trailer()
    out, re_as, _ = prepare_image(image + trailer, mime, ShardsConfig(image_format=fmt))
    assert (out, re_as) == (image, None)  # lossless: the image's own bytes, nothing after
    assert {"jpg": jpeg_end, "png": png_end, "webp": webp_end}[fmt](image + trailer) == len(image)


def test_a_jpeg_whose_end_cannot_be_found_is_reencoded_not_copied() -> None:
    """No EOI after the scan, and an appended JPEG: its EOI is not this image's end."""
    image = encoded(photo(), "JPEG")
    eoi_less = image[:-2] + _trailer()
    assert jpeg_end(eoi_less) is None and jpeg_end(image + _trailer()) == len(image)
    try:
        out, re_as, _ = prepare_image(eoi_less, "image/jpeg", ShardsConfig(image_format="jpg"))
    except ValueError:
        return  # undecodable: the release excludes it (image_error)
    assert re_as == "jpg" and _trailer()[-200:] not in out


# ---- F10: a malformed EXIF tag ends in a re-encode, not an exception --------------------------


def _bad_exif_jpeg() -> bytes:
    """A JPEG with orientation 6 and an ImageWidth tag stored as text: rewriting that EXIF
    (`ImageOps.exif_transpose`) raises struct.error."""
    entries = [
        struct.pack("<HHI4s", 0x0100, 2, 3, b"me\0\0"),  # ImageWidth as ASCII
        struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0),  # Orientation 6
    ]
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 2) + b"".join(entries)
    exif = b"Exif\0\0" + tiff + b"\0" * 4
    return encoded(Image.new("RGB", (40, 30), (200, 30, 30)), "JPEG", exif=exif)


@pytest.mark.parametrize("fmt", ["png", "webp", "jpg"])
def test_a_malformed_exif_tag_is_reencoded_upright(fmt: str) -> None:
    data = _bad_exif_jpeg()
    with pytest.raises(struct.error):
        ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    out, re_as, size = prepare_image(data, "image/png", ShardsConfig(image_format=fmt))
    assert re_as == fmt and size == (30, 40)
    assert Image.open(io.BytesIO(out)).size == (30, 40)
