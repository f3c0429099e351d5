"""The Ray executor runs the same stages as the local one and resumes its runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ccurate.executor import LocalExecutor, tasks_for
from ccurate.stage import FilterStage
from tests.executor_compare import demo_on, release_sums
from tests.test_spine import _inputs, _OddDropper

pytestmark = pytest.mark.ray


def test_local_executor_does_not_import_ray():
    import subprocess

    code = "import ccurate.executor, ccurate.pipeline, sys; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_ray_matches_local_and_resumes_local_markers(tmp_path: Path, ray_local):
    from ccurate.ray_executor import RayExecutor

    inputs = _inputs(tmp_path)
    LocalExecutor(1, progress=False).map(
        FilterStage([_OddDropper()]), tasks_for(inputs, tmp_path / "a")
    )
    stats = RayExecutor(progress=False).map(
        FilterStage([_OddDropper()]), tasks_for(inputs, tmp_path / "b")
    )
    assert (stats.n_in, stats.n_kept, stats.n_dropped) == (12, 6, 6)
    for p in sorted((tmp_path / "a").iterdir()):
        if p.name.endswith((".tar", ".parquet")):
            assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes(), p.name
    # a run started locally is finished by Ray: only the unfinished shard is redone
    tasks = tasks_for(inputs, tmp_path / "a")
    Path(tasks[2].dst + ".done").unlink()
    stats = RayExecutor(progress=False).map(FilterStage([_OddDropper()]), tasks)
    assert stats.skipped_shards == 2 and stats.n_in == 12


def test_ray_and_local_pipelines_publish_the_same_release(tmp_path: Path, ray_local):
    """The whole pipeline (ingest over loopback HTTP .. release) on both executors."""
    from ccurate.ray_executor import RayExecutor

    runs = demo_on(
        tmp_path, {"local": LocalExecutor(2, progress=False), "ray": RayExecutor(progress=False)}
    )
    cfg = runs["ray"][1]
    sums = {name: release_sums(root) for name, (root, _) in runs.items()}
    data = [p for p in sums["local"] if p.endswith((".tar", ".parquet"))]
    assert any(p.endswith(".tar") for p in data) and "manifest.parquet" in data
    for path in data:
        assert sums["ray"].get(path) == sums["local"][path], path
    assert set(sums["ray"]) == set(sums["local"])
    # the work shards agree too, and every step finished on Ray
    for step in ("10_ingest", "20_filter", "30_dedup", "40_caption"):
        assert (Path(cfg.run.work_dir) / step / "_COMPLETE").exists()
