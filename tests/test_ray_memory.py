"""The Ray executor asks Ray for the memory a stage declares (`Resources.memory_gb`), so Ray
does not pack memory-hungry stages onto a node without room, and caps a request no node can
meet (it would wait forever), as it caps CPUs."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ccurate.executor import tasks_for
from ccurate.record import Sample
from ccurate.stage import Resources, Stage
from tests.test_spine import _inputs

GIB = 2**30


class _Needs(Stage):
    """Passes samples through; declares `res`; writes the resources Ray assigned it."""

    name = "needs"

    def __init__(self, res: Resources, seen: str = "") -> None:
        self.res = res
        self.seen = seen

    @property
    def resources(self) -> Resources:
        return self.res

    def process(self, batch: list[Sample]) -> list[Sample]:
        if self.seen:
            import ray

            got = ray.get_runtime_context().get_assigned_resources()
            Path(self.seen).write_text(json.dumps(got))
        return batch


def _fake_ray(*nodes: dict[str, float], dead: dict[str, float] | None = None) -> Any:
    """Just what the option builders read: the live nodes' resources, the GPU total."""
    listed = [{"Alive": True, "Resources": n} for n in nodes]
    if dead:
        listed.append({"Alive": False, "Resources": dead})
    gpus = sum(n.get("GPU", 0) for n in nodes)
    return SimpleNamespace(nodes=lambda: listed, cluster_resources=lambda: {"GPU": gpus})


def test_task_options_ask_for_the_declared_memory_in_bytes() -> None:
    from ccurate.ray_executor import _task_options

    ray = _fake_ray({"CPU": 8, "memory": 64 * GIB}, {"CPU": 4, "memory": 16 * GIB})
    opts = _task_options(ray, _Needs(Resources(cpus=2, memory_gb=8)))
    assert opts["memory"] == 8 * GIB
    assert opts["num_cpus"] == 2
    assert isinstance(opts["memory"], int)  # Ray rejects fractional bytes
    assert opts["retry_exceptions"] is True


def test_no_memory_request_when_the_stage_declares_none() -> None:
    from ccurate.ray_executor import _actor_options, _task_options

    ray = _fake_ray({"CPU": 8, "GPU": 1, "memory": 64 * GIB})
    assert "memory" not in _task_options(ray, _Needs(Resources(cpus=1, memory_gb=0)))
    assert "memory" not in _actor_options(ray, _Needs(Resources(gpus=1, memory_gb=0)), 1.0)


def test_actor_options_ask_for_memory_and_gpus() -> None:
    from ccurate.ray_executor import _actor_options

    ray = _fake_ray({"CPU": 8, "GPU": 2, "memory": 64 * GIB})
    opts = _actor_options(ray, _Needs(Resources(cpus=2, gpus=0.5, memory_gb=16)), 2.0)
    assert opts == {"num_cpus": 2, "num_gpus": 0.5, "memory": 16 * GIB}
    # no GPU in the cluster: the actors run on CPUs, still with their memory
    no_gpu = _actor_options(ray, _Needs(Resources(cpus=2, gpus=0.5, memory_gb=16)), 0.0)
    assert no_gpu["num_gpus"] == 0 and no_gpu["memory"] == 16 * GIB


def test_memory_beyond_the_largest_live_node_is_capped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from ccurate.ray_executor import _actor_options, _task_options

    # a dead node with room does not count: nothing would ever be scheduled there
    ray = _fake_ray(
        {"CPU": 8, "memory": 6 * GIB}, {"CPU": 8, "memory": 12 * GIB}, dead={"memory": 99 * GIB}
    )
    with caplog.at_level(logging.WARNING, logger="ccurate.ray_executor"):
        opts = _task_options(ray, _Needs(Resources(cpus=1, memory_gb=16)))
    assert opts["memory"] == 12 * GIB
    assert any("needs" in r.getMessage() and "memory" in r.getMessage() for r in caplog.records)
    actor = _actor_options(ray, _Needs(Resources(gpus=1, memory_gb=16)), 0.0)
    assert actor["memory"] == 12 * GIB
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ccurate.ray_executor"):
        assert _task_options(ray, _Needs(Resources(memory_gb=12)))["memory"] == 12 * GIB
    assert not caplog.records  # a request that fits is not capped, nor warned about


@pytest.mark.ray
def test_ray_runs_a_stage_with_memory_and_reserves_it(tmp_path: Path, ray_local: Any) -> None:
    """On a real local Ray: the task holds the declared memory; a request larger than the
    node is capped, so the step finishes instead of waiting forever."""
    from ccurate.ray_executor import RayExecutor

    seen = tmp_path / "assigned.json"
    tasks = tasks_for(_inputs(tmp_path, n_shards=1), tmp_path / "out")
    stats = RayExecutor(progress=False).map(_Needs(Resources(memory_gb=0.25), str(seen)), tasks)
    assert stats.n_in == 4
    assert json.loads(seen.read_text())["memory"] == 0.25 * GIB

    huge = tasks_for(_inputs(tmp_path / "huge", n_shards=1), tmp_path / "huge-out")
    result: list[int] = []
    runner = threading.Thread(
        target=lambda: result.append(
            RayExecutor(progress=False).map(_Needs(Resources(memory_gb=4096)), huge).n_in
        ),
        daemon=True,
    )
    runner.start()
    runner.join(timeout=30)
    assert result == [4], "a stage asking for more memory than any node has never ran"


def test_gpu_actors_are_no_more_than_the_cluster_memory_holds() -> None:
    from ccurate.ray_executor import _actor_count

    gib = 2**30
    cluster = {"GPU": 4.0, "memory": 44.0 * gib}
    # 4 GPUs, but 16 GiB each fits twice in 44 GiB: 2 actors, not 2 running and 2 waiting
    assert _actor_count(cluster, {"memory": 16 * gib}, 1.0, 0, 100) == 2
    assert _actor_count(cluster, {}, 1.0, 0, 100) == 4  # no memory request: by GPUs
    assert _actor_count(cluster, {"memory": 16 * gib}, 1.0, 0, 1) == 1  # one shard
    assert _actor_count({"memory": 8.0 * gib}, {"memory": 16 * gib}, 1.0, 3, 10) == 1


def test_filters_without_models_declare_little_memory() -> None:
    """The filter stage's request is the sum of its filters': model-free ones (licence,
    basic quality, CLIP/aesthetic without weights) must not each count a full GiB, or Ray
    runs far fewer filter tasks than there are cores."""
    from ccurate.filters.chain import build_filter_stage
    from ccurate.filters.config import FiltersConfig

    stage = build_filter_stage(FiltersConfig())
    by_name = {f.name: f.resources.memory_gb for f in stage.filters}
    assert by_name["license"] <= 0.1 and by_name["quality"] <= 0.1
    assert stage.resources.memory_gb < 3.0
