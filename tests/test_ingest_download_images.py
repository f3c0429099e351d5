"""Decode/validate/resize of downloaded bodies: odd modes, orientation, bombs, resize modes."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ccurate.ingest.images import ImageDrop, ImageOptions, configure_pillow, process_image

configure_pillow(ImageOptions().max_pixels)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(w: int, h: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims w x h pixels."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    chunks = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def photo(w: int = 400, h: int = 300, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1)
    noise = rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


OPT = ImageOptions(image_size=64)


def test_plain_jpeg_keep_ratio():
    data = _save(photo(400, 300), "JPEG", quality=90)
    r = process_image(data, OPT)
    assert (r.width, r.height) == (85, 64)
    assert (r.original_width, r.original_height) == (400, 300)
    assert r.mime == "image/jpeg" and decode(r.data).size == (85, 64)


@pytest.mark.parametrize(
    ("mode", "size"),
    [
        ("keep_ratio", (85, 64)),
        ("keep_ratio_largest", (64, 48)),
        ("center_crop", (64, 64)),
        ("border", (64, 64)),
        ("no", (400, 300)),
    ],
)
def test_resize_modes(mode: str, size: tuple[int, int]):
    data = _save(photo(400, 300), "PNG")
    r = process_image(data, ImageOptions(image_size=64, resize_mode=mode))
    assert (r.width, r.height) == size
    if mode == "border":
        px = np.asarray(decode(r.data).convert("RGB"))
        assert px[:4].max() < 20 and px[-4:].max() < 20  # black bands top and bottom
        assert px[32].mean() > 40


def test_small_images_are_upscaled_unless_only_if_bigger():
    data = _save(photo(40, 30), "PNG")
    assert process_image(data, OPT).height == 64
    r = process_image(data, ImageOptions(image_size=64, resize_only_if_bigger=True))
    assert (r.width, r.height) == (40, 30)


def test_output_formats():
    data = _save(photo(100, 100), "JPEG")
    for fmt, mime, pil in [("png", "image/png", "PNG"), ("webp", "image/webp", "WEBP")]:
        r = process_image(data, ImageOptions(image_size=32, output_format=fmt, encode_quality=80))
        assert r.mime == mime and decode(r.data).format == pil


def test_jpeg_draft_matches_full_decode():
    data = _save(photo(1024, 768, seed=3), "JPEG", quality=92)
    fast = process_image(data, ImageOptions(image_size=256, output_format="png"))
    slow = process_image(data, ImageOptions(image_size=256, output_format="png", jpeg_draft=False))
    assert (fast.width, fast.height) == (slow.width, slow.height) == (341, 256)
    a = np.asarray(decode(fast.data), np.float64)
    b = np.asarray(decode(slow.data), np.float64)
    psnr = 10 * np.log10(255**2 / np.mean((a - b) ** 2))
    assert psnr > 40, psnr


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 100, 100))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = _save(img, "JPEG", exif=exif.tobytes(), quality=95)
    r = process_image(data, ImageOptions(image_size=50, resize_mode="keep_ratio"))
    assert (r.original_width, r.original_height) == (100, 200)
    assert (r.width, r.height) == (50, 100)
    px = np.asarray(decode(r.data))
    assert px[10, 25, 2] > 200 and px[10, 25, 0] < 60  # top is blue after rotation
    assert px[90, 25, 0] > 200


def test_cmyk_jpeg():
    data = _save(Image.new("CMYK", (80, 80), (0, 255, 255, 0)), "JPEG")
    r = process_image(data, OPT)
    px = np.asarray(decode(r.data))
    assert px[32, 32, 0] > 200 and px[32, 32, 1] < 60 and px[32, 32, 2] < 60  # red


def test_16bit_grey_is_rescaled_not_clipped():
    arr = np.full((80, 80), 32768, np.uint16)
    data = _save(Image.fromarray(arr), "PNG")
    r = process_image(data, OPT)
    px = np.asarray(decode(r.data))
    assert 120 <= int(px[32, 32, 0]) <= 135


def test_palette_with_transparency_goes_on_white():
    img = Image.new("P", (80, 80), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (0, 0, 40, 80))
    data = _save(img, "PNG", transparency=0)
    r = process_image(data, OPT)
    px = np.asarray(decode(r.data))
    assert px[32, 5].tolist()[0] > 200 and px[32, 5, 1] < 60  # red half
    assert px[32, 60].min() > 230  # transparent half -> white, not black


def test_rgba_alpha_goes_on_white():
    img = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    img.paste((0, 128, 0, 255), (40, 0, 80, 80))
    r = process_image(_save(img, "PNG"), OPT)
    px = np.asarray(decode(r.data))
    assert px[32, 5].min() > 230 and px[32, 60, 1] > 100


def test_animated_gif_keeps_first_frame():
    frames = [Image.new("RGB", (60, 60), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    r = process_image(data, OPT)
    px = np.asarray(decode(r.data))
    assert px[30, 30, 0] > 200 and px[30, 30, 2] < 60


def test_grey_and_bilevel():
    cases: list[tuple[str, int | tuple[int, int]]] = [("L", 128), ("1", 1), ("LA", (100, 255))]
    for mode, color in cases:
        r = process_image(_save(Image.new(mode, (70, 70), color), "PNG"), OPT)
        assert decode(r.data).mode == "RGB"


def test_bombs_are_refused_before_decoding():
    with pytest.raises(ImageDrop) as e:
        process_image(bomb_png(100_000, 100_000), OPT)
    assert e.value.reason == "decompression_bomb"
    with pytest.raises(ImageDrop) as e:
        process_image(bomb_png(3000, 3000), ImageOptions(image_size=64, max_pixels=1_000_000))
    assert e.value.reason == "decompression_bomb"


def test_a_resize_that_would_make_a_bomb_is_refused():
    """A 1 x 20000 strip is 20k pixels, but keep_ratio scales its short side to 256: 5.1M x 256
    (1.3 G pixels, ~4 GB of RGB) before any crop. Refused as a bomb, not allocated."""
    strip = Image.new("L", (1, 20000), 90)
    buf = io.BytesIO()
    strip.save(buf, "PNG")
    for mode in ("keep_ratio", "center_crop"):
        with pytest.raises(ImageDrop) as e:
            process_image(buf.getvalue(), ImageOptions(image_size=256, resize_mode=mode))
        assert e.value.reason == "decompression_bomb" and "256x5120000" in str(e.value)
    wide = io.BytesIO()
    Image.new("RGB", (2000, 10), (9, 9, 9)).save(wide, "PNG")  # 51,200 x 256: within the cap
    out = process_image(wide.getvalue(), ImageOptions(image_size=256, resize_mode="keep_ratio"))
    assert (out.width, out.height) == (51200, 256)
    border = process_image(buf.getvalue(), ImageOptions(image_size=256, resize_mode="border"))
    assert (border.width, border.height) == (256, 256)  # by the long side: no blow-up


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not_an_image"),
        (b"<!doctype html><html></html>", "not_an_image"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "not_an_image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "decode_error"),
        (b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, "decode_error"),
    ],
)
def test_not_images_and_broken_images(data: bytes, reason: str):
    with pytest.raises(ImageDrop) as e:
        process_image(data, OPT)
    assert e.value.reason == reason


def test_truncated_files_are_decode_errors():
    for fmt in ("JPEG", "PNG"):
        data = _save(photo(200, 200), fmt)
        with pytest.raises(ImageDrop) as e:
            process_image(data[: len(data) // 2], OPT)
        assert e.value.reason == "decode_error", fmt


def test_keep_original_stores_the_downloaded_bytes():
    data = _save(photo(300, 200), "PNG")
    r = process_image(data, ImageOptions(image_size=64, keep_original=True))
    assert r.data == data and r.mime == "image/png" and (r.width, r.height) == (300, 200)


def test_size_filters():
    data = _save(photo(300, 60), "PNG")
    cases = [
        (ImageOptions(min_image_size=100), "image_too_small"),
        (ImageOptions(max_image_size=200), "image_too_large"),
        (ImageOptions(max_aspect_ratio=3.0), "image_bad_aspect"),
    ]
    for opt, reason in cases:
        with pytest.raises(ImageDrop) as e:
            process_image(data, opt)
        assert e.value.reason == reason
    assert process_image(data, ImageOptions(image_size=32)).original_width == 300


@pytest.mark.parametrize("mode", ["keep_ratio", "keep_ratio_largest", "center_crop", "border"])
@pytest.mark.parametrize("kind", ["baseline", "progressive", "grey"])
def test_jpeg_fast_path_matches_the_general_path(
    mode: str, kind: str, monkeypatch: pytest.MonkeyPatch
):
    """Upright JPEGs skip Pillow (libjpeg-turbo straight to an array, then OpenCV): the
    same pixels as the general path gets from the same decoded image stored as PNG."""
    import simplejpeg

    calls: list[int] = []
    real = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    img = photo(333, 250, seed=7)
    if kind == "grey":
        img = img.convert("L")
    data = _save(img, "JPEG", quality=90, progressive=kind == "progressive")
    lossless = _save(decode(data), "PNG")  # general path: the very same pixels
    opt = ImageOptions(image_size=64, resize_mode=mode, output_format="png", jpeg_draft=False)
    fast, ref = process_image(data, opt), process_image(lossless, opt)
    assert (fast.width, fast.height) == (ref.width, ref.height)
    a = np.asarray(decode(fast.data).convert("RGB"), float)
    b = np.asarray(decode(ref.data).convert("RGB"), float)
    assert np.abs(a - b).mean() < 1.0
    assert fast.image.mode == "RGB" and fast.sha256 == hashlib.sha256(data).hexdigest()
    assert len(calls) == 1  # the JPEG took the fast path, the PNG did not


@pytest.mark.parametrize("filt", ["area", "lanczos", "bicubic"])
def test_resize_filters_agree(filt: str):
    data = _save(photo(400, 300, seed=5), "PNG")
    ref = process_image(
        data, ImageOptions(image_size=64, output_format="png", resize_filter="lanczos")
    )
    r = process_image(data, ImageOptions(image_size=64, output_format="png", resize_filter=filt))
    assert (r.width, r.height) == (ref.width, ref.height) == (85, 64)
    diff = np.abs(np.asarray(decode(r.data), float) - np.asarray(decode(ref.data), float))
    assert diff.mean() < 6.0


def test_pixel_budget_serialises_big_images_only():
    import threading
    import time

    from ccurate.ingest.images import PixelBudget

    budget = PixelBudget(100)  # pixels of 4 bytes: 400 bytes, held in bytes
    seen: set[int] = set()
    lock = threading.Lock()

    def work(px: int) -> None:
        with budget.hold(px):
            with lock:
                seen.add(budget.used)
            time.sleep(0.05)

    threads = [threading.Thread(target=work, args=(240,)) for _ in range(4)]
    threads.append(threading.Thread(target=work, args=(2000,)))  # above the budget: alone
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert seen == {240, 2000} and budget.used == 0  # never two at once over the budget
    shared = PixelBudget(1000, threads=4)  # 4000 B: 4 x 500 B pass freely, big ones share 2000
    entered = threading.Event()

    def second_big() -> None:
        with shared.hold(1200):
            entered.set()

    with shared.hold(500), shared.hold(500):  # ordinary images neither wait nor count
        assert shared.used == 0
        with shared.hold(1200):
            assert shared.used == 1200
            t = threading.Thread(target=second_big)
            t.start()
            assert not entered.wait(0.2)  # 2400 > 2000: the second big one waits
        assert entered.wait(5)
        t.join(5)
    assert shared.used == 0


def test_integer_factor_area_resize_equals_cv2_inter_area():
    import cv2

    from ccurate.ingest.images import ImageOptions, _resize

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (384, 512, 3), dtype=np.uint8)
    out = _resize(Image.fromarray(arr, "RGB"), ImageOptions(image_size=192))  # short side
    want = cv2.resize(arr, (256, 192), interpolation=cv2.INTER_AREA)
    assert out.size == (256, 192)
    assert np.array_equal(np.asarray(out), want)
    # a non-integer factor still goes through cv2's area filter
    odd = _resize(Image.fromarray(arr, "RGB"), ImageOptions(image_size=256))
    assert odd.size == (341, 256)
    assert np.array_equal(
        np.asarray(odd), cv2.resize(arr, (341, 256), interpolation=cv2.INTER_AREA)
    )


def test_image_options_take_every_setting_from_the_ingest_config() -> None:
    from ccurate.ingest.config import IngestConfig

    changed = {
        "image_size": 320,
        "resize_mode": "center_crop",
        "resize_only_if_bigger": True,
        "output_format": "webp",
        "encode_quality": 80,
        "keep_original": True,
        "max_pixels": 1_000_000,
        "min_image_size": 10,
        "max_image_size": 5000,
        "max_aspect_ratio": 3.0,
        "jpeg_draft": False,
        "jpeg_draft_factor": 2.0,
        "resize_filter": "lanczos",
    }
    opt = ImageOptions.from_config(IngestConfig(**changed))
    assert {f: getattr(opt, f) for f in changed} == changed
    assert set(changed) == {f.name for f in dataclasses.fields(ImageOptions)}


# ----------------------------------------------------------------- edge cases
@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"RIFF\x00\x00\x00\x00WEBP", "decode_error"),  # a WebP signature, nothing after
        (b"RIFF\x04\x00\x00\x00WEBPjunkjunk", "decode_error"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 40, "not_an_image"),  # a sound file
        (b"RIFF\x20\x00\x00\x00WEBPVP8X" + b"\xff" * 30, "decompression_bomb"),  # 2^24 x 2^24
    ],
)
def test_riff_bodies_are_judged_by_their_form_type(data: bytes, reason: str):
    with pytest.raises(ImageDrop) as e:
        process_image(data, OPT)
    assert e.value.reason == reason


def test_float_grey_is_scaled_and_nan_is_black():
    a = np.tile(np.linspace(0, 1, 80, dtype=np.float32), (80, 1))
    a[0, 0] = np.nan
    r = process_image(_save(Image.fromarray(a, "F"), "TIFF"), ImageOptions(image_size=80))
    px = np.asarray(decode(r.data)).astype(int)
    assert abs(px[40, 40, 0] - 129) <= 3 and px[40, 79, 0] >= 250  # 0..1 -> 0..255
    assert px[0, 0].max() <= 8  # NaN -> 0, not an error
    # values already in 0..255 (or beyond) are clipped, not rescaled
    b = np.tile(np.linspace(-50, 300, 80, dtype=np.float32), (80, 1))
    opt = ImageOptions(image_size=80, output_format="png")
    px = np.asarray(decode(process_image(_save(Image.fromarray(b, "F"), "TIFF"), opt).data))
    assert px[40, 0, 0] == 0 and px[40, 79, 0] == 255 and 120 <= px[40, 40, 0] <= 135


def test_32bit_grey_above_8_bits_is_rescaled():
    i = np.tile(np.linspace(0, 65535, 80).astype(np.int32), (80, 1))
    opt = ImageOptions(image_size=80, output_format="png")
    px = np.asarray(decode(process_image(_save(Image.fromarray(i, "I"), "TIFF"), opt).data))
    assert px[40, 0, 0] == 0 and px[40, 79, 0] == 255 and 120 <= px[40, 40, 0] <= 135


@pytest.mark.parametrize(("mode", "fill", "key"), [("RGB", (255, 0, 0), (0, 0, 0)), ("L", 200, 0)])
def test_colour_key_transparency_goes_on_white(mode: str, fill, key):
    """RGB and grey PNGs with a tRNS colour key: the keyed colour is transparent."""
    img = Image.new(mode, (80, 80), key)
    img.paste(fill, (0, 0, 40, 80))
    r = process_image(_save(img, "PNG", transparency=key), ImageOptions(image_size=80))
    px = np.asarray(decode(r.data)).astype(int)
    assert px[40, 60].min() > 240  # keyed black -> white, not black
    want = (255, 0, 0) if mode == "RGB" else (200, 200, 200)
    assert np.abs(px[40, 10] - np.array(want)).max() < 12


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_side_already_at_target_is_not_resampled(fmt: str):
    src = photo(64, 100)
    r = process_image(_save(src, fmt), ImageOptions(image_size=64, output_format="png"))
    assert (r.width, r.height) == (64, 100)
    if fmt == "PNG":  # no resampling at all: the pixels come back unchanged
        assert np.array_equal(np.asarray(decode(r.data)), np.asarray(src))


def test_unknown_output_format_is_an_error_not_a_drop():
    from ccurate.ingest.images import encode

    with pytest.raises(ValueError, match="gif"):
        encode(photo(8, 8), "gif", 90)


def test_written_jpegs_have_optimised_huffman_tables_and_the_same_pixels() -> None:
    """ccurate's JPEGs are Huffman-optimised: smaller (and faster to decode in training)
    than the default tables give, pixel for pixel the same image."""
    from ccurate.ingest.images import encode
    from ccurate.pixels import save_jpeg

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:256, 0:320]
    arr = np.clip(
        np.stack([xx * 0.8, yy, (xx + yy) * 0.4], -1) + rng.normal(0, 8, (256, 320, 3)), 0, 255
    ).astype(np.uint8)
    img = Image.fromarray(arr)
    plain, ours = io.BytesIO(), io.BytesIO()
    img.save(plain, "JPEG", quality=95)
    save_jpeg(img, ours, 95)
    assert len(ours.getvalue()) < 0.97 * len(plain.getvalue())
    a = np.asarray(Image.open(io.BytesIO(ours.getvalue())))
    b = np.asarray(Image.open(io.BytesIO(plain.getvalue())))
    assert np.array_equal(a, b)  # lossless: only the entropy coding differs
    assert encode(img, "jpg", 95) == ours.getvalue()  # what ingest writes


def test_save_jpeg_writes_noise_that_overflows_pillows_optimise_buffer() -> None:
    """Pillow sizes its optimise buffer at 2 bytes a pixel at q95: full-chroma noise needs
    more and fails; the JPEG is then written with the default tables, not lost."""
    from ccurate.pixels import save_jpeg

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), np.uint8))
    buf = io.BytesIO(b"head")
    buf.seek(4)
    save_jpeg(noise, buf, 95, subsampling=0)
    data = buf.getvalue()
    assert data[:4] == b"head"  # what the stream held before is kept
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data[4:]))).shape, (256, 256, 3))


def _ico(frame: bytes, claimed: int = 16) -> bytes:
    """An ICO with one directory entry (claiming claimed x claimed) whose frame is `frame`."""
    entry = struct.pack("<BBBBHHII", claimed, claimed, 0, 0, 1, 32, len(frame), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + frame


def test_an_icon_bomb_is_refused_from_its_headers_before_any_decode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pillow decodes an ICO frame inside `Image.open` (before `process_image` sees a size):
    a 688 KB ICO whose directory says 16x16 but whose PNG says 13300x13300 took 730 MB."""
    from PIL import IcoImagePlugin

    def no_decode(*a, **k):
        raise AssertionError("an ICO frame was decoded")

    monkeypatch.setattr(IcoImagePlugin.IcoFile, "frame", no_decode)
    for body in (_ico(bomb_png(20_000, 20_000)), _ico(bomb_png(400, 400))):
        with pytest.raises(ImageDrop) as e:
            process_image(body, ImageOptions(image_size=64, max_pixels=100_000))
        assert e.value.reason == "decompression_bomb"
    # a BMP frame: its header height counts the AND mask (Pillow halves it)
    dib = struct.pack("<IiiHHIIiiII", 40, 30_000, 60_000, 1, 32, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ImageDrop) as e:
        process_image(_ico(dib), OPT)
    assert e.value.reason == "decompression_bomb"


