"""The OCR's fourth and fifth passes, on the log black-hat of the luminance (`ratio_map`).

A dark semi-transparent overlay darkens every pixel under it by the same factor (1 - a):
over a mid-grey or dark ground its linear contrast is small, and the three earlier passes
(the image, its achromatic map, that map's white top-hat: light strokes only) read
nothing. In the log of the luminance the overlay is one step of log(1 - a) wherever it
lies, and the black-hat brings it out as bright strokes on black. One pure test checks that
contrast invariance on the map; one checks the config field; the OCR tests check that a dark
overlay the old passes miss is flagged, and that the clean ground stays clean.
"""

from __future__ import annotations

import glob
import io
from collections.abc import Iterator

import cv2
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from ccurate.filters.watermark import (
    RATIO_PASS,
    OcrBox,
    OcrReader,
    WatermarkConfig,
    WatermarkFilter,
    ratio_map,
)
from ccurate.record import Sample
from tests.overlays import text_overlay

SANS = sorted(glob.glob("/usr/share/fonts/**/DejaVuSans.ttf", recursive=True))


def test_ratio_map_gives_a_dark_overlay_the_same_contrast_on_bright_and_dark_ground() -> None:
    """A 4-px stroke darkened by opacity 0.4 over a ground of 200 (left) and 60 (right): the
    linear black-hat sees it 3x stronger on the left; the log black-hat about the same."""
    g = np.full((200, 400), 200.0, np.float32)
    g[:, 200:] = 60.0
    stroke = np.zeros(g.shape, bool)
    stroke[95:99, 20:380] = True
    g = np.where(stroke, 0.6 * g, g)
    rgb = np.dstack([g] * 3).astype(np.uint8)
    out, w, h = ratio_map(rgb, "dark", 384, 0.05)
    assert (w, h) == (384, 192) and out.shape == (192, 384, 3) and out.dtype == np.uint8
    m = out[:, :, 0].astype(float)
    left, right = m[90:97, 40:170].max(), m[90:97, 220:350].max()
    assert min(left, right) > 200 and abs(left - right) < 30, (left, right)
    flat = np.r_[0:186, 198:384]  # the ground off the stroke and off the step between halves
    assert m[20:60, flat].max() < 20 and m[140:180, flat].max() < 20  # flat ground: black
    # the same stroke in the linear luminance's black-hat: 80 levels on the left, 24 on the right
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (10, 10))
    lum = cv2.resize(g, (384, 192), interpolation=cv2.INTER_AREA)
    bh = cv2.morphologyEx(lum, cv2.MORPH_BLACKHAT, disc)
    assert bh[90:97, 40:170].max() > 2.5 * bh[90:97, 220:350].max()


def test_ratio_passes_config_is_validated() -> None:
    assert WatermarkConfig().ocr_ratio_passes == ["dark", "light"]
    assert WatermarkConfig(ocr_ratio_passes=[]).ocr_ratio_passes == []
    assert WatermarkConfig(ocr_ratio_passes=["light"]).ocr_ratio_passes == ["light"]
    with pytest.raises(ValidationError):
        WatermarkConfig.model_validate({"ocr_ratio_passes": ["grey"]})
    with pytest.raises(ValidationError):
        WatermarkConfig(ocr_ratio_passes=["dark", "light", "dark"])
    assert RATIO_PASS == {"dark": 4.0, "light": 5.0}


def gravel() -> Image.Image:
    """400x320 of scikit-image's gravel photo: mid-grey stones, dark gaps between them."""
    data = pytest.importorskip("skimage.data")
    return Image.fromarray(data.gravel()).convert("RGB").crop((0, 0, 400, 320))


def dark_overlay(im: Image.Image, text: str, font_file: str, size: int, opacity: float,
                 angle: float) -> Image.Image:  # fmt: skip
    """Near-black (20, 20, 20) text at `opacity`, centred, rotated by `angle` degrees."""
    return text_overlay(im, text, font_file, size, opacity, angle, fill=(20, 20, 20))


def sample(im: Image.Image) -> Sample:
    """PNG bytes: the pixels as drawn (a JPEG's ringing around the strokes changes the reads)."""
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return Sample(key="k", url="https://example.org/k.jpg", image=buf.getvalue())


