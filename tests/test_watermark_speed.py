"""The OCR's speed-ups change no output.

The image work done by OpenCV (`chroma`, `achromatic_map`, `tophat_map`) gives the same bytes
as the numpy formulas it replaced (kept below verbatim as references); the detector's
table-driven preprocessing (`LutDetPreProcess`) the same input as rapidocr's own; the memory
arena (`ocr_mem_arena`) reaches both sessions, and a planted overlay reads the same, box for
box, with every speed-up on as with all off.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydantic import ValidationError

from ccurate.filters.watermark import (
    LutDetPreProcess,
    OcrReader,
    WatermarkConfig,
    achromatic_map,
    chroma,
    tophat_map,
)


def chroma_ref(rgb: np.ndarray) -> float:
    return float((rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)).mean())


def achromatic_map_ref(rgb: np.ndarray) -> np.ndarray:
    f = rgb.astype(np.float32)
    mx, mn = f.max(axis=2), f.min(axis=2)
    g = np.clip(255.0 - 2.0 * (mx - mn), 0.0, 255.0) * (mn / 255.0)
    lo, hi = float(g.min()), float(g.max())
    g8 = np.rint((g - lo) * (255.0 / max(hi - lo, 1e-6))).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(g8[:, :, None], 3, axis=2))


def tophat_map_ref(gray: np.ndarray, frac: float) -> np.ndarray:
    g = np.ascontiguousarray(gray[:, :, 0])
    k = max(5, round(frac * min(g.shape)))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    th = cv2.morphologyEx(g, cv2.MORPH_TOPHAT, disc).astype(np.float32)
    lo, hi = (float(v) for v in np.percentile(th, [0.5, 99.5]))
    t8 = np.clip((th - lo) * (255.0 / max(hi - lo, 1e-6)), 0.0, 255.0).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(t8[:, :, None], 3, axis=2))


def images() -> list[np.ndarray]:
    """Noise, smooth colour gradients with grey and white patches, flat and tiny edge cases,
    and a non-contiguous (mirrored) view, as `np.asarray` of a PIL image can be."""
    rng = np.random.default_rng(7)
    out = [(rng.random((123, 201, 3)) * 255).astype(np.uint8)]
    yy, xx = np.mgrid[:240, :320].astype(np.float32)
    grad = np.stack([xx / 320 * 255, yy / 240 * 255, (xx + yy) / 560 * 255], axis=2)
    grad[60:120, 40:200] = 230.0  # light grey patch: bright in the map
    grad[150:170, 100:300] = (200.0, 200.0, 120.0)
    grad += rng.normal(0.0, 6.0, grad.shape)
    g8 = np.clip(grad, 0, 255).astype(np.uint8)
    out += [g8, np.ascontiguousarray(g8[:, ::-1])[::2], g8[:, ::-1]]
    out += [np.zeros((9, 7, 3), np.uint8), np.full((40, 50, 3), 255, np.uint8)]
    out.append(np.full((30, 30, 3), (250, 10, 120), np.uint8))  # saturated: 2*chroma > 255
    return out


@pytest.mark.parametrize("i", range(7))
def test_opencv_image_work_is_bit_identical_to_the_numpy_formulas(i: int) -> None:
    rgb = images()[i]
    assert chroma(rgb) == chroma_ref(rgb)
    got, ref = achromatic_map(rgb), achromatic_map_ref(rgb)
    assert got.dtype == ref.dtype == np.uint8 and got.shape == ref.shape == (*rgb.shape[:2], 3)
    assert got.flags.c_contiguous
    assert np.array_equal(got, ref)
    th, th_ref = tophat_map(ref, 0.05), tophat_map_ref(ref, 0.05)
    assert th.flags.c_contiguous and np.array_equal(th, th_ref)


def test_saturated_colour_counts_as_dark_in_the_map() -> None:
    """A pixel whose chroma exceeds 127 has 255 - 2*chroma < 0: clipped to 0, not wrapped
    around (uint8 arithmetic would wrap where numpy's float clip did not)."""
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (255, 255, 255)  # white: the map's brightest
    rgb[0, 1] = (250, 10, 120)  # saturated pink: chroma 240
    rgb[1, :] = (128, 128, 128)
    m = achromatic_map(rgb)[:, :, 0]
    assert m[0, 0] == 255 and m[0, 1] == 0 and 0 < m[1, 0] < 255


# ---- the OCR engine ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fast() -> OcrReader:
    r = OcrReader(WatermarkConfig())
    r.setup()
    return r


@pytest.fixture(scope="module")
def stock() -> OcrReader:
    """rapidocr's own preprocessing and no memory arena: the reference path."""
    r = OcrReader(WatermarkConfig(ocr_mem_arena=False))
    r.setup()
    det = r._engine.text_det
    det.get_preprocess = det.__class__.get_preprocess.__get__(det)
    return r


def test_table_preprocessing_is_rapidocrs_bit_for_bit(fast: OcrReader) -> None:
    det = fast._engine.text_det
    pre, ref = det.get_preprocess(), det.__class__.get_preprocess(det)
    assert isinstance(pre, LutDetPreProcess) and pre is det.get_preprocess()  # one instance
    rng = np.random.default_rng(3)
    for shape in ((480, 640, 3), (101, 37, 3), (640, 640, 3), (333, 250, 3)):
        img = (rng.random(shape) * 255).astype(np.uint8)
        a, b = pre(img), ref(img)
        assert a is not None and b is not None
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
        assert a.flags.c_contiguous and np.array_equal(a, b)
    flat = (rng.random((20, 900, 3)) * 255).astype(np.uint8)  # rounds to 0 rows: no input
    assert pre(flat) is None and ref(flat) is None
    as_float = rng.random((64, 96, 3)).astype(np.float32) * 255  # not uint8: their path
    a, b = pre(as_float), ref(as_float)
    assert a is not None and b is not None and np.array_equal(a, b)


@pytest.mark.parametrize("arena", [True, False])
def test_mem_arena_option_reaches_both_sessions(arena: bool) -> None:
    r = OcrReader(WatermarkConfig(ocr_mem_arena=arena))
    r.setup()
    for model in (r._engine.text_det, r._engine.text_rec):
        assert model.session.session.get_session_options().enable_cpu_mem_arena is arena


def test_mem_arena_is_validated() -> None:
    assert WatermarkConfig().ocr_mem_arena is True
    with pytest.raises(ValidationError):
        WatermarkConfig(ocr_mem_arena="yes")  # type: ignore[arg-type]


def overlay(text: str) -> np.ndarray:
    """A textured colour photo with a semi-transparent white brand across it, as BGR."""
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[:300, :420].astype(np.float32)
    base = np.stack([90 + 60 * np.sin(xx / 37), 140 + 50 * np.cos(yy / 23), 80 + xx / 8], 2)
    base += rng.normal(0.0, 12.0, base.shape)
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).convert("RGBA")
    layer = Image.new("RGBA", im.size, (0, 0, 0, 0))
    try:
        f: ImageFont.FreeTypeFont | ImageFont.ImageFont = ImageFont.truetype(
            "DejaVuSans-Bold.ttf", 44
        )
    except OSError:
        f = ImageFont.load_default(44)
    ImageDraw.Draw(layer).text((40, 120), text, font=f, fill=(255, 255, 255, 170))
    rgb = np.asarray(Image.alpha_composite(im, layer).convert("RGB"))
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