def test_favicons_still_decode() -> None:
    from ccurate.ingest.images import _icon_pixels

    src = photo(48, 48).convert("RGBA")
    data = _save(src, "ICO", sizes=[(16, 16), (32, 32), (48, 48)])
    assert _icon_pixels(data) == 48 * 48
    r = process_image(data, ImageOptions(image_size=32, output_format="png"))
    assert (r.width, r.height, r.original_width, r.original_height) == (32, 32, 48, 48)
    png_inside = _ico(_save(photo(40, 40), "PNG"), claimed=40)
    assert process_image(png_inside, OPT).original_width == 40


def test_pillows_own_bomb_error_fires_at_max_pixels_never_below_the_shared_cap() -> None:
    """Above the shared cap, Pillow's own error fires at ingest's `max_pixels` (+1 when odd);
    below it the process-wide limit stays (other stages share the process) and ingest's own
    header check drops the image."""
    from ccurate.pixels import MAX_PIXELS

    try:
        for cap in (2 * MAX_PIXELS, 2 * MAX_PIXELS + 1):
            configure_pillow(cap)
            Image._decompression_bomb_check((cap, 1))  # at the cap: allowed
            with pytest.raises(Image.DecompressionBombError):
                Image._decompression_bomb_check((cap + 2, 1))
        configure_pillow(1000)
        Image._decompression_bomb_check((MAX_PIXELS, 1))  # not lowered
        with pytest.raises(ImageDrop) as e:
            process_image(_save(photo(40, 40), "PNG"), ImageOptions(image_size=32, max_pixels=1000))
        assert e.value.reason == "decompression_bomb"
    finally:
        configure_pillow(ImageOptions().max_pixels)


