"""The Slurm executor: job arrays over the same markers, against stand-in Slurm commands."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ccurate.executor import LocalExecutor, ShardTask, tasks_for
from ccurate.record import Sample
from ccurate.slurm_executor import (
    SCRIPT_FILE,
    TASKS_FILE,
    SlurmConfig,
    SlurmError,
    SlurmExecutor,
    _groups,
    sbatch_script,
)
from ccurate.stage import FilterStage, Resources, Stage
from tests import fake_slurm
from tests.executor_compare import demo_on, release_sums
from tests.test_spine import _inputs, _OddDropper

REPO = Path(__file__).resolve().parent.parent


def _cfg(**kw: object) -> SlurmConfig:
    # array tasks import the test's stage classes: the repo on their PYTHONPATH, as a
    # site's `setup` lines would activate its environment
    setup = [f"export PYTHONPATH={REPO}"]
    return SlurmConfig(poll_seconds=0.1, setup=setup, **kw)  # type: ignore[arg-type]


def _jobs(tasks: list[ShardTask], stage: str) -> list[Path]:
    root = Path(tasks[0].dst).parent / "_slurm" / stage
    return sorted(root.iterdir())


def test_slurm_matches_local_and_resumes_local_markers(tmp_path: Path, slurm: Path):
    inputs = _inputs(tmp_path, n_shards=5)
    LocalExecutor(1, progress=False).map(
        FilterStage([_OddDropper()]), tasks_for(inputs, tmp_path / "a")
    )
    tasks = tasks_for(inputs, tmp_path / "b")
    stats = SlurmExecutor(_cfg(max_array_tasks=2), progress=False).map(
        FilterStage([_OddDropper()]), tasks
    )
    assert (stats.n_in, stats.n_kept, stats.n_dropped, stats.shards) == (20, 10, 10, 5)
    assert stats.drops == {"odd_number": 10}
    for p in sorted((tmp_path / "a").iterdir()):
        if p.name.endswith((".tar", ".parquet")):
            assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes(), p.name
    (job,) = _jobs(tasks, "filter")
    groups = json.loads((job / TASKS_FILE).read_text())
    assert [len(g) for g in groups] == [3, 2]  # 5 shards in 2 array tasks
    assert "#SBATCH --array=0-1" in (job / SCRIPT_FILE).read_text()
    logs = sorted(p.name for p in (job / "logs").iterdir())
    assert (
        len(logs) == 2
        and "filter part-00000: in=4 kept=2 dropped=2" in (job / "logs" / logs[0]).read_text()
    )

    # a run started locally is finished on Slurm: only the unfinished shard is submitted
    local = tasks_for(inputs, tmp_path / "a")
    Path(local[3].dst + ".done").unlink()
    stats = SlurmExecutor(_cfg(), progress=False).map(FilterStage([_OddDropper()]), local)
    assert stats.skipped_shards == 4 and stats.n_in == 20
    (job,) = _jobs(local, "filter")
    assert json.loads((job / TASKS_FILE).read_text()) == [[[local[3].src, local[3].dst]]]
    sbatch_calls = [c for c in fake_slurm.calls(slurm) if c.startswith("sbatch")]
    assert len(sbatch_calls) == 2


class _FailsOn(Stage):
    """Raises on one shard's samples: always, or only while a flag file exists."""

    name = "flaky"

    def __init__(self, url_part: str, flag: str | None = None) -> None:
        self.url_part = url_part
        self.flag = flag

    def process(self, batch: list[Sample]) -> list[Sample]:
        if any(self.url_part in s.url for s in batch):
            if self.flag is None:
                raise RuntimeError("corrupt shard")
            if os.path.exists(self.flag):
                os.unlink(self.flag)
                raise RuntimeError("node lost")
        return batch