def test_planted_overlay_reads_the_same_with_and_without_the_speed_ups(
    fast: OcrReader, stock: OcrReader
) -> None:
    bgr = overlay("shutterstock")
    got, n_got = fast.read_bgr(bgr)
    ref, n_ref = stock.read_bgr(bgr)
    assert n_got == n_ref and [b.text for b in got] == [b.text for b in ref]
    assert all(
        np.array_equal(a.box, b.box) and a.score == b.score for a, b in zip(got, ref, strict=True)
    )
    assert any("shutterstock" in b.text.lower().replace(" ", "") for b in got)


def test_tophat_side_brings_the_third_pass_map_down_and_is_validated() -> None:
    r = OcrReader(WatermarkConfig())  # no models needed for the map's size
    assert r.cfg.ocr_tophat_side == 384
    big = np.zeros((480, 640, 3), np.uint8)
    m, w, h = r.tophat_copy(big, 640, 480)
    assert (w, h) == (384, 288) and m.shape == (288, 384, 3)
    small = np.zeros((200, 300, 3), np.uint8)
    m, w, h = r.tophat_copy(small, 300, 200)
    assert m is small and (w, h) == (300, 200)
    m, w, h = OcrReader(WatermarkConfig(ocr_tophat_side=1024)).tophat_copy(big, 640, 480)
    assert m is big and (w, h) == (640, 480)  # a larger side keeps the map as it is
    for bad in (32, 5000, 384.5):
        with pytest.raises(ValidationError):
            WatermarkConfig(ocr_tophat_side=bad)  # type: ignore[arg-type]
