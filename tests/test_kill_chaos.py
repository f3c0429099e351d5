"""Kill chaos: SIGKILL the pipeline (or one pool worker) at many moments, rerun, compare.

The promise under test: every stage is resumable and idempotent. Killed at any moment, a
rerun finishes the job with nothing lost and nothing duplicated, and gives the release an
uninterrupted run gives, byte for byte; published files appear atomically and durably
(data before name, name before the marker that vouches for it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest

from ccurate.config import parse_config
from ccurate.demo.corpus import DemoCorpus, generate
from ccurate.demo.server import serve_directory
from ccurate.executor import Executor, ShardTask
from ccurate.pipeline import Pipeline, StepResult
from ccurate.record import Sample, make_key
from ccurate.shardio import MARKER, ShardWriter, write_partition
from ccurate.stage import Stage, StageStats

REPO = Path(__file__).resolve().parent.parent
STEPS = "ingest,filter,dedup,caption,shard"


def _sample(url: str, **kw: Any) -> Sample:
    return Sample(key=make_key(url), url=url, **kw)


# -- the end-to-end harness ----------------------------------------------------------------
def _config(out: Path, base: str, pages: list[str]) -> Path:
    urls = ", ".join(f'"{base}{p}"' for p in pages)
    cfg = out / "cfg.toml"
    cfg.write_text(
        textwrap.dedent(f"""
        [run]
        name = "chaos"
        work_dir = "{out / "work"}"
        release_dir = "{out / "releases"}"
        release_name = "v1"
        catalog_dir = "{out / "catalog"}"
        workers = 2
        partition_size = 4
        [[sources]]
        type = "pages"
        urls = [{urls}]
        [ingest]
        allow_private = true
        image_size = 128
        [dedup]
        radius = 6
        [shards]
        samples_per_shard = 8
        """),
        encoding="utf-8",
    )
    return cfg


def _cmd(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "ccurate.cli", "run", str(cfg), "--steps", STEPS]


ENV = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200", HF_HUB_OFFLINE="1")


def _run(cfg: Path) -> None:
    r = subprocess.run(_cmd(cfg), env=ENV, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def _kill_when(cfg: Path, pattern: str, worker: bool = False, timeout: float = 300) -> bool:
    """Start a run; SIGKILL it (or one of its pool workers) as soon as `pattern` matches
    under the run's folder. False when the run finished first."""
    root = cfg.parent
    proc = subprocess.Popen(
        _cmd(cfg), env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline and not list(root.glob(pattern)):
            time.sleep(0.003)
        if proc.poll() is not None:
            return False
        if worker:
            kids = _pool_workers(proc.pid)
            if not kids:
                return False
            os.kill(kids[0], signal.SIGKILL)
            proc.wait(timeout=timeout)  # the run fails (broken pool), or finishes
            return True
        proc.kill()
        return True
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _pool_workers(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and "spawn_main" in cmd:
            out.append(int(d.name))
    return out


def _state(out: Path) -> dict[str, Any]:
    """What a run leaves that must not depend on whether it was killed."""
    rel = out / "releases" / "v1"
    summary = json.loads((out / "work" / "summary.json").read_text())
    con = duckdb.connect(str(out / "catalog" / "catalog.duckdb"), read_only=True)
    try:
        catalog = {
            "samples": con.execute(
                "SELECT status, drop_reason, count(*), count(DISTINCT key) FROM samples "
                "GROUP BY ALL ORDER BY ALL"
            ).fetchall(),
            "runs": con.execute("SELECT run_id, kept, dropped FROM runs").fetchall(),
            "release": con.execute(
                "SELECT release, count(*), count(DISTINCT key) FROM release_samples GROUP BY ALL"
            ).fetchall(),
        }
    finally:
        con.close()
    shards = {}
    for step in ("10_ingest", "20_filter", "30_dedup", "40_caption"):
        for p in sorted((out / "work" / step).iterdir()):
            if p.suffix in (".tar", ".parquet"):
                shards[f"{step}/{p.name}"] = p.read_bytes()
    return {
        "sums": (rel / "SHA256SUMS").read_text(),
        "counts": {
            s["stage"]: (s["in"], s["kept"], s["dropped"], s["drops"]) for s in summary["steps"]
        },
        "catalog": catalog,
        "shards": shards,
    }


def _leftovers(out: Path) -> list[str]:
    return [str(p) for p in out.rglob("*") if "tmp" in p.name or p.name.startswith(".tmp")]


def _wipe(out: Path) -> None:
    import shutil

    for d in ("work", "releases", "catalog"):
        shutil.rmtree(out / d, ignore_errors=True)


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A small demo corpus served on loopback and an uninterrupted reference run of it.
    Killed runs reuse the same folder and config (paths are in release.json)."""
    root = tmp_path_factory.mktemp("chaos")
    corpus: DemoCorpus = generate(root / "corpus", n_images=24, per_page=4)
    with serve_directory(corpus.root) as base:
        out = root / "run"
        out.mkdir()
        cfg = _config(out, base, corpus.pages)
        _run(cfg)
        reference = _state(out)
        assert reference["counts"]["shard"][1] > 0
        yield cfg, reference


def _kill_and_resume(cfg: Path, reference: dict[str, Any], *kills: tuple[str, bool]) -> None:
    """Kill a fresh run at the first point, each resuming rerun at the next; then rerun to
    the end and compare with the reference."""
    out = cfg.parent
    _wipe(out)
    landed = [_kill_when(cfg, pattern, worker) for pattern, worker in kills]
    assert landed[0], f"the run finished before {kills[0]}"
    _run(cfg)
    got = _state(out)
    assert got["sums"] == reference["sums"]
    assert got["counts"] == reference["counts"]
    assert got["catalog"] == reference["catalog"]
    assert got["shards"].keys() == reference["shards"].keys()
    assert got["shards"] == reference["shards"]
    assert not _leftovers(out)


@pytest.mark.timeout(600)
def test_killed_in_filter_and_again_while_resuming_gives_the_same_release(chaos) -> None:
    """Killed when the first filter shard is published, the rerun killed again in dedup's
    plan: the last rerun's release has the reference's SHA256SUMS (release.json states no
    resumed-shard counts), the same drop counts, and a catalog without doubles."""
    cfg, reference = chaos
    _kill_and_resume(
        cfg, reference, ("work/20_filter/*.done", False), ("work/30_dedup/_prepare/*", False)
    )


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize(
    "kills",
    [
        [("work/00_plan/*", False)],
        [("work/10_ingest/*.done", False)],
        [("work/10_ingest/_COMPLETE", False)],
        [("work/20_filter/.*tmp*", False)],
        [("work/20_filter/*.done", True)],
        [("work/30_dedup/_prepare/*.parquet", False)],
        [("work/30_dedup/*.done", False)],
        [("work/40_caption/*.done", False)],
        [("work/40_caption/*.done", True)],
        [("releases/.tmp-*/*", False)],
        [("releases/v1", False)],
        [("catalog/catalog.duckdb*", False)],
        [("work/summary.json", False)],
        [("work/10_ingest/*.done", False), ("work/20_filter/*.done", True)],
        [("work/20_filter/_COMPLETE", False), ("work/30_dedup/*.done", False)],
    ],
    ids=lambda k: "+".join(f"{p}{'(worker)' if w else ''}" for p, w in k),
)
def test_killed_anywhere_a_rerun_gives_the_same_release(chaos, kills) -> None:
    cfg, reference = chaos
    _kill_and_resume(cfg, reference, *kills)


# -- pool workers die with their driver --------------------------------------------------------
class _SlowStage(Stage):
    """Records its worker's pid, then takes long over every batch."""

    name = "slow"

    def __init__(self, pids: str) -> None:
        self.pids = pids

    def setup(self) -> None:
        with open(self.pids, "a") as fh:
            fh.write(f"{os.getpid()}\n")

    def process(self, batch: list[Sample]) -> list[Sample]:
        time.sleep(60)
        return batch


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.timeout(120)
def test_pool_workers_exit_when_their_driver_is_killed(tmp_path: Path) -> None:
    """SIGKILL of the driver left its spawned pool workers blocked on their task pipe
    forever (they hold both ends of it): orphans holding models, racing the rerun."""
    for i in range(2):
        write_partition(tmp_path / f"in-{i}", [_sample(f"http://x/{i}.jpg")])
    pids = tmp_path / "pids"
    script = textwrap.dedent(f"""
        from ccurate.executor import LocalExecutor, tasks_for
        from tests.test_kill_chaos import _SlowStage
        LocalExecutor(2, progress=False).map(
            _SlowStage({str(pids)!r}),
            tasks_for([{str(tmp_path / "in-0")!r}, {str(tmp_path / "in-1")!r}],
                      {str(tmp_path / "out")!r}),
        )
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=ENV)
    workers: list[int] = []
    try:
        deadline = time.time() + 90
        while time.time() < deadline and len(workers) < 2:
            time.sleep(0.05)
            workers = [int(x) for x in pids.read_text().split()] if pids.exists() else []
        assert len(workers) == 2, "the pool did not start"
        proc.kill()
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.05)
        left = [p for p in workers if _alive(p)]
        assert not left, f"pool workers outlived their killed driver: {left}"
    finally:
        for p in workers:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- durability order --------------------------------------------------------------------------
def test_a_shard_is_durable_before_its_marker(tmp_path: Path, monkeypatch) -> None:
    """Every file a marker vouches for is fsynced under its temporary name, renamed, and the
    renames made durable (directory fsync) before the marker is renamed into place. Without
    it, a power cut can leave a marker naming an empty parquet index, which a rerun adopts."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("rename", str(dst)))
        events.append(("renamed-from", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    prefix = tmp_path / "shards" / "shard-00000"
    w = ShardWriter(prefix)
    kept = _sample("http://x/a.jpg", image=b"\xff\xd8jpeg", mime="image/jpeg")
    dropped = _sample("http://x/b.jpg")
    dropped.drop("too_small", "quality")
    w.write(kept)
    w.write(dropped)
    w.commit({"stage": "t"})

    marker = f"{prefix}{MARKER}"
    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    marker_at = next(i for i in renames if events[i][1] == marker)
    directory = str(prefix.parent)
    for i in renames:
        src = events[i + 1][1]
        assert ("fsync", src) in events[:i], f"{events[i][1]} renamed before its data was synced"
    for name in (".tar", ".parquet", ".dropped.parquet"):
        at = next(i for i in renames if events[i][1] == f"{prefix}{name}")
        assert ("fsync", directory) in events[at:marker_at], f"{name} rename not durable"
    assert ("fsync", directory) in events[marker_at:], "the marker's rename is not durable"


# -- nothing lost: the passes recorded in a step's _COMPLETE -------------------------------
class _KilledOnce(Executor):
    """Dies (as a kill would) in the first map; maps nothing in the next."""

    def __init__(self) -> None:
        self.calls = 0

    def map(self, stage: Stage, tasks: list[ShardTask], label: str | None = None) -> StageStats:
        self.calls += 1
        if self.calls == 1:
            raise KeyboardInterrupt
        return StageStats(stage.name, shards=len(tasks), skipped_shards=len(tasks))

    def _run(self, stage: Stage, todo: list[ShardTask]) -> Iterator[StageStats]:
        raise AssertionError("not used")


class _Noop(Stage):
    name = "noop"

    def process(self, batch: list[Sample]) -> list[Sample]:
        return batch


def test_a_kill_while_a_step_is_remapped_keeps_its_retry_passes(tmp_path: Path) -> None:
    """A full map of a finished step unlinks `_COMPLETE` (the inputs may have grown) and
    rewrites it with the earlier passes' entries (e.g. `retry`) it held; killed in between,
    the rerun found no `_COMPLETE` and those entries were gone for good."""
    cfg = parse_config({"run": {"work_dir": str(tmp_path / "work")}}, "t")
    pipe = Pipeline(cfg, executor=_KilledOnce())
    write_partition(tmp_path / "in-0", [_sample("http://x/a.jpg")])
    pipe._check_settings("filter")
    complete = pipe.step_dir("filter") / "_COMPLETE"
    retry = [{"shard": "retry-0001", "stats": {"stage": "retry", "in": 3}}]
    complete.write_text(json.dumps({"shards": 1, "stats": {}, "retry": retry}))
    with pytest.raises(KeyboardInterrupt):
        pipe.map_step("filter", _Noop(), [str(tmp_path / "in-0")])
    pipe.map_step("filter", _Noop(), [str(tmp_path / "in-0")])
    assert json.loads(complete.read_text()).get("retry") == retry


def test_run_info_does_not_say_how_many_shards_a_rerun_found_done(tmp_path: Path) -> None:
    """release.json (and so SHA256SUMS) holds run_info: a resumed run's `skipped_shards`
    made a release built after a kill differ from an uninterrupted run's."""
    cfg = parse_config({"run": {"work_dir": str(tmp_path / "work")}}, "t")
    fresh, resumed = Pipeline(cfg), Pipeline(cfg)
    fresh.results = [StepResult("filter", StageStats("filter", 4, 3, 1, shards=2), 1.0)]
    resumed.results = [
        StepResult("filter", StageStats("filter", 4, 3, 1, shards=2, skipped_shards=1), 0.5)
    ]
    from shards.release import stable_run_info

    assert stable_run_info(fresh.run_info()) == stable_run_info(resumed.run_info())


def test_a_kill_between_dedup_decisions_and_summary_leaves_no_stale_summary(
    tmp_path: Path, monkeypatch
) -> None:
    """The decisions file is what a rerun adopts (by fingerprint): written before the
    summary, a kill between the two left a plan whose dedup_summary.json was missing (or
    an older plan's) for good."""
    import filters.dedup as dedup

    real = dedup.write_json_atomic

    def killed(path: Any, data: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(dedup, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        dedup.DedupStage(dedup.DedupConfig()).prepare([], str(tmp_path / "scratch"))
    monkeypatch.setattr(dedup, "write_json_atomic", real)
    dedup.DedupStage(dedup.DedupConfig()).prepare([], str(tmp_path / "scratch"))
    assert (tmp_path / "scratch" / dedup.SUMMARY_FILE).exists()


def test_a_step_removes_the_temporaries_a_killed_run_left(tmp_path: Path) -> None:
    """Only a redone shard's temporaries were removed (`clear_shard`): a kill while
    `_SETTINGS`, `_COMPLETE`, dedup's plan or summary.json was being written left its
    `.name.tmp-*` file in the work folders for good."""
    cfg = parse_config({"run": {"work_dir": str(tmp_path / "work")}}, "t")
    pipe = Pipeline(cfg, executor=_KilledOnce())
    write_partition(tmp_path / "in-0", [_sample("http://x/a.jpg")])
    step = pipe.step_dir("filter")
    (step / "_prepare").mkdir(parents=True)
    stale = [
        step / "._SETTINGS.tmp-999999-0a1b2c3d",
        step / "_prepare" / ".dedup_decisions.parquet.tmp-999999-0a1b2c3d",
    ]
    for p in stale:
        p.write_bytes(b"half")
    with pytest.raises(KeyboardInterrupt):
        pipe.map_step("filter", _Noop(), [str(tmp_path / "in-0")])
    assert not [p for p in stale if p.exists()]


def test_a_kill_while_clearing_a_step_does_not_let_the_rerun_adopt_its_old_shards(
    tmp_path: Path, monkeypatch
) -> None:
    """Changed settings clear the step's folder; an rmtree killed after it removed
    `_SETTINGS` but before the shards left finished shards without settings, which the
    rerun adopted as a folder from before settings were recorded."""
    import shutil

    import ccurate.pipeline as pipeline

    work = tmp_path / "work"
    old = Pipeline(parse_config({"run": {"work_dir": str(work)}}, "t"))
    old._check_settings("filter")
    shard = old.step_dir("filter") / "shard-00000"
    Path(f"{shard}.parquet").write_bytes(b"old")
    Path(f"{shard}{MARKER}").write_text("{}")
    new = Pipeline(
        parse_config({"run": {"work_dir": str(work)}, "filters": {"quality": {"min_side": 7}}}, "t")
    )
    real = shutil.rmtree

    def killed_halfway(path: Any, *args: Any, **kw: Any) -> None:
        Path(path, "_SETTINGS").unlink()  # the first entry it happened to remove
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        new._check_settings("filter")
    monkeypatch.setattr(shutil, "rmtree", real)
    new._check_settings("filter")
    assert not Path(f"{shard}{MARKER}").exists(), "the old settings' shard was adopted"
    assert (
        pipeline._changed_keys(
            json.loads((new.step_dir("filter") / "_SETTINGS").read_text()),
            new.step_settings("filter"),
        )
        == []
    )
    assert not list(work.glob(".*cleared*"))
