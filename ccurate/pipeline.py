"""The pipeline: sources -> ingest -> filter -> dedup -> caption -> release -> train.

Each step reads the previous step's finished shards from the work directory
and writes its own, so steps can run on different machines and resume
independently. Re-running a finished step is a no-op that re-reads its stats,
as long as its settings (`_SETTINGS`, see `Pipeline.step_settings`) are unchanged.

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
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from ccurate.config import PipelineConfig, portable, portable_dump
from ccurate.configbase import PERF_KEYS
from ccurate.executor import Executor, LocalExecutor, tasks_for
from ccurate.shardio import clear_temporaries, list_shards, write_json_atomic
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
SECTION = {"ingest": "ingest", "filter": "filters", "dedup": "dedup", "caption": "caption"}
# settings that change how fast or how politely a step runs, never what it outputs:
# changing them keeps a step's results


# the keys of a step's `_COMPLETE` marker that are the step's own; others are its passes
_TOTALS = frozenset({"shards", "stats"})

log = logging.getLogger("ccurate.pipeline")


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

    def __init__(
        self,
        cfg: PipelineConfig,
        executor: Executor | None = None,
        retry_reasons: frozenset[str] = frozenset(),
    ) -> None:
        self.cfg = cfg
        self.executor = executor or LocalExecutor(cfg.run.workers)
        self.retry_reasons = retry_reasons  # `retry` step: drop reasons fetched again too
        self.work = Path(cfg.run.work_dir)
        self.results: list[StepResult] = []
        self.report_path: Path | None = None

    # -- paths ---------------------------------------------------------------
    def step_dir(self, step: str) -> Path:
        return self.work / STEP_DIRS[step]

    def finished_inputs(self, step: str) -> list[str]:
        """The previous step's shards; refuses to run on a half-finished step. A finished
        step with no shards (every source row dropped at planning: bad URLs, opt-outs)
        gives none: the next steps finish on the empty input like on any other, and the
        summary and report state the drops that explain it."""
        prev = PREVIOUS[step]
        d = self.step_dir(prev)
        all_shards = list_shards(d, done_only=False)
        done = list_shards(d, done_only=True)
        if not all_shards and not done and _marker_shards(d) != 0:
            raise PipelineError(f"step '{step}' needs the output of '{prev}' in {d}: run it first")
        if len(done) != len(all_shards) or not (d / "_COMPLETE").exists():
            left = len(all_shards) - len(done)
            why = f"{left} of {len(all_shards)} are not" if left else "it did not finish"
            raise PipelineError(
                f"step '{step}' needs every shard of '{prev}' finished; {why}: rerun '{prev}'"
            )
        settings = d / "_SETTINGS"
        if settings.exists():
            have, want = json.loads(settings.read_text()), self.step_settings(prev)
            if have != want:
                raise PipelineError(
                    f"step '{step}' needs '{prev}' redone: "
                    f"{self._describe(*self._split_changes(prev, have, want))} "
                    f"since it ran; rerun '{prev}'"
                )
        return [str(p) for p in done]

    # -- steps ---------------------------------------------------------------
    def map_step(
        self,
        step: str,
        stage: Stage,
        inputs: list[str],
        name: str | None = None,
        also: StageStats | None = None,
    ) -> StepResult:
        """Run `stage` over `inputs` into the step's directory; `_COMPLETE` marks it whole.

        With `name` (a pass that adds shards to a finished step, e.g. "retry") the
        step stays complete throughout and the pass's stats are appended to the marker;
        the step's own stats are the sum over its shards' markers, restated by the next
        full map of the step (which keeps the passes' entries).
        `also`: counts of the step made outside its shards (the planner's drops), added
        to the step's stats and marker."""
        t0 = time.perf_counter()
        out_dir = self.step_dir(step)
        complete = out_dir / "_COMPLETE"
        earlier: dict[str, Any] = {}  # e.g. the retry passes of a finished ingest
        for d in (out_dir, out_dir / "_prepare"):  # what a killed run was writing
            clear_temporaries(d)
        passes_path = out_dir / "_PASSES"  # them while `_COMPLETE` is away: a kill keeps them
        if name is None:
            self._check_settings(step)
        if complete.exists() and name is None:
            earlier = {
                k: v for k, v in json.loads(complete.read_text()).items() if k not in _TOTALS
            }
            write_json_atomic(passes_path, earlier)
            complete.unlink()  # the inputs may have grown; recheck every shard
        elif name is None and passes_path.exists():  # a kill came between unlink and rewrite
            earlier = json.loads(passes_path.read_text())
        stats = self.executor.map(stage, tasks_for(inputs, out_dir), label=name or step)
        stats.stage = name or step
        if also is not None:
            stats.add(also)
        if name is None:
            write_json_atomic(
                complete, {**earlier, "shards": len(inputs), "stats": stats.to_json()}
            )
        else:
            marker = json.loads(complete.read_text())
            passes = [p for p in marker.get(name, []) if p["shard"] not in inputs]
            passes.append({"shard": inputs[0], "stats": stats.to_json()})
            write_json_atomic(complete, {**marker, name: passes})
        return self._record(StepResult(name or step, stats, time.perf_counter() - t0))

    def step_settings(self, step: str, defaults: bool = False) -> dict[str, Any]:
        """What a step's outputs depend on: its config section without `PERF_KEYS`, and
        the settings of the steps before it (a changed filter threshold changes dedup's
        input, so dedup's results go too). `defaults`: this version's defaults instead."""
        section = getattr(self.cfg, SECTION[step])
        if defaults:
            section = type(section)()
        out = {SECTION[step]: _without_perf_keys(section.model_dump(mode="json"))}
        prev = PREVIOUS.get(step)
        return {**self.step_settings(prev, defaults), **out} if prev in SECTION else out

    def _split_changes(self, step: str, have: Any, want: Any) -> tuple[list[str], list[str]]:
        """How a step's recorded settings `have` differ from `want`: (changed by the user,
        new in this version), the latter being settings `have` (recorded by an earlier
        version) lacks and that are now at this version's default."""
        from pydantic import ValidationError

        changed = _changed_keys(have, want)
        try:
            defaults = self.step_settings(step, defaults=True)
        except ValidationError:  # a section without defaults: every change is the user's
            return changed, []
        new = {k for k in changed if _at(have, k) is _ABSENT and _at(want, k) == _at(defaults, k)}
        return [k for k in changed if k not in new], sorted(new)

    @staticmethod
    def _describe(user: list[str], new: list[str]) -> str:
        parts = [f"settings changed ({', '.join(user)})"] if user else []
        if new:
            parts.append(f"new settings in this version, at their defaults ({', '.join(new)})")
        return "; ".join(parts)

    def _check_settings(self, step: str) -> None:
        """Results written under other settings are not reused: for filter, dedup and
        caption they are cleared and recomputed (captions come back from the cache);
        ingest refuses, since recomputing it means downloading everything again.

        A setting new in this version, at its default, counts as a change of what the step
        computes (its rules changed with the version), so filter, dedup and caption are
        recomputed: the work directory then holds what this version gives, as a fresh run
        would. The message says it is new, not the user's change. Ingest keeps its
        downloads then (nothing to restore; deleting them is the user's call)."""
        out_dir = self.step_dir(step)
        path = out_dir / "_SETTINGS"
        want = self.step_settings(step)
        _remove_cleared(out_dir)
        if path.exists():
            # recorded before a key became a performance one: that key is no change
            have = _without_perf_keys(json.loads(path.read_text()))
            if have == want:
                return
            user, new = self._split_changes(step, have, want)
            changes = self._describe(user, new)
            if step == "ingest" and user:
                raise PipelineError(
                    f"ingest {changes} since {out_dir} was downloaded; restore them, or "
                    f"delete {out_dir} to download again with the new ones"
                )
            if step == "ingest":
                log.warning(
                    "ingest: %s: the downloads in %s are kept (delete it to download again "
                    "under them)",
                    changes,
                    out_dir,
                )
            else:
                log.warning("%s: %s: its results are recomputed", step, changes)
                _clear_step(out_dir)
        # (a step dir from before settings were recorded is adopted as it is)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, want)

    def _record(self, result: StepResult) -> StepResult:
        self.results.append(result)
        return result

    def ingest(self) -> StepResult:
        from ccurate.config import ConfigError
        from ccurate.ingest.sources import SourceError, plan_sources
        from ccurate.ingest.stage import IngestStage

        if not self.cfg.sources:
            raise PipelineError("no [[sources]] configured: nothing to ingest")
        clear_temporaries(self.step_dir("plan"))  # a planner killed mid-write
        try:
            planned = plan_sources(
                list(self.cfg.sources), self.step_dir("plan"), self.cfg.run.partition_size
            )
        except SourceError as err:  # a missing file or column: the config's fault (exit 2)
            raise ConfigError(str(err)) from None
        except ValueError as err:  # e.g. sources changed under an existing work directory
            raise PipelineError(str(err)) from None
        # finished `--retry-failed` passes are ingest shards too: their partitions are
        # inputs (already done, so only their markers are read), and the drop rows they
        # supersede are gone from the older shards (and their markers) before counting
        retries = _finished_retries(self.step_dir("plan"), self.step_dir("ingest"))
        if retries:
            _supersede_ingest_drops(self.step_dir("ingest"))
        plan_drops = _plan_drops(self.step_dir("plan"))
        if not planned and not retries:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(plan_drops.drops.items()))
            log.warning(
                "ingest: the sources planned no record to fetch (%d dropped: %s); the "
                "next steps run on an empty input",
                plan_drops.n_dropped,
                reasons or "none read",
            )
        return self.map_step(
            "ingest",
            IngestStage(self.cfg.ingest),
            [str(p) for p in planned] + retries,
            also=plan_drops,
        )

    def retry_failed(self) -> StepResult:
        """Fetch again the transient ingest failures (timeouts, connection errors, 408, 429,
        5xx) of a finished ingest, and its drops for `retry_reasons` (e.g. `decode_error`
        after an upgrade that decodes more images), without touching what was downloaded.

        The records go to a new ingest shard `retry-NNNN`; the older drop rows of the same
        keys are then removed from their shards' side outputs and markers (the newest
        outcome of a key is its only one), the dedup and caption steps are cleared so the
        next run redoes them over the grown input (filter only runs on the new shard;
        captions come from the cache), and ingest's stats are restated over every shard
        (an `ingest` step in the results, next to the pass's own `retry`), so a retried
        record is counted once, with its newest outcome. Killed at any point, rerunning
        finishes the same retry."""
        from ccurate.ingest.stage import IngestStage, plan_retry
        from ccurate.shardio import is_done, write_partition

        ing = self.step_dir("ingest")
        if not (ing / "_COMPLETE").exists():
            raise PipelineError("retry-failed needs a finished ingest: run 'ccurate ingest' first")
        self._check_settings("ingest")  # retried downloads must match the first ones
        retry_dir = self.step_dir("plan") / "retries"
        retry_dir.mkdir(parents=True, exist_ok=True)
        done_retries = sorted(retry_dir.glob("retry-*.parquet"))
        pending = [p for p in done_retries if not is_done(ing / p.name[: -len(".parquet")])]
        if pending:
            prefix = retry_dir / pending[0].name[: -len(".parquet")]
        else:
            records = plan_retry(ing, self.retry_reasons)
            if not records:  # a killed retry may still have its drops to supersede
                result = self._record(StepResult("retry", StageStats("retry"), 0.0))
                self.ingest()
                return result
            prefix = retry_dir / f"retry-{len(done_retries) + 1:04d}"
            write_partition(prefix, records)
        result = self.map_step("ingest", IngestStage(self.cfg.ingest), [str(prefix)], "retry")
        for step in ("dedup", "caption"):
            _clear_step(self.step_dir(step))
        self.ingest()  # supersedes the retried drops; fetches nothing (every shard is done)
        return result

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
        from ccurate.shards.release import inputs_digest, write_release

        t0 = time.perf_counter()
        inputs = self.finished_inputs("shard")
        if not inputs:  # the sources planned nothing: no release of nothing (nor `vN+1`)
            drops = _plan_drops(self.step_dir("plan"))
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(drops.drops.items()))
            log.warning(
                "shard: nothing to publish (the sources planned no record; %d dropped: %s): "
                "no release written",
                drops.n_dropped,
                reasons or "none read",
            )
            return self._record(StepResult("shard", StageStats("shard"), 0.0))
        dropped = self.dropped_outputs()
        run_info = {**self.run_info(), "inputs_digest": inputs_digest(inputs, dropped)}
        self._check_named_release(run_info["inputs_digest"])
        release = write_release(
            inputs,
            dropped,
            self.cfg.run.release_dir,
            self.cfg.shards,
            name=self.cfg.run.release_name or self._same_latest_release(run_info),
            run_info=run_info,
            digest=run_info["inputs_digest"],
        )
        catalog = Catalog(self.cfg.run.catalog)
        try:
            catalog.record_run(inputs, self.dropped_outputs(), run_id=release.name)
            catalog.record_release(release)
        finally:
            catalog.close()
        # kept samples the release did not publish are counted with their reason, as in
        # excluded.parquet (shard rows would count a superset split's samples twice)
        info = json.loads((release / "release.json").read_text())
        excluded = Counter({str(k): int(v) for k, v in info.get("excluded", {}).items()})
        stats = StageStats(
            "shard",
            n_in=int(info["input_samples"]),
            n_kept=int(info["published_samples"]),
            n_dropped=excluded.total(),
            drops=excluded,
            shards=len(inputs),
        )
        return self._record(
            StepResult("shard", stats, time.perf_counter() - t0, {"release": str(release)})
        )

    def _check_named_release(self, inputs_digest: str) -> None:
        """A complete release is immutable and a rerun returns it untouched: refuse when the
        named one was built with other settings or from other inputs than this run's (a
        retry's new samples, a takedown's removed ones), rather than hand it back."""
        name = self.cfg.run.release_name
        info = Path(self.cfg.run.release_dir) / name / "release.json" if name else None
        if info is None or not info.exists():
            return
        built_info = json.loads(info.read_text()).get("run_info", {})
        built = portable(built_info.get("config", {}), self.cfg.base_dir)  # pre-portable_dump
        now = portable_dump(self.cfg)
        keys = [*SECTION.values(), "shards"]
        changed = _changed_keys(
            {k: _without_perf_keys(built.get(k)) for k in keys},
            {k: _without_perf_keys(now.get(k)) for k in keys},
        )
        reasons = [f"with other settings ({', '.join(changed)})"] if changed else []
        was = built_info.get("inputs_digest")
        if was is not None and was != inputs_digest:  # a release from before it recorded one
            reasons.append(
                "from other inputs (samples were added, removed or changed since: a retry, "
                "a takedown or opt-out, a licence fix, a caption rerun)"
            )
        if reasons:
            raise PipelineError(
                f"release '{name}' exists and was built {' and '.join(reasons)}; releases are "
                "immutable: set another run.release_name (or leave it empty for the next "
                "version), or remove the old release if it was never shared"
            )

    def _same_latest_release(self, run_info: dict[str, Any]) -> str | None:
        """The newest numbered release (`vN`) when it was built from these very inputs with
        these settings: a rerun returns it (rerunning a finished step is a no-op) instead of
        publishing a byte-identical copy as the next version. None: build the next one."""
        from ccurate.shards.release import is_release

        root = Path(self.cfg.run.release_dir)
        if not root.is_dir():
            return None
        numbered = [
            (int(p.name[1:]), p)
            for p in root.iterdir()
            if p.name[:1] == "v" and p.name[1:].isdigit() and is_release(p)
        ]
        if not numbered:
            return None
        latest = max(numbered)[1]
        try:
            built = json.loads((latest / "release.json").read_text()).get("run_info", {})
        except (OSError, ValueError):
            return None
        if built.get("inputs_digest") != run_info["inputs_digest"]:
            return None
        keys = [*SECTION.values(), "shards"]
        # a release from before portable_dump holds absolute paths
        was, now = portable(built.get("config", {}), self.cfg.base_dir), run_info["config"]
        same = not _changed_keys(
            {k: _without_perf_keys(was.get(k)) for k in keys},
            {k: _without_perf_keys(now.get(k)) for k in keys},
        )
        return latest.name if same else None

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
        """Run the steps; summary.json and the report are of this run only (a second
        `run` of the same pipeline must not count the first one's steps again)."""
        self.results = []
        clear_temporaries(self.work)  # a killed run's summary.json or report
        for step in steps or STEPS:
            if step not in STEPS and step != "retry":
                raise PipelineError(f"unknown step {step!r}; expected one of {', '.join(STEPS)}")
            if step == "train" and not self.cfg.train.enabled:
                continue
            if step == "train" and any(
                r.step == "shard" and "release" not in r.outputs for r in self.results
            ):
                log.warning("train: skipped, this run published no release (nothing to publish)")
                continue
            getattr(self, "retry_failed" if step == "retry" else step)()
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
                done = json.loads(marker.read_text())
                stages[step] = done.get("stats", {})
                for i, p in enumerate(done.get("retry", []), 1):
                    stages[f"retry-{i}"] = p["stats"]
        # this run's retry pass is already among the marker's passes (map_step appends it)
        stages.update({r.step: r.to_json() for r in self.results if r.step != "retry"})
        info: dict[str, Any] = {"config": portable_dump(self.cfg), "stages": stages}
        refs = _dedup_references(self.step_dir("dedup"))
        if refs:
            info["dedup_references"] = refs
        return info

    def write_summary(self) -> Path:
        path = self.work / "summary.json"
        write_json_atomic(path, {"steps": [r.to_json() for r in self.results]})
        return path


