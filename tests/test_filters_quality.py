"""Quality filter: every drop reason, resolution-independent blur, alt-text on real alt text."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from ccurate.filters import images as imgmod
from ccurate.filters.quality import (
    REASONS,
    QualityConfig,
    QualityFilter,
    alt_is_boilerplate,
    alt_is_filename,
    pixel_scores,
)
from ccurate.record import Sample
from ccurate.stage import FilterStage


def photo(w: int = 320, h: int = 240, seed: int = 0) -> Image.Image:
    """A photographic-looking scene: sky gradient, textured ridge, multi-scale noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h)[:, None, None]
    img = np.broadcast_to(np.array([70, 120, 200]) * (1 - y) + np.array([220, 220, 230]) * y,
                          (h, w, 3)).astype(np.float32)  # fmt: skip
    tex = np.zeros((h, w), np.float32)
    for s, amp in ((4, 60), (16, 30), (64, 15)):
        small = rng.random((max(2, h // s), max(2, w // s))).astype(np.float32)
        tex += amp * np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))
    ridge = (0.5 + 0.1 * np.sin(np.linspace(0, 9, w)))[None, :] * h
    ground = np.arange(h)[:, None] > ridge
    img = np.where(ground[..., None], np.array([60, 100, 40]) + tex[..., None], img)
    img += rng.normal(0, 3, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def near_uniform() -> Image.Image:
    noise = np.random.default_rng(1).normal(0, 2, (256, 256, 3))
    return Image.fromarray(np.clip(128 + noise, 0, 255).astype(np.uint8))


def encode(im: Image.Image, fmt: str = "JPEG", **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def sample(data: bytes, alt: str | None = "a ridge under a blue sky", key: str = "k") -> Sample:
    return Sample(key=key, url=f"https://example.org/{key}.jpg", alt_text=alt, image=data)


@pytest.fixture(scope="module")
def filt() -> QualityFilter:
    f = QualityFilter(QualityConfig())
    f.setup()
    return f


def test_defaults_are_documented_and_judicious() -> None:
    cfg = QualityConfig()
    assert cfg.min_side >= 64  # the demo plants 32-48 px images
    assert not cfg.drop_alt_empty and not cfg.drop_alt_filename  # captions are synthetic
    assert cfg.drop_alt_boilerplate
    assert set(REASONS) >= {
        "too_small", "bad_aspect", "file_too_small", "blurry", "low_entropy", "alt_text_empty",
        "alt_text_filename", "alt_text_boilerplate", "alt_text_length", "clip_score_low",
        "aesthetic_low",
    }  # fmt: skip


def test_good_photo_is_kept_with_every_score(filt: QualityFilter) -> None:
    d = filt.decide(sample(encode(photo())))
    assert d.keep, d
    for k in ("width", "height", "aspect", "file_bytes", "blur", "entropy", "grey_std",
              "alt_len", "alt_filename", "alt_boilerplate"):  # fmt: skip
        assert k in d.scores
    assert d.scores["width"] == 320 and d.scores["height"] == 240
    assert d.scores["blur"] > QualityConfig().min_blur
    assert d.scores["entropy"] > QualityConfig().min_entropy


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: encode(photo(48, 40)), "too_small"),
        (lambda: encode(photo(640, 120)), "bad_aspect"),
        # a 2-colour palette PNG: a few hundred bytes, a placeholder graphic
        (lambda: encode(Image.new("P", (120, 120), 3), "PNG"), "file_too_small"),
        (lambda: encode(near_uniform(), quality=90), "low_entropy"),
        (lambda: encode(photo(512, 400).filter(ImageFilter.GaussianBlur(6))), "blurry"),
        (lambda: b"not an image at all", "decode_error"),
    ],
)
def test_pixel_drop_reasons(filt: QualityFilter, make, reason: str) -> None:
    s = sample(make())
    FilterStage([filt]).process([s])
    assert not s.kept
    assert s.drop_reason == reason and s.dropped_by == "quality"
    assert reason in REASONS


