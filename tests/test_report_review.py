"""Review fixes: summary markup and resumed rates, progress bar stream, report memory, demo."""

from __future__ import annotations

import io
import json
import os
import sys
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pytest
from rich.console import Console

from ccurate.pipeline import StepResult
from ccurate.record import Sample, make_key
from ccurate.shardio import ShardWriter
from ccurate.stage import StageStats
from tests.test_summary import _render


def test_summary_prints_reasons_with_brackets_as_written() -> None:
    """Reasons went through rich markup: `[/]` raised after the whole run, `[x]` vanished."""
    drops = Counter({"a[/]": 1, "license[by-nc]": 2})
    stats = StageStats("filter", n_in=5, n_kept=2, n_dropped=3, drops=drops)
    text = _render([StepResult("filter", stats, 1.0)])
    assert "license[by-nc] 2" in text and "a[/] 1" in text


def test_resumed_shards_do_not_inflate_throughput() -> None:
    """Counts of resumed shards came from markers but were divided by this run's seconds."""
    all_resumed = StageStats("filter", n_in=10_000, n_kept=10_000, shards=10, skipped_shards=10)
    half = StageStats("dedup", n_in=10_000, n_kept=10_000, shards=10, skipped_shards=5)
    text = _render([StepResult("filter", all_resumed, 0.5), StepResult("dedup", half, 10.0)])
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}
    assert "20000.0/s" not in rows["filter"] and rows["filter"].rstrip("│ ").endswith("-")
    assert "500.0/s" in rows["dedup"]  # 5 of 10 shards, 5000 samples, in 10 s


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_on_the_terminal_it_checked(monkeypatch) -> None:
    """stderr was checked for a terminal but rich drew on stdout: with stdout redirected
    the bar was invisible and left a blank line in the redirected output."""
    from ccurate.progress import Progress

    out, err = io.StringIO(), _FakeTTY()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    bar = Progress("filter", 3)
    for _ in range(3):
        bar.advance()
    bar.close()
    assert out.getvalue() == ""
    assert err.getvalue()  # drawn (and cleared) on the terminal


def test_report_reads_only_the_dropped_images_it_shows(tmp_path: Path) -> None:
    """Every dropped row's image bytes were loaded to pick 8 examples per reason."""
    from ccurate.report import write_report

    work = tmp_path / "work"
    w = ShardWriter(work / "20_filter" / "part-00000")
    blob = os.urandom(50_000)
    for i in range(300):
        url = f"http://example.org/{i}.jpg"
        s = Sample(key=make_key(url), url=url, image=blob + bytes([i % 256]), mime="image/jpeg")
        s.drop("too_small", "quality")
        w.write(s)
    w.commit({})
    import matplotlib.pyplot  # noqa: F401  (its import is not the report's memory)

    tracemalloc.start()
    try:
        page = write_report(work, per_reason=4).read_text()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "too_small (300)" in page
    assert peak < 8_000_000, peak  # 300 x 50 kB were held at once before


# --------------------------------------------------------------------------- demo
class _NoRun:
    """A pipeline that does nothing: every planted image ends up missing."""

    configs: ClassVar[list[Any]] = []

    def __init__(self, cfg, executor=None, retry_reasons=frozenset()) -> None:
        self.configs.append(cfg)
        self.report_path = Path(cfg.run.work_dir) / "report.html"

    def run(self, steps=None) -> list[StepResult]:
        return []


def _tiny_corpus(out: Path) -> None:
    corpus = out / "corpus"
    corpus.mkdir(parents=True)
    image = {"path": "/img/a.jpg", "page": "/pages/p.html", "expected": "keep", "style": "cc0"}
    truth = {"pages": ["/pages/p.html"], "images": [image]}
    (corpus / "truth.json").write_text(json.dumps(truth))


def test_demo_exits_non_zero_when_a_planted_defect_slips_through(tmp_path, monkeypatch):
    """`ccurate demo` printed the mismatches and exited 0, so `make demo` passed."""
    from typer.testing import CliRunner

    from ccurate.cli import app

    monkeypatch.setattr("ccurate.pipeline.Pipeline", _NoRun)
    _tiny_corpus(tmp_path / "demo")
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 1, result.output
    assert "demo check FAILED" in result.output


def test_demo_urls_are_the_same_every_run(tmp_path, monkeypatch):
    """A random port made other URLs, keys and SHA256SUMS on every run of the same corpus."""
    from ccurate.demo.run import DemoCheckFailed, run_demo

    _NoRun.configs = []
    monkeypatch.setattr("ccurate.pipeline.Pipeline", _NoRun)
    _tiny_corpus(tmp_path)
    for _ in range(2):
        with pytest.raises(DemoCheckFailed):
            run_demo(tmp_path, console=Console(file=io.StringIO()))
    first, second = ([str(u) for u in c.sources[0].urls] for c in _NoRun.configs)
    assert first == second
