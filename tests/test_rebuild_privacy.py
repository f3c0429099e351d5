"""Rebuilds carry released samples forward without a refetch: the safety settings now
configured (face blurring, the NSFW rule) must reach them too, and dedup's `previous` must
catch near copies of them as a single run does (review: privacy #1, dedup #3)."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from ccurate.captioning.config import CaptionConfig
from ccurate.executor import LocalExecutor
from ccurate.filters.safety import FACES, NudeNetScorer, SafetyConfig
from ccurate.rebuild import SAFETY_JUDGED, RebuildConfig, rebuild, safety_digest
from ccurate.record import Sample
from ccurate.release_gate import REJUDGED, SafetyRejudge
from tests.test_rebuild import FIGURE, CountingHandler, _config, _jpeg, _serve

EX = LocalExecutor(1, progress=False)
RC = RebuildConfig(report=False, recheck_optout_days=None)
GRACE = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def _handler() -> type[CountingHandler]:
    return type("H", (CountingHandler,), {"hits": Counter(), "fail": {}, "headers_for": {}})


def _site(root: Path, images: dict[str, bytes]) -> None:
    (root / "corpus" / "img").mkdir(parents=True, exist_ok=True)
    (root / "corpus" / "pages").mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        (root / "corpus" / "img" / name).write_bytes(data)
        fig = FIGURE.format(src=f"/img/{name}", alt=f"{name} by Ana Ruiz")
        (root / "corpus" / "pages" / f"{name}.html").write_text(f"<html><body>{fig}</body></html>")


def _cfg(root: Path, base: str, pages: list[str], **safety: Any) -> Any:
    cfg = _config(root, base, pages)
    cfg.ingest.image_size = 256  # grace_hopper.jpg is 512x600: resized at ingest
    cfg.filters.safety = SafetyConfig(**safety)
    return cfg


_scorer = NudeNetScorer()


def _faces(release: Path) -> list[float]:
    """NudeNet's face score of every image the release's shards hold."""
    out = []
    for tar in sorted(release.glob("*/*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".jpg"):
                    f = t.extractfile(m)
                    assert f is not None
                    rgb = np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))
                    ((anchors, _),) = _scorer.raw([rgb])
                    best = NudeNetScorer.class_max(anchors)
                    out.append(max(best[c] for c in FACES))
    return out


def test_turning_blur_on_blurs_the_faces_of_released_samples(tmp_path: Path) -> None:
    """A portrait released with blurring off is not carried into the next release with its
    face: the gate judges it again under the safety settings now configured, blurs it, and
    publishes although no field the diff compares changed. A third generation with the same
    settings judges nothing again (the judged shard is recorded) and publishes nothing."""
    _site(tmp_path, {"face.jpg": GRACE.read_bytes()})
    server, base = _serve(tmp_path / "corpus", _handler())
    pages = ["/pages/face.jpg.html"]
    try:
        g1 = rebuild(_cfg(tmp_path, base, pages), RC, EX)
        g2 = rebuild(_cfg(tmp_path, base, pages, blur_faces=True), RC, EX)
        g3 = rebuild(_cfg(tmp_path, base, pages, blur_faces=True), RC, EX)
    finally:
        server.shutdown()
        server.server_close()
    assert g1.release is not None and g2.release is not None
    (before,) = _faces(g1.release)
    (after,) = _faces(g2.release)
    assert before > 0.5 and after < SafetyConfig().face_min_score
    again = g2.info["settings"]["safety_judged_again"]
    assert again["judged"] == 1 and again["faces_blurred"] == 1 and again["dropped"] == {}
    rel = json.loads((g2.release / "release.json").read_text())
    assert rel["run_info"]["rebuild"]["settings"]["safety_judged_again"]["faces_blurred"] == 1
    assert g3.release is None and g3.info["settings"]["safety_judged_again"]["judged"] == 0
    # a generation from before `safety_judged.json` is judged by its filter step's settings
    recorded = json.loads((g1.dir / "20_filter" / "_SETTINGS").read_text())["filters"]
    assert set(json.loads((g1.dir / SAFETY_JUDGED).read_text()).values()) == {
        safety_digest(recorded["safety"])
    }


def test_a_stricter_nsfw_rule_withdraws_released_samples(tmp_path: Path) -> None:
    """`threshold_alone = 0` makes every image NSFW: the released sample is withdrawn as
    `nsfw` by the safety filter, and the gate's side output says why."""
    from ccurate.demo.corpus import landscape

    _site(tmp_path, {"land.jpg": _jpeg(landscape(3, 400, 300))})
    server, base = _serve(tmp_path / "corpus", _handler())
    pages = ["/pages/land.jpg.html"]
    try:
        g1 = rebuild(_cfg(tmp_path, base, pages), RC, EX)
        g2 = rebuild(_cfg(tmp_path, base, pages, threshold=0.0, threshold_alone=0.0), RC, EX)
    finally:
        server.shutdown()
        server.server_close()
    assert g1.release is not None and g2.release is not None
    assert pq.read_metadata(g2.release / "manifest.parquet").num_rows == 0
    assert g2.info["diff"]["removed_by_reason"] == {"nsfw": 1}
    assert g2.info["settings"]["safety_judged_again"]["dropped"] == {"nsfw": 1}
    gate = pq.read_table(next((g2.dir / "50_release_input").glob("*.dropped.parquet")))
    assert gate.column("dropped_by").to_pylist() == ["safety"]
    assert gate.column("removed_because").to_pylist() == [REJUDGED]