def test_alpha_on_white_is_the_old_alpha_composite_for_every_value_and_alpha() -> None:
    from ccurate.pixels import to_rgb

    v, a = np.meshgrid(np.arange(256), np.arange(256))
    rgba = Image.fromarray(np.stack([v, 255 - v, v // 3, a], -1).astype(np.uint8), "RGBA")
    for img in (rgba, rgba.convert("LA")):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        old = Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
        assert np.array_equal(np.asarray(to_rgb(img)), np.asarray(old)), img.mode


def _noise_bodies(w: int, h: int) -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    a[: h // 2, :, 3] = 255  # opaque and translucent halves
    p = Image.fromarray(a[..., :3], "RGB").quantize(64)
    return {
        "RGBA": _save(Image.fromarray(a, "RGBA"), "PNG", compress_level=1),
        "P+tRNS": _save(p, "PNG", transparency=bytes(range(0, 256, 4)), compress_level=1),
        "I;16": _save(Image.fromarray(a[..., 0].astype(np.uint16) * 257), "PNG", compress_level=1),
        "RGB+key": _save(
            Image.fromarray(a[..., :3] // 128 * 128, "RGB"), "PNG", transparency=(0, 0, 0)
        ),
    }


@pytest.mark.parametrize(
    ("size", "filt", "plan"),
    [
        (256, "area", (1, 1)),
        (300, "area", (7, 7)),
        (256, "lanczos", (2, 2)),
        (200, "bicubic", (3, 3)),
    ],
)
def test_big_downscales_in_bands_give_the_full_size_pixels(size: int, filt: str, plan) -> None:
    """A big downscale converts to RGB a band at a time (box-reduce first, or `area` as
    separable passes): the same pixels as converting the whole image first."""
    from ccurate.ingest.images import _prereduce, _resize, _upright_resized
    from ccurate.pixels import to_rgb

    opt = ImageOptions(image_size=size, resize_filter=filt, resize_mode="center_crop")
    for name, data in _noise_bodies(2100, 2100).items():
        img = decode(data)
        assert _prereduce(*img.size, img.mode, opt) == plan, name
        banded = np.asarray(_upright_resized(img, opt))
        full = np.asarray(_resize(to_rgb(img), opt))
        assert banded.shape == (size, size, 3) and np.array_equal(banded, full), name


def test_the_budget_holds_bytes_by_mode_and_path() -> None:
    """`decode_pixel_budget` counted pixels (~4 B each) while the decode took 10-28 B a pixel:
    each decode now holds its measured peak in bytes."""
    from ccurate.ingest.images import PixelBudget

    class Spy(PixelBudget):
        held: list[int]

        def hold(self, nbytes: int):
            self.held.append(nbytes)
            return super().hold(nbytes)

    spy = Spy(10**9)
    spy.held = []
    bodies = _noise_bodies(2100, 2100)
    px = 2100 * 2100
    for name, keep, least in [
        ("RGBA", True, 8),  # decoded RGBA + the RGB canvas
        ("RGBA", False, 4),  # downscaled in bands: the decoded RGBA
        ("P+tRNS", True, 9),  # P + RGBA + RGB
        ("P+tRNS", False, 1),
        ("I;16", True, 12),
    ]:
        opt = ImageOptions(image_size=64, keep_original=keep)
        process_image(bodies[name], opt, spy)
        band = 0 if keep else 40_000_000  # a band's copies, whatever the image size
        assert least * px <= spy.held[-1] <= (least + 6) * px + band, (name, keep)
    assert PixelBudget(100, threads=1).limit + PixelBudget(100, threads=1).free == 400
