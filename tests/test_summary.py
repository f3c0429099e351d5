"""The end-of-run summary table."""

from __future__ import annotations

import io
from collections import Counter

from rich.console import Console

from ccurate.pipeline import StepResult
from ccurate.stage import StageStats
from ccurate.summary import print_summary, summary_table


def _render(results: list[StepResult]) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    print_summary(results, console)
    return console.export_text()


def test_pages_that_hold_many_images_are_explained_and_rated_by_images():
    ingest = StageStats("ingest", n_in=10, n_kept=90, n_dropped=10, drops=Counter(timeout=10))
    filt = StageStats("filter", n_in=90, n_kept=60, n_dropped=30, drops=Counter(watermark=30))
    text = _render([StepResult("ingest", ingest, 2.0), StepResult("filter", filt, 3.0)])
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}
    assert "50.0/s" in rows["ingest"]  # 100 images in 2 s, not 10 inputs
    assert "30.0/s" in rows["filter"]
    assert "timeout 10" in rows["ingest"] and "watermark 30" in rows["filter"]
    assert "ingest: 10 inputs held 100 images" in text
    assert "filter:" not in text.split("ingest: 10 inputs")[1]  # no note where in = out


def test_no_caption_when_every_step_keeps_or_drops_its_inputs():
    stats = StageStats("dedup", n_in=5, n_kept=3, n_dropped=2, drops=Counter(duplicate_exact=2))
    table = summary_table([StepResult("dedup", stats, 0.0)])
    assert table.caption is None
    assert "0.0/s" in _render([StepResult("dedup", stats, 0.0)])
