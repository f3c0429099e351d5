"""The one stage contract every step of the pipeline implements.

In the spirit of datatrove (one step contract, per-rank stats) and NeMo Curator
(typed stages declaring resources, setup/teardown split): a stage maps batches
of `Sample`s to batches of `Sample`s. Stages are plain picklable objects built
from their config; heavy state (models, sessions) is created in `setup`, once
per worker process or Ray actor, never at construction or per batch, so any
executor can ship a stage to a worker unchanged.

Dropped samples are returned too (with `status="dropped"` and a reason): the
runner moves them to a side output and counts them, so nothing is lost
silently.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ccurate.record import Decision, Sample


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs; executors size pools and Ray requests from it."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: float = 1.0


@dataclass
class StageStats:
    """Counts for one stage over one shard (or summed over shards)."""

    stage: str
    n_in: int = 0
    n_kept: int = 0
    n_dropped: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    shards: int = 0
    skipped_shards: int = 0

    def add(self, other: StageStats) -> None:
        self.n_in += other.n_in
        self.n_kept += other.n_kept
        self.n_dropped += other.n_dropped
        self.drops.update(other.drops)
        self.seconds += other.seconds
        self.shards += other.shards
        self.skipped_shards += other.skipped_shards

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "in": self.n_in,
            "kept": self.n_kept,
            "dropped": self.n_dropped,
            "drops": dict(sorted(self.drops.items())),
            "seconds": round(self.seconds, 4),
            "shards": self.shards,
            "skipped_shards": self.skipped_shards,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StageStats:
        return cls(
            stage=d["stage"],
            n_in=d["in"],
            n_kept=d["kept"],
            n_dropped=d["dropped"],
            drops=Counter(d.get("drops", {})),
            seconds=d.get("seconds", 0.0),
            shards=d.get("shards", 0),
            skipped_shards=d.get("skipped_shards", 0),
        )


class Stage(ABC):
    """A step that maps batches of samples to batches of samples.

    Subclasses set `name`, declare `resources`, load models in `setup`, and
    implement `process`. `preserves_keys` is True for stages that decide on
    samples (filters, captioning): the runner then checks that every input key
    comes out exactly once, kept or dropped, so a stage cannot lose a sample.
    Source stages (ingest) expand inputs into new samples and set it False.
    """

    name: ClassVar[str] = "stage"
    preserves_keys: ClassVar[bool] = True
    batch_size: int = 64

    @property
    def resources(self) -> Resources:
        return Resources()

    def prepare(self, inputs: list[str], scratch_dir: str) -> None:  # noqa: B027
        """Optional global step, run once on the driver before any shard is mapped.

        For decisions that need every shard (dedup): read the inputs' parquet
        indexes, write the result under `scratch_dir`, and remember its path on
        `self` so workers load it in `setup`. Must be idempotent: the executor
        reruns it when its marker is missing.
        """

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Load models and open sessions; called once per worker before any batch."""

    def teardown(self) -> None:  # noqa: B027 - optional hook
        """Release what `setup` acquired."""

    def checkpoint(self) -> None:  # noqa: B027 - optional hook
        """Persist what a rerun would otherwise recompute (caches), called after a shard's
        samples are written and before its completion marker: a kill after the marker
        must not lose work the marker vouches for."""

    @abstractmethod
    def process(self, batch: list[Sample]) -> list[Sample]:
        """Return every input sample (kept or marked dropped), or new samples for sources."""

    def describe(self) -> dict[str, Any]:
        """Settings that matter for reproducibility (goes into stats and the dataset card)."""
        return {}


class Filter(ABC):
    """A small decision: keep, or drop with a reason; scores are always recorded.

    Filters are composed by `FilterStage`; each filter only sees samples that
    are still kept. Override `decide_batch` for batched models.
    """

    name: ClassVar[str] = "filter"

    @property
    def resources(self) -> Resources:
        """What the filter adds to its stage's process (`FilterStage` sums them): a filter
        without a model holds little; those with models declare their own."""
        return Resources(memory_gb=0.1)

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Load models once per worker."""

    def teardown(self) -> None:  # noqa: B027 - optional hook
        """Release what `setup` acquired."""

    def keep(self, **scores: float) -> Decision:
        return Decision(self.name, True, None, dict(scores))

    def reject(self, reason: str, **scores: float) -> Decision:
        return Decision(self.name, False, reason, dict(scores))

    @abstractmethod
    def decide(self, sample: Sample) -> Decision:
        """Keep or (drop, reason) for one sample."""

    def decide_batch(self, samples: list[Sample]) -> list[Decision]:
        return [self.decide(s) for s in samples]

    def describe(self) -> dict[str, Any]:
        return {}


class FilterStage(Stage):
    """Runs a chain of filters; the first negative verdict drops a sample."""

    name: ClassVar[str] = "filter"

    def __init__(self, filters: list[Filter], stage_name: str = "filter") -> None:
        self.filters = filters
        self.stage_name = stage_name

    @property
    def resources(self) -> Resources:
        if not self.filters:
            return Resources()
        return Resources(
            cpus=max(f.resources.cpus for f in self.filters),
            gpus=max(f.resources.gpus for f in self.filters),
            memory_gb=sum(f.resources.memory_gb for f in self.filters),
        )

    def setup(self) -> None:
        for f in self.filters:
            f.setup()

    def teardown(self) -> None:
        for f in self.filters:
            f.teardown()

    def process(self, batch: list[Sample]) -> list[Sample]:
        for f in self.filters:
            live = [s for s in batch if s.kept]
            if not live:
                break
            decisions = f.decide_batch(live)
            if len(decisions) != len(live):
                raise RuntimeError(
                    f"filter {f.name} returned {len(decisions)} decisions for {len(live)} samples"
                )
            for sample, decision in zip(live, decisions, strict=True):
                sample.record(decision)
        return batch

    def describe(self) -> dict[str, Any]:
        return {f.name: f.describe() for f in self.filters}


def timed_process(stage: Stage, batch: list[Sample], stats: StageStats) -> list[Sample]:
    """Run one batch through a stage, enforcing the accounting contract."""
    t0 = time.perf_counter()
    out = stage.process(batch)
    stats.seconds += time.perf_counter() - t0
    if stage.preserves_keys:
        in_keys = sorted(s.key for s in batch)
        out_keys = sorted(s.key for s in out)
        if in_keys != out_keys:
            lost = set(in_keys) - set(out_keys)
            raise RuntimeError(
                f"stage {stage.name} must return every input sample exactly once; "
                f"{len(lost)} lost, {len(out_keys) - len(in_keys) + len(lost)} extra"
            )
    for s in out:
        if s.kept:
            stats.n_kept += 1
        else:
            stats.n_dropped += 1
            stats.drops[s.drop_reason or "unknown"] += 1
    return out
