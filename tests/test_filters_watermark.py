"""Watermark filter: real rapidocr on overlaid procedural photos, the cue scoring, LAION's head."""

from __future__ import annotations

import glob
import io
import logging
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from ccurate.filters import clip_models
from ccurate.filters.watermark import (
    REASONS,
    OcrBox,
    WatermarkConfig,
    WatermarkFilter,
    achromatic_map,
    brand_match,
    build_watermark_model,
    fuzzy_contains,
    is_wordlike,
    ocr_cues,
    repeat_count,
    substring_distance,
)
from ccurate.record import Sample
from ccurate.stage import FilterStage
from ccurate.weights import WeightsNotFoundError

FONTS = sorted(glob.glob("/usr/share/fonts/**/DejaVuSans*.ttf", recursive=True))


def font(size: int, bold: bool = True) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    want = [f for f in FONTS if f.endswith("Bold.ttf") == bold] or FONTS
    return ImageFont.truetype(want[0], size) if want else ImageFont.load_default(size=size)


def photo(w: int = 448, h: int = 336, seed: int = 0) -> Image.Image:
    """A photographic-looking scene: sky gradient, textured ground, multi-scale noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h)[:, None, None]
    img = np.broadcast_to(np.array([70, 120, 200]) * (1 - y) + np.array([210, 215, 230]) * y,
                          (h, w, 3)).astype(np.float32)  # fmt: skip
    tex = np.zeros((h, w), np.float32)
    for s, amp in ((4, 60), (16, 30), (64, 15)):
        small = rng.random((max(2, h // s), max(2, w // s))).astype(np.float32)
        tex += amp * np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))
    ridge = (0.55 + 0.08 * np.sin(np.linspace(0, 7, w)))[None, :] * h
    ground = np.arange(h)[:, None] > ridge
    img = np.where(ground[..., None], np.array([60, 95, 40]) + tex[..., None], img)
    return Image.fromarray(np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8))


def overlay(im: Image.Image, text: str, size: int, opacity: float, angle: float = 0.0,
            tiled: bool = False, where: str = "center") -> Image.Image:  # fmt: skip
    w, h = im.size
    big = int(math.hypot(w, h)) + 2
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    f = font(size)
    x0, y0, x1, y1 = (int(v) for v in d.textbbox((0, 0), text, font=f))
    tw, th = x1 - x0, y1 - y0
    fill = (255, 255, 255, int(255 * opacity))
    if tiled:
        for row, yy in enumerate(range(0, big, th * 3)):
            for xx in range(-(row % 2) * tw // 2, big, int(tw * 1.6)):
                d.text((xx, yy), text, font=f, fill=fill)
    else:
        cx, cy = big // 2, big // 2
        if where == "bottom-right":
            cx, cy = big // 2 + w // 2 - tw // 2 - 10, big // 2 + h // 2 - th - 10
        d.text((cx - tw // 2 - x0, cy - th // 2 - y0), text, font=f, fill=fill)
    layer = layer.rotate(angle, resample=Image.Resampling.BICUBIC)
    left, top = (big - w) // 2, (big - h) // 2
    layer = layer.crop((left, top, left + w, top + h))
    return Image.alpha_composite(im.convert("RGBA"), layer).convert("RGB")


def sign(im: Image.Image, text: str) -> Image.Image:
    """Scene text: an opaque sign board with a word (large enough to reach the centre)."""
    out = im.copy()
    d = ImageDraw.Draw(out)
    f = font(34)
    x0, y0, x1, y1 = (int(v) for v in d.textbbox((0, 0), text, font=f))
    px, py = 40, 200
    board = [px - 10, py - 8, px + x1 - x0 + 10, py + y1 - y0 + 8]
    d.rounded_rectangle(board, 8, fill=(120, 30, 20))
    d.text((px - x0, py - y0), text, font=f, fill=(250, 240, 220))
    return out


def sample(im: Image.Image, key: str = "k") -> Sample:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92)
    return Sample(key=key, url=f"https://example.org/{key}.jpg", image=buf.getvalue())


@pytest.fixture(scope="module")
def wm() -> WatermarkFilter:
    f = WatermarkFilter(WatermarkConfig())
    f.setup()  # rapidocr loads once for the module
    return f


# ---- real OCR ---------------------------------------------------------------------------------


def test_large_shutterstock_overlay_is_dropped(wm: WatermarkFilter) -> None:
    s = sample(overlay(photo(seed=1), "shutterstock", 44, 0.6))
    FilterStage([wm]).process([s])
    assert not s.kept and s.drop_reason == "watermark" and s.dropped_by == "watermark"
    assert s.scores["watermark.ocr_brand"] == 1.0
    assert s.scores["watermark.pwatermark_ocr"] >= 0.9
    assert s.scores["watermark.ocr_text_area"] > 0.0 and s.scores["watermark.ocr_boxes"] >= 1


def test_clean_photo_is_kept(wm: WatermarkFilter) -> None:
    s = sample(photo(seed=2))
    FilterStage([wm]).process([s])
    assert s.kept
    assert s.scores["watermark.pwatermark_ocr"] < wm.cfg.ocr_threshold
    assert s.scores["watermark.ocr_brand"] == 0.0


def test_non_brand_scene_text_is_read_but_kept(wm: WatermarkFilter) -> None:
    s = sample(sign(photo(seed=3), "BAKERY"))
    d = wm.decide(s)
    assert d.keep, d.scores
    assert d.scores["ocr_boxes"] >= 1  # the word was seen, and judged not a watermark
    assert d.scores["pwatermark_ocr"] < wm.cfg.ocr_threshold


def test_tiled_rotated_semi_transparent_text_is_dropped(wm: WatermarkFilter) -> None:
    d = wm.decide(sample(overlay(photo(seed=4), "PROOF", 30, 0.45, angle=30, tiled=True)))
    assert not d.keep and d.reason == "watermark"
    assert d.scores["ocr_repeat"] >= 3


def test_copyright_line_in_a_corner_is_dropped(wm: WatermarkFilter) -> None:
    d = wm.decide(sample(overlay(photo(seed=5), "© 2021 Jane Doe", 26, 0.7, where="bottom-right")))
    assert not d.keep and d.scores["ocr_copyright"] == 1.0


def test_faint_rotated_brand_on_colour_is_caught_by_the_achromatic_pass(
    wm: WatermarkFilter,
) -> None:
    """White 40%-opaque text at 20 degrees over sky and foliage: too little luminance
    contrast for the first pass, plain on the achromatic-brightness map."""
    s = sample(overlay(photo(seed=11), "Adobe Stock", 44, 0.4, angle=20))
    d = wm.decide(s)
    assert not d.keep and d.reason == "watermark", d.scores
    assert d.scores["ocr_brand"] == 1.0 and d.scores["ocr_pass"] == 2.0
    one_pass = WatermarkFilter(wm.cfg.model_copy(update={"ocr_achromatic_pass": False}))
    d1 = one_pass.decide(s)
    assert d1.keep and d1.scores["ocr_pass"] == 1.0, d1.scores


def test_street_address_sign_is_kept(wm: WatermarkFilter) -> None:
    """A house number and street name reads like a credit ('2011 John Smith'): kept."""
    d = wm.decide(sample(sign(photo(seed=13), "2011 Main St")))
    assert d.keep, d.scores
    assert d.scores["ocr_boxes"] >= 1 and d.scores["ocr_copyright"] == 0.0


def test_undecodable_is_decode_error(wm: WatermarkFilter) -> None:
    d = wm.decide(Sample(key="x", url="u", image=b"\xff\xd8 truncated"))
    assert not d.keep and d.reason == "decode_error" and "decode_error" in REASONS


# ---- cue scoring without OCR ----------------------------------------------------------------


def box(x: float, y: float, w: float, h: float, text: str) -> OcrBox:
    return OcrBox(np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float32), text, 0.9)


CFG = WatermarkConfig()


def test_brand_matching_is_fuzzy_for_long_names_only() -> None:
    assert brand_match("Shutterstck", CFG.brands)  # faint text loses a letter
    assert brand_match("ettyimag", CFG.brands)  # cut at both ends
    assert brand_match("stock.adobe.com", CFG.brands)
    assert brand_match("IN STOCK", CFG.brands) is None  # not 'istock'
    assert brand_match("Gettysburg", CFG.brands) is None  # short names: whole words only
    assert brand_match("Getty", CFG.brands) and brand_match("alamy.com", CFG.brands)
    assert brand_match("alarm", CFG.brands) is None  # not 'alamy'
    # most of a name's start or end, as a whole word: a tile cut by the border, faint ends lost
    assert brand_match("IStOC", CFG.brands) == "istock"
    assert brand_match("amstime", CFG.brands) == "dreamstime"
    assert brand_match("Stoc", CFG.brands) is None  # under 5 letters
    assert brand_match("Fresh stock", CFG.brands) is None  # 'stock' is a word of its own
    assert brand_match("DREAMS", CFG.brands) is None  # 60% of 'dreamstime' and a word
    assert brand_match("Sunshine", CFG.brands) is None
    # an 8-letter run of a long name, but inside a word of its own: a shop sign, not a brand
    assert brand_match("SHUTTERS", CFG.brands) is None
    assert brand_match("Window Shutters", CFG.brands) is None
    assert brand_match("Shutterst", CFG.brands) == "shutterstock"  # a cut name still is
    assert brand_match("Shutters tock", CFG.brands) == "shutterstock"
    assert substring_distance("watermark", "nwatermak!") == 1


def test_cue_weights() -> None:
    def p(*boxes: OcrBox) -> float:
        return ocr_cues(list(boxes), 640, 480, CFG)["pwatermark_ocr"]

    assert p() == 0.0
    assert p(box(10, 10, 80, 20, "OPEN")) < 0.5  # a small sign word
    assert p(box(250, 220, 140, 40, "OPEN")) < 0.5  # even a big central one
    assert p(box(500, 440, 120, 20, "© Jane Doe")) >= 0.5
    assert p(box(500, 440, 120, 20, "www.janedoe.com")) >= 0.5
    assert p(box(10, 10, 120, 20, "2011 Main St")) < 0.5  # an address, not a credit
    assert p(box(210, 215, 220, 50, "2015 John Smith")) >= 0.5  # © lost, large and central
    assert p(box(500, 440, 120, 20, "alamy")) >= 0.9
    assert p(box(10, 10, 100, 20, "Free sample")) < 0.5  # a weak word inside a line
    assert p(box(10, 10, 160, 20, "Proof of purchase")) < 0.5
    assert p(box(10, 10, 100, 20, "sample")) >= 0.5  # a stamp word, the whole line
    assert p(box(10, 10, 100, 20, "PREVIEW")) >= 0.5
    assert p(box(200, 200, 240, 60, "SAMPLE")) >= 0.5  # weak word, large and central
    tiles = [box(x, y, 90, 20, "PROOF") for x, y in ((0, 0), (200, 100), (400, 200))]
    assert p(*tiles) >= 0.8
    assert repeat_count(["johnsmithphoto", "hnsmithph", "smithphoto", "x"]) == 3
    assert p(box(500, 440, 120, 20, "@ John Smit")) >= 0.5  # © misread as @
    assert p(box(500, 440, 120, 20, "@johnsmith")) < 0.5  # a handle alone
    assert p(box(500, 440, 120, 20, "W.W")) < 0.5  # garble, not a 'w.' URL
    assert p(box(210, 215, 220, 50, "2022 John smith")) >= 0.5  # lower-case surname
    # a credit whose © was lost: below 0.5 mid-image (a shop's "1925 Grand Cafe"), a drop in
    # the top or bottom band where photographers put credits
    assert p(box(40, 150, 120, 20, "2018 John Smith")) < 0.5
    assert p(box(40, 445, 120, 20, "2018 John Smith")) >= 0.5
    assert p(box(40, 5, 120, 20, "2009 P. Dubois")) >= 0.5  # an initial
    assert p(box(40, 445, 120, 20, "2011 Main St")) < 0.5  # an address, even at the edge
    assert p(box(210, 215, 220, 50, "2011 Main St")) < 0.5  # an address, even central
    assert p(box(250, 220, 140, 40, "Adobe Stoc")) >= 0.9  # fuzzy: last letter lost
    # words of a strong phrase are no piece of it on their own: parking and studio signs
    for sign in ("RESERVED", "Reserved Parking", "Wedding Photography"):
        assert p(box(250, 220, 140, 40, sign)) < 0.5, sign
    assert p(box(500, 440, 120, 20, "ll rights reser")) >= 0.5  # a cut phrase still is
    assert p(box(500, 440, 120, 20, "tock photogra")) >= 0.5


def test_window_grid_garble_is_not_a_tiled_watermark() -> None:
    """Lit windows read as '000', 'OOO', 'DOOOOS' in many boxes: not repeated text."""
    garble = ["000", "OOO", "0OO", "DOOOOS", "DO DOOOOS", "BOOOOD", "日口日", "日口日"]
    assert repeat_count([t.lower().replace(" ", "") for t in garble]) <= 1
    assert not is_wordlike("0oo") and not is_wordlike("日口日") and is_wordlike("pro")
    boxes = [OcrBox(np.array([[220 + 10 * i, 200], [300 + 10 * i, 200], [300 + 10 * i, 230],
                              [220 + 10 * i, 230]], np.float32), t, 0.45)
             for i, t in enumerate(garble)]  # fmt: skip
    cues = ocr_cues(boxes, 640, 480, CFG)
    assert cues["pwatermark_ocr"] < 0.5 and cues["ocr_repeat"] <= 1
    assert repeat_count(["previe", "prev", "orevie", "iew"]) >= 3  # a cut tiled word still counts


def test_achromatic_map_lifts_white_overlay_on_colour() -> None:
    """40% white text on saturated green: more contrast on the map than in luminance."""
    bg = np.zeros((40, 80, 3), np.uint8)
    bg[:] = (40, 170, 60)
    marked = bg.copy()
    marked[15:25, 20:60] = (0.6 * bg[15:25, 20:60] + 0.4 * 255).astype(np.uint8)
    lum = np.asarray(Image.fromarray(marked).convert("L"), np.float32)
    m = achromatic_map(marked)[:, :, 0].astype(np.float32)
    assert m.shape == (40, 80)
    lum_c = (lum[20, 40] - lum[5, 5]) / 255
    map_c = (m[20, 40] - m[5, 5]) / 255
    assert map_c > 2 * lum_c > 0
    with pytest.raises(ValueError):
        WatermarkConfig(ocr_achromatic_min_chroma=-1.0)
    with pytest.raises(ValueError):
        WatermarkConfig(ocr_max_line_frac=0.0)


# ---- LAION's classifier ---------------------------------------------------------------------


def test_laion_head_layout_matches_watermark_model_v1() -> None:
    sd = build_watermark_model("efficientnet_b3").state_dict()
    heads = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("classifier.")}
    assert heads == {
        "classifier.0.weight": (625, 1536), "classifier.0.bias": (625,),
        "classifier.3.weight": (256, 625), "classifier.3.bias": (256,),
        "classifier.5.weight": (2, 256), "classifier.5.bias": (2,),
    }  # fmt: skip
    assert "conv_stem.weight" in sd


@pytest.fixture(scope="module")
def tiny_wm_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = build_watermark_model("test_efficientnet")
    path = tmp_path_factory.mktemp("wm") / "watermark_model_v1.pt"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def test_model_pwatermark_is_recorded_and_thresholded(tiny_wm_weights) -> None:
    path, ref = tiny_wm_weights
    cfg = WatermarkConfig(ocr=False, model_weights=str(path), model_arch="test_efficientnet",
                          device="cpu", model_threshold=1.0)  # fmt: skip
    f = pickle.loads(pickle.dumps(WatermarkFilter(cfg)))
    im = photo(300, 200, seed=6)
    d = f.decide(sample(im))
    assert d.keep and 0.0 <= d.scores["pwatermark"] <= 1.0 and "pwatermark_ocr" not in d.scores
    # same probability as the saved network on LAION's preprocessing (256x256, ImageNet norm)
    dec = Image.open(io.BytesIO(sample(im).image or b"")).convert("RGB")
    dec = dec.resize((256, 256), Image.Resampling.BILINEAR)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = (np.asarray(dec, np.float32) / 255 - mean) / std
    with torch.no_grad():
        inp = torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None]
        want = torch.softmax(ref(inp), 1)[0, 0]
    assert d.scores["pwatermark"] == pytest.approx(float(want), abs=1e-4)
    strict = WatermarkFilter(cfg.model_copy(update={"model_threshold": 0.0}))
    d2 = strict.decide(sample(im))
    assert not d2.keep and d2.reason == "watermark"


def test_model_off_without_weights_and_missing_weights_error(tmp_path, caplog) -> None:
    clip_models._off_logged.discard("watermark_model")
    with caplog.at_level(logging.WARNING, logger="ccurate.filters"):
        f = WatermarkFilter(WatermarkConfig())
    assert f.model_off_reason and "filters.watermark.model_weights" in caplog.text
    assert "OCR detector stays on" in caplog.text
    missing = tmp_path / "models" / "watermark_model_v1.pt"
    with pytest.raises(WeightsNotFoundError) as e:
        WatermarkFilter(WatermarkConfig(model_weights=str(missing)))
    assert str(missing) in str(e.value) and "LAION-5B-WatermarkDetection" in str(e.value)


def test_demo_corpus_planted_watermarks(wm: WatermarkFilter) -> None:
    """The demo's planted stock overlays are dropped; its clean scenes are kept."""
    from ccurate.demo import corpus

    planted = [sample(corpus.watermark(corpus.landscape(50_000 + k, 480, 360), k), f"w{k}")
               for k in range(3)]  # fmt: skip
    clean = [sample(corpus.landscape(k, 480, 360), f"c{k}") for k in range(3)]
    FilterStage([wm]).process(planted + clean)
    assert [s.drop_reason for s in planted] == ["watermark"] * 3
    assert all(s.kept for s in clean), [s.scores for s in clean]


