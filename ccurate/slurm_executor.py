"""Run the same stages as Slurm job arrays, unchanged (datatrove's Slurm executor, our markers).

Each step becomes one `sbatch` job array: its unfinished shards are split into at most
`max_array_tasks` groups, and array task `i` sets the stage up once and runs group `i`
(`ccurate.slurm_task`). Shards publish the same completion markers as on the local and
Ray executors, so the driver follows progress by reading markers on the shared
filesystem, and a step (or the whole run) resumes on any executor. When the job has
left the queue with shards still unfinished (a node failed, a task hit its time limit,
a bad shard raised), those shards are submitted again as a new array, up to
`max_retries` times; then the step fails naming the shards and their log files.

The driver itself (`ccurate run --executor slurm`) stays on the submitting node and runs
the global steps there (the dedup plan: memory, not cores, see docs/scale.md); for large
runs, submit the driver as a job of its own. Interrupting the driver cancels the array:
Ctrl-C, and SIGTERM or SIGHUP (what Slurm sends a driver job at its time limit or on
`scancel`, and `kill` by default) while an array is in flight: the driver runs `scancel`,
then exits with 128 + the signal's number. A SIGHUP ignored when the driver started
(`nohup`) stays ignored.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

from pydantic import Field

from ccurate.configbase import Section
from ccurate.executor import Executor, ShardTask
from ccurate.shardio import atomic_path, is_done, read_marker
from ccurate.stage import Stage, StageStats

log = logging.getLogger(__name__)

STAGE_FILE = "stage.pkl"
SQUEUE_RETRIES = 20  # consecutive squeue failures tolerated (one per poll)
TASKS_FILE = "tasks.json"
SCRIPT_FILE = "job.sbatch"


class SlurmConfig(Section):
    """[slurm]: how array jobs are requested (used when `[run] executor = "slurm"`)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: Annotated[str, Field(pattern=r"^(\d+-)?\d+(:\d{2}){0,2}$")] = "04:00:00"
    # cores and GPUs per array task; unset: what the stage declares (`Stage.resources`,
    # fractional GPUs rounded up: Slurm allocates whole GPUs)
    cpus_per_task: Annotated[int, Field(ge=1)] | None = None
    gpus_per_task: Annotated[int, Field(ge=0)] | None = None
    mem_per_cpu: Annotated[str, Field(pattern=r"^\d+[KMGT]?$")] | None = None
    # shards of a step are grouped into at most this many array tasks (each loads its
    # models once for its whole group); max_parallel throttles running tasks (`%N`)
    max_array_tasks: Annotated[int, Field(ge=1)] = 1000
    max_parallel: Annotated[int, Field(ge=1)] | None = None
    max_retries: Annotated[int, Field(ge=0)] = 2
    poll_seconds: Annotated[float, Field(gt=0)] = 15.0
    # shell lines run before each task (module load ..., source .venv/bin/activate)
    setup: list[str] = Field(default_factory=list)
    sbatch_args: list[str] = Field(default_factory=list)  # extra options, e.g. --constraint=x
    python: str | None = None  # interpreter on the compute nodes; default: the driver's


class SlurmError(RuntimeError):
    """A Slurm command failed, or shards stayed unfinished after every retry."""


