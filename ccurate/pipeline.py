"""The pipeline: sources -> ingest -> filter -> dedup -> caption -> release -> train.

Each step reads the previous step's finished shards from the work directory
and writes its own, so steps can run on different machines and resume
independently. Re-running a finished step is a no-op that re-reads its stats.

Work directory layout::

    work/00_plan/      planned input partitions (parquet only) + _PLANNED marker
    work/10_ingest/    downloaded images            (shard files, see ccurate.shardio)
    work/20_filter/    licence/quality/watermark/safety decisions
    work/30_dedup/     exact/near/semantic dedup     (+ _prepare/ global decisions)
    work/40_caption/   synthetic captions
    work/summary.json  per-stage stats of the last run
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccurate.config import PipelineConfig
from ccurate.executor import Executor, LocalExecutor, tasks_for
from ccurate.shardio import list_shards, write_json_atomic
from ccurate.stage import Stage, StageStats

STEPS = ["ingest", "filter", "dedup", "caption", "shard", "train"]
STEP_DIRS = {
    "plan": "00_plan",
    "ingest": "10_ingest",
    "filter": "20_filter",
    "dedup": "30_dedup",
    "caption": "40_caption",
}
PREVIOUS = {"filter": "ingest", "dedup": "filter", "caption": "dedup", "shard": "caption"}


class PipelineError(RuntimeError):
    """A step cannot run (e.g. its input step has unfinished shards)."""


@dataclass
class StepResult:
    step: str
    stats: StageStats
    wall_seconds: float
    outputs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**self.stats.to_json(), "wall_seconds": round(self.wall_seconds, 3), **self.outputs}


class Pipeline:
    """Runs the steps of one config on one executor."""

    def __init__(self, cfg: PipelineConfig, executor: Executor | None = None) -> None:
        self.cfg = cfg
        self.executor = executor or LocalExecutor(cfg.run.workers)
        self.work = Path(cfg.run.work_dir)
        self.results: list[StepResult] = []
        self.report_path: Path | None = None

    # -- paths ---------------------------------------------------------------
    def step_dir(self, step: str) -> Path:
        return self.work / STEP_DIRS[step]

    def finished_inputs(self, step: str) -> list[str]:
        """The previous step's shards; refuses to run on a half-finished step."""
        prev = PREVIOUS[step]
        d = self.step_dir(prev)
        all_shards = list_shards(d, done_only=False)
        done = list_shards(d, done_only=True)
        if not all_shards and not done:
            raise PipelineError(f"step '{step}' needs the output of '{prev}' in {d}: run it first")
        if len(done) != len(all_shards) or not (d / "_COMPLETE").exists():
            raise PipelineError(
                f"step '{step}' needs every shard of '{prev}' finished; "
                f"{len(all_shards) - len(done)} of {len(all_shards)} are not: rerun '{prev}'"
            )
        return [str(p) for p in done]

    # -- steps ---------------------------------------------------------------
    def map_step(self, step: str, stage: Stage, inputs: list[str]) -> StepResult:
        """Run `stage` over `inputs` into the step's directory; `_COMPLETE` marks it whole."""
        t0 = time.perf_counter()
        out_dir = self.step_dir(step)
        complete = out_dir / "_COMPLETE"
        if complete.exists():
            complete.unlink()  # the inputs may have grown; recheck every shard
        stats = self.executor.map(stage, tasks_for(inputs, out_dir), label=step)
        stats.stage = step
        write_json_atomic(complete, {"shards": len(inputs), "stats": stats.to_json()})
        return self._record(StepResult(step, stats, time.perf_counter() - t0))

    def _record(self, result: StepResult) -> StepResult:
        self.results.append(result)
        return result

    def ingest(self) -> StepResult:
        from ccurate.ingest.sources import plan_sources
        from ccurate.ingest.stage import IngestStage

        if not self.cfg.sources:
            raise PipelineError("no [[sources]] configured: nothing to ingest")
        try:
            planned = plan_sources(
                list(self.cfg.sources), self.step_dir("plan"), self.cfg.run.partition_size
            )
        except ValueError as err:  # e.g. sources changed under an existing work directory
            raise PipelineError(str(err)) from None
        return self.map_step("ingest", IngestStage(self.cfg.ingest), [str(p) for p in planned])

    def filter(self) -> StepResult:
        from ccurate.filters.chain import build_filter_stage

        return self.map_step(
            "filter", build_filter_stage(self.cfg.filters), self.finished_inputs("filter")
        )

    def dedup(self) -> StepResult:
        from ccurate.filters.dedup import DedupStage

        return self.map_step("dedup", DedupStage(self.cfg.dedup), self.finished_inputs("dedup"))

    def caption(self) -> StepResult:
        from ccurate.captioning.stage import CaptionStage

        cap = self.cfg.caption
        if cap.cache_dir is None:
            cap = cap.model_copy(update={"cache_dir": str(self.cfg.run.catalog / "caption_cache")})
        return self.map_step("caption", CaptionStage(cap), self.finished_inputs("caption"))

    def dropped_outputs(self) -> list[str]:
        """Every side output of dropped samples, across steps (for counts and reports)."""
        paths: list[str] = []
        for step in ["ingest", "filter", "dedup", "caption"]:
            paths += sorted(str(p) for p in self.step_dir(step).glob("*.dropped.parquet"))
        planned_drops = self.step_dir("plan") / "planned-dropped.parquet"
        if planned_drops.exists():
            paths.insert(0, str(planned_drops))
        return paths

    def shard(self) -> StepResult:
        from ccurate.shards.catalog import Catalog
        from ccurate.shards.release import write_release

        t0 = time.perf_counter()
        inputs = self.finished_inputs("shard")
        release = write_release(
            inputs,
            self.dropped_outputs(),
            self.cfg.run.release_dir,
            self.cfg.shards,
            name=self.cfg.run.release_name,
            run_info=self.run_info(),
        )
        catalog = Catalog(self.cfg.run.catalog)
        try:
            catalog.record_run(inputs, self.dropped_outputs(), run_id=release.name)
            catalog.record_release(release)
        finally:
            catalog.close()
        n = sum(json.loads(p.read_text()).get("count", 0) for p in release.glob("**/*.stats.json"))
        stats = StageStats("shard", n_in=n, n_kept=n, shards=len(inputs))
        return self._record(
            StepResult("shard", stats, time.perf_counter() - t0, {"release": str(release)})
        )

    def latest_release(self) -> Path:
        root = Path(self.cfg.run.release_dir)
        name = self.cfg.run.release_name
        candidates = (
            [root / name]
            if name
            else sorted(
                (p for p in root.iterdir() if (p / "_SUCCESS").exists()),
                key=lambda p: p.stat().st_mtime,
            )
            if root.exists()
            else []
        )
        if not candidates or not (candidates[-1] / "_SUCCESS").exists():
            raise PipelineError(f"no finished release in {root}: run 'ccurate shard' first")
        return candidates[-1]

    def train(self) -> StepResult:
        from ccurate.train.loop import train

        t0 = time.perf_counter()
        release = self.latest_release()
        summary = train(self.cfg.train, release, self.cfg.run.train_out)
        steps = int(summary.get("steps", 0))
        stats = StageStats("train", n_in=steps, n_kept=steps)
        return self._record(
            StepResult("train", stats, time.perf_counter() - t0, {"train": summary})
        )

    # -- whole runs ------------------------------------------------------------
    def run(self, steps: list[str] | None = None) -> list[StepResult]:
        for step in steps or STEPS:
            if step not in STEPS:
                raise PipelineError(f"unknown step {step!r}; expected one of {', '.join(STEPS)}")
            if step == "train" and not self.cfg.train.enabled:
                continue
            getattr(self, step)()
        self.write_summary()
        from ccurate.report import write_report

        self.report_path = write_report(self.work)
        return self.results

    def run_info(self) -> dict[str, Any]:
        """What the dataset card needs to explain the run: settings and the stats of every
        finished step (from its `_COMPLETE` marker when it ran in an earlier invocation)."""
        stages: dict[str, Any] = {}
        for step in ["ingest", "filter", "dedup", "caption"]:
            marker = self.step_dir(step) / "_COMPLETE"
            if marker.exists():
                stages[step] = json.loads(marker.read_text()).get("stats", {})
        stages.update({r.step: r.to_json() for r in self.results})
        return {"config": json.loads(self.cfg.model_dump_json()), "stages": stages}

    def write_summary(self) -> Path:
        path = self.work / "summary.json"
        write_json_atomic(path, {"steps": [r.to_json() for r in self.results]})
        return path
