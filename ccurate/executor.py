"""Executors run a stage over shards: resumable through completion markers.

The unit of work is a `ShardTask`: one input shard -> one output shard. A task
whose output marker exists is skipped (its stats are read from the marker); an
unfinished one is cleared and redone, so a run killed at any moment finishes on
rerun with nothing lost and nothing duplicated. The markers live on the shared
filesystem, so the local and Ray executors can resume each other's runs.
"""

from __future__ import annotations

import multiprocessing.util
import os
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.queues import SimpleQueue
from pathlib import Path

from ccurate.progress import Progress
from ccurate.record import Sample, make_key
from ccurate.shardio import (
    ShardWriter,
    clear_shard,
    is_done,
    iter_samples,
    read_marker,
)
from ccurate.stage import Stage, StageStats, timed_process


@dataclass(frozen=True)
class ShardTask:
    """Map input shard `src` to output shard `dst` (both prefixes)."""

    src: str
    dst: str


def run_task(stage: Stage, task: ShardTask) -> StageStats:
    """Process one shard with a stage that is already set up; publish atomically."""
    if is_done(task.dst):
        stats = StageStats.from_json(read_marker(task.dst))
        stats.skipped_shards = 1
        return stats
    clear_shard(task.dst)
    stats = StageStats(stage.name, shards=1)
    writer = ShardWriter(task.dst)
    # a source stage can make one key twice (two planned pages that redirect to the same
    # page give the same images): the repeat is recorded as a drop, not a crash
    seen: set[str] | None = None if stage.preserves_keys else set()
    t0 = time.perf_counter()
    try:
        for batch in iter_samples(task.src, batch_size=stage.batch_size):
            stats.n_in += len(batch)
            for sample in timed_process(stage, batch, stats):
                if seen is not None:
                    if sample.key in seen:
                        _drop_repeat(sample, stats, stage.name, len(seen))
                    seen.add(sample.key)
                writer.write(sample)
        stage.checkpoint()
    except BaseException:
        writer.abort()
        raise
    stats.seconds = time.perf_counter() - t0
    writer.commit(stats.to_json())
    return stats


def _drop_repeat(sample: Sample, stats: StageStats, by: str, row: int) -> None:
    """A key already written to this shard: dropped as `duplicate_url` (key = url + page)
    under a key of its own that names the first (`duplicate_of`), counted once."""
    if sample.kept:
        stats.n_kept -= 1
        stats.n_dropped += 1
    else:
        stats.drops[sample.drop_reason or "unknown"] -= 1
        stats.drops += Counter()  # drop zero counts
    stats.drops["duplicate_url"] += 1
    first = sample.key
    sample.key = make_key(f"dup:{first}:{row}")  # row: this shard's rows so far, unique
    sample.duplicate_of = first
    sample.drop("duplicate_url", by)


# -- worker-process state: one set-up stage per process, reused for every shard --
_WORKER_STAGE: Stage | None = None
_WORKER_SETUP_ERROR: Exception | None = None  # what stage.setup() raised in this worker
_Note = tuple[int, str, bool]  # (worker pid, input shard, started: else finished)
_WORKER_NOTES: SimpleQueue[_Note | None] | None = None
_WORKER_CPUS: int | None = None  # this process's share of the cores, set by its executor


def set_worker_cpus(n: int) -> None:
    global _WORKER_CPUS
    _WORKER_CPUS = max(1, n)


def worker_cpus() -> int:
    """Cores this worker process should keep busy (e.g. its decode threads): the share its
    executor gave it (usable cores / local workers; the CPUs a Ray task reserves), or every
    usable core when a stage runs in-process."""
    return _WORKER_CPUS or usable_cpus()


