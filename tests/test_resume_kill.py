"""Killed at any moment, a rerun ends with the same shards as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ccurate.demo.corpus import generate
from ccurate.demo.server import serve_directory

STEPS = "ingest,filter,dedup"


def _write_config(path: Path, base_url: str, pages: list[str], work: Path) -> None:
    urls = ", ".join(f'"{base_url}{p}"' for p in pages)
    path.write_text(
        f"""
[run]
work_dir = "{work}"
release_dir = "{work.parent / "releases"}"
workers = 1
partition_size = 2

[[sources]]
type = "pages"
urls = [{urls}]

[ingest]
allow_private = true
image_size = 128

[filters.watermark]
enabled = false

[filters.safety]
enabled = false
""",
        encoding="utf-8",
    )


def _shard_files(work: Path) -> dict[str, bytes]:
    files = {}
    for step in ("10_ingest", "20_filter", "30_dedup"):
        for p in sorted((work / step).glob("*")):
            if p.suffix in (".tar", ".parquet"):
                files[f"{step}/{p.name}"] = p.read_bytes()
    return files


def _ccurate(*args: str) -> list[str]:
    return [sys.executable, "-m", "ccurate.cli", *args]


@pytest.mark.timeout(600)
def test_sigkill_mid_ingest_then_rerun_gives_identical_shards(tmp_path: Path):
    corpus = generate(tmp_path / "corpus", n_images=24, per_page=4)
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    with serve_directory(corpus.root) as base:
        pages = corpus.pages
        # the uninterrupted reference run
        _write_config(tmp_path / "a.toml", base, pages, tmp_path / "a" / "work")
        subprocess.run(
            _ccurate("run", str(tmp_path / "a.toml"), "--steps", STEPS),
            check=True,
            env=env,
            capture_output=True,
        )
        reference = _shard_files(tmp_path / "a" / "work")
        assert any(k.startswith("10_ingest/") for k in reference)

        # the killed run: SIGKILL as soon as the first ingest shard is published
        work_b = tmp_path / "b" / "work"
        _write_config(tmp_path / "b.toml", base, pages, work_b)
        proc = subprocess.Popen(
            _ccurate("run", str(tmp_path / "b.toml"), "--steps", STEPS),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 300
        while time.time() < deadline and not list((work_b / "10_ingest").glob("*.done")):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = list((work_b / "10_ingest").glob("*.done"))
        planned = list((work_b / "00_plan").glob("part-*.parquet"))
        assert done and len(done) < len(planned), "the kill must land mid-stage"

        # rerun: finishes the job; nothing lost, nothing duplicated
        rerun = subprocess.run(
            _ccurate("run", str(tmp_path / "b.toml"), "--steps", STEPS),
            env=env,
            capture_output=True,
            text=True,
        )
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "resumed" in rerun.stdout
    assert _shard_files(work_b) == reference
    assert not [p for p in work_b.rglob(".*tmp*")]
