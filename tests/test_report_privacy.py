"""The HTML report is a file to share: it must not show what the run would not publish, i.e.
NSFW drops, or (when the run blurs faces) the unblurred faces of samples dropped before the
safety filter saw them (review: privacy #4)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

from ccurate.demo.corpus import landscape
from ccurate.filters.config import FiltersConfig
from ccurate.filters.license_filter import LicenseFilter
from ccurate.filters.safety import SafetyConfig, SafetyFilter
from ccurate.record import LicenseEvidence, Sample
from ccurate.report import _thumb, write_report
from ccurate.shardio import ShardWriter
from ccurate.stage import FilterStage
from tests.test_rebuild import _jpeg

FACE = (Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").read_bytes()
BY = "https://creativecommons.org/licenses/by/4.0/"


def _run(work: Path, blur: bool) -> tuple[Sample, Sample, Sample]:
    """A filter step: a portrait kept (blurred when `blur`), the same portrait dropped by the
    licence filter (before safety: never blurred), and an image dropped as `nsfw`."""
    filters = FiltersConfig()
    filters.safety = SafetyConfig(blur_faces=blur)
    kept = Sample(key="kept", url="https://example.org/a.jpg", image=FACE, mime="image/jpeg")
    kept.author, kept.page_url = "A. Photographer", "https://example.org/page"
    kept.license_evidence = [LicenseEvidence("column", "column", BY)]
    no_licence = Sample(key="nolicence", url="https://example.org/b.jpg", image=FACE)
    FilterStage([LicenseFilter(filters.license), SafetyFilter(filters.safety)]).process(
        [kept, no_licence]
    )
    nsfw = Sample(key="nsfw", url="https://example.org/c.jpg", image=_jpeg(landscape(1, 64, 48)))
    nsfw.drop("nsfw", "safety")
    w = ShardWriter(work / "20_filter" / "part-00000")
    for s in (kept, no_licence, nsfw):
        w.write(s)
    w.commit({"in": 3})
    settings = {"filters": filters.model_dump(mode="json")}
    (work / "20_filter" / "_SETTINGS").write_text(json.dumps(settings))
    assert kept.kept and not no_licence.kept
    return kept, no_licence, nsfw


def _dropped_section(work: Path) -> dict[str, list[str]]:
    """Reason -> the images embedded under it in the report's dropped grid."""
    html = write_report(work).read_text()
    dropped = html.split("Dropped samples by reason")[1]
    out = {}
    for part in dropped.split("<h3>")[1:]:
        reason = part.split(" (")[0]
        out[reason] = re.findall(r"<img src='(data:image/jpeg;base64,[^']+)'", part)
    return out


def test_nsfw_drops_are_never_shown(tmp_path: Path) -> None:
    _run(tmp_path, blur=False)
    shown = _dropped_section(tmp_path)
    assert shown["nsfw"] == []
    assert "image not shown (nsfw)" in (tmp_path / "report.html").read_text()


def test_a_run_that_blurs_faces_shows_dropped_samples_blurred(tmp_path: Path) -> None:
    """The licence drop is the unblurred portrait on disk; the report shows it as the run
    would have published it (the same thumbnail as the blurred kept sample's)."""
    kept, _, _ = _run(tmp_path, blur=True)
    assert kept.scores["safety.faces_blurred"] > 0
    (thumb,) = _dropped_section(tmp_path)["license_unknown"]
    assert thumb == _thumb(kept.image) and thumb != _thumb(FACE)
