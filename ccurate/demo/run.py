"""`ccurate demo`: generate the corpus, serve it on loopback, run every step, check the result."""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import typer
from rich.console import Console

from ccurate.config import ConfigError, PipelineConfig, looks_local, parse_config
from ccurate.demo.corpus import DemoCorpus, generate, load
from ccurate.demo.server import serve_directory

# The demo's loopback port: URLs (and so keys and the release's bytes) must not change
# between runs, or the same corpus would give another SHA256SUMS every time.
DEMO_PORT = 18765

# Printed on Ctrl-C: unlike a pipeline run, the demo does not resume (it remakes work/ and
# releases/ every run), so "rerun to resume" would be untrue here.
INTERRUPTED = "interrupted: `ccurate demo` starts afresh on every run: rerun it to start over"

# What each planted problem may be dropped for; `keep` means it must survive.
EXPECTED_REASONS: dict[str, set[str]] = {
    "license": {"license_unknown", "license_not_allowed", "license_conflict"},
    "duplicate": {"duplicate_exact", "duplicate_near"},
    "watermark": {"watermark"},
    "too_small": {"too_small"},
    "broken": {"decode_error", "not_an_image"},
}


def demo_config(
    corpus: DemoCorpus,
    base_url: str,
    out: Path,
    workers: int,
    caption_model: str | None,
    train_steps: int,
) -> PipelineConfig:
    """The demo's pipeline config: every stage on, tuned to the corpus, private fetch allowed.
    Its paths are stated relative to `out`, as a config file in `out` would."""
    out = out.resolve()
    cwd = Path.cwd()
    if caption_model and looks_local(caption_model, cwd):
        # a local path given on the command line means one relative to the caller
        caption_model = str((cwd / Path(caption_model).expanduser()).resolve())
    data: dict[str, Any] = {
        "run": {
            "name": "demo",
            "work_dir": str(out / "work"),
            "release_dir": str(out / "releases"),
            "release_name": "demo-v1",
            "workers": workers,
            "partition_size": 4,
        },
        "sources": [{"type": "pages", "urls": [base_url + p for p in corpus.pages]}],
        "ingest": {"allow_private": True, "image_size": 256},
        "dedup": {"radius": 6},
        "caption": {"model": caption_model},
        "shards": {"samples_per_shard": 32},
        "train": {"preset": "tiny", "steps": train_steps},
    }
    return parse_config(data, "demo", base=out)


@dataclass
class DemoCheck:
    """How the run treated each planted image, compared with what was planted."""

    # url path -> (status, reason)
    outcomes: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)
    wrong_paths: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.wrong


class DemoCheckFailed(typer.Exit):
    """`ccurate demo` (and `make demo`) exit 1 when a planted defect slipped through: the
    mismatches alone scrolled by under an exit status of 0."""

    def __init__(self, check: DemoCheck) -> None:
        super().__init__(code=1)
        self.check = check


def final_outcomes(work: Path) -> dict[str, tuple[str, str | None]]:
    """url -> ("kept", None) or ("dropped", reason), from every step's shards."""
    result: dict[str, tuple[str, str | None]] = {}
    for p in sorted(work.glob("*/*.dropped.parquet")) + sorted(
        work.glob("00_plan/planned-dropped.parquet")
    ):
        t = pq.read_table(p, columns=["url", "drop_reason"])
        for url, reason in zip(t["url"].to_pylist(), t["drop_reason"].to_pylist(), strict=True):
            result[url] = ("dropped", reason)
    kept = sorted((work / "40_caption").glob("*.parquet"))
    kept = [p for p in kept if not p.name.endswith(".dropped.parquet")]
    if kept:
        urls = pa.concat_tables([pq.read_table(p, columns=["url"]) for p in kept])[
            "url"
        ].to_pylist()
        for url in urls:
            result[url] = ("kept", None)
    return result