def _dedup_references(dedup_dir: Path) -> dict[str, Any]:
    """What the dedup plan read of its `against` (decontamination) and `previous` references:
    rows, usable rows and what it could not read, for the card to state what the
    decontamination promise rests on. Empty when the plan has not run."""
    from ccurate.filters.dedup import SUMMARY_FILE

    path = dedup_dir / "_prepare" / SUMMARY_FILE
    if not path.exists():
        return {}
    summary = json.loads(path.read_text())
    return {
        name: {k: summary[f"{name}_{k}"] for k in ("rows", "usable", "unread")}
        for name in ("against", "previous")
        if summary.get(f"{name}_rows")
    }


def _marker_shards(step_dir: Path) -> int | None:
    """The shard count a finished step's `_COMPLETE` states; None when it has none."""
    try:
        shards = json.loads((step_dir / "_COMPLETE").read_text()).get("shards")
    except (OSError, ValueError, AttributeError):
        return None
    return shards if isinstance(shards, int) else None


def _plan_drops(plan_dir: Path) -> StageStats:
    """The planner's drops (`bad_url`, `bad_row`, `duplicate_url`, WARC opt-outs): records
    read from the sources that reach no shard. They are ingest's (`dropped_by="ingest"`),
    so ingest's stats count them as its inputs and drops, as the side outputs do."""
    from ccurate.ingest.sources import PLANNED_MARKER

    marker = plan_dir / PLANNED_MARKER
    done = json.loads(marker.read_text()) if marker.exists() else {}
    drops = Counter({str(k): int(v) for k, v in done.get("drops", {}).items()})
    return StageStats("ingest", n_in=drops.total(), n_dropped=drops.total(), drops=drops)