def test_unfinished_shards_are_resubmitted_once_then_named(tmp_path: Path, slurm: Path):
    inputs = _inputs(tmp_path, n_shards=3)
    flag = tmp_path / "fail-once"
    flag.write_text("")
    tasks = tasks_for(inputs, tmp_path / "out")
    url_part = "/5."  # sample 5 lives in the second shard
    stats = SlurmExecutor(_cfg(max_retries=1), progress=False).map(
        _FailsOn(url_part, str(flag)), tasks
    )
    assert stats.n_in == 12 and stats.shards == 3
    retry = _jobs(tasks, "flaky")[1]
    assert json.loads((retry / TASKS_FILE).read_text()) == [[[tasks[1].src, tasks[1].dst]]]

    out = tasks_for(inputs, tmp_path / "out2")
    with pytest.raises(SlurmError, match=r"1 shard\(s\) unfinished after 2 job\(s\): part-00001"):
        SlurmExecutor(_cfg(max_retries=1), progress=False).map(_FailsOn(url_part), out)
    assert all(Path(t.dst + ".done").exists() for t in (out[0], out[2]))
    logs = [p for j in _jobs(out, "flaky") for p in (j / "logs").iterdir()]
    assert any("corrupt shard" in p.read_text() for p in logs)  # the traceback is kept


def test_squeue_timeouts_are_retried_then_reported(tmp_path: Path, slurm: Path, monkeypatch):
    import ccurate.slurm_executor as se

    inputs = _inputs(tmp_path, n_shards=2)
    monkeypatch.setenv("FAKE_SQUEUE_FAILURES", "3")  # a busy controller, then answers
    stats = SlurmExecutor(_cfg(), progress=False).map(
        FilterStage([_OddDropper()]), tasks_for(inputs, tmp_path / "a")
    )
    assert stats.n_in == 8 and (slurm / "squeue_failures").read_text() == "3"
    (slurm / "squeue_failures").unlink()
    monkeypatch.setenv("FAKE_SQUEUE_FAILURES", "1000")  # never answers again
    monkeypatch.setattr(se, "SQUEUE_RETRIES", 2)
    monkeypatch.setattr(se, "is_done", lambda dst: False)
    with pytest.raises(SlurmError, match="squeue has not answered for job 1001 3 times"):
        SlurmExecutor(_cfg(), progress=False).map(
            FilterStage([_OddDropper()]), tasks_for(inputs, tmp_path / "b")
        )
    assert "scancel 1001" in fake_slurm.calls(slurm)  # the array is not left running


def test_interrupted_driver_cancels_the_array(tmp_path: Path, slurm: Path, monkeypatch):
    import ccurate.slurm_executor as se

    inputs = _inputs(tmp_path, n_shards=2)

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(se.time, "sleep", interrupt)
    monkeypatch.setattr(se, "is_done", lambda dst: False)  # nothing finished yet
    with pytest.raises(KeyboardInterrupt):
        SlurmExecutor(_cfg(), progress=False).map(
            FilterStage([_OddDropper()]), tasks_for(inputs, tmp_path / "out")
        )
    assert any(c == "scancel 1000" for c in fake_slurm.calls(slurm))


def test_sbatch_refusal_and_missing_commands_are_clear(tmp_path: Path, slurm, monkeypatch):
    tasks = tasks_for(_inputs(tmp_path, n_shards=1), tmp_path / "out")
    monkeypatch.setenv("FAKE_SBATCH_ERROR", "invalid partition specified: gpu-big")
    with pytest.raises(SlurmError, match=r"sbatch refused the filter array .*invalid partition"):
        SlurmExecutor(_cfg(), progress=False).map(FilterStage([_OddDropper()]), tasks)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SlurmError, match="needs sbatch, squeue, scancel on the PATH"):
        SlurmExecutor(_cfg(), progress=False).map(FilterStage([_OddDropper()]), tasks)


class _GpuStage(Stage):
    name = "captioner"
    resources = Resources(cpus=3.5, gpus=0.5)

    def process(self, batch: list[Sample]) -> list[Sample]:
        return batch