def test_blur_score_does_not_depend_on_resolution() -> None:
    base = photo(1024, 768, seed=3)
    sharp_big = pixel_scores(base)["blur"]
    small = base.resize((512, 384), Image.Resampling.LANCZOS)
    sharp_small = pixel_scores(small)["blur"]
    assert sharp_small == pytest.approx(sharp_big, rel=0.35)
    # the same optical blur at two resolutions: sigma scales with the image
    blur_big = pixel_scores(base.filter(ImageFilter.GaussianBlur(4)))["blur"]
    blur_small = pixel_scores(small.filter(ImageFilter.GaussianBlur(2)))["blur"]
    assert blur_small == pytest.approx(blur_big, rel=0.35)
    assert blur_big < sharp_big / 5


def test_alt_text_defaults_keep_empty_and_filenames(filt: QualityFilter) -> None:
    data = encode(photo())
    for alt, flag in ((None, None), ("", None), ("IMG_1234.JPG", "alt_filename"),
                      ("DSC01234", "alt_filename")):  # fmt: skip
        d = filt.decide(sample(data, alt))
        assert d.keep, (alt, d)
        if flag:
            assert d.scores[flag] == 1.0
        else:
            assert d.scores["alt_len"] == 0.0


@pytest.mark.parametrize(
    ("cfg", "alt", "reason"),
    [
        ({"drop_alt_empty": True}, "   ", "alt_text_empty"),
        ({"drop_alt_filename": True}, "IMG_1234.jpg", "alt_text_filename"),
        ({"drop_alt_filename": True}, "https://cdn.example.com/a/photo-2.png", "alt_text_filename"),
        ({}, "Logo", "alt_text_boilerplate"),
        ({}, "click here", "alt_text_boilerplate"),
        ({}, "Image 3", "alt_text_boilerplate"),
        ({"alt_max_chars": 40}, "cheap shoes " * 10, "alt_text_length"),
        ({"alt_min_chars": 10}, "a dog", "alt_text_length"),
    ],
)
def test_alt_text_drop_reasons(cfg: dict, alt: str, reason: str) -> None:
    s = sample(encode(photo()), alt)
    s.record(QualityFilter(QualityConfig(**cfg)).decide(s))
    assert s.drop_reason == reason


def test_alt_text_checks_do_not_fire_on_descriptions() -> None:
    phrases = {"logo", "image", "click here"}
    for alt in ("Company logo design on a red truck", "Photo of an old mill", "image of a cat"):
        assert not alt_is_boilerplate(alt, phrases)
        assert not alt_is_filename(alt)
    assert alt_is_filename("shaker-heritage-barn-wedding-day007.jpg")
    assert alt_is_filename("IMG_20190304_112233")


def test_judicious_on_real_laion_alt_text(real_fixtures) -> None:
    """On 10,000 real LAION alt texts the default alt checks drop almost nothing."""
    texts = pq.read_table(real_fixtures / "laion_sample_10000.parquet", columns=["TEXT"])
    alts = [t or "" for t in texts.column("TEXT").to_pylist()]
    f = QualityFilter()
    flagged_bp = [a for a in alts if f.alt_scores(a)["alt_boilerplate"]]
    flagged_fn = [a for a in alts if f.alt_scores(a)["alt_filename"]]
    assert len(flagged_bp) <= 0.01 * len(alts), flagged_bp[:10]
    # file-name alt texts exist in the wild and are recognised (recorded, kept by default)
    assert 5 <= len(flagged_fn) <= 0.02 * len(alts)
    assert all("." in a or a[:3].isalpha() for a in flagged_fn)


def test_filter_pickles_and_runs_in_a_stage() -> None:
    f = pickle.loads(pickle.dumps(QualityFilter(QualityConfig(min_side=100))))
    good, small = sample(encode(photo()), key="a"), sample(encode(photo(90, 90)), key="b")
    stage = FilterStage([f])
    stage.setup()
    out = stage.process([good, small])
    assert [s.kept for s in out] == [True, False]
    assert small.drop_reason == "too_small"
    assert good.scores["quality.width"] == 320.0


def test_decode_helper_shares_one_decode_and_flattens_alpha() -> None:
    imgmod.clear_cache()
    rgba = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    data = encode(rgba, "PNG")
    a, b = imgmod.decode_rgb(data), imgmod.decode_rgb(data)
    assert a is b  # one decode per bytes object
    assert a.mode == "RGB" and a.getpixel((5, 5)) == (255, 255, 255)
    with pytest.raises(imgmod.DecodeError):
        imgmod.decode_rgb(b"\x89PNG broken")
    assert imgmod.image_format(data) == "PNG"


