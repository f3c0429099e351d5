"""Ray and Slurm executors: failures, resubmission and job scripts behave as a user needs."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pytest

from ccurate.executor import tasks_for
from ccurate.record import Sample
from ccurate.slurm_executor import (
    STAGE_FILE,
    TASKS_FILE,
    SlurmConfig,
    SlurmError,
    SlurmExecutor,
    sbatch_script,
)
from ccurate.stage import FilterStage, Resources, Stage
from tests.test_spine import _inputs, _OddDropper

REPO = Path(__file__).resolve().parent.parent


class _Marks(Stage):
    """Passes samples through; `teardown` leaves a file behind (to see that it ran)."""

    name = "marks"

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def process(self, batch: list[Sample]) -> list[Sample]:
        return batch

    def teardown(self) -> None:
        Path(self.flag).write_text("torn down")


class _Fails(Stage):
    """Raises on the shard holding sample `bad`; sleeps `pause` seconds per other batch."""

    name = "fails"

    def __init__(self, bad: str, pause: float = 0.0) -> None:
        self.bad = bad
        self.pause = pause

    def process(self, batch: list[Sample]) -> list[Sample]:
        if any(s.url.endswith(f"/{self.bad}.jpg") for s in batch):
            raise RuntimeError("corrupt shard")
        time.sleep(self.pause)
        return batch


class _DiesThrice(Stage):
    """A GPU stage whose worker process dies on its first three shards (OOM, lost node)."""

    name = "dies"

    def __init__(self, counter: str) -> None:
        self.counter = counter

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1, gpus=0.5)

    def process(self, batch: list[Sample]) -> list[Sample]:
        path = Path(self.counter)
        n = int(path.read_text()) if path.exists() else 0
        if n < 3:
            path.write_text(str(n + 1))
            os._exit(1)
        return batch


# -- Ray: one worker process keeps one set-up stage -----------------------------------------


def test_ray_worker_releases_the_previous_stage(tmp_path: Path):
    """A worker used by the filter step and then by dedup must not keep the filter's models
    loaded for the rest of the run: the previous stage is torn down and dropped."""
    from ccurate import ray_executor as rx

    rx._STAGE_CACHE.clear()
    first, second = _Marks(str(tmp_path / "a")), _Marks(str(tmp_path / "b"))
    s1 = rx._cached_stage(pickle.dumps(first), "fp1")
    assert rx._cached_stage(pickle.dumps(first), "fp1") is s1  # reused for every shard
    rx._cached_stage(pickle.dumps(second), "fp2")
    assert list(rx._STAGE_CACHE) == ["fp2"]
    assert (tmp_path / "a").read_text() == "torn down" and not (tmp_path / "b").exists()
    rx._STAGE_CACHE.clear()


@pytest.mark.ray
@pytest.mark.slow
def test_ray_failed_shard_is_named_and_the_rest_cancelled(tmp_path: Path, ray_local):
    """A shard failing every try names itself; the shards still running are cancelled, not
    left publishing outputs behind the driver (a rerun would race them)."""
    from ccurate.ray_executor import RayExecutor

    inputs = _inputs(tmp_path, n_shards=4)
    tasks = tasks_for(inputs, tmp_path / "out")
    with pytest.raises(RuntimeError, match=r"(?s)stage fails: shard .*part-00000 .*corrupt shard"):
        RayExecutor(max_retries=0, progress=False).map(_Fails("1", pause=2.0), tasks)
    # a shard that finished before the failure keeps its marker; none may appear after it
    published = [Path(t.dst + ".done").exists() for t in tasks]
    assert not published[0] and not all(published[1:])  # 2 CPUs: some were still to run
    time.sleep(7.0)  # an uncancelled shard publishes within ~4 s (worker start + 2 s)
    assert [Path(t.dst + ".done").exists() for t in tasks] == published


@pytest.mark.ray
@pytest.mark.slow
def test_ray_dead_actor_is_replaced(tmp_path: Path, ray_local):
    """An actor that died more often than Ray restarts it must not fail every shard it
    is given: it is replaced, and the step finishes."""
    from ccurate.ray_executor import RayExecutor

    inputs = _inputs(tmp_path, n_shards=1)
    tasks = tasks_for(inputs, tmp_path / "out")
    stage = _DiesThrice(str(tmp_path / "deaths"))
    stats = RayExecutor(max_retries=3, actors=1, progress=False).map(stage, tasks)
    assert (stats.n_in, stats.shards) == (4, 1)
    assert (tmp_path / "deaths").read_text() == "3"


class _Greedy(Stage):
    """Declares more CPUs than the test's Ray instance has (captioning declares 4)."""

    name = "greedy"

    @property
    def resources(self) -> Resources:
        return Resources(cpus=4)

    def process(self, batch: list[Sample]) -> list[Sample]:
        return batch


