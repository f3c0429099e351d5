"""The command line's exit codes and messages: bad options and configs, steps run too early,
the Ray executor options, takedown and lookup errors, unexpected failures, Ctrl-C.

Exit codes (ccurate.cli): 0 ok, 1 unexpected error, 2 bad config or usage, 3 a step cannot
run yet, 4 locked. Messages are printed with rich, which would read `[word]` as markup:
they must come out as written (paths, URLs and `[[sources]]` stay copyable).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
from PIL import Image
from typer.testing import CliRunner, Result

from ccurate import __version__, cli
from ccurate.cli import app, load_run_config, make_executor
from ccurate.config import ConfigError
from ccurate.demo.corpus import landscape
from ccurate.executor import LocalExecutor
from ccurate.pipeline import PipelineError, StepResult
from ccurate.stage import StageStats

runner = CliRunner()


def _invoke(*args: str) -> Result:
    return runner.invoke(app, list(args), env={"COLUMNS": "400"})  # no rich wrapping


def _flat(res: Result) -> str:
    return " ".join(res.output.split())


def _config(tmp_path: Path, extra: str = "", sources: bool = True) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    p = tmp_path / "c.toml"
    src = '[[sources]]\ntype = "pages"\nurls = ["http://127.0.0.1:9/p.html"]\n' if sources else ""
    p.write_text(
        f'[run]\nwork_dir = "{tmp_path / "work"}"\n{src}[rebuild]\nreport = false\n{extra}'
    )
    return p


# --------------------------------------------------------------------------- run options


_ZERO = (["--workers", "0"], "--workers 0: Input should be greater than or equal to 1")
_MANY = (["-w", "5000"], "--workers 5000: Input should be less than or equal to 1024")
_RAU = (["--executor", "rau"], "--executor 'rau': String should match pattern")


@pytest.mark.parametrize(
    ("command", "args", "needle"),
    [
        ("run", *_ZERO),
        ("run", *_MANY),
        ("run", *_RAU),
        ("ingest", *_ZERO),
        ("filter", *_MANY),
        ("rebuild", *_ZERO),
        ("rebuild", *_RAU),
    ],
)
def test_bad_run_options_exit_2_naming_the_option(
    tmp_path: Path, command: str, args: list[str], needle: str
) -> None:
    """A bad --workers / --executor is a usage error (2), not a traceback (it was exit 1)."""
    res = _invoke(command, str(_config(tmp_path)), *args)
    assert res.exit_code == 2, res.output
    assert needle in _flat(res)
    assert "Traceback" not in res.output


def test_overrides_and_the_executor_they_choose(tmp_path: Path) -> None:
    from ccurate.ray_executor import RayExecutor

    cfg_path = _config(tmp_path, extra="", sources=True)
    cfg = load_run_config(cfg_path, 3, "ray", "ray://10.1.2.3:10001")
    assert (cfg.run.workers, cfg.run.executor, cfg.run.ray_address) == (
        3,
        "ray",
        "ray://10.1.2.3:10001",
    )
    ex = make_executor(cfg)
    assert isinstance(ex, RayExecutor) and ex.address == "ray://10.1.2.3:10001"
    local = make_executor(load_run_config(cfg_path, 2))
    assert isinstance(local, LocalExecutor) and local.workers == 2
    # nothing given: the file's [run] values stand
    plain = load_run_config(cfg_path, None)
    assert (plain.run.workers, plain.run.executor, plain.run.ray_address) == (1, "local", None)


class _FakePipeline:
    """Stands in for Pipeline: records what the command built, returns a shard result."""

    seen: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: Any, executor: Any, retry_reasons: frozenset[str]) -> None:
        self.seen.update(cfg=cfg, executor=executor, retry_reasons=retry_reasons)
        self.report_path = Path(cfg.run.work_dir) / "[gen 1]" / "report.html"

    def run(self, steps: list[str]) -> list[StepResult]:
        self.seen["steps"] = steps
        release = Path(self.seen["cfg"].run.release_dir) / "ccurate-[v1]"
        stats = StageStats("shard", n_in=5, n_kept=4, n_dropped=1, shards=1)
        return [StepResult("shard", stats, 0.5, {"release": str(release)})]


def test_run_hands_the_ray_executor_to_the_pipeline_and_prints_the_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ccurate.ray_executor import RayExecutor

    monkeypatch.setattr("ccurate.pipeline.Pipeline", _FakePipeline)
    cfg = _config(tmp_path)
    res = _invoke(
        "run",
        str(cfg),
        "--executor",
        "ray",
        "--address",
        "ray://h:1",
        "-w",
        "3",
        "--steps",
        "shard",
    )
    assert res.exit_code == 0, res.output
    seen = _FakePipeline.seen
    assert seen["steps"] == ["shard"] and seen["cfg"].run.workers == 3
    assert isinstance(seen["executor"], RayExecutor) and seen["executor"].address == "ray://h:1"
    # the release and report paths print as they are (brackets are not rich markup)
    release = Path(seen["cfg"].run.release_dir) / "ccurate-[v1]"
    assert f"release: {release}" in res.output
    assert f"report: {tmp_path / 'work' / '[gen 1]' / 'report.html'}" in res.output


# --------------------------------------------------------------------------- steps, routing


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["caption"], "step 'caption' needs the output of 'dedup'"),
        (["shard"], "step 'shard' needs the output of 'caption'"),
        (["train"], "run 'ccurate shard' first"),  # `train CONFIG` means `train run CONFIG`
        (["train", "run"], "run 'ccurate shard' first"),
    ],
)
def test_steps_without_their_input_exit_3(tmp_path: Path, args: list[str], needle: str) -> None:
    res = _invoke(*args, str(_config(tmp_path)))
    assert res.exit_code == 3, res.output
    assert "cannot run" in res.output and needle in _flat(res)


def test_train_subcommands_are_not_taken_for_a_config() -> None:
    res = _invoke("train", "precompute", "--help")
    assert res.exit_code == 0, res.output
    assert "ccurate train precompute [OPTIONS]" in _flat(res) and "--data" in res.output


def test_messages_keep_their_square_brackets(tmp_path: Path) -> None:
    """`[[sources]]` used to print as `[]`: rich took `[sources]` for a style tag."""
    cfg = _config(tmp_path, sources=False)
    res = _invoke("ingest", str(cfg))
    assert res.exit_code == 3
    assert "no [[sources]] configured: nothing to ingest" in _flat(res)
    res = _invoke("rebuild", str(cfg))
    assert res.exit_code == 3, res.output
    assert "no [[sources]] configured: nothing to rebuild from" in _flat(res)
    log = (tmp_path / "work" / "logs" / "rebuild.log").read_text()
    assert "rebuild not run: no [[sources]] configured" in log


def test_version_prints_the_package_version() -> None:
    res = _invoke("--version")
    assert res.exit_code == 0 and res.output == f"ccurate {__version__}\n"


def test_interrupt_says_how_to_resume_and_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "app", interrupted)
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 130
    assert "interrupted: rerun the same command to resume" in capsys.readouterr().err


def test_demo_passes_its_options_and_maps_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Path, dict[str, Any]]] = []

    def fake_demo(out: Path, **kw: Any) -> None:
        calls.append((out, kw))
        if kw["train_steps"] == 2:
            raise PipelineError("no finished release in [demo]: run 'ccurate shard' first")
        if kw["train_steps"] == 1:
            raise ConfigError("caption.model: not found")

    monkeypatch.setattr("ccurate.demo.run.run_demo", fake_demo)
    args = ["demo", "--out", str(tmp_path / "d"), "-w", "3", "--caption-model", "blip"]
    res = _invoke(*args, "--train-steps", "7")
    assert res.exit_code == 0, res.output
    out, kw = calls[0]
    assert out == tmp_path / "d"
    assert (kw["workers"], kw["caption_model"], kw["train_steps"]) == (3, "blip", 7)
    res = _invoke(*args, "--train-steps", "2")
    assert res.exit_code == 3 and "no finished release in [demo]" in _flat(res)
    res = _invoke(*args, "--train-steps", "0")  # refused before the demo starts
    assert res.exit_code == 2 and len(calls) == 2
    res = _invoke(*args, "--train-steps", "1")
    assert res.exit_code == 2 and "config error: caption.model: not found" in _flat(res)


# --------------------------------------------------------------------------- rebuild


def test_rebuild_unexpected_failure_exits_1_with_the_traceback_in_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*a: Any, **k: Any) -> None:
        raise RuntimeError("disk on fire [sda1]")

    monkeypatch.setattr("ccurate.rebuild.rebuild", broken)
    res = _invoke("rebuild", str(_config(tmp_path)))
    assert res.exit_code == 1
    log = tmp_path / "work" / "logs" / "rebuild.log"
    text = _flat(res)
    assert "failed: RuntimeError: disk on fire [sda1]" in text
    assert f"traceback in {log}" in text and "Traceback" not in res.output
    logged = log.read_text()
    assert "rebuild failed" in logged and "Traceback" in logged
    assert "RuntimeError: disk on fire [sda1]" in logged


# --------------------------------------------------------------------------- takedown


def test_takedown_add_and_list_through_the_config(tmp_path: Path) -> None:
    """--config finds the catalog (default <work_dir>/catalog); the table shows what was added."""
    cfg = _config(tmp_path)
    res = _invoke(
        "takedown",
        "add",
        "--config",
        str(cfg),
        "--author",
        "Li Wei",
        "--phash",
        "8f373714acfcf4d0",
        "--radius",
        "3",
        "--reason",
        "[urgent] DMCA notice",
        "--by",
        "legal@example.org",
    )
    assert res.exit_code == 0, res.output
    listed = tmp_path / "work" / "catalog" / "takedowns.jsonl"
    rows = [json.loads(line) for line in listed.read_text().splitlines()]
    assert [(r["kind"], r["value"]) for r in rows] == [
        ("author", "li wei"),
        ("phash", "8f373714acfcf4d0"),
    ]
    assert rows[1]["radius"] == 3 and "radius" not in rows[0]
    assert f"takedown list: {listed}" in _flat(res)
    res = _invoke("takedown", "list", "--config", str(cfg))
    assert res.exit_code == 0, res.output
    text = _flat(res)
    assert f"{listed} (2 entries)" in text
    assert "li wei" in text and "8f373714acfcf4d0" in text and "legal@example.org" in text
    assert text.count("[urgent] DMCA notice") == 2  # not eaten as a rich style tag


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "nothing to add: give --url"),
        (["--phash", "xyz"], "perceptual hash (16 hex digits): 'xyz'"),
        (["--url", "ftp://a.example/x.jpg"], "ftp://a.example/x.jpg"),
        (["--image", "{tmp}/missing.jpg"], "missing.jpg"),
    ],
)
def test_takedown_add_errors_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = _invoke("takedown", "add", "--catalog", str(tmp_path / "cat"), *args)
    assert res.exit_code == 2, res.output
    assert needle in _flat(res)
    assert not (tmp_path / "cat" / "takedowns.jsonl").exists()


def test_takedown_into_a_catalog_that_is_a_file_exits_1_with_a_traceback(tmp_path: Path):
    """An unexpected OS error is exit 1 with the error named and its traceback on stderr."""
    blocker = tmp_path / "catalog"
    blocker.write_text("not a directory")
    res = _invoke("takedown", "add", "--catalog", str(blocker), "--url", "http://a.example/x.jpg")
    assert res.exit_code == 1
    assert "failed: FileExistsError" in _flat(res)
    assert "Traceback (most recent call last)" in res.output


# --------------------------------------------------------------------------- lookup


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_lookup_finds_the_release_through_the_config(tmp_path: Path) -> None:
    from ccurate.record import Sample, make_key
    from ccurate.shardio import ShardWriter
    from ccurate.shards.config import ShardsConfig
    from ccurate.shards.release import write_release
    from ccurate.takedown import hash_image_bytes

    data = _jpeg(landscape(41, 160, 120))
    h = hash_image_bytes(data)
    url = "https://photos.example.org/[id]/41.jpg"
    w = ShardWriter(tmp_path / "in" / "part-00000")
    w.write(
        Sample(
            key=make_key(url),
            url=url,
            license="CC-BY-4.0",
            license_url="https://creativecommons.org/licenses/by/4.0/",
            author="Ana [Studio] Ruiz",
            image=data,
            mime="image/jpeg",
            width=160,
            height=120,
            sha256=h.sha256,
            pixel_sha256=h.pixel_sha256,
            phash=h.phash,
        )
    )
    w.commit({"stage": "caption"})
    releases = tmp_path / "releases"
    write_release([str(tmp_path / "in" / "part-00000")], [], releases, ShardsConfig(), name="v1")
    cfg = _config(tmp_path, sources=True)
    cfg.write_text(cfg.read_text().replace("[run]\n", f'[run]\nrelease_dir = "{releases}"\n'))
    query = tmp_path / "mine.jpg"
    query.write_bytes(data)
    res = _invoke("lookup", str(query), "--config", str(cfg))
    assert res.exit_code == 0, res.output
    text = _flat(res)
    assert f"{query}: 1 match(es) in v1" in text
    assert url in text and "Ana [Studio] Ruiz" in text  # markup-looking text kept
    # no --release and no --config: a usage error naming both
    res = _invoke("lookup", str(query))
    assert res.exit_code == 2 and "give --release DIR or --config CONFIG" in _flat(res)
    # a config whose release folder holds no release
    empty = _config(tmp_path / "e")
    res = _invoke("lookup", str(query), "--config", str(empty))
    assert res.exit_code == 2 and "no release" in _flat(res)


def test_rebuild_summary_counts_the_recheck_opt_outs(capsys: pytest.CaptureFixture[str]) -> None:
    from ccurate.rebuild_cli import _print_result

    info = {
        "generation": 3,
        "plan": {"planned": 1, "new": 1},
        "recheck": {
            "due": 4,
            "checked": 4,
            "optout_x_robots_tag": 1,
            "optout_robots_txt": 2,
            "result_ok": 1,
            "result_transient": 1,
        },
        "diff": {"added": 1, "removed": 3, "removed_by_reason": {"optout_robots_txt": 2}},
        "published": True,
        "release": "/data/releases/[g3]",
    }
    _print_result(info, as_json=False)
    text = " ".join(capsys.readouterr().out.split())
    assert "opt-out re-check: 4 checked, 3 opted out" in text
    assert "release: /data/releases/[g3]" in text
    _print_result(info, as_json=True)
    assert json.loads(capsys.readouterr().out)["recheck"]["optout_robots_txt"] == 2
