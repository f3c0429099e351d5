"""One Slurm array task: set the pickled stage up once, run its group of shards.

`python -m ccurate.slurm_task JOB_DIR INDEX`, written into the array's batch script by
`ccurate.slurm_executor`. Each shard publishes its completion marker as it finishes, so
a task killed part-way (time limit, preemption) keeps what it finished and the driver
resubmits the rest.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import traceback
from pathlib import Path

from ccurate.executor import ShardTask, run_task, set_worker_cpus, usable_cpus
from ccurate.slurm_executor import STAGE_FILE, TASKS_FILE, worker_cpus_from_env
from ccurate.stage import Stage


def task_cpus() -> int:
    """The cores this task keeps busy: its Slurm request, unless its affinity mask is
    narrower (a node whose cgroup or cpuset allows fewer); the mask without a request."""
    requested, allowed = worker_cpus_from_env(), usable_cpus()
    return min(requested, allowed) if requested else allowed


def run_group(job_dir: Path, index: int) -> int:
    """Run group `index` of the job; returns the number of shards processed.

    A shard that raises is logged by name and the group goes on with its other shards (a
    corrupt shard must not keep its group-mates from ever finishing); the task then exits
    non-zero naming the failed shards, which the driver resubmits."""
    groups = json.loads((job_dir / TASKS_FILE).read_text())
    if not 0 <= index < len(groups):
        raise SystemExit(f"array index {index} out of range: the job has {len(groups)} groups")
    stage: Stage = pickle.loads((job_dir / STAGE_FILE).read_bytes())
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    set_worker_cpus(task_cpus())
    failed: list[str] = []
    stage.setup()
    try:
        for src, dst in groups[index]:
            try:
                stats = run_task(stage, ShardTask(src, dst))
            except Exception:
                print(f"{stage.name} {Path(dst).name}: FAILED (input {src})", flush=True)
                traceback.print_exc()
                sys.stderr.flush()
                failed.append(Path(dst).name)
                continue
            print(
                f"{stage.name} {Path(dst).name}: in={stats.n_in} kept={stats.n_kept} "
                f"dropped={stats.n_dropped}" + (" (already done)" if stats.skipped_shards else ""),
                flush=True,
            )
    finally:
        stage.teardown()
    if failed:
        raise SystemExit(
            f"array task {index}: {len(failed)} of {len(groups[index])} shard(s) failed: "
            + ", ".join(failed)
        )
    return len(groups[index])


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit():
        raise SystemExit("usage: python -m ccurate.slurm_task JOB_DIR ARRAY_INDEX")
    run_group(Path(args[0]), int(args[1]))


if __name__ == "__main__":
    main()
