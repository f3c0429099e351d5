"""Review of the quality and safety filters: config values that silently switched a check off
or crashed mid-run, memory that grew with the batch, hidden colour bleeding through face
blurring, and alt text with a number read as boilerplate."""

from __future__ import annotations

import io
import tracemalloc
import weakref
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from ccurate.filters import clip_models
from ccurate.filters.images import clear_cache
from ccurate.filters.quality import QualityFilter
from ccurate.filters.safety import (
    NudeNetScorer,
    SafetyConfig,
    SafetyFilter,
    safe_reencode,
)
from ccurate.record import Sample


def _jpeg(w: int, h: int, seed: int) -> bytes:
    g = Image.linear_gradient("L")
    im = Image.merge("RGB", [g.rotate(30 * seed).resize((w, h)), g.resize((w, h)),
                             g.rotate(90).resize((w, h))])  # fmt: skip
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


# ---- 1. classes = [] ------------------------------------------------------------------------


def test_empty_nsfw_classes_are_refused() -> None:
    """`classes = []` was accepted: every image scored `nsfw = 0` and was kept while the
    recorded settings said the safety filter was on. The way to turn it off is `enabled`."""
    with pytest.raises(ValidationError, match="enabled = false"):
        SafetyConfig(classes=[])
    SafetyConfig(enabled=False)  # the intended "off"
    SafetyConfig(classes=["FEMALE_GENITALIA_EXPOSED"])


# ---- 2. one full-size decode at a time --------------------------------------------------------


def test_safety_batch_holds_one_full_size_image_at_a_time(monkeypatch) -> None:
    """`decide_batch` kept a full-size array of every sample until the detector ran, so memory
    grew with batch size x image size. Now only each image's small detector input waits."""
    w, h, n = 2000, 1500, 8
    full = w * h * 3
    f = SafetyFilter(SafetyConfig(batch_size=n, resolution=64))  # small inputs: 49 KB each
    f.setup()
    scorer = f._scorer
    assert scorer is not None
    held: list[int] = []
    real_raw = scorer.raw

    def raw(images: Any) -> Any:
        held.append(tracemalloc.get_traced_memory()[0] - base)
        return real_raw(images)

    monkeypatch.setattr(scorer, "raw", raw)
    samples = [Sample(key=str(i), url="u", image=_jpeg(w, h, i)) for i in range(n)]
    clear_cache()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        decisions = f.decide_batch(samples)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert all(d.keep for d in decisions) and len(held) == 1
    assert held[0] < full / 4, f"{held[0] / 1e6:.0f} MB held ({full / 1e6:.0f} MB an image)"
    assert peak < 2 * full, f"peak {peak / 1e6:.0f} MB for {n} images of {full / 1e6:.0f} MB"


def _padded_square_blob(rgb: np.ndarray, r: int) -> np.ndarray:
    """NudeDetector's preprocessing as written: zero-pad to a square, resize, BGR."""
    h, w = rgb.shape[:2]
    square = np.zeros((max(h, w), max(h, w), 3), np.uint8)
    square[:h, :w] = rgb[:, :, ::-1]
    small = cv2.resize(square, (r, r), interpolation=cv2.INTER_LINEAR)
    return small.transpose(2, 0, 1).astype(np.float32) / 255.0


@pytest.mark.parametrize("r", [320, 64, 640])
def test_detector_input_is_bit_identical_without_the_square(r: int) -> None:
    """The detector's input is made without allocating the padded square (a panorama's is
    many times the image); it must equal NudeDetector's preprocessing bit for bit, or the
    recorded scores change."""
    rng = np.random.default_rng(r)
    scorer = NudeNetScorer(resolution=r)
    sizes = [(1, 1), (1, 700), (640, 480), (480, 640), (640, 640), (2 * r, r), (257, 513),
             (3000, 400), (319, 321), (r, r)]  # fmt: skip
    for w, h in sizes:
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = _padded_square_blob(rgb, r)
        for image in (rgb, Image.fromarray(rgb)):
            got = scorer.blob(image)
            assert got.scale == max(w, h) / r
            assert np.array_equal(got.tensor, want), (w, h, type(image).__name__)


