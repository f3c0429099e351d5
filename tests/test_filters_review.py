"""Review fixes in the quality, safety and semantic filters (each test failed before its fix)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageCms

from ccurate.filters.quality import QualityConfig, QualityFilter, alt_is_filename
from ccurate.filters.safety import reencode_blurred
from ccurate.filters.semantic import semantic_groups
from ccurate.record import Sample

ORIENTATION = 0x0112


def _noise(w: int = 300, h: int = 200, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def _srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def test_face_blur_keeps_exif_orientation_and_rgb_profile() -> None:
    """A phone photo kept as downloaded (EXIF orientation 6) must still display upright
    after its faces are blurred (written upright, tag reset: tests/test_orientation.py),
    and keep its colour profile."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    icc = _srgb_icc()
    for fmt in ("JPEG", "PNG", "WEBP"):
        buf = io.BytesIO()
        _noise().save(buf, fmt, exif=exif.tobytes(), icc_profile=icc)
        data = buf.getvalue()
        out, _, n = reencode_blurred(data, [(20, 20, 60, 60, 0.9)])
        assert n == 1 and out != data, fmt
        with Image.open(io.BytesIO(out)) as im:
            assert im.format == fmt
            assert im.getexif().get(ORIENTATION) == 1, fmt
            assert im.info.get("icc_profile") == icc, fmt
            assert im.size == (200, 300)  # upright, the frame the boxes are in
    # a grey image is re-encoded as RGB: the profile of its grey pixels must not follow
    buf = io.BytesIO()
    _noise().convert("L").save(buf, "JPEG", icc_profile=icc)
    out, _, n = reencode_blurred(buf.getvalue(), [(20, 20, 60, 60, 0.9)])
    with Image.open(io.BytesIO(out)) as im:
        assert n == 1 and im.mode == "RGB" and "icc_profile" not in im.info


def test_camera_name_rule_does_not_drop_descriptive_alt_text() -> None:
    """A real LAION alt text that starts like a screenshot name is prose, not a file name:
    with `drop_alt_filename` on it must be kept; real camera names still drop."""
    prose = "Screenshot 112 Bible Maps with 65 Bibles and Commentaries on iPad"
    assert not alt_is_filename(prose)
    assert not alt_is_filename("DSC 2019 annual meeting of the rowing club")
    for name in ("DSC 01234", "IMG_20190304_112233", "img-1234-edit", "PXL_20230101_123456"):
        assert alt_is_filename(name), name
    buf = io.BytesIO()
    _noise(320, 240).save(buf, "PNG")
    f = QualityFilter(QualityConfig(drop_alt_filename=True, min_blur=0.0))
    s = Sample(key="k", url="https://example.org/k.png", alt_text=prose, image=buf.getvalue())
    s.record(f.decide(s))
    assert s.kept, s.drop_reason
    assert s.scores["quality.alt_filename"] == 0.0


def test_semantic_groups_skip_a_non_finite_embedding() -> None:
    """One NaN embedding (a model overflow on one image) must not abort semantic dedup:
    the other duplicates are still grouped, with indices into the caller's rows."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(5, 32)).astype(np.float32)
    emb = np.repeat(base, 4, axis=0) + rng.normal(0, 1e-4, (20, 32)).astype(np.float32)
    emb[5] = np.nan
    emb[10, 3] = np.inf
    groups = semantic_groups(emb, n_clusters=5, eps=0.01)
    members = {m for g in groups for m in g}
    assert 5 not in members and 10 not in members
    # rows 4, 6, 7 (the finite copies of base[1]) still form one group, keeper first
    assert [4, 6, 7] in groups
    assert [0, 1, 2, 3] in groups
    clean = np.delete(emb, [5, 10], axis=0)
    assert len(groups) == len(semantic_groups(clean, n_clusters=5, eps=0.01))


def test_16_bit_and_float_images_decode_to_their_grey_level_not_white() -> None:
    """Pillow's convert("RGB") clips 16-bit grey at 255 (mid-grey came out white and was
    dropped as low_entropy); the filters now decode as ingest does: scaled to 8 bits."""
    from ccurate.filters.images import decode_rgb
    from ccurate.pixels import to_rgb

    ramp = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")  # mode I;16
    rgb = np.asarray(decode_rgb(buf.getvalue()))
    assert rgb.shape == (48, 64, 3)
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert 120 <= float(rgb.mean()) <= 135  # a ramp: mid-grey on average, not ~255
    floats = Image.fromarray(np.full((4, 4), 0.5, np.float32))  # mode F
    assert np.asarray(to_rgb(floats))[0, 0].tolist() == [127, 127, 127]
    keyed = Image.new("L", (2, 1), 0)
    keyed.info["transparency"] = 0  # a grey GIF/PNG colour key: transparent pixels on white
    assert np.asarray(to_rgb(keyed))[0, 0].tolist() == [255, 255, 255]
    out, _, n = reencode_blurred(buf.getvalue(), [(0, 0, 64, 48, 0.9)])
    with Image.open(io.BytesIO(out)) as im:  # the blurred copy keeps the grey levels too
        assert n == 1 and 100 <= float(np.asarray(im.convert("L")).mean()) <= 155
