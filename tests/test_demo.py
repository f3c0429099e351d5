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