@pytest.mark.ray
@pytest.mark.slow
def test_ray_runs_a_stage_that_asks_for_more_cpus_than_a_node_has(tmp_path: Path, ray_local):
    """The local executor runs it; Ray must not wait forever for a 4-CPU slot on 2 CPUs."""
    import threading

    from ccurate.ray_executor import RayExecutor

    tasks = tasks_for(_inputs(tmp_path, n_shards=2), tmp_path / "out")
    result: list[int] = []
    runner = threading.Thread(
        target=lambda: result.append(RayExecutor(progress=False).map(_Greedy(), tasks).n_in),
        daemon=True,
    )
    runner.start()
    runner.join(timeout=30)
    assert result == [8], "the step never finished"


# -- Slurm ----------------------------------------------------------------------------------


def _sbatch_argument(line: str) -> list[str]:
    """The arguments sbatch reads from one `#SBATCH` line (Slurm's `_get_argument` in
    src/sbatch/opt.c: white space splits, quotes group, `\\` escapes, `#` starts a comment)."""
    args, i, n = [], 0, len(line)
    while True:
        while i < n and line[i].isspace():
            i += 1
        if i >= n:
            return args
        arg, quoted, q, escape = [], False, "", False
        while i < n and (quoted or not line[i].isspace()) and line[i] != "\n":
            c = line[i]
            if escape:
                escape = False
            elif c == "\\":
                escape, i = True, i + 1
                continue
            elif quoted:
                if c == q:
                    quoted, i = False, i + 1
                    continue
            elif c in "\"'":
                quoted, q, i = True, c, i + 1
                continue
            elif c == "#":
                return args + (["".join(arg)] if arg else [])
            arg.append(c)
            i += 1
        assert not quoted, f"sbatch: unmatched {q} in {line!r}"
        args.append("".join(arg))


def test_sbatch_reads_back_log_paths_with_spaces_quotes_and_hashes(tmp_path: Path):
    job = tmp_path / "run #2" / 'it\'s "new"' / "back\\slash"
    text = sbatch_script(SlurmConfig(), FilterStage([]), job, 3)
    parsed = [
        a
        for line in text.splitlines()
        if line.startswith("#SBATCH")
        for a in _sbatch_argument(line[len("#SBATCH") :])
    ]
    assert f"--output={job / 'logs' / '%A_%a.log'}" in parsed
    assert "--array=0-2" in parsed and "--cpus-per-task=1" in parsed
    # plain values stay unquoted
    plain = sbatch_script(SlurmConfig(), FilterStage([]), tmp_path / "job", 1)
    assert f"#SBATCH --output={tmp_path / 'job' / 'logs' / '%A_%a.log'}" in plain.splitlines()


def test_slurm_relative_work_dir_survives_a_setup_cd(tmp_path: Path, slurm, monkeypatch):
    """`setup = ["cd /project", ...]` is common; a run with a relative work dir must still
    find its job folder and write its shards where the driver looks for them."""
    monkeypatch.chdir(tmp_path)
    inputs = [os.path.relpath(p, tmp_path) for p in _inputs(tmp_path, n_shards=2)]
    tasks = tasks_for(inputs, "out")
    cfg = SlurmConfig(poll_seconds=0.1, max_retries=0, setup=[f"export PYTHONPATH={REPO}", "cd /"])
    stats = SlurmExecutor(cfg, progress=False).map(FilterStage([_OddDropper()]), tasks)
    assert (stats.n_in, stats.shards) == (8, 2)
    assert all(Path(tmp_path / (t.dst + ".done")).exists() for t in tasks)


def test_slurm_bad_shard_does_not_block_its_group(tmp_path: Path, capsys):
    """One corrupt shard in an array task's group: the other shards still finish, and the
    task fails naming the bad one (its log says which shard the traceback belongs to)."""
    from ccurate.slurm_task import run_group

    inputs = _inputs(tmp_path, n_shards=3)
    tasks = tasks_for(inputs, tmp_path / "out")
    job = tmp_path / "job"
    job.mkdir()
    (job / STAGE_FILE).write_bytes(pickle.dumps(_Fails("1")))  # sample 1: shard 0
    (job / TASKS_FILE).write_text(f"[{[[t.src, t.dst] for t in tasks]}]".replace("'", '"'))
    with pytest.raises(SystemExit, match=r"array task 0: 1 of 3 shard\(s\) failed: part-00000"):
        run_group(job, 0)
    assert [Path(t.dst + ".done").exists() for t in tasks] == [False, True, True]
    out = capsys.readouterr()
    assert "fails part-00000: FAILED" in out.out and "corrupt shard" in out.err


def test_slurm_unfinished_error_names_shards(tmp_path: Path, slurm):
    """With every retry spent the step fails and names the unfinished shard."""
    inputs = _inputs(tmp_path, n_shards=2)
    tasks = tasks_for(inputs, tmp_path / "out")
    cfg = SlurmConfig(
        poll_seconds=0.1, max_retries=0, max_array_tasks=1, setup=[f"export PYTHONPATH={REPO}"]
    )
    with pytest.raises(SlurmError, match=r"1 shard\(s\) unfinished after 1 job\(s\): part-00000"):
        SlurmExecutor(cfg, progress=False).map(_Fails("1"), tasks)
    assert Path(tasks[1].dst + ".done").exists()  # its group-mate finished in the same task