def test_declared_memory_follows_the_detector_run() -> None:
    """One detector run takes ~96 B per input pixel (batch x resolution^2): 3.2 GB for a
    chunk of 8 at 2048, which the flat 0.5 GB declared did not cover."""
    assert SafetyFilter(SafetyConfig()).resources.memory_gb == 0.5
    big = SafetyFilter(SafetyConfig(resolution=2048, batch_size=8)).resources.memory_gb
    assert big * 2**30 >= 8 * 2048**2 * 96


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_clip_embeddings_hold_one_full_size_decode_at_a_time(monkeypatch) -> None:
    """`image_embeddings` kept every decoded image of a batch until the model ran; now each
    is preprocessed on its own and only its small model input waits. The embeddings equal
    encoding the same images as one batch."""
    from open_clip.model import CLIP
    from open_clip.transform import PreprocessCfg, image_transform_v2

    torch.manual_seed(0)
    model = CLIP(**TINY_CLIP).eval()
    pre = image_transform_v2(PreprocessCfg(size=32), is_train=False)
    clip = clip_models.ClipModel(model, pre, lambda t: t, torch.device("cpu"), 32, "tiny")
    alive: set[int] = set()
    most = [0]
    real_decode = clip_models.decode_rgb

    def decode(data: bytes | None) -> Image.Image:
        im = real_decode(data).copy()  # its own object: the shared cache does not keep it
        alive.add(id(im))
        weakref.finalize(im, alive.discard, id(im))
        most[0] = max(most[0], len(alive))
        return im

    real_encode = model.encode_image

    def encode_image(batch: torch.Tensor) -> torch.Tensor:
        most[0] = max(most[0], len(alive))
        return real_encode(batch)

    monkeypatch.setattr(clip_models, "decode_rgb", decode)
    monkeypatch.setattr(model, "encode_image", encode_image)
    datas = [_jpeg(300, 200, i) for i in range(5)]
    embs = clip.image_embeddings([*datas, b"not an image"], batch_size=4)
    assert most[0] == 1, f"{most[0]} full-size decodes alive at once"
    assert embs[-1] is None
    ims = [real_decode(d) for d in datas]
    want = np.concatenate([clip.encode_images(ims[:4]), clip.encode_images(ims[4:])])
    assert np.array_equal(np.stack(embs[:5]), want)  # type: ignore[arg-type]


# ---- 3. resolution --------------------------------------------------------------------------


def test_resolution_must_be_a_multiple_of_32() -> None:
    """100 or 330 validated, then the first batch crashed in onnxruntime (the YOLO detector
    needs a multiple of 32), stopping the filter step mid-run instead of at config time."""
    for bad in (100, 330, 33):
        with pytest.raises(ValidationError, match="multiple of 32"):
            SafetyConfig(resolution=bad)
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), (9, 9, 9)).save(buf, "PNG")
    for ok in (64, 352):  # accepted sides do run
        d = SafetyFilter(SafetyConfig(resolution=ok)).decide(
            Sample(key="k", url="u", image=buf.getvalue())
        )
        assert d.keep and "nsfw" in d.scores


# ---- 4. threshold_alone < threshold -----------------------------------------------------------


def test_threshold_alone_below_threshold_is_refused() -> None:
    """`threshold_alone` (drops with no person) below `threshold` (drops with a person) was
    accepted: the rule became plain `nsfw >= threshold_alone`, with `threshold` and
    `person_min` recorded but dead."""
    with pytest.raises(ValidationError, match="threshold_alone = threshold"):
        SafetyConfig(threshold=0.7, threshold_alone=0.4)
    plain = SafetyFilter(SafetyConfig(threshold=0.6, threshold_alone=0.6))  # the plain rule
    assert plain.is_nsfw(0.6, 0.0) and not plain.is_nsfw(0.59, 1.0)
    SafetyConfig(threshold=0.0, threshold_alone=0.0)


# ---- 5. transparent pixels before face blurring ---------------------------------------------


def test_face_blur_does_not_bleed_hidden_colour_into_visible_pixels() -> None:
    """The blur ran before the colour under fully transparent pixels was whitened, so hidden,
    never-judged colour (the detector saw white there) was smeared into the visible pixels
    of a face box crossing a transparent area."""
    a = np.zeros((100, 100, 4), np.uint8)
    a[:, :50] = [255, 0, 0, 255]  # opaque red
    a[:, 50:] = [0, 255, 0, 0]  # fully transparent, green hidden underneath
    buf = io.BytesIO()
    Image.fromarray(a, "RGBA").save(buf, "PNG")
    out, mime, n = safe_reencode(buf.getvalue(), [(30, 10, 40, 40, 1.0)])
    o = np.asarray(Image.open(io.BytesIO(out)).convert("RGBA")).astype(int)
    assert (mime, n) == ("image/png", 1)
    visible = o[:, :50]
    assert (visible[..., 1] - visible[..., 2]).max() <= 2  # red blurred with white: G == B
    assert (o[:, :50, 1] > 0).any()  # the blur did mix in the white
    hidden = o[o[..., 3] == 0]
    assert (hidden[:, :3] == 255).all()  # what ships under transparency is what was judged


# ---- 6. boilerplate alt text with a number --------------------------------------------------


def test_alt_text_with_a_number_is_not_boilerplate_unless_a_generic_image_word() -> None:
    """Digits were stripped before the phrase lookup, so a listed word plus a number ('Pixel
    7', 'Avatar 2', 'AD 1066') was dropped as `alt_text_boilerplate`."""
    f = QualityFilter()
    for alt in ("Pixel 7", "Avatar 2", "AD 1066", "Logo 2000"):
        assert f.alt_scores(alt)["alt_boilerplate"] == 0.0, alt
    for alt in ("image 1", "Photo #3", "Image 3", "img-5", "untitled-1", "Untitled image 2",
                "picture_12.png", "logo", "Click here!", "thumbnail"):  # fmt: skip
        assert f.alt_scores(alt)["alt_boilerplate"] == 1.0, alt
    assert f.alt_scores("IMG_1234.jpg")["alt_boilerplate"] == 0.0  # a camera name
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, "PNG")
    assert f.decide(Sample(key="k", url="u", image=buf.getvalue(), alt_text="Pixel 7")).keep
    d = f.decide(Sample(key="k", url="u", image=buf.getvalue(), alt_text="Photo #3"))
    assert d.reason == "alt_text_boilerplate"