class SlurmExecutor(Executor):
    """Executor over Slurm job arrays (`sbatch`, `squeue`, `scancel` on the PATH)."""

    def __init__(self, cfg: SlurmConfig | None = None, progress: bool = True) -> None:
        self.cfg = cfg or SlurmConfig()
        self.progress = progress

    def _run(self, stage: Stage, todo: list[ShardTask]) -> Iterator[StageStats]:
        _require("sbatch", "squeue", "scancel")
        left = list(todo)
        for attempt in range(self.cfg.max_retries + 1):
            job_dir = _job_dir(stage, left, attempt)
            with _signals_raise():
                job_id = self._submit(stage, left, job_dir)
                try:
                    left = yield from self._follow(job_id, left)
                except BaseException:
                    _scancel(job_id)  # interrupted driver, or a stats read that failed
                    raise
            if not left:
                return
        logs = _jobs_root(stage, left)
        names = ", ".join(Path(t.dst).name for t in left[:5]) + (" ..." if len(left) > 5 else "")
        raise SlurmError(
            f"stage {stage.name}: {len(left)} shard(s) unfinished after "
            f"{self.cfg.max_retries + 1} job(s): {names}; task logs under {logs}"
        )

    def _submit(self, stage: Stage, tasks: list[ShardTask], job_dir: Path) -> str:
        groups = _groups(tasks, self.cfg.max_array_tasks)
        (job_dir / "logs").mkdir(parents=True, exist_ok=True)
        with atomic_path(job_dir / STAGE_FILE) as tmp:
            tmp.write_bytes(pickle.dumps(stage))
        with atomic_path(job_dir / TASKS_FILE) as tmp:
            # absolute: an array task runs wherever its `setup` lines `cd` to
            tmp.write_text(json.dumps([[[_abs(t.src), _abs(t.dst)] for t in g] for g in groups]))
        script = job_dir / SCRIPT_FILE
        script.write_text(sbatch_script(self.cfg, stage, job_dir, len(groups)))
        proc = subprocess.run(
            ["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise SlurmError(
                f"sbatch refused the {stage.name} array ({script}): "
                f"{(proc.stderr or proc.stdout).strip()}"
            )
        job_id = proc.stdout.strip().split(";")[0]
        if not re.fullmatch(r"\d+", job_id):
            raise SlurmError(f"sbatch gave no job id for {script}: {proc.stdout.strip()!r}")
        return job_id

    def _follow(
        self, job_id: str, tasks: list[ShardTask]
    ) -> Generator[StageStats, None, list[ShardTask]]:
        """Yield each shard's stats as its marker appears, until the job leaves the queue;
        return the shards still unfinished then."""
        pending = list(tasks)
        settle = 1  # one more look after the job is gone: NFS caches directory listings
        failures = 0
        while True:
            running = _in_queue(job_id)  # asked first: markers written before it are seen
            if running is None:  # the controller did not answer: assume the job still runs
                failures += 1
                if failures > SQUEUE_RETRIES:
                    raise SlurmError(
                        f"squeue has not answered for job {job_id} {failures} times in a row"
                    )
                running = True
            else:
                failures = 0
            still = []
            for t in pending:
                if is_done(t.dst):
                    yield StageStats.from_json(read_marker(t.dst))
                else:
                    still.append(t)
            pending = still
            if not pending:
                return pending
            if not running:
                if not settle:
                    return pending
                settle -= 1
            time.sleep(self.cfg.poll_seconds)


def sbatch_script(cfg: SlurmConfig, stage: Stage, job_dir: Path, n_tasks: int) -> str:
    """The array job's batch script: resources from the config, else from the stage."""
    res = stage.resources
    cpus = cfg.cpus_per_task or max(1, math.ceil(res.cpus))
    gpus = cfg.gpus_per_task if cfg.gpus_per_task is not None else math.ceil(res.gpus)
    array = f"0-{n_tasks - 1}" + (f"%{cfg.max_parallel}" if cfg.max_parallel else "")
    opts = [
        f"--job-name=ccurate-{stage.name}",
        f"--array={array}",
        "--ntasks=1",
        f"--cpus-per-task={cpus}",
        f"--time={cfg.time}",
        f"--output={job_dir / 'logs' / '%A_%a.log'}",
    ]
    if gpus:
        opts.append(f"--gres=gpu:{gpus}")
    if cfg.mem_per_cpu:
        opts.append(f"--mem-per-cpu={cfg.mem_per_cpu}")
    for flag, value in (("partition", cfg.partition), ("account", cfg.account), ("qos", cfg.qos)):
        if value:
            opts.append(f"--{flag}={value}")
    opts += cfg.sbatch_args
    python = cfg.python or sys.executable
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH {_sbatch_quote(o)}" for o in opts]
    lines += ["set -euo pipefail", *cfg.setup]
    lines.append(
        f"exec {shlex.quote(python)} -m ccurate.slurm_task {shlex.quote(str(job_dir))} "
        '"$SLURM_ARRAY_TASK_ID"'
    )
    return "\n".join(lines) + "\n"


def _sbatch_quote(option: str) -> str:
    """An option as sbatch reads it back from a `#SBATCH` line: sbatch splits the line at
    white space, takes an unquoted `#` as a comment and strips quotes and backslashes, so a
    log path with a space, `#` or quote is double-quoted with `\\` and `"` escaped."""
    if "\n" in option or "\r" in option:
        raise SlurmError(f"a #SBATCH option cannot hold a line break: {option!r}")
    if not re.search(r"[\s#\"'\\]", option):
        return option
    return '"' + option.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _groups(tasks: list[ShardTask], max_groups: int) -> list[list[ShardTask]]:
    """At most `max_groups` contiguous groups of near-equal size, in task order."""
    n = max(1, min(max_groups, len(tasks)))
    size, extra = divmod(len(tasks), n)
    out, i = [], 0
    for g in range(n):
        j = i + size + (1 if g < extra else 0)
        out.append(tasks[i:j])
        i = j
    return out


def _jobs_root(stage: Stage, tasks: list[ShardTask]) -> Path:
    """Beside the step's outputs: `_slurm/<stage>`, one folder per submitted job in it."""
    return Path(os.path.abspath(tasks[0].dst)).parent / "_slurm" / stage.name


def _job_dir(stage: Stage, tasks: list[ShardTask], attempt: int) -> Path:
    """`<_jobs_root>/<time>-<attempt>-<random>`."""
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{attempt}-{uuid.uuid4().hex[:6]}"
    return _jobs_root(stage, tasks) / stamp


def _abs(path: str) -> str:
    return os.path.abspath(path)


def _require(*commands: str) -> None:
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        raise SlurmError(
            f"the Slurm executor needs {', '.join(missing)} on the PATH (run the driver on a "
            "Slurm login or compute node), or choose --executor local or ray"
        )


def _in_queue(job_id: str) -> bool | None:
    """Whether any task of the array is still pending or running; None when squeue failed
    (a busy controller times out now and then: the caller asks again)."""
    proc = subprocess.run(
        ["squeue", "--noheader", "--jobs", job_id, "--format=%i"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        # squeue exits 1 for a job id it no longer knows (finished and purged)
        if "Invalid job id" in proc.stderr:
            return False
        log.warning("squeue failed for job %s: %s", job_id, proc.stderr.strip())
        return None
    return bool(proc.stdout.strip())


def _scancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], capture_output=True, check=False)


# the signals that end a driver without a Python exception by default (SIGINT already
# raises KeyboardInterrupt, which unwinds through the same clean-up)
CANCEL_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers


@contextmanager
def _signals_raise() -> Iterator[None]:
    """While an array is in flight, SIGTERM/SIGHUP raise `SystemExit(128 + signum)` instead
    of killing the driver outright, so the `except BaseException` around the array runs
    `scancel` (otherwise the array runs on and a rerun submits a second one for the same
    shards). Later signals, while that clean-up runs, are ignored: it finishes. Only the
    main thread can set handlers; a signal ignored at entry (`nohup`) stays ignored; the
    previous handlers come back on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if fired:
            return  # the first one is cancelling the array already
        fired.append(signum)
        log.warning("signal %d: cancelling the Slurm array before exiting", signum)
        raise SystemExit(128 + signum)

    previous: dict[signal.Signals, _Handler] = {}
    try:
        for sig in CANCEL_SIGNALS:
            old = signal.getsignal(sig)
            if old is signal.SIG_IGN or old is None:  # ignored, or set outside Python
                continue
            previous[sig] = old
            signal.signal(sig, handler)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def worker_cpus_from_env() -> int | None:
    """The cores Slurm gave this array task (`SLURM_CPUS_PER_TASK`), if set."""
    value = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(value) if value.isdigit() and int(value) > 0 else None
