"""Run the same stages on a Ray cluster, unchanged.

CPU stages run as Ray tasks over shards; stages that declare GPUs run on an
actor pool whose actors load their models once. Tasks and actors request the
stage's declared `Resources`: CPUs, fractional GPUs and memory (Ray's `memory`
resource, in bytes), CPUs and memory capped at the largest node's. Task workers
also keep one set-up stage per process, so CPU stages with models (OCR, NSFW)
load them once per worker, not per shard. Failed shards are retried; completion
markers on the shared filesystem are the same ones the local executor writes, so
a run can resume on either executor.

Ray is an optional extra: importing this module is the only place that
imports `ray`, and the local executor never does.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Iterator
from typing import Any

from ccurate.executor import Executor, ShardTask, run_task, set_worker_cpus
from ccurate.stage import Stage, StageStats

log = logging.getLogger(__name__)

# stage fingerprint -> set-up stage, per Ray worker process
_STAGE_CACHE: dict[str, Stage] = {}


def _fingerprint(stage: Stage) -> str:
    return hashlib.sha256(pickle.dumps(stage)).hexdigest()


def _cached_stage(blob: bytes, fingerprint: str) -> Stage:
    stage = _STAGE_CACHE.get(fingerprint)
    if stage is None:
        # one stage per worker: the previous step's models (OCR, NSFW, CLIP) are released
        # before the next step's load, not kept in every worker for the rest of the run
        while _STAGE_CACHE:
            _STAGE_CACHE.popitem()[1].teardown()
        stage = pickle.loads(blob)
        set_worker_cpus(int(stage.resources.cpus))
        stage.setup()
        _STAGE_CACHE[fingerprint] = stage
    return stage


def _shard_task(blob: bytes, fingerprint: str, task: ShardTask) -> StageStats:
    return run_task(_cached_stage(blob, fingerprint), task)


class _StageActor:
    """Holds one set-up stage (e.g. a captioning model on a GPU) for many shards."""

    def __init__(self, blob: bytes) -> None:
        self.stage: Stage = pickle.loads(blob)
        set_worker_cpus(int(self.stage.resources.cpus))
        self.stage.setup()

    def run(self, task: ShardTask) -> StageStats:
        return run_task(self.stage, task)


class RayExecutor(Executor):
    """Executor over a Ray cluster (`address=None` starts or joins a local one)."""

    def __init__(
        self,
        address: str | None = None,
        max_retries: int = 3,
        actors: int | None = None,
        progress: bool = True,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.address = address
        self.max_retries = max_retries
        self.actors = actors
        self.progress = progress
        self.init_kwargs = init_kwargs or {}

    def _ray(self) -> Any:
        try:
            import ray
        except ModuleNotFoundError as err:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "the Ray executor needs the 'ray' extra: pip install 'ccurate[ray]'"
            ) from err
        if not ray.is_initialized():
            ray.init(address=self.address, **self.init_kwargs)
        return ray

    def _run(self, stage: Stage, todo: list[ShardTask]) -> Iterator[StageStats]:
        ray = self._ray()
        res = stage.resources
        blob = pickle.dumps(stage)
        if res.gpus > 0:
            yield from self._run_actors(ray, stage, blob, todo)
            return
        fn = ray.remote(**_task_options(ray, stage), max_retries=self.max_retries)(_shard_task)
        blob_ref = ray.put(blob)
        fp = _fingerprint(stage)
        pending = {fn.remote(blob_ref, fp, t): t for t in todo}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    task = pending.pop(ref)
                    try:
                        stats = ray.get(ref)
                    except Exception as err:
                        raise _shard_failed(stage.name, task, self.max_retries, err) from err
                    yield stats
        finally:
            # a failed shard or an interrupted driver: the other shards must not keep
            # writing outputs behind the driver's back (a rerun would race them)
            _cancel(ray, list(pending))

    def _run_actors(
        self, ray: Any, stage: Stage, blob: bytes, todo: list[ShardTask]
    ) -> Iterator[StageStats]:
        name, gpus = stage.name, stage.resources.gpus
        cluster = ray.cluster_resources()
        total_gpus = float(cluster.get("GPU", 0))
        options = _actor_options(ray, stage, total_gpus)
        n = _actor_count(cluster, options, gpus, self.actors, len(todo))
        actor_cls = ray.remote(**options, max_restarts=2)(_StageActor)
        actors = [actor_cls.remote(blob) for _ in range(n)]
        queue = list(todo)
        attempts: dict[ShardTask, int] = {}
        running: dict[Any, tuple[Any, ShardTask]] = {}

        def submit(actor: Any) -> None:
            if queue:
                task = queue.pop(0)
                running[actor.run.remote(task)] = (actor, task)

        try:
            for a in actors:
                submit(a)
            while running:
                done, _ = ray.wait(list(running), num_returns=1)
                for ref in done:
                    actor, task = running.pop(ref)
                    try:
                        stats = ray.get(ref)
                    except Exception as err:
                        attempts[task] = attempts.get(task, 0) + 1
                        if attempts[task] > self.max_retries:
                            raise _shard_failed(name, task, self.max_retries, err) from err
                        queue.append(task)  # retry the shard, on whichever actor frees first
                        if isinstance(err, ray.exceptions.RayActorError):
                            # the actor died (OOM, lost node): once its restarts are spent it
                            # fails every shard it is given, so it is replaced by a fresh one
                            ray.kill(actor, no_restart=True)
                            actors[actors.index(actor)] = actor = actor_cls.remote(blob)
                    else:
                        yield stats
                    submit(actor)
        finally:
            # done, failed or interrupted: the actors release their GPUs now, and no shard
            # keeps running behind the driver's back
            for a in actors:
                ray.kill(a, no_restart=True)


def _actor_count(
    cluster: dict[str, float], options: dict[str, Any], gpus: float, wanted: int | None, n_todo: int
) -> int:
    """Actors of a GPU stage: one per `gpus` of the cluster's GPUs (or `wanted`), no more than
    the cluster's memory holds at the stage's request (an actor that cannot get its memory
    never starts, and the shard handed to it would wait forever), nor than there are shards."""
    total_gpus = float(cluster.get("GPU", 0))
    n = wanted or (max(1, int(total_gpus / gpus)) if total_gpus else 1)
    memory = options.get("memory")
    if memory:
        n = min(n, max(1, int(float(cluster.get("memory", 0)) // memory)))
    return max(1, min(n, n_todo))


def _task_options(ray: Any, stage: Stage) -> dict[str, Any]:
    """`ray.remote` options of a CPU stage's shard task: its CPUs and memory, each capped at
    the largest node's; failures are retried (`max_retries` is the caller's)."""
    return {**_resource_options(ray, stage), "retry_exceptions": True}


def _actor_options(ray: Any, stage: Stage, total_gpus: float) -> dict[str, Any]:
    """`ray.remote` options of a GPU stage's actors; a cluster without GPUs runs them on
    CPUs (num_gpus 0) rather than waiting forever."""
    return {**_resource_options(ray, stage), "num_gpus": stage.resources.gpus if total_gpus else 0}


def _resource_options(ray: Any, stage: Stage) -> dict[str, Any]:
    """CPUs always; `memory` (bytes) only when the stage declares some, so Ray does not
    pack memory-hungry workers (captioning, dedup) onto a node without room for them."""
    res = stage.resources
    opts: dict[str, Any] = {"num_cpus": _feasible_cpus(ray, stage.name, res.cpus)}
    memory = _feasible_memory(ray, stage.name, res.memory_gb)
    if memory > 0:
        opts["memory"] = memory
    return opts


def _largest_node(ray: Any, resource: str) -> float:
    """The most of `resource` any live node has (0 when none reports it)."""
    return max(
        (float(n["Resources"].get(resource, 0)) for n in ray.nodes() if n.get("Alive")),
        default=0.0,
    )


def _feasible_memory(ray: Any, name: str, memory_gb: float) -> int:
    """The stage's memory request in bytes (0: none), capped at the largest node's Ray
    `memory` resource: a request no node can meet would wait forever, as for CPUs."""
    if memory_gb <= 0:
        return 0
    want = int(memory_gb * 2**30)
    most = int(_largest_node(ray, "memory"))
    if 0 < most < want:
        log.warning(
            "stage %s asks for %.1f GiB of memory per worker; the largest Ray node has "
            "%.1f GiB: using %.1f GiB",
            name,
            memory_gb,
            most / 2**30,
            most / 2**30,
        )
        return most
    return want


def _feasible_cpus(ray: Any, name: str, cpus: float) -> float:
    """The stage's CPU request, capped at the largest node's CPUs: Ray waits forever on a
    request no node can meet (captioning declares 4 CPUs; a laptop may have 2), where the
    local executor just runs the stage."""
    most = _largest_node(ray, "CPU")
    if 0 < most < cpus:
        log.warning(
            "stage %s asks for %s CPUs per task; the largest Ray node has %s: using %s",
            name,
            cpus,
            most,
            most,
        )
        return most
    return cpus


def _shard_failed(name: str, task: ShardTask, retries: int, err: Exception) -> RuntimeError:
    """The error for a shard that failed every try: names the stage and the shard."""
    return RuntimeError(
        f"stage {name}: shard {task.dst} (input {task.src}) failed after "
        f"{retries + 1} attempt(s): {type(err).__name__}: {err}"
    )


def _cancel(ray: Any, refs: list[Any], wait_s: float = 10.0) -> None:
    """Cancel unfinished shard tasks and wait (bounded) until they have stopped: a running
    one gets KeyboardInterrupt, so `run_task` aborts its shard and publishes nothing."""
    if not refs:
        return
    for ref in refs:
        ray.cancel(ref, force=False, recursive=True)
    ray.wait(refs, num_returns=len(refs), timeout=wait_s)