def test_script_asks_for_what_the_stage_declares_unless_configured(tmp_path: Path):
    cfg = SlurmConfig(
        partition="gpu",
        account="lab",
        qos="high",
        time="1-00:00:00",
        mem_per_cpu="8G",
        max_parallel=16,
        setup=["module load cuda", "source /opt/venv/bin/activate"],
        sbatch_args=["--constraint=h100"],
        python="/opt/venv/bin/python",
    )
    text = sbatch_script(cfg, _GpuStage(), tmp_path / "job", 40)
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for want in (
        "#SBATCH --job-name=ccurate-captioner",
        "#SBATCH --array=0-39%16",
        "#SBATCH --cpus-per-task=4",  # 3.5 rounded up
        "#SBATCH --gres=gpu:1",  # Slurm allocates whole GPUs
        "#SBATCH --time=1-00:00:00",
        "#SBATCH --mem-per-cpu=8G",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=h100",
        f"#SBATCH --output={tmp_path / 'job' / 'logs' / '%A_%a.log'}",
    ):
        assert want in lines, want
    assert lines.index("module load cuda") < lines.index(lines[-1])
    assert lines[-1].startswith("exec /opt/venv/bin/python -m ccurate.slurm_task ")
    assert lines[-1].endswith('"$SLURM_ARRAY_TASK_ID"')
    cpu = sbatch_script(SlurmConfig(cpus_per_task=8, gpus_per_task=0), _GpuStage(), tmp_path, 1)
    assert "#SBATCH --cpus-per-task=8" in cpu and "--gres" not in cpu
    assert "#SBATCH --array=0-0" in cpu.splitlines()  # no throttle unless configured


@pytest.mark.parametrize(
    ("n", "most", "sizes"),
    [(10, 4, [3, 3, 2, 2]), (3, 1000, [1, 1, 1]), (7, 1, [7]), (1, 5, [1])],
)
def test_groups_are_contiguous_and_near_equal(n: int, most: int, sizes: list[int]):
    tasks = [ShardTask(f"in/{i}", f"out/{i}") for i in range(n)]
    groups = _groups(tasks, most)
    assert [len(g) for g in groups] == sizes
    assert [t for g in groups for t in g] == tasks


def test_config_selects_and_validates_slurm(tmp_path: Path):
    from ccurate.cli import make_executor
    from ccurate.config import ConfigError, load_config

    path = tmp_path / "c.toml"
    path.write_text('[run]\nexecutor = "slurm"\n[slurm]\npartition = "cpu"\nmax_parallel = 8\n')
    ex = make_executor(load_config(path))
    assert isinstance(ex, SlurmExecutor) and ex.cfg.partition == "cpu"
    path.write_text('[run]\nexecutor = "slurm"\n[slurm]\ntime = "4h"\n')
    with pytest.raises(ConfigError, match=r"slurm\.time"):
        load_config(path)
    path.write_text("[slurm]\nnodes = 3\n")
    with pytest.raises(ConfigError, match=r"slurm\.nodes"):
        load_config(path)


def test_run_help_shows_the_config_keys_it_overrides():
    from typer.testing import CliRunner

    from ccurate.cli import app

    out = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).stdout
    assert "local, ray or slurm (overrides [run].executor)" in out
    assert "(overrides [run].workers)" in out


def test_slurm_and_local_pipelines_publish_the_same_release(tmp_path: Path, slurm: Path):
    """The whole pipeline (ingest over loopback HTTP .. release) with every step's shards run
    by array tasks in fresh processes: each real stage survives its pickle file."""
    runs = demo_on(
        tmp_path,
        {"local": LocalExecutor(2, progress=False), "slurm": SlurmExecutor(_cfg(), progress=False)},
    )
    (local, _), (on_slurm, cfg) = runs["local"], runs["slurm"]
    want, got = release_sums(local), release_sums(on_slurm)
    assert set(got) == set(want) and "manifest.parquet" in want
    for path, digest in want.items():
        if path.endswith((".tar", ".parquet")):
            assert got[path] == digest, path
    work = Path(cfg.run.work_dir)
    arrays = {p.parent.name for p in work.glob("*/_slurm/*/*")}
    assert {"ingest", "filter"} <= arrays  # these steps ran as job arrays


def test_task_cpus_take_the_narrower_of_request_and_affinity(monkeypatch) -> None:
    """A task asked for 8 CPUs on a node whose cpuset allows 2 must not start 8 decode
    threads; without a request the affinity mask decides."""
    from ccurate import executor as executor_mod
    from ccurate.slurm_task import task_cpus

    monkeypatch.setattr(executor_mod.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    assert task_cpus() == 2
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert task_cpus() == 1
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert task_cpus() == 2