def test_size_is_judged_as_published_not_as_ingest_resized(filt: QualityFilter) -> None:
    """Ingest upscales a 40 px thumbnail to its image_size; original_* keep the truth."""
    thumb = photo(40, 32).resize((320, 256), Image.Resampling.LANCZOS)
    s = sample(encode(thumb))
    s.original_width, s.original_height = 40, 32
    d = filt.decide(s)
    assert not d.keep and d.reason == "too_small"
    assert (d.scores["width"], d.scores["height"]) == (40.0, 32.0)


def test_decode_helper_refuses_no_bytes_and_evicts_past_its_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for empty in (None, b""):
        with pytest.raises(imgmod.DecodeError, match="no image bytes"):
            imgmod.decode_rgb(empty)
    imgmod.clear_cache()
    monkeypatch.setattr(imgmod, "MAX_CACHE_PIXELS", 100 * 100)
    a = encode(Image.new("RGB", (100, 100), (1, 2, 3)), "PNG")
    b = encode(Image.new("RGB", (100, 100), (4, 5, 6)), "PNG")
    big = encode(Image.new("RGB", (200, 200), (7, 8, 9)), "PNG")
    first_a = imgmod.decode_rgb(a)
    first_b = imgmod.decode_rgb(b)  # over budget: the oldest (a) goes
    assert imgmod.decode_rgb(b) is first_b and imgmod.decode_rgb(a) is not first_a
    assert imgmod._cache_pixels <= 100 * 100
    imgmod.decode_rgb(big)  # larger than the whole budget: still cached, alone
    assert len(imgmod._cache) == 1 and imgmod._cache_pixels == 200 * 200
    imgmod.clear_cache()
    assert imgmod._cache_pixels == 0


def test_disabled_quality_keeps_without_judging() -> None:
    d = QualityFilter(QualityConfig(enabled=False)).decide(sample(b"not an image"))
    assert d.keep and d.scores == {}


def test_describe_summarises_the_phrase_list() -> None:
    from ccurate.filters.quality import DEFAULT_BOILERPLATE

    d = QualityFilter(QualityConfig(min_side=80, alt_boilerplate=["logo", "icon"])).describe()
    assert d["min_side"] == 80 and d["alt_boilerplate"] == 2
    assert QualityFilter().describe()["alt_boilerplate"] == len(DEFAULT_BOILERPLATE)


def test_model_filters_switched_off_mark_every_sample() -> None:
    from ccurate.filters.quality import (
        AestheticConfig,
        AestheticFilter,
        ClipScoreConfig,
        ClipScoreFilter,
    )

    s = sample(b"never decoded")
    for f in (
        ClipScoreFilter(ClipScoreConfig(enabled=False)),
        AestheticFilter(AestheticConfig(enabled=False)),
    ):
        assert not f.active and "enabled = false" in (f.off_reason or "")
        d = f.decide(s)
        assert d.keep and d.scores == {"off": 1.0}
        desc = f.describe()
        assert desc["active"] is False and desc["off_reason"] == f.off_reason


def test_aesthetic_drops_what_clip_cannot_embed(monkeypatch: pytest.MonkeyPatch) -> None:
    """No embedding (undecodable bytes) is `decode_error`, never kept unscored."""
    from ccurate.filters.quality import AestheticConfig, AestheticFilter

    class FakeClip:
        device = "cpu"

        def image_embeddings(self, images, batch_size):
            return [np.ones(4, np.float32) / 2 if im and im[:3] == b"\xff\xd8\xff" else None
                    for im in images]  # fmt: skip

    f = AestheticFilter(AestheticConfig(enabled=False, min_score=4.5))
    f.off_reason = None  # as if weights were configured: the model parts are stubbed
    f._m_clip, f._m_mlp = FakeClip(), object()  # type: ignore[assignment]
    monkeypatch.setattr(f, "scores", lambda embs: np.array([5.0, 4.0][: len(embs)]))
    good, bad, low = sample(encode(photo())), sample(b"garbage"), sample(encode(photo(seed=2)))
    out = f.decide_batch([good, bad, low])
    assert [(d.keep, d.reason) for d in out] == [
        (True, None),
        (False, "decode_error"),
        (False, "aesthetic_low"),
    ]
    assert out[0].scores == {"score": 5.0} and out[1].scores == {}