def _exit_with_parent(parent: int, poll_s: float = 0.5) -> None:
    """End this worker process when the driver that started it is gone.

    A pool worker holds both ends of its task pipe, so a driver killed with SIGKILL
    leaves it blocked on that pipe forever: an orphan holding its stage's models
    (GPU memory) and, mid-shard, racing the rerun that redoes the same shard."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="ccurate-parent-watch", daemon=True).start()


def _init_worker(
    stage: Stage,
    cpus: int,
    parent: int | None = None,
    notes: SimpleQueue[_Note | None] | None = None,
) -> None:
    """Set the stage up once in a pool worker. A setup error is kept and raised by each of
    the worker's tasks: raised here it would only break the pool, and the driver would see
    a bare BrokenProcessPool instead of the stage's own error (missing weights, ...)."""
    global _WORKER_STAGE, _WORKER_SETUP_ERROR, _WORKER_NOTES
    if parent is not None:
        _exit_with_parent(parent)
        # Ctrl-C reaches the whole process group: the driver stops the workers (`_stop_pool`);
        # a worker acting on it itself would only abandon its shard and take the next one
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_NOTES = notes
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    set_worker_cpus(cpus)
    try:
        stage.setup()
    except Exception as err:
        _WORKER_SETUP_ERROR = err
        return
    _WORKER_STAGE = stage
    # teardown when the pool shuts the worker down (multiprocessing runs its finalizers
    # there; atexit does not run in pool children): stages log their totals in it
    multiprocessing.util.Finalize(None, stage.teardown, exitpriority=10)


def _run_in_worker(task: ShardTask) -> StageStats:
    if _WORKER_SETUP_ERROR is not None:
        raise _WORKER_SETUP_ERROR
    assert _WORKER_STAGE is not None, "worker not initialised"
    if _WORKER_NOTES is None:
        return run_task(_WORKER_STAGE, task)
    # written before the shard starts (no feeder thread to lose it): a worker that dies
    # on its first image is named too
    _WORKER_NOTES.put((os.getpid(), task.src, True))
    try:
        return run_task(_WORKER_STAGE, task)
    finally:
        _WORKER_NOTES.put((os.getpid(), task.src, False))


def _stop_pool(pool: ProcessPoolExecutor, grace_s: float = 1.0) -> None:
    """Cancel the shards not started and end the pool's workers at once (SIGTERM, then
    SIGKILL after `grace_s`), instead of `shutdown(wait=True)` running every queued shard.

    A shard cut off mid-way is never half-published: its files go under temporary names
    and its completion marker is written last (`ShardWriter.commit`), so a rerun clears and
    redoes it, and keeps every shard that had finished."""
    # the pool forgets its processes and manager thread in shutdown(): taken first
    procs = list((getattr(pool, "_processes", None) or {}).values())
    manager = getattr(pool, "_executor_manager_thread", None)
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(grace_s)
    if manager is not None:  # it sees the workers gone, fails the futures left, and ends
        manager.join(grace_s)


class WorkerDied(BrokenProcessPool):
    """A local worker process ended abruptly (OOM killer, a crash in native code): names
    the stage and the shards that were in flight, so the culprit input can be found."""


def _read_notes(notes: SimpleQueue[_Note | None], in_flight: dict[str, int]) -> threading.Thread:
    """A driver thread applying the workers' start/end notes to `in_flight` (input shard ->
    worker pid) as they come, so the pipe never fills; a `None` note ends it."""

    def read() -> None:
        while True:
            try:
                note = notes.get()
            except (OSError, EOFError, ValueError):
                return
            if note is None:
                return
            pid, src, started = note
            if started:
                in_flight[src] = pid
            else:
                in_flight.pop(src, None)

    thread = threading.Thread(target=read, name="ccurate-worker-notes", daemon=True)
    thread.start()
    return thread


def _died_message(stage: Stage, in_flight: dict[str, int], left: list[ShardTask]) -> str:
    if in_flight:
        shards = ", ".join(f"{src} (pid {pid})" for src, pid in sorted(in_flight.items()))
        where = f"while on shard(s) {shards}"
    else:  # no note came through: the unfinished shards, the culprit among them
        names = ", ".join(t.src for t in left[:5]) + (" ..." if len(left) > 5 else "")
        where = f"with {len(left)} shard(s) unfinished: {names}"
    return (
        f"stage '{stage.name}': a worker process died abruptly (killed by the OOM killer? "
        f"a crash in native code?) {where}; finished shards are kept: rerun to resume, "
        "with fewer workers if memory ran out"
    )


