"""Safety filter: NudeNet scoring (real model on clean images, stubbed detections for the
threshold logic), equivalence with NudeDetector, and face blurring of the stored image."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from ccurate.filters.safety import (
    LABELS,
    REASONS,
    NudeNetScorer,
    SafetyConfig,
    SafetyFilter,
    reencode_blurred,
)
from ccurate.record import Sample
from ccurate.stage import FilterStage


def grace_hopper() -> Path:
    import matplotlib

    p = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not p.exists():
        pytest.skip("matplotlib's sample photo is not installed")
    return p


def landscape(w: int = 320, h: int = 256, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h)[:, None, None]
    img = np.array([80, 130, 210]) * (1 - y) + np.array([90, 140, 60]) * y
    img = np.broadcast_to(img, (h, w, 3)) + rng.normal(0, 12, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def sample(data: bytes, key: str = "k") -> Sample:
    return Sample(key=key, url=f"https://example.org/{key}.jpg", image=data, mime="image/jpeg")


@pytest.fixture(scope="module")
def safety() -> SafetyFilter:
    f = SafetyFilter(SafetyConfig())
    f.setup()
    return f


def test_clean_images_are_kept_with_a_score(safety: SafetyFilter) -> None:
    batch = [sample(landscape(seed=i), key=f"k{i}") for i in range(3)]
    batch.append(sample(grace_hopper().read_bytes(), key="gh"))
    FilterStage([safety]).process(batch)
    for s in batch:
        assert s.kept, s.scores
        assert 0.0 <= s.scores["safety.nsfw"] < safety.cfg.threshold
    assert "safety.faces" not in batch[-1].scores  # blurring is off by default
    assert batch[-1].image == grace_hopper().read_bytes()


def test_scores_equal_nudedetector(safety: SafetyFilter) -> None:
    """Our batched pre/post-processing reproduces NudeDetector.detect on a real photo."""
    from nudenet import NudeDetector

    path = grace_hopper()
    ref = NudeDetector().detect(str(path))
    assert ref, "NudeNet finds the face in the portrait"
    rgb = np.asarray(Image.open(path).convert("RGB"))
    scorer = safety._scorer
    assert scorer is not None
    ((anchors, scale),) = scorer.raw([rgb])
    got = scorer.class_max(anchors)
    for det in ref:
        assert got[det["class"]] == pytest.approx(det["score"], abs=1e-3)
    faces = scorer.boxes(anchors, scale, ("FACE_FEMALE", "FACE_MALE"), 0.25)
    ref_faces = [d["box"] for d in ref if d["class"].startswith("FACE")]
    assert faces and ref_faces
    assert np.allclose(faces[0][:4], ref_faces[0], atol=2)


def anchors_with(scores: dict[str, float]) -> np.ndarray:
    """Fake detector output: one anchor per entry, best class = that label."""
    rows = []
    for label, score in scores.items():
        row = np.zeros(4 + len(LABELS), np.float32)
        row[:4] = (100, 100, 40, 40)
        row[4 + LABELS.index(label)] = score
        rows.append(row)
    return np.stack(rows) if rows else np.zeros((0, 4 + len(LABELS)), np.float32)


@pytest.mark.parametrize(
    ("detections", "cfg", "keep"),
    [
        ({"FEMALE_BREAST_EXPOSED": 0.9}, {}, False),  # confident enough alone
        ({"FEMALE_BREAST_EXPOSED": 0.6, "FACE_FEMALE": 0.7}, {}, False),  # with a person
        ({"MALE_GENITALIA_EXPOSED": 0.51, "FACE_MALE": 0.41}, {}, False),
        ({"MALE_GENITALIA_EXPOSED": 0.49, "FACE_MALE": 0.9}, {}, True),
        ({"FEMALE_BREAST_EXPOSED": 0.79}, {}, True),  # a sun on a sky: no person
        ({"FEMALE_BREAST_EXPOSED": 0.6, "FACE_FEMALE": 0.3}, {}, True),
        ({"FEMALE_BREAST_EXPOSED": 0.6}, {"threshold_alone": 0.5}, False),  # the plain rule
        ({"BELLY_EXPOSED": 0.95, "FEET_EXPOSED": 0.9, "FACE_FEMALE": 0.9}, {}, True),  # beach
        ({"BUTTOCKS_EXPOSED": 0.4, "FACE_FEMALE": 0.5}, {"threshold": 0.3}, False),
        ({"BELLY_EXPOSED": 0.95}, {"classes": ["BELLY_EXPOSED"]}, False),
        ({}, {}, True),
    ],
)
def test_threshold_logic_with_stubbed_detections(monkeypatch, detections, cfg, keep) -> None:
    f = SafetyFilter(SafetyConfig(**cfg))
    f.setup()
    assert f._scorer is not None
    fake = anchors_with(detections)
    monkeypatch.setattr(f._scorer, "raw", lambda ims: [(fake, 1.0) for _ in ims])
    s = sample(landscape())
    FilterStage([f]).process([s])
    assert s.kept is keep
    want = max((v for k, v in detections.items() if k in f.cfg.classes), default=0.0)
    assert s.scores["safety.nsfw"] == pytest.approx(want)
    face = max((v for k, v in detections.items() if k.startswith("FACE")), default=0.0)
    assert s.scores["safety.person"] == pytest.approx(face)
    if not keep:
        assert s.drop_reason == "nsfw" and s.dropped_by == "safety" and "nsfw" in REASONS


def test_unknown_class_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match="BREASTS"):
        SafetyConfig(classes=["BREASTS"])


def lap_var(im: Image.Image, box: tuple[int, int, int, int]) -> float:
    x, y, w, h = box
    grey = np.asarray(im.convert("L"))[y : y + h, x : x + w]
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


@pytest.mark.parametrize("detector", ["nudenet", "haar"])
def test_face_blurring_rewrites_the_stored_image(detector: Literal["nudenet", "haar"]) -> None:
    data = grace_hopper().read_bytes()
    f = SafetyFilter(SafetyConfig(blur_faces=True, face_detector=detector))
    s = sample(data)
    FilterStage([f]).process([s])
    assert s.kept
    assert s.scores["safety.faces"] >= 1 and s.scores["safety.faces_blurred"] >= 1
    assert s.image != data and s.mime == "image/jpeg"
    before, after = Image.open(io.BytesIO(data)), Image.open(io.BytesIO(s.image or b""))
    assert after.format == "JPEG" and after.size == before.size
    face = (190, 160, 140, 150)  # the face in the portrait (NudeNet box ~ 168,138,188,207)
    assert lap_var(after, face) < 0.3 * lap_var(before, face)
    corner = (0, 520, 120, 80)  # far from the face: unchanged up to re-encoding
    assert lap_var(after, corner) == pytest.approx(lap_var(before, corner), rel=0.2)


def test_reencode_keeps_png_and_alpha() -> None:
    rgba = np.zeros((100, 120, 4), np.uint8)
    rgba[..., :3] = np.random.default_rng(0).integers(0, 255, (100, 120, 3))
    rgba[..., 3] = 128
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, "PNG")
    out, mime, n = reencode_blurred(buf.getvalue(), [(20, 20, 40, 40, 0.9)])
    im = Image.open(io.BytesIO(out))
    assert (mime, n, im.format, im.mode) == ("image/png", 1, "PNG", "RGBA")
    assert np.asarray(im)[..., 3].min() == 128
    assert not np.array_equal(np.asarray(im)[30, 30, :3], rgba[30, 30, :3])
    assert np.array_equal(np.asarray(im)[90, 110], rgba[90, 110])
    same, _, n0 = reencode_blurred(buf.getvalue(), [])
    assert n0 == 0 and same == buf.getvalue()


def test_undecodable_is_decode_error(safety: SafetyFilter) -> None:
    d = safety.decide(Sample(key="x", url="u", image=b"nope"))
    assert not d.keep and d.reason == "decode_error"


def test_scorer_batches_like_single_calls(safety: SafetyFilter) -> None:
    scorer = safety._scorer
    assert isinstance(scorer, NudeNetScorer)
    ims = [np.asarray(Image.open(io.BytesIO(landscape(200 + 40 * i, 180, i)))) for i in range(3)]
    batched = scorer.raw(ims)
    for im, (anchors, scale) in zip(ims, batched, strict=True):
        ((single, s1),) = scorer.raw([im])
        assert scale == pytest.approx(s1)
        np.testing.assert_allclose(anchors, single, atol=1e-4)


def test_pickles_without_its_session_and_sets_up_again(safety: SafetyFilter) -> None:
    clone = pickle.loads(pickle.dumps(safety))
    assert clone._scorer is None  # workers build their own onnxruntime session
    d = clone.decide(sample(landscape(seed=7)))
    assert d.keep and "nsfw" in d.scores and clone._scorer is not None


def test_demo_scenes_with_a_sun_are_not_nsfw(safety: SafetyFilter) -> None:
    """NudeNet reads the demo's procedural suns as exposed breasts (up to ~0.8) with no
    person in view: the person rule keeps them, and the score stays recorded."""
    from ccurate.demo import corpus

    batch = []
    for i in range(48):  # several of these suns score 0.5-0.7
        buf = io.BytesIO()
        corpus.landscape(i, 341, 256).save(buf, "JPEG", quality=95)
        batch.append(sample(buf.getvalue(), f"d{i}"))
    FilterStage([safety]).process(batch)
    assert all(s.kept for s in batch)
    assert max(s.scores["safety.nsfw"] for s in batch) >= safety.cfg.threshold
    assert all(s.scores["safety.person"] < safety.cfg.person_min for s in batch)


def test_missing_model_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "320n.onnx"
    with pytest.raises(FileNotFoundError) as e:
        SafetyFilter(SafetyConfig(model_path=str(missing))).setup()
    assert str(missing) in str(e.value) and "nudenet" in str(e.value)


def test_disabled_safety_keeps_and_loads_nothing() -> None:
    f = SafetyFilter(SafetyConfig(enabled=False, threshold=0.3))
    d = f.decide(Sample(key="x", url="u", image=b"not even an image"))
    assert d.keep and d.scores == {} and f._scorer is None
    assert f.describe()["threshold"] == 0.3 and f.describe()["enabled"] is False


def test_face_boxes_only_for_confident_faces() -> None:
    faces = ("FACE_FEMALE", "FACE_MALE")
    assert NudeNetScorer.boxes(anchors_with({"FACE_FEMALE": 0.2}), 1.0, faces, 0.35) == []
    assert NudeNetScorer.boxes(anchors_with({"BELLY_EXPOSED": 0.9}), 1.0, faces, 0.35) == []
    ((x, y, w, h, score),) = NudeNetScorer.boxes(anchors_with({"FACE_MALE": 0.8}), 2.0, faces, 0.35)
    assert (x, y, w, h) == (160, 160, 80, 80) and score == pytest.approx(0.8)  # scaled x2


def test_boxes_outside_or_too_thin_are_not_blurred() -> None:
    from ccurate.filters.safety import blur_regions

    arr = np.random.default_rng(0).integers(0, 255, (100, 120, 3), dtype=np.uint8)
    out, n = blur_regions(arr, [(500, 500, 10, 10, 0.9), (119, 10, 1, 1, 0.9)])
    assert n == 0 and np.array_equal(out, arr)


def _noisy(fmt: str, **kw: object) -> bytes:
    arr = np.random.default_rng(1).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "fmt", "mime"),
    [
        (_noisy("GIF"), "GIF", "image/gif"),
        (_noisy("WEBP", quality=90), "WEBP", "image/webp"),
        (_noisy("BMP"), "BMP", "image/bmp"),
    ],
)
def test_reencode_keeps_the_format(data: bytes, fmt: str, mime: str) -> None:
    out, got_mime, n = reencode_blurred(data, [(30, 30, 30, 30, 0.9)])
    im = Image.open(io.BytesIO(out))
    assert (got_mime, n, im.format, im.size) == (mime, 1, fmt, (96, 96))
    before = np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.float64)
    after = np.asarray(im.convert("L"), np.float64)
    assert after[35:55, 35:55].std() < 0.5 * before[35:55, 35:55].std()  # the box is blurred


def test_reencode_falls_back_to_png_for_formats_pillow_cannot_write() -> None:
    """A .cur icon opens but cannot be saved as CUR: the blurred image is stored as PNG."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(_noisy("PNG"))).save(buf, "ICO", sizes=[(64, 64)], bitmap_format="bmp")
    cur = bytearray(buf.getvalue())
    cur[2] = 2  # ICONDIR type 2: a cursor
    assert Image.open(io.BytesIO(bytes(cur))).format == "CUR"
    out, mime, n = reencode_blurred(bytes(cur), [(10, 10, 30, 30, 0.9)])
    assert (mime, n, Image.open(io.BytesIO(out)).format) == ("image/png", 1, "PNG")
