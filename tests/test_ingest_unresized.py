"""Images that need no new pixels (kept originals, or already at the target size) must come
out of ingest decoded and hashed: `process_image` returned the very image it then closed, and
the hashing that follows dropped every such image as `decode_error`."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ccurate.filters.hashing import image_hashes
from ccurate.ingest.images import ImageOptions, process_image


def _photo(w: int, h: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(w * 7 + h)
    arr = (rng.random((h, w, 3)) * 60 + np.linspace(0, 180, w)[None, :, None]).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").convert(mode).save(buf, fmt)
    return buf.getvalue()


CASES = [
    ("keep_original, upright RGB JPEG", _photo(400, 300), ImageOptions(keep_original=True)),
    ("keep_original, RGB PNG", _photo(300, 200, "PNG"), ImageOptions(keep_original=True)),
    ("short side already at image_size", _photo(512, 600), ImageOptions(image_size=512)),
    ("resize_mode no", _photo(320, 240), ImageOptions(resize_mode="no")),
    (
        "resize_only_if_bigger, smaller image",
        _photo(300, 200, "PNG"),
        ImageOptions(image_size=512, resize_only_if_bigger=True),
    ),
]


@pytest.mark.parametrize(("name", "body", "opt"), CASES, ids=[c[0] for c in CASES])
def test_unresized_images_stay_open_for_hashing(name: str, body: bytes, opt: ImageOptions) -> None:
    out = process_image(body, opt)
    pixel_sha, phash, dhash = image_hashes(out.image)  # raised on a closed image
    assert len(pixel_sha) == 64 and len(phash) == 16 and len(dhash) == 16
    assert out.image.size == (out.width, out.height)
    src = Image.open(io.BytesIO(body)).convert("RGB")
    assert np.asarray(out.image).shape == np.asarray(src).shape
    if opt.keep_original:
        assert out.data == body
        assert np.array_equal(np.asarray(out.image), np.asarray(src))


def test_stage_keeps_an_unresized_image() -> None:
    """The ingest stage's decode step (decode + hashes) keeps the image instead of recording
    `decode_error`."""
    from ccurate.ingest.config import IngestConfig
    from ccurate.ingest.stage import IngestStage
    from ccurate.record import Sample

    stage = IngestStage(IngestConfig(keep_original=True, allow_private=True))
    stage.setup()
    try:
        s = stage._decode(Sample(key="k", url="http://127.0.0.1/a.jpg"), _photo(400, 300))
    finally:
        stage.teardown()
    assert s.kept, s.drop_reason
    assert s.phash and s.pixel_sha256 and (s.width, s.height) == (400, 300)