def _finished_retries(plan_dir: Path, ingest_dir: Path) -> list[str]:
    """The `--retry-failed` partitions whose ingest shard is finished (a killed retry's
    partition is left to the next `--retry-failed`, which finishes it)."""
    from ccurate.shardio import is_done

    parts = sorted((plan_dir / "retries").glob("retry-*.parquet"))
    prefixes = [p.with_name(p.name[: -len(".parquet")]) for p in parts]
    return [str(p) for p in prefixes if is_done(ingest_dir / p.name)]


def _supersede_ingest_drops(ingest_dir: Path) -> None:
    """Remove ingest drop rows whose key has a newer outcome in a later-finished shard,
    and restate each shard's marker from its files (`_restate_ingest_marker`).

    A page's drop row is superseded by a later image of that page as well (its key is
    `make_key(page_url)`, as `plan_retry` resolves it). Idempotent, and each side output
    and marker is replaced atomically, so a kill in between is finished by the next call."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ccurate.record import make_key
    from ccurate.shardio import shards_in_completion_order, write_table_atomic

    shards = shards_in_completion_order(ingest_dir)
    later: set[str] = set()
    for prefix in reversed(shards):
        dropped_path = Path(f"{prefix}.dropped.parquet")
        t = pq.read_table(dropped_path) if dropped_path.exists() else None
        if t is not None and later:
            stale = pc.and_(
                pc.is_in(t["key"], value_set=pa.array(sorted(later), pa.string())),
                pc.equal(t["dropped_by"], "ingest"),
            )
            stale = pc.fill_null(stale, False)
            if pc.any(stale).as_py():
                keys = t.filter(stale)["key"].to_pylist()
                t = t.filter(pc.invert(stale))
                write_table_atomic(dropped_path, t)
                later.update(keys)
        if t is not None:
            _restate_ingest_marker(prefix, t)
        for part in [pq.read_table(f"{prefix}.parquet", columns=["key", "url", "page_url"]), t]:
            if part is None:
                continue
            later.update(part["key"].to_pylist())
            urls = part["url"].to_pylist()
            pages = part["page_url"].to_pylist()
            later.update(make_key(p) for u, p in zip(urls, pages, strict=True) if p and p != u)


def _restate_ingest_marker(prefix: Path, dropped: pa.Table) -> None:
    """Make an ingest shard's marker state its dropped file after superseded rows left it.

    Each superseded row leaves the shard's `dropped` (and its reason) and its `in`: its
    record is an input of the retry shard that holds its newest outcome, so summing the
    markers counts every record once, as kept or with its newest drop reason. The count
    removed so far is kept as `superseded` (recomputing from the file stays right after
    a kill between the two writes), and the marker keeps its mtime: completion order
    decides which outcome is newer."""
    import os

    from ccurate.shardio import MARKER, atomic_path, read_marker

    marker = read_marker(prefix)
    if int(marker["dropped"]) == dropped.num_rows:
        return
    before = int(marker.get("superseded", 0))
    superseded = int(marker["dropped"]) + before - dropped.num_rows
    drops = Counter(r or "unknown" for r in dropped["drop_reason"].to_pylist())
    restated = {
        **marker,
        "in": int(marker["in"]) + before - superseded,
        "dropped": dropped.num_rows,
        "drops": dict(sorted(drops.items())),
        "superseded": superseded,
    }
    path = Path(f"{prefix}{MARKER}")
    st = path.stat()
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(restated, indent=1, sort_keys=True))
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))


def _without_perf_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_perf_keys(v) for k, v in value.items() if k not in PERF_KEYS}
    if isinstance(value, list):
        return [_without_perf_keys(v) for v in value]
    return value


_ABSENT = object()


def _at(tree: Any, dotted: str) -> Any:
    """The value at a dotted path of a settings tree (`_changed_keys`), `_ABSENT` if none."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two settings trees differ ('filters.quality.min_side')."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            out += _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _clear_step(step_dir: Path) -> None:
    """Forget a step's results (its input changed): the next run recomputes them.

    The folder leaves under its name in one rename before it is deleted: an rmtree killed
    halfway could remove `_SETTINGS` and keep finished shards, which the rerun would
    then adopt as they are (a step folder without `_SETTINGS` predates settings)."""
    import os
    import shutil

    _remove_cleared(step_dir)
    if step_dir.exists():
        trash = step_dir.with_name(f".{step_dir.name}.cleared-{os.getpid()}")
        os.rename(step_dir, trash)
        shutil.rmtree(trash)


def _remove_cleared(step_dir: Path) -> None:
    """Delete what a `_clear_step` killed after its rename left behind."""
    import shutil

    for old in step_dir.parent.glob(f".{step_dir.name}.cleared-*"):
        shutil.rmtree(old, ignore_errors=True)
