"""The OCR's third pass, on the top-hat of the achromatic map (`tophat_map`).

Semi-transparent white text over hill-shaded terrain (a real elevation model shipped with
matplotlib, upscaled 2x as small photos are) has strokes no brighter than the lit slopes
around them: the first two passes read nothing, the top-hat flattens the slopes and the
brand is read. The clean terrain stays clean, and `ocr_achromatic_pass = false` still means
"first pass only". One pure test checks the map itself; one checks the 'wwwww.' guard.
"""

from __future__ import annotations

import glob
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ccurate.filters.watermark import (
    OcrBox,
    WatermarkConfig,
    WatermarkFilter,
    ocr_cues,
    tophat_map,
)
from ccurate.record import Sample
from tests.benchload import load_bench
from tests.overlays import text_overlay as overlay

SANS = sorted(glob.glob("/usr/share/fonts/**/DejaVuSans.ttf", recursive=True))
SERIF = sorted(glob.glob("/usr/share/fonts/**/DejaVuSerif.ttf", recursive=True))


def terrain(x_frac: float, y_frac: float) -> Image.Image:
    """80% of matplotlib's topobathy DEM, hill-shaded and coloured by height, upscaled 2x."""
    matplotlib = pytest.importorskip("matplotlib")
    path = Path(matplotlib.get_data_path()) / "sample_data" / "topobathy.npz"
    if not path.exists():
        pytest.skip("matplotlib's sample data is not installed")
    z = np.asarray(np.load(path)["topo"], np.float64)
    im = load_bench("watermark_eval").hillshade(z)  # the bench's own rendering of the same terrain
    w, h = im.size
    cw, ch = int(w * 0.8), int(h * 0.8)
    x0, y0 = int(x_frac * (w - cw)), int(y_frac * (h - ch))
    im = im.crop((x0, y0, x0 + cw, y0 + ch))
    return im.resize((cw * 2, ch * 2), Image.Resampling.BICUBIC)


def sample(im: Image.Image) -> Sample:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return Sample(key="k", url="https://example.org/k.jpg", image=buf.getvalue())


@pytest.fixture(scope="module")
def filters() -> tuple[WatermarkFilter, WatermarkFilter]:
    """(the default filter, the same without the top-hat pass), rapidocr loaded once each."""
    new = WatermarkFilter(WatermarkConfig())
    old = WatermarkFilter(WatermarkConfig(ocr_tophat_pass=False))
    new.setup()
    old.setup()
    return new, old


CASES = [  # (terrain crop, text, font, size px, opacity, angle, the pass that flags it)
    ((0.2, 0.2), "Getty Images", SANS, 18, 0.45, 0.0, 3.0),  # missed by passes 1 and 2
    # the second pass reads 'Adobe Sto': a cut two-word name (`is_phrase_fragment`), flagged
    # there since that rule; before it, only the top-hat pass's reading matched
    ((0.8, 0.8), "Adobe Stock", SERIF, 18, 0.45, 25.0, 2.0),
]


@pytest.mark.parametrize("case", CASES, ids=["getty-flat", "adobe-rotated"])
def test_faint_brand_on_terrain_is_read_by_the_tophat_pass(
    filters: tuple[WatermarkFilter, WatermarkFilter], case: tuple
) -> None:
    (cx, cy), text, fonts, size, opacity, angle, flag_pass = case
    if not fonts:
        pytest.skip("DejaVu fonts are not installed")
    new, old = filters
    s = sample(overlay(terrain(cx, cy), text, fonts[0], size, opacity, angle))
    d_old = old.decide(s)
    assert d_old.scores["ocr_pass"] in (1.0, 2.0)
    assert d_old.keep == (flag_pass == 3.0), d_old.scores  # the first two passes miss it
    d = new.decide(s)
    assert not d.keep and d.reason == "watermark", d.scores
    assert d.scores["ocr_pass"] == flag_pass and d.scores["ocr_brand"] == 1.0


def test_clean_terrain_stays_clean_and_first_pass_only_still_means_one_pass(
    filters: tuple[WatermarkFilter, WatermarkFilter],
) -> None:
    new, _ = filters
    for cx, cy in ((0.2, 0.2), (0.8, 0.8)):
        d = new.decide(sample(terrain(cx, cy)))
        assert d.keep and d.scores["pwatermark_ocr"] < new.cfg.ocr_threshold, d.scores
    if not SANS:
        pytest.skip("DejaVu fonts are not installed")
    s = sample(overlay(terrain(0.2, 0.2), "Getty Images", SANS[0], 18, 0.45, 0.0))
    one = WatermarkFilter(WatermarkConfig(ocr_achromatic_pass=False))
    d1 = one.decide(s)
    assert d1.keep and d1.scores["ocr_pass"] == 1.0, d1.scores


def test_tophat_map_flattens_the_ground_under_thin_strokes() -> None:
    """Bright 3-px strokes at +40 over rolling ground (hills 80 px across, 120 levels from
    trough to crest): on the input the ground varies 3x the strokes' contrast; on the
    top-hat the strokes are bright and the ground flat and dark."""
    yy, xx = np.mgrid[:200, :200].astype(np.float32)
    g = 110 + 60 * np.sin(2 * np.pi * xx / 80) * np.cos(2 * np.pi * yy / 80)
    strokes = np.zeros_like(g, bool)
    for x in range(30, 170, 12):
        strokes[90:110, x : x + 3] = True
    g[strokes] += 40
    gray = np.repeat(np.clip(g, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    t = tophat_map(gray, 0.05)[:, :, 0].astype(np.float32)
    assert t.shape == (200, 200)
    ground = ~strokes
    assert t[strokes].mean() > 200
    assert np.percentile(t[ground], 99) < 40
    with pytest.raises(ValueError):
        WatermarkConfig(ocr_tophat_frac=0.0)


def test_a_run_of_w_is_garble_not_a_url() -> None:
    """Texture read as 'wwwww.wh' (by the top-hat pass, on a bench negative) is no URL."""
    cfg = WatermarkConfig()

    def p(text: str) -> float:
        b = OcrBox(np.array([[10, 10], [150, 10], [150, 30], [10, 30]], np.float32), text, 0.9)
        return ocr_cues([b], 640, 480, cfg)["pwatermark_ocr"]

    assert p("wwwww.wh") < 0.5
    assert p("WWWW.ab") < 0.5
    assert p("www.leekim") >= 0.5
    assert p("WWW.JANEDOE") >= 0.5
