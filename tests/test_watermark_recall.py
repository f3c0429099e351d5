"""Recall cues of the OCR watermark detector: accents, cut URLs, tiled pieces (keep and flag).

The cue tests are pure (no OCR). One test runs rapidocr end to end on two small synthetic
images: a dark tiled 'shutterstock' overlay is flagged, an opaque shop sign is not.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from ccurate.filters.watermark import (
    OcrBox,
    WatermarkConfig,
    WatermarkFilter,
    brand_match,
    fragment_repeats,
    norm_text,
    ocr_cues,
)
from ccurate.record import Sample

CFG = WatermarkConfig()


def box(x: float, y: float, w: float, h: float, text: str, score: float = 0.9) -> OcrBox:
    return OcrBox(
        np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float32), text, score
    )


def p(*boxes: OcrBox) -> float:
    return ocr_cues(list(boxes), 640, 480, CFG)["pwatermark_ocr"]


def test_accented_reads_match_brands() -> None:
    assert norm_text("iStóck") == "istock"
    assert brand_match("iStóck", CFG.brands) == "istock"
    assert p(box(500, 440, 120, 20, "iStóck")) >= 0.9
    assert brand_match("Gettýsburg Café", CFG.brands) is None  # still whole words only
    assert p(box(10, 10, 100, 20, "Café")) < 0.5


def test_misread_and_cut_urls() -> None:
    assert p(box(10, 440, 150, 20, "v.anovak.")) >= 0.5  # 'www.' read as 'v.'
    assert p(box(10, 440, 150, 20, "vv.janedoe.c")) >= 0.5
    assert p(box(10, 440, 150, 20, "eekimphoto.ne")) >= 0.5  # '.net' cut short
    # not URLs: an address, an initial, a capitalised sign, garble
    assert p(box(10, 440, 150, 20, "MAIN ST.")) < 0.5
    assert p(box(10, 440, 150, 20, "P.Dubois")) < 0.5
    assert p(box(10, 440, 150, 20, "Coffee.Tea")) < 0.5
    assert p(box(10, 440, 150, 20, "W.W")) < 0.5
    assert p(box(10, 440, 150, 20, "e.g.")) < 0.5


def test_tiled_pieces_of_one_brand() -> None:
    terms = [norm_text(t) for t in CFG.brands + CFG.strong_words]
    assert fragment_repeats(["23r", "3rf"], terms) == 2
    assert p(box(0, 0, 60, 20, "23R"), box(300, 200, 60, 20, "3RF")) >= 0.5
    assert p(box(0, 0, 60, 20, "atermar"), box(300, 200, 60, 20, "waterm")) >= 0.5
    # one piece alone, pieces too short or without letters, and words of their own: kept
    assert p(box(0, 0, 60, 20, "23R")) < 0.5
    assert p(box(0, 0, 60, 20, "RF"), box(300, 200, 60, 20, "RF")) < 0.5
    assert p(box(0, 0, 60, 20, "123"), box(300, 200, 60, 20, "123")) < 0.5
    assert p(box(0, 0, 60, 20, "STOCK"), box(300, 200, 60, 20, "STOCK")) < 0.5
    assert p(box(0, 0, 60, 20, "OPEN"), box(300, 200, 60, 20, "CAFE")) < 0.5


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def _photo(seed: int) -> Image.Image:
    """A smooth, colourful 'photo' with some texture (no text)."""
    rng = np.random.default_rng(seed)
    h, w = 240, 360
    y, x = np.mgrid[:h, :w].astype(np.float32)
    base = np.stack(
        [120 + 80 * np.sin(x / 50), 140 + 60 * np.cos(y / 40), 90 + 50 * np.sin((x + y) / 70)], 2
    )
    base += rng.normal(0, 8, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _jpeg(im: Image.Image, key: str) -> Sample:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return Sample(key=key, url=f"https://example.org/{key}.jpg", image=buf.getvalue())


@pytest.fixture(scope="module")
def filt() -> WatermarkFilter:
    pytest.importorskip("rapidocr")
    f = WatermarkFilter(WatermarkConfig(threads=1))
    f.setup()
    return f


def test_end_to_end_dark_tiled_flagged_sign_kept(filt: WatermarkFilter) -> None:
    # a dark, semi-transparent, tiled 'shutterstock' overlay: flagged
    im = _photo(0).convert("RGBA")
    layer = Image.new("RGBA", im.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    font = _font(22)
    for row, ty in enumerate(range(5, im.height, 60)):
        for tx in range(-80 * (row % 2), im.width, 190):
            d.text((tx, ty), "shutterstock", font=font, fill=(20, 20, 20, 150))
    marked = Image.alpha_composite(im, layer).convert("RGB")
    # an opaque shop sign on the same photo: scene text, kept
    signed = _photo(0)
    sd = ImageDraw.Draw(signed)
    sd.rounded_rectangle([120, 90, 250, 140], radius=8, fill=(150, 20, 20))
    sd.text((132, 100), "BAKERY", font=_font(26), fill=(255, 255, 255))
    out = filt.decide_batch([_jpeg(marked, "m"), _jpeg(signed, "s"), _jpeg(_photo(1), "c")])
    assert not out[0].keep and out[0].reason == "watermark"
    assert out[0].scores["pwatermark_ocr"] >= 0.5
    assert out[1].keep, out[1].scores
    assert out[2].keep and out[2].scores["pwatermark_ocr"] < 0.5


def test_url_cues_pass_over_scene_text_that_only_looks_like_a_host() -> None:
    from ccurate.filters.watermark import _MISREAD_WWW_RE, _URL_RE, _cut_host

    def url(t: str) -> bool:
        return bool(_URL_RE.search(t) or _MISREAD_WWW_RE.search(t) or _cut_host(t))

    for sign in ["V.LE EUROPA", "V.Roma 12", "(V.le Mazzini)", "v.Chr.", "photo.jpg",
                 "readme.txt", "index.htm", "hello world.the"]:  # fmt: skip
        assert not url(sign), sign
    for mark in ["v.anovak.", "vv.janedoe", "leekimphoto.ne", "janedoephoto.co"]:
        assert url(mark), mark


def test_pieces_cue_needs_two_different_pieces_not_one_word_twice() -> None:
    from ccurate.filters.watermark import WatermarkConfig, fragment_repeats, norm_text

    cfg = WatermarkConfig()
    terms = [norm_text(w) for w in [*cfg.brands, *cfg.strong_words]]
    assert fragment_repeats(["23r", "3rf"], terms) == 2  # a tiled 123RF read in pieces
    assert fragment_repeats(["search", "search"], terms) == 0  # a word of its own (fotosearch)
    assert fragment_repeats(["3rf", "3rf"], terms) == 1  # the same piece twice: repeat_count's
