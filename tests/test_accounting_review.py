"""Nothing is dropped silently: the demo pipeline's books balance, on disk, everywhere.

One run of the embedded demo (a smaller corpus, plus a bad URL, a repeated page and a
missing page so the plan and page paths drop something too), then from the files:
each step's inputs are its kept plus its dropped samples, every dropped row names its
reason and stage, the per-reason counts agree between the side outputs, the run
summary, the catalog, the release (excluded.parquet, release.json, README) and the
HTML report, and every key that entered ends in exactly one place. Rerunning the
finished pipeline (a new `Pipeline`, and the same one again) must not change a count.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from ccurate.config import PipelineConfig, parse_config
from ccurate.demo.corpus import generate
from ccurate.demo.run import check_demo, demo_config
from ccurate.demo.server import serve_directory
from ccurate.pipeline import STEP_DIRS, Pipeline
from ccurate.record import make_key
from ccurate.shardio import list_shards, read_marker
from ccurate.shards.catalog import Catalog

MAP_STEPS = ["ingest", "filter", "dedup", "caption"]
PLANNED_DROPPED = "planned-dropped.parquet"
TIMINGS = {"seconds", "wall_seconds", "skipped_shards", "train"}


@dataclass
class Demo:
    out: Path
    cfg: PipelineConfig
    first: dict[str, Any]  # books after the first run
    rerun: dict[str, Any]  # after a new Pipeline on the finished run
    again: dict[str, Any]  # after the same Pipeline object ran once more
    wrong: list[str]  # planted defects the run got wrong (check_demo)


def _config(corpus_pages: list[str], base: str, out: Path, cfg: PipelineConfig) -> PipelineConfig:
    data = cfg.model_dump(mode="json")
    data["sources"][0]["urls"] += [
        "not a url",  # plan: bad_url
        base + corpus_pages[0],  # plan: duplicate_url
        base + "/pages/missing.html",  # ingest: a page record dropped, http_404
    ]
    data["train"]["enabled"] = False
    return parse_config(data, "accounting")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    out = tmp_path_factory.mktemp("accounting")
    corpus = generate(out / "corpus", n_images=72)
    with serve_directory(corpus.root) as base:
        cfg = _config(
            corpus.pages,
            base,
            out,
            demo_config(corpus, base, out, workers=2, caption_model=None, train_steps=1),
        )
        pipe = Pipeline(cfg)
        pipe.run()
        first = books(out, cfg)
        wrong = check_demo(corpus, base, Path(cfg.run.work_dir)).wrong
        Pipeline(cfg).run()
        rerun = books(out, cfg)
        pipe.run()
        again = books(out, cfg)
    return Demo(out, cfg, first, rerun, again, wrong)


# -- reading the books --------------------------------------------------------
def _rows(path: Path, cols: list[str]) -> list[dict[str, Any]]:
    names = pq.read_schema(path).names
    rows: list[dict[str, Any]] = pq.read_table(
        path, columns=[c for c in cols if c in names]
    ).to_pylist()
    return rows


def dropped_rows(work: Path, step: str) -> list[dict[str, Any]]:
    """The side-output rows of one step (`plan`: the planner's dropped file)."""
    d = work / STEP_DIRS[step]
    paths = [d / PLANNED_DROPPED] if step == "plan" else sorted(d.glob("*.dropped.parquet"))
    cols = ["key", "url", "page_url", "drop_reason", "dropped_by"]
    return [r for p in paths if p.exists() for r in _rows(p, cols)]


def kept_keys(work: Path, step: str) -> list[str]:
    return [
        k
        for p in list_shards(work / STEP_DIRS[step])
        for k in pq.read_table(f"{p}.parquet", columns=["key"])["key"].to_pylist()
    ]


def reasons(rows: list[dict[str, Any]]) -> Counter[str]:
    return Counter(r["drop_reason"] for r in rows)


def _stable(step: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in step.items() if k not in TIMINGS}


def report_numbers(path: Path) -> tuple[dict[str, list[int]], Counter[str]]:
    """What the HTML report states: the step table, and the count by each reason heading."""
    text = path.read_text()
    steps = {
        html.unescape(m[0]): [int(m[1]), int(m[2]), int(m[3])]
        for m in re.findall(r"<tr><td>([^<]+)</td><td>(\d+)</td><td>(\d+)</td><td>(\d+)</td>", text)
    }
    by_reason = Counter(
        {html.unescape(r): int(n) for r, n in re.findall(r"<h3>([^<(]+) \((\d+)\)</h3>", text)}
    )
    return steps, by_reason


def card_numbers(readme: str) -> tuple[int, int, Counter[str]]:
    """(published, input samples, dropped records by reason) as the README states them."""
    m = re.search(r"Samples published: (\d+) \(of (\d+) kept", readme)
    assert m, "the card states published and input samples"
    section = readme.split("## How samples were selected", 1)[1].split("Per stage:", 1)[0]
    by_reason = Counter({r: int(n) for r, n in re.findall(r"\| `([^`]+)` \| (\d+) \|", section)})
    return int(m[1]), int(m[2]), by_reason


def books(out: Path, cfg: PipelineConfig) -> dict[str, Any]:
    """Every count the run states about itself, from the files."""
    work = Path(cfg.run.work_dir)
    release = Path(cfg.run.release_dir) / str(cfg.run.release_name)
    summary = json.loads((work / "summary.json").read_text())["steps"]
    with Catalog(cfg.run.catalog, read_only=True) as cat:
        stats = cat.stats()
        runs = cat.query("SELECT run_id, kept, dropped FROM runs ORDER BY run_id").to_pylist()
    info = json.loads((release / "release.json").read_text())
    info.pop("run_info", None)
    info["stages"] = [_stable(s) for s in info.get("stages", [])]
    steps, by_reason = report_numbers(work / "report.html")
    return {
        "summary": [_stable(s) for s in summary],
        "sides": {s: reasons(dropped_rows(work, s)) for s in ["plan", *MAP_STEPS]},
        "catalog": stats,
        "runs": runs,
        "release": info,
        "excluded": pq.read_table(release / "excluded.parquet").num_rows,
        "report_steps": steps,
        "report_reasons": by_reason,
    }


def _markers(work: Path, step: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    for p in list_shards(work / STEP_DIRS[step]):
        yield p, read_marker(p)


# -- the tests ------------------------------------------------------------------
def test_the_run_drops_for_every_kind_of_reason(demo: Demo) -> None:
    """The books below are only worth checking if every path dropped something."""
    assert not demo.wrong, demo.wrong
    sides = demo.first["sides"]
    assert sides["plan"] == Counter(bad_url=1, duplicate_url=1)
    assert sides["ingest"]["http_404"] == 1 and sides["ingest"]["decode_error"] >= 1
    assert {"license_not_allowed", "watermark", "too_small"} <= set(sides["filter"])
    assert sides["dedup"]["duplicate_exact"] >= 1 and sides["dedup"]["duplicate_near"] >= 1


def test_every_dropped_row_names_its_reason_and_stage(demo: Demo) -> None:
    work = Path(demo.cfg.run.work_dir)
    for step in ["plan", *MAP_STEPS]:
        for row in dropped_rows(work, step):
            assert row["drop_reason"], (step, row)
            assert row["dropped_by"], (step, row)
            assert row["key"], (step, row)


def test_each_shard_is_its_kept_plus_its_dropped(demo: Demo) -> None:
    """Per shard: the marker's counts are the files' rows; for deciding steps every input
    key comes out once, kept or dropped."""
    work = Path(demo.cfg.run.work_dir)
    for step in MAP_STEPS:
        for prefix, m in _markers(work, step):
            kept = pq.read_table(f"{prefix}.parquet", columns=["key"]).num_rows
            side = _rows(Path(f"{prefix}.dropped.parquet"), ["key", "drop_reason"])
            assert m["kept"] == kept and m["dropped"] == len(side), prefix
            assert Counter(m["drops"]) == reasons(side), prefix
            if step != "ingest":
                assert m["in"] == m["kept"] + m["dropped"], prefix
    for step, prev in [("filter", "ingest"), ("dedup", "filter"), ("caption", "dedup")]:
        out = kept_keys(work, step) + [r["key"] for r in dropped_rows(work, step)]
        assert Counter(out) == Counter(kept_keys(work, prev)), step


def test_every_planned_record_is_fetched_expanded_or_dropped(demo: Demo) -> None:
    """Ingest turns a page into its images: each planned record is dropped as itself, or
    is the page of the images it produced; each produced image comes from a planned page."""
    work = Path(demo.cfg.run.work_dir)
    planned = kept_keys(work, "plan")
    assert len(planned) == len(set(planned))
    dropped = dropped_rows(work, "ingest")
    kept = [
        r
        for p in list_shards(work / STEP_DIRS["ingest"])
        for r in _rows(Path(f"{p}.parquet"), ["key", "page_url"])
    ]
    produced = [r for r in [*dropped, *kept] if r["key"] not in set(planned)]
    pages = {make_key(r["page_url"]) for r in produced}
    dropped_planned = {r["key"] for r in dropped} & set(planned)
    assert pages <= set(planned), "an image from no planned page"
    assert set(planned) == dropped_planned | pages, "a planned record with no outcome"
    assert not dropped_planned & pages, "a page both dropped and expanded"
    images = [r["key"] for r in produced]
    assert len(images) == len(set(images)), "an image key out of ingest twice"


def test_every_key_ends_in_exactly_one_place(demo: Demo) -> None:
    """Released (any split), excluded by the release, or in one step's dropped output:
    each key that entered is in one of them, once."""
    work = Path(demo.cfg.run.work_dir)
    release = Path(demo.cfg.run.release_dir) / str(demo.cfg.run.release_name)
    places: Counter[str] = Counter()
    manifest = pq.read_table(release / "manifest.parquet", columns=["key"])["key"].to_pylist()
    places.update(set(manifest))
    places.update(pq.read_table(release / "excluded.parquet", columns=["key"])["key"].to_pylist())
    for step in ["plan", *MAP_STEPS]:
        places.update(r["key"] for r in dropped_rows(work, step))
    twice = {k: n for k, n in places.items() if n > 1}
    assert not twice, f"{len(twice)} keys in more than one place"
    planned = set(kept_keys(work, "plan"))
    ingest_out = set(kept_keys(work, "ingest")) | {r["key"] for r in dropped_rows(work, "ingest")}
    expanded = planned - ingest_out  # pages that became their images
    entered = (planned - expanded) | (ingest_out - planned)
    entered |= {r["key"] for r in dropped_rows(work, "plan")}
    assert set(places) == entered
    assert set(manifest) | set(
        pq.read_table(release / "excluded.parquet", columns=["key"])["key"].to_pylist()
    ) == set(kept_keys(work, "caption"))


def test_the_run_summary_states_the_side_outputs(demo: Demo) -> None:
    b = demo.first
    steps = {s["stage"]: s for s in b["summary"]}
    assert list(steps) == [*MAP_STEPS, "shard"]
    ingest = steps["ingest"]
    # the planner's drops are ingest's (dropped_by = "ingest"): the run summary counts them
    assert Counter(ingest["drops"]) == b["sides"]["ingest"] + b["sides"]["plan"]
    assert ingest["dropped"] == sum(ingest["drops"].values())
    for step in ["filter", "dedup", "caption"]:
        s = steps[step]
        assert Counter(s["drops"]) == b["sides"][step], step
        assert s["in"] == s["kept"] + s["dropped"] == sum(s["drops"].values()) + s["kept"], step
    for prev, step in [("ingest", "filter"), ("filter", "dedup"), ("dedup", "caption")]:
        assert steps[prev]["kept"] == steps[step]["in"], step
    shard, info = steps["shard"], b["release"]
    assert shard["in"] == steps["caption"]["kept"] == info["input_samples"]
    assert shard["kept"] == info["published_samples"]
    assert shard["dropped"] == b["excluded"] == sum(info["excluded"].values())
    assert Counter(shard["drops"]) == Counter(info["excluded"])
    assert shard["in"] == shard["kept"] + shard["dropped"]


def test_the_catalog_states_the_side_outputs(demo: Demo) -> None:
    b = demo.first
    all_drops = sum(b["sides"].values(), Counter())
    stats = b["catalog"]
    work = Path(demo.cfg.run.work_dir)
    assert Counter(stats["drop_reasons"]) == all_drops
    assert stats["by_status"].get("ok", 0) == len(kept_keys(work, "caption"))
    assert stats["samples"] == len(kept_keys(work, "caption")) + all_drops.total()
    (run,) = b["runs"]
    assert run["dropped"] == all_drops.total()
    assert stats["releases"] == {str(demo.cfg.run.release_name): b["release"]["published_samples"]}


def test_the_release_states_the_side_outputs(demo: Demo) -> None:
    b = demo.first
    info = b["release"]
    all_drops = sum(b["sides"].values(), Counter())
    assert Counter(info["drops"]["by_reason"]) == all_drops
    assert info["drops"]["total"] == all_drops.total()
    by_stage = info["drops"]["by_stage"]
    assert sum((Counter(v) for v in by_stage.values()), Counter()) == all_drops
    assert info["input_samples"] == info["published_samples"] + b["excluded"]
    release = Path(demo.cfg.run.release_dir) / str(demo.cfg.run.release_name)
    published, seen, card_drops = card_numbers((release / "README.md").read_text())
    assert (published, seen) == (info["published_samples"], info["input_samples"])
    assert card_drops == all_drops
    stages = {s["stage"]: s for s in info["stages"]}
    summary = {s["stage"]: s for s in b["summary"]}
    for step in MAP_STEPS:
        assert {k: stages[step][k] for k in ("in", "kept", "dropped", "drops")} == {
            k: summary[step][k] for k in ("in", "kept", "dropped", "drops")
        }, step


def test_the_report_states_the_summary_and_the_side_outputs(demo: Demo) -> None:
    b = demo.first
    assert b["report_reasons"] == sum(b["sides"].values(), Counter())
    assert b["report_steps"] == {
        s["stage"]: [s["in"], s["kept"], s["dropped"]] for s in b["summary"]
    }


def test_rerunning_a_finished_pipeline_changes_no_count(demo: Demo) -> None:
    assert demo.rerun == demo.first
    assert demo.again == demo.first


def test_release_exclusions_are_counted_by_the_shard_step(demo: Demo, tmp_path: Path) -> None:
    """A release that publishes fewer samples than the run kept says so in the run
    summary and the report, with the same reasons as its excluded.parquet (here: a
    finished caption shard met twice, so its keys are excluded as `duplicate_key`)."""
    work = tmp_path / "work"
    shutil.copytree(demo.cfg.run.work_dir, work)
    caption = work / STEP_DIRS["caption"]
    first = list_shards(caption)[0]
    for f in sorted(caption.glob(f"{first.name}.*")):
        shutil.copy(f, caption / f.name.replace(first.name, "zz-copy", 1))
    copied = pq.read_table(f"{first}.parquet").num_rows
    data = demo.cfg.model_dump(mode="json")
    data["run"].update(
        work_dir=str(work),
        release_dir=str(tmp_path / "releases"),
        release_name="twice",
        catalog_dir=None,
    )
    cfg = parse_config(data, "accounting-twice")
    Pipeline(cfg).run(["shard"])
    (shard,) = json.loads((work / "summary.json").read_text())["steps"]
    excluded = pq.read_table(tmp_path / "releases" / "twice" / "excluded.parquet")
    n = len(kept_keys(work, "caption"))
    assert copied > 0 and excluded["reason"].to_pylist() == ["duplicate_key"] * copied
    assert (shard["in"], shard["kept"], shard["dropped"]) == (n, n - copied, copied)
    assert shard["drops"] == {"duplicate_key": copied}
    steps, _ = report_numbers(work / "report.html")
    assert steps["shard"] == [n, n - copied, copied]
