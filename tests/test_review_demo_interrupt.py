"""Ctrl-C stops a local step at once; the demo's interrupt message does not promise a resume."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from ccurate import cli
from ccurate.executor import LocalExecutor, tasks_for
from ccurate.record import Sample
from ccurate.shardio import is_done, iter_samples
from ccurate.stage import Stage
from tests.test_spine import _inputs, sample


class SlowStage(Stage):
    """Keeps every sample after a pause per shard; notes in `log_dir` which worker set it
    up and which shard it started and finished."""

    name = "slow"

    def __init__(self, log_dir: Path, sleep_s: float) -> None:
        self.log_dir = log_dir
        self.sleep_s = sleep_s

    def setup(self) -> None:
        (self.log_dir / f"worker-{os.getpid()}").touch()

    def process(self, batch: list[Sample]) -> list[Sample]:
        (self.log_dir / f"start-{batch[0].key}-{os.getpid()}").touch()
        time.sleep(self.sleep_s)
        (self.log_dir / f"end-{batch[0].key}").touch()
        return batch


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_stops_the_local_workers_at_once_and_a_rerun_finishes(tmp_path: Path) -> None:
    """Ctrl-C waited for every shard already handed to the pool (`shutdown(wait=True)`), and a
    worker hit by it only dropped its shard and took the next: a demo step ran on for minutes
    holding its port. Now the workers are stopped at once and the cut-off shard is redone."""
    n = 8
    inputs = _inputs(tmp_path, n_shards=n, per=1)
    out = tmp_path / "out"
    log = tmp_path / "log"
    log.mkdir()
    tasks = tasks_for(inputs, out)
    sent: list[float] = []

    def ctrl_c() -> None:  # as a terminal does: SIGINT to the driver and to its workers
        deadline = time.monotonic() + 60
        while not (started := list(log.glob("start-*"))) and time.monotonic() < deadline:
            time.sleep(0.02)
        for p in started:
            os.kill(int(p.name.rsplit("-", 1)[1]), signal.SIGINT)
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    # Python's own Ctrl-C handler, as an interactive CLI has it: a test run started in the
    # background (`cmd &` from a script) inherits SIGINT ignored, and Python keeps it so
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=ctrl_c, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            LocalExecutor(2, progress=False).map(SlowStage(log, sleep_s=2.0), tasks)
    finally:
        signal.signal(signal.SIGINT, previous)
    took = time.monotonic() - sent[0]
    assert took < 3.0, f"Ctrl-C took {took:.1f}s: the step ran on"

    workers = [int(p.name.split("-")[1]) for p in log.glob("worker-*")]
    assert workers and not multiprocessing.active_children()
    assert not [pid for pid in workers if _alive(pid)]
    started = {p.name.split("-")[1] for p in log.glob("start-*")}
    ended = {p.name.split("-", 1)[1] for p in log.glob("end-*")}
    done = {t for t in tasks if is_done(t.dst)}
    assert len(done) < n
    # a shard cut off mid-way is not published: only finished shards have their marker
    assert all(sample(int(Path(t.src).name.split("-")[1])).key in ended for t in done)
    assert started - ended, "no shard was cut off mid-way"

    total = LocalExecutor(2, progress=False).map(SlowStage(log, sleep_s=0.05), tasks)
    assert (total.shards, total.n_in, total.n_kept) == (n, n, n)
    assert total.skipped_shards == len(done)
    keys = [s.key for t in tasks for batch in iter_samples(t.dst) for s in batch]
    assert sorted(keys) == sorted(sample(i).key for i in range(n))
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


def test_interrupted_demo_says_it_starts_afresh_and_a_run_says_it_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The resume hint was printed only by `main`, after typer had already turned Ctrl-C
    into a silent exit 130; and for `ccurate demo`, which remakes its work, it was untrue."""

    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("ccurate.demo.run.run_demo", interrupted)
    monkeypatch.setattr(cli, "_pipeline", interrupted)
    for args, said in [
        (["demo", "--out", str(tmp_path / "d")], "`ccurate demo` starts afresh on every run"),
        (["run", str(tmp_path / "c.toml")], "interrupted: rerun the same command to resume"),
    ]:
        monkeypatch.setattr("sys.argv", ["ccurate", *args])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        assert exc.value.code == 130
        err = capsys.readouterr().err
        assert said in err and ("resume" in err) == (args[0] == "run")