class Executor(ABC):
    """Runs the tasks of one stage; returns the summed stats.

    The shared part lives here so every executor resumes the same way: tasks
    whose marker exists are skipped, the stage's global `prepare` step runs
    once when anything is left to do, and only then are shards mapped.
    """

    progress: bool = True

    def map(self, stage: Stage, tasks: list[ShardTask], label: str | None = None) -> StageStats:
        total = StageStats(stage.name)
        todo: list[ShardTask] = []
        for t in tasks:
            if is_done(t.dst):
                total.add(run_task(stage, t))  # reads the marker only
            else:
                todo.append(t)
        if not todo:
            return total
        if tasks:
            scratch = Path(tasks[0].dst).parent / "_prepare"
            scratch.mkdir(parents=True, exist_ok=True)
            stage.prepare([t.src for t in tasks], str(scratch))
        bar = Progress(label or stage.name, total=len(todo), enabled=self.progress)
        results = self._run(stage, todo)
        try:
            for stats in results:
                total.add(stats)
                bar.advance()
        finally:
            bar.close()
            if isinstance(results, Generator):
                # if the loop raised, the executor's clean-up (cancelling Ray tasks or a
                # Slurm array) runs now, not whenever the generator is garbage-collected
                results.close()
        return total

    @abstractmethod
    def _run(self, stage: Stage, todo: list[ShardTask]) -> Iterator[StageStats]:
        """Run the unfinished tasks, yielding each one's stats as it completes."""


class LocalExecutor(Executor):
    """Processes on this machine. `workers=1` runs in-process (easy to debug)."""

    def __init__(self, workers: int = 1, progress: bool = True) -> None:
        self.workers = max(1, workers)
        self.progress = progress

    def _run(self, stage: Stage, todo: list[ShardTask]) -> Iterator[StageStats]:
        workers = self._workers_for(stage, len(todo))
        if workers == 1:
            stage.setup()
            try:
                for t in todo:
                    yield run_task(stage, t)
            finally:
                stage.teardown()
            return
        ctx = get_context("spawn")
        notes: SimpleQueue[_Note | None] = ctx.SimpleQueue()
        in_flight: dict[str, int] = {}  # input shard -> the worker on it
        reader = _read_notes(notes, in_flight)

        stopped = False

        def stop_reading(wait_s: float = 5) -> None:  # every note written before is read then
            nonlocal stopped
            if stopped:
                return
            stopped = True
            if reader.is_alive():
                # from a thread: a worker killed inside its own put holds the queue's write
                # lock for ever, and the driver must not wait on it
                threading.Thread(target=notes.put, args=(None,), daemon=True).start()
                reader.join(timeout=wait_s)

        try:
            with ProcessPoolExecutor(
                max_workers=workers,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(stage, usable_cpus() // workers, os.getpid(), notes),
            ) as pool:
                try:
                    futures = [pool.submit(_run_in_worker, t) for t in todo]
                    for fut in as_completed(futures):
                        try:
                            stats = fut.result()
                        except BrokenProcessPool as err:
                            stop_reading()
                            left = [t for t in todo if not is_done(t.dst)]
                            raise WorkerDied(_died_message(stage, dict(in_flight), left)) from err
                        yield stats
                except (KeyboardInterrupt, SystemExit, GeneratorExit):
                    # Ctrl-C, a signal turned into SystemExit, or the caller giving up on
                    # the results: stop now, not after every shard already handed out
                    _stop_pool(pool)
                    stop_reading(wait_s=0.5)  # the notes are not needed: no long wait
                    raise
        finally:
            stop_reading()
            notes.close()

    def _workers_for(self, stage: Stage, n_tasks: int) -> int:
        # GPU stages get one worker per visible GPU at most; CPU stages share the cores.
        n = min(self.workers, n_tasks)
        if stage.resources.gpus > 0:
            n = min(n, max(1, _visible_gpus()))
        return max(1, n)


def usable_cpus() -> int:
    """CPU cores this process may run on: its affinity mask (Slurm, taskset), not the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - platforms without affinity masks
        return os.cpu_count() or 1


def _visible_gpus() -> int:
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # pragma: no cover - torch missing or broken
        return 0


def tasks_for(inputs: Iterable[str | Path], out_dir: str | Path) -> list[ShardTask]:
    """One task per input shard; the output keeps the input's shard name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [ShardTask(str(p), str(out_dir / Path(p).name)) for p in inputs]
