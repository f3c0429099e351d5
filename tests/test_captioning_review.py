"""Review of the captioning stage: bugs found, each pinned by a test that failed before its fix."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ccurate.captioning.blip2 import caption_model_tag, decoding_tag, load_image
from ccurate.captioning.config import CaptionConfig
from ccurate.pixels import to_rgb
from tests.test_captioning import (  # noqa: F401 - fixtures are used by name
    _offline_single_thread,
    attached,
    samples,
    tiny_dir,
)
from tests.test_captioning import captioner as captioner  # a fixture


def encoded(img: Image.Image, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def project_pixels(data: bytes) -> np.ndarray:
    """The one decode rule of ingest and the filters (`to_rgb`: alpha over white) at 32x32."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(to_rgb(im).resize((32, 32), 3))


def transparent_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., :3] = rng.integers(0, 255, (40, 40, 3))
    rgba[20:, :, 3] = 255  # top half fully transparent (its RGB is noise, not shown)
    pal = Image.fromarray(rgba[..., :3]).convert("P")
    return {
        "rgba-png": encoded(Image.fromarray(rgba, "RGBA"), "PNG"),
        "rgba-webp": encoded(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True),
        "la-png": encoded(Image.fromarray(rgba[..., [0, 3]], "LA"), "PNG"),
        "p-png-trns": encoded(pal, "PNG", transparency=0),
        "p-gif-trns": encoded(pal, "GIF", transparency=0),
    }


@pytest.mark.parametrize("name", sorted(transparent_images()))
def test_transparent_images_are_captioned_as_ingest_and_filters_see_them(name):
    """Bug: OpenCV's IMREAD_COLOR dropped alpha, so transparent areas showed their hidden RGB
    (often black or noise) instead of white: the caption described another image than the
    one the filters scored and viewers see."""
    data = transparent_images()[name]
    ours = load_image(data, 32, 32, 3)
    assert ours is not None and ours.shape == (32, 32, 3)
    assert np.abs(ours.astype(int) - project_pixels(data)).max() <= 1, name


def test_opaque_jpeg_grey_cmyk_and_tiny_images_still_decode():
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8))
    for img, tol in [
        (rgb, 1),
        (rgb.convert("L"), 1),
        (rgb.convert("CMYK"), 2),
        (rgb.crop((0, 0, 1, 1)), 1),
    ]:
        data = encoded(img, "JPEG")
        ours = load_image(data, 32, 32, 3)
        assert ours is not None
        assert np.abs(ours.astype(int) - project_pixels(data)).max() <= tol, img.mode


def test_stage_batch_with_transparent_and_bad_images_keeps_going(captioner):
    """Every decodable image is captioned; undecodable ones are counted, not fatal."""
    stage = attached(CaptionConfig(model="unused", batch_size=4), captioner)
    batch = samples(len(transparent_images()) + 2)
    images = [*transparent_images().values(), b"not an image", b""]
    for s, data in zip(batch, images, strict=True):
        s.image = data
    out = stage.process(batch)
    assert [s.caption is None for s in out] == [False] * (len(images) - 2) + [True, True]
    assert stage.counts["failed"] == 2 and stage.counts["captioned"] == len(images) - 2
    assert all(s.caption_model == captioner.tag for s in out[:-2])


def test_beam_sampling_is_in_the_cache_key():
    """Bug: with do_sample the tag ignored num_beams (HF then does beam sampling) and
    length_penalty, so a sampled run could be served captions cached by a beam-sampled run
    (and the record could not tell them apart)."""
    plain = CaptionConfig(do_sample=True)
    beams = CaptionConfig(do_sample=True, num_beams=4)
    beams_lp = CaptionConfig(do_sample=True, num_beams=4, length_penalty=0.5)
    tags = {decoding_tag(c) for c in (plain, beams, beams_lp)}
    assert len(tags) == 3
    assert decoding_tag(plain) == "sample(top_p=0.9,temp=1.0,seed=0)|max30|min1|prompt=a photo of"
    assert decoding_tag(CaptionConfig(num_beams=5)) == "beam5|max30|min1|prompt=a photo of"
    assert caption_model_tag("m", "r", beams, "fp32").startswith("m@r|fp32|sample(")