def check_demo(corpus: DemoCorpus, base_url: str, work: Path) -> DemoCheck:
    """Compare outcomes with what was planted. A duplicate group (an original and its
    copies) must keep exactly one member: dedup's keep policy may prefer a copy (e.g.
    one with more pixels), so which member survives is the policy's choice, not ours."""
    outcomes = final_outcomes(work)
    check = DemoCheck()
    groups: dict[str, list[str]] = {}
    for img in corpus.images:
        if img.group is not None:
            groups.setdefault(img.group, [img.group]).append(img.path)
    in_group = {p for members in groups.values() for p in members}
    for img in corpus.images:
        status, reason = outcomes.get(base_url + img.path, ("missing", None))
        check.outcomes[img.path] = (status, reason)
        if img.path in in_group:
            continue
        if img.expected == "keep":
            if status != "kept":
                check.wrong.append(f"{img.path}: expected kept, got {status} {reason}")
                check.wrong_paths.add(img.path)
        elif status != "dropped" or reason not in EXPECTED_REASONS[img.expected]:
            check.wrong.append(f"{img.path}: expected {img.expected} drop, got {status} {reason}")
            check.wrong_paths.add(img.path)
    for members in groups.values():
        results = [check.outcomes[p] for p in members]
        kept = [p for p, (status, _) in zip(members, results, strict=True) if status == "kept"]
        bad = [
            f"{p} {status} {reason}"
            for p, (status, reason) in zip(members, results, strict=True)
            if status != "kept" and reason not in EXPECTED_REASONS["duplicate"]
        ]
        if len(kept) != 1 or bad:
            check.wrong.append(
                f"duplicate group {members}: expected one kept and the rest dropped as "
                f"duplicates, got kept={kept} other={bad}"
            )
            check.wrong_paths.update(members)
    return check


DEMO_MARKER = ".ccurate-demo"


def _claim(out: Path) -> None:
    """Mark `out` as the demo's, refusing a folder whose `work/` or `releases/` the demo did
    not make: those are every project's default work and release folders, and each demo
    run starts them afresh (`--out .` in a project would have deleted its catalog and
    releases)."""
    marker = out / DEMO_MARKER
    # a demo folder from before the marker has the demo corpus's truth file
    if not marker.exists() and not (out / "corpus" / "truth.json").exists():
        theirs = [d for d in ("work", "releases") if (out / d).exists()]
        if theirs:
            raise ConfigError(
                f"{out} holds {' and '.join(d + '/' for d in theirs)} that `ccurate demo` did "
                "not make, and a demo run starts them afresh: choose another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by `ccurate demo`: its work/ and releases/ are remade each run\n")


def run_demo(
    out: Path,
    workers: int = 2,
    caption_model: str | None = None,
    train_steps: int = 20,
    console: Console | None = None,
) -> DemoCheck:
    """Start fresh, run every step on the loopback corpus, print the summary and the check."""
    from ccurate.pipeline import Pipeline
    from ccurate.summary import print_summary

    console = console or Console()
    out = Path(out).resolve()
    _claim(out)
    corpus_dir = out / "corpus"
    corpus = load(corpus_dir) if (corpus_dir / "truth.json").exists() else generate(corpus_dir)
    # the settings are checked before anything is removed: a bad option changes nothing
    demo_config(corpus, f"http://127.0.0.1:{DEMO_PORT}", out, workers, caption_model, train_steps)
    for stale in ("work", "releases"):
        shutil.rmtree(out / stale, ignore_errors=True)
    console.print(
        f"demo corpus: {len(corpus.images)} images on {len(corpus.pages)} pages in {corpus_dir}"
    )
    with serve_directory(corpus_dir, port=DEMO_PORT) as base_url:
        console.print(f"serving it on {base_url} (loopback only)")
        if not base_url.endswith(f":{DEMO_PORT}"):
            console.print(
                f"[yellow]port {DEMO_PORT} is busy[/yellow]: URLs, keys and the release's "
                "SHA256SUMS will differ from a run on the usual port"
            )
        cfg = demo_config(corpus, base_url, out, workers, caption_model, train_steps)
        pipe = Pipeline(cfg)
        results = pipe.run()
        check = check_demo(corpus, base_url, Path(cfg.run.work_dir))
    print_summary(results, console)
    expected = Counter(i.expected for i in corpus.images)
    caught = Counter(i.expected for i in corpus.images if i.path not in check.wrong_paths)
    console.print(
        "planted vs caught: "
        + ", ".join(f"{k} {caught[k]}/{v}" for k, v in sorted(expected.items()))
    )
    for line in check.wrong[:20]:
        console.print(f"[yellow]mismatch[/yellow] {line}")
    for r in results:
        for k, v in r.outputs.items():
            console.print(f"{k}: {v}")
    console.print(f"report: {pipe.report_path}")
    if not check.ok:
        console.print(
            f"[bold red]demo check FAILED[/bold red]: {len(check.wrong_paths)} planted images "
            "were not handled as planted (mismatches above)"
        )
        raise DemoCheckFailed(check)
    return check