class _FakeCaptioner:
    tag = "fake@1"
    batch_size = 1

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def caption(self, images: list[bytes]) -> list[list[str]]:
        self.seen += images
        return [["a blurred portrait"] for _ in images]


def _captioned_portrait() -> Sample:
    s = Sample(key="k", url="https://example.org/k.jpg", image=GRACE.read_bytes())
    s.mime, s.caption, s.caption_model = "image/jpeg", "grace hopper in uniform", "blip2@0"
    return s


def test_a_caption_of_the_unblurred_face_is_not_kept() -> None:
    """The caption a released sample got from its unblurred pixels goes with them: made again
    from the blurred bytes when a caption model is configured, else removed."""
    fake = _FakeCaptioner()
    stage = SafetyRejudge(SafetyConfig(blur_faces=True), CaptionConfig(model="fake"))
    assert stage.captioner is not None
    stage.captioner.attach(fake)
    s = _captioned_portrait()
    stage.setup()
    stage.process([s])
    assert s.kept and s.scores["safety.faces_blurred"] > 0
    assert fake.seen == [s.image] and s.image != GRACE.read_bytes()
    assert (s.caption, s.caption_model) == ("a blurred portrait", "fake@1")

    s = _captioned_portrait()
    stage = SafetyRejudge(SafetyConfig(blur_faces=True), CaptionConfig())
    stage.process([s])
    assert s.kept and (s.caption, s.caption_model) == (None, None)


def test_a_crop_of_a_released_image_is_a_near_duplicate_in_a_later_generation(
    tmp_path: Path,
) -> None:
    """dedup's `previous` carries the dHash: a 3 % crop (pHash > 4 apart, so without the
    dHash only an exact-ish match would count) is dropped as a near copy of the released
    image, as it would be in one run."""
    from ccurate.filters.hashing import hamming

    _site(tmp_path, {"face.jpg": GRACE.read_bytes()})
    server, base = _serve(tmp_path / "corpus", _handler())
    im = Image.open(GRACE).convert("RGB")
    w, h = im.size
    crop = _jpeg(im.crop((int(0.03 * w), int(0.03 * h), w, h)))
    try:
        cfg = _cfg(tmp_path, base, ["/pages/face.jpg.html"], enabled=False)
        cfg.dedup.radius = 12
        g1 = rebuild(cfg, RC, EX)
        _site(tmp_path, {"crop.jpg": crop})
        cfg.sources[0].urls.append(base + "/pages/crop.jpg.html")
        g2 = rebuild(cfg, RC, EX)
    finally:
        server.shutdown()
        server.server_close()
    assert g1.release is not None
    assert g2.info["steps"]["dedup"]["drops"] == {"duplicate_near": 1}
    prev = pq.read_table(g2.dir / "previous.parquet").to_pylist()
    dup = pq.read_table(next((g2.dir / "30_dedup").glob("*.dropped.parquet"))).to_pylist()
    (orig,), (copy,) = prev, dup
    assert hamming(orig["phash"], copy["phash"]) > 4