def test_empty_needles_never_match() -> None:
    """A configured word that normalises to nothing ('!!!') must not match every text."""
    assert not fuzzy_contains("", "anything") and not fuzzy_contains("getty", "")
    assert substring_distance("", "abc") == 0
    cfg = WatermarkConfig(strong_words=["!!!"], weak_words=["???"], brands=["®"])
    box = OcrBox(np.array([[0, 0], [60, 0], [60, 12], [0, 12]], np.float32), "Bakery", 0.9)
    cues = ocr_cues([box], 400, 300, cfg)
    assert cues["pwatermark_ocr"] == 0.0 and cues["ocr_brand"] == 0.0


def test_disabled_filter_keeps_everything_without_loading_ocr() -> None:
    f = WatermarkFilter(WatermarkConfig(enabled=False))
    assert f.model_off_reason is None  # nothing logged for a filter that is off
    out = f.decide_batch([Sample(key="a", url="u", image=b"not an image")])
    assert [(d.keep, d.scores) for d in out] == [(True, {})]
    f.setup()
    assert f._ocr is None and f._model is None


def test_describe_counts_word_lists() -> None:
    d = WatermarkFilter(WatermarkConfig(brands=["a", "b"], weak_words=[])).describe()
    assert (d["brands"], d["weak_words"]) == (2, 0)
    assert d["strong_words"] == len(WatermarkConfig().strong_words)
    assert "filters.watermark.model_weights" in d["model_off_reason"]


def test_upside_down_brand_is_read_with_the_angle_classifier() -> None:
    f = WatermarkFilter(WatermarkConfig(ocr_use_cls=True, ocr_achromatic_pass=False))
    s = sample(overlay(photo(seed=4), "shutterstock", 44, 0.8, angle=180))
    d = f.decide(s)
    assert not d.keep and d.reason == "watermark" and d.scores["ocr_brand"] == 1.0


def test_setup_loads_every_ocr_model_it_will_use() -> None:
    """Models load in setup, not on a worker's first image: the angle classifier too when
    `ocr_use_cls` is on, and not when it is off (a third model a run never uses)."""
    from ccurate.filters.watermark import OcrReader

    with_cls = OcrReader(WatermarkConfig(ocr_use_cls=True))
    with_cls.setup()
    engine = with_cls._engine
    assert engine.text_det is not None and engine.text_rec is not None
    assert engine.text_cls is not None
    without = OcrReader(WatermarkConfig(ocr_use_cls=False))
    without.setup()
    assert without._engine.text_cls is None and without._engine.text_det is not None
