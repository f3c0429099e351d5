"""`make demo` end to end: every planted defect of the demo corpus is caught for its reason."""

from __future__ import annotations

import io
import json
from pathlib import Path

import duckdb
import pytest
from rich.console import Console

from ccurate.demo.corpus import load
from ccurate.demo.run import run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, str]:
    out = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    check = run_demo(out, workers=2, train_steps=2, console=Console(file=buf, width=200))
    return out, check, buf.getvalue()


def test_demo_catches_every_planted_defect(demo):
    out, check, log = demo
    assert check.ok, "\n".join(check.wrong)
    corpus = load(out / "corpus")
    assert {i.expected for i in corpus.images} == {
        "keep",
        "license",
        "duplicate",
        "watermark",
        "too_small",
        "broken",
    }
    assert "planted vs caught" in log and "mismatch" not in log


def test_demo_release_is_commercial_attributed_and_queryable(demo):
    out, check, _ = demo
    release = out / "releases" / "demo-v1"
    assert (release / "_SUCCESS").exists()
    kept = {p for p, (status, _) in check.outcomes.items() if status == "kept"}
    rows = (
        duckdb.connect()
        .sql(f"SELECT key, url, license, license_url FROM '{release}/manifest.parquet'")
        .fetchall()
    )
    assert len(rows) == len(kept)
    assert {r[1].split("/img/")[-1] for r in rows} == {p.split("/img/")[-1] for p in kept}
    assert {r[2] for r in rows} <= {"CC-BY-4.0", "CC-BY-SA-2.0", "CC0-1.0", "CC-PDM-1.0"}
    assert all(r[3] for r in rows)
    credits = (release / "ATTRIBUTION").read_text()
    assert "CC-BY-4.0" in credits or "CC BY 4.0" in credits


def test_demo_writes_summary_report_and_trains(demo):
    out, _, _ = demo
    work = out / "work"
    steps = {s["stage"]: s for s in json.loads((work / "summary.json").read_text())["steps"]}
    assert list(steps) == ["ingest", "filter", "dedup", "caption", "shard", "train"]
    drops = steps["filter"]["drops"]
    assert drops.get("watermark", 0) > 0 and drops.get("too_small", 0) > 0
    html = (work / "report.html").read_text()
    assert "<img" in html and "watermark" in html
    assert any((work / "train" / "checkpoints").iterdir())


def test_the_demo_check_reports_every_kind_of_miss(tmp_path: Path) -> None:
    """The demo's verdict must be able to say no: a kept image dropped, a defect dropped
    for the wrong reason, an image never seen, a duplicate group with two survivors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ccurate.demo.corpus import DemoCorpus, PlantedImage
    from ccurate.demo.run import check_demo

    base = "http://127.0.0.1:1"

    def img(path: str, expected: str, group: str | None = None) -> PlantedImage:
        return PlantedImage(path, "/pages/p.html", expected, "cc-by", group)

    images = [
        img("/img/ok.jpg", "keep"),
        img("/img/lost.jpg", "keep"),  # dropped although clean
        img("/img/wm.jpg", "watermark"),  # dropped, but for another reason
        img("/img/tiny.jpg", "too_small"),  # right
        img("/img/never.jpg", "broken"),  # no outcome at all
        img("/img/orig.jpg", "keep"),
        img("/img/copy.jpg", "duplicate", group="/img/orig.jpg"),  # both kept
        img("/img/o2.jpg", "keep"),
        img("/img/c2.jpg", "duplicate", group="/img/o2.jpg"),  # right: one kept
        img("/img/o3.jpg", "keep"),
        img("/img/c3.jpg", "duplicate", group="/img/o3.jpg"),  # the copy dropped for a mark
    ]
    corpus = DemoCorpus(tmp_path / "corpus", ["/pages/p.html"], images)
    work = tmp_path / "work"
    (work / "40_caption").mkdir(parents=True)
    (work / "20_filter").mkdir()
    kept = ["/img/ok.jpg", "/img/orig.jpg", "/img/copy.jpg", "/img/c2.jpg", "/img/o3.jpg"]
    pq.write_table(pa.table({"url": [base + p for p in kept]}), work / "40_caption/p.parquet")
    drops = {
        "/img/lost.jpg": "too_small",
        "/img/wm.jpg": "too_small",
        "/img/tiny.jpg": "too_small",
        "/img/o2.jpg": "duplicate_near",
        "/img/c3.jpg": "watermark",
    }
    pq.write_table(
        pa.table({"url": [base + p for p in drops], "drop_reason": list(drops.values())}),
        work / "20_filter/p.dropped.parquet",
    )
    check = check_demo(corpus, base, work)
    assert not check.ok
    assert check.wrong_paths == {
        "/img/lost.jpg",
        "/img/wm.jpg",
        "/img/never.jpg",
        "/img/orig.jpg",
        "/img/copy.jpg",
        "/img/o3.jpg",
        "/img/c3.jpg",
    }
    assert check.outcomes["/img/never.jpg"] == ("missing", None)
    assert any("expected watermark drop, got dropped too_small" in w for w in check.wrong)
    # the same run with every planted problem caught is ok
    kept = ["/img/ok.jpg", "/img/lost.jpg", "/img/orig.jpg", "/img/c2.jpg", "/img/o3.jpg"]
    drops = {
        "/img/wm.jpg": "watermark",
        "/img/tiny.jpg": "too_small",
        "/img/never.jpg": "decode_error",
        "/img/copy.jpg": "duplicate_exact",
        "/img/o2.jpg": "duplicate_near",
        "/img/c3.jpg": "duplicate_near",
    }
    pq.write_table(pa.table({"url": [base + p for p in kept]}), work / "40_caption/p.parquet")
    pq.write_table(
        pa.table({"url": [base + p for p in drops], "drop_reason": list(drops.values())}),
        work / "20_filter/p.dropped.parquet",
    )
    assert check_demo(corpus, base, work).ok


def _project(root: Path) -> Path:
    """A project folder: its catalog and a published release in the default places."""
    (root / "work" / "catalog").mkdir(parents=True)
    (root / "work" / "catalog" / "catalog.duckdb").write_text("precious")
    (root / "releases" / "mydata-v7").mkdir(parents=True)
    (root / "releases" / "mydata-v7" / "_SUCCESS").write_text("{}")
    return root


def test_the_demo_refuses_a_folder_whose_work_and_releases_it_did_not_make(
    tmp_path: Path,
) -> None:
    """`work/` and `releases/` are every project's default folders; the demo remakes its
    own each run, so `--out .` in a project used to delete its catalog and releases."""
    from ccurate.config import ConfigError

    root = _project(tmp_path / "proj")
    with pytest.raises(ConfigError, match="did not make"):
        run_demo(root, train_steps=2, console=Console(file=io.StringIO()))
    assert (root / "work" / "catalog" / "catalog.duckdb").read_text() == "precious"
    assert (root / "releases" / "mydata-v7" / "_SUCCESS").exists()


def test_a_bad_demo_setting_removes_nothing(tmp_path: Path) -> None:
    """Settings are checked before the demo's own folders are started afresh."""
    from ccurate.config import ConfigError

    root = tmp_path / "d"
    root.mkdir()
    (root / ".ccurate-demo").write_text("")
    _project(root)
    with pytest.raises(ConfigError, match=r"train\.steps"):
        run_demo(root, train_steps=0, console=Console(file=io.StringIO()))
    assert (root / "releases" / "mydata-v7" / "_SUCCESS").exists()