@pytest.fixture(scope="module")
def filters() -> tuple[WatermarkFilter, WatermarkFilter]:
    """(the default filter, the same without the ratio passes), rapidocr loaded once each."""
    new = WatermarkFilter(WatermarkConfig())
    old = WatermarkFilter(WatermarkConfig(ocr_ratio_passes=[]))
    new.setup()
    old.setup()
    return new, old


def test_dark_overlay_on_gravel_is_read_by_the_dark_ratio_pass(
    filters: tuple[WatermarkFilter, WatermarkFilter],
) -> None:
    if not SANS:
        pytest.skip("DejaVu fonts are not installed")
    new, old = filters
    s = sample(dark_overlay(gravel(), "Getty Images", SANS[0], 18, 0.7, 15.0))
    d_old = old.decide(s)
    assert d_old.keep and d_old.scores["ocr_pass"] in (1.0, 2.0, 3.0), d_old.scores
    d = new.decide(s)
    assert not d.keep and d.reason == "watermark", d.scores
    assert d.scores["ocr_pass"] == RATIO_PASS["dark"] and d.scores["ocr_brand"] == 1.0


def test_clean_gravel_stays_clean_through_all_five_passes(
    filters: tuple[WatermarkFilter, WatermarkFilter],
) -> None:
    new, _ = filters
    d = new.decide(sample(gravel()))
    assert d.keep and d.scores["pwatermark_ocr"] < new.cfg.ocr_threshold, d.scores
    # a flat grey image: every map is flat, nothing is boxed by any pass
    d = new.decide(sample(Image.new("RGB", (320, 240), (128, 128, 128))))
    assert d.keep and d.scores["ocr_boxes"] == 0.0, d.scores


def _pass_ids(cfg: WatermarkConfig, img: Image.Image) -> list[float]:
    return [pass_id for pass_id, *_ in OcrReader(cfg).pass_maps(img)]


def test_pass_maps_list_every_pass_that_applies_in_order() -> None:
    """`scores` and the bench's read ceiling (`unread_misses`) walk the same maps: the
    achromatic map only on a colourful image, "first pass only" without it, no ratio pass
    when the list is empty."""
    rng = np.random.default_rng(0)
    colour = Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    grey = colour.convert("L").convert("RGB")
    cfg = WatermarkConfig()
    assert _pass_ids(cfg, colour) == [1.0, 2.0, 3.0, RATIO_PASS["dark"], RATIO_PASS["light"]]
    assert _pass_ids(cfg, grey) == [1.0, 3.0, RATIO_PASS["dark"], RATIO_PASS["light"]]
    assert _pass_ids(WatermarkConfig(ocr_achromatic_pass=False), colour) == [1.0]
    assert _pass_ids(WatermarkConfig(ocr_ratio_passes=[], ocr_tophat_pass=False), colour) == [
        1.0,
        2.0,
    ]
    for pass_id, bgr, w, h in OcrReader(cfg).pass_maps(colour):
        assert bgr.dtype == np.uint8 and bgr.shape == (h, w, 3), pass_id


def test_scores_build_no_map_past_the_pass_that_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clean colour photo costs five passes; one the first pass flags costs one: the later
    maps are built lazily and never for it."""
    reader = OcrReader(WatermarkConfig())
    built: list[float] = []
    empty: list[OcrBox] = []
    reads = iter([(empty, 0)] * 3)

    def read(bgr: np.ndarray) -> tuple[list[OcrBox], int]:
        return next(reads, ([OcrBox(np.zeros((4, 2), np.float32), "shutterstock", 0.99)], 1))

    monkeypatch.setattr(reader, "read_bgr", read)
    real = reader.pass_maps

    def spy(img: Image.Image) -> Iterator[tuple[float, np.ndarray, int, int]]:
        for item in real(img):
            built.append(item[0])
            yield item

    monkeypatch.setattr(reader, "pass_maps", spy)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 120, 3), np.uint8))
    out = reader.scores(img)
    assert built == [1.0, 2.0, 3.0, RATIO_PASS["dark"]]  # the fourth flags: no fifth map
    assert out["ocr_pass"] == RATIO_PASS["dark"] and out["pwatermark_ocr"] >= 0.5
