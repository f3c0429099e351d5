"""`ccurate train fit`: settings from a TOML file, options and --set, resume, and the errors a
user meets (bad settings exit 2 naming the key; a checkpoint or data set that does not fit
exits 2 with one line, not a traceback)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ccurate.cli import app
from ccurate.train.checkpoint import load_checkpoint
from ccurate.train.synthetic import write_image_release
from tests.test_train_loop import _offline_one_thread  # noqa: F401 - autouse: 1 thread

TOML = """
[run]
name = "not read by train fit"

[train]
resolution = 16
num_workers = 0
shuffle_buffer = 8
log_every = 1
sample_prompts = []
batch_size = 2
ema = false
steps = 5
lr = 0.01
"""


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("release")
    write_image_release(root, [4, 6], resolution=16)
    return root


def _summary(output: str) -> dict:
    m = re.search(r"^\{$.*^\}$", output, re.S | re.M)
    assert m, output
    return json.loads(m.group(0))


def test_fit_from_a_pipeline_toml_with_overrides_and_resume(release: Path, tmp_path: Path) -> None:
    config = tmp_path / "ccurate.toml"
    config.write_text(TOML)
    out = tmp_path / "run"
    fit = ["train", "fit", "--data", str(release), "--out", str(out), "--config", str(config)]
    runner = CliRunner()
    # the file's [train], then --steps, then --set (parsed as JSON when it parses)
    r = runner.invoke(app, [*fit, "--steps", "2", "--set", "lr=0.001", "--set", "seed=3"])
    assert r.exit_code == 0, r.output
    summary = _summary(r.output)
    assert summary["steps"] == 2 and summary["batch_size"] == 2 and summary["resolution"] == 16
    saved = load_checkpoint(summary["checkpoint"]).state["config"]
    assert (saved["steps"], saved["lr"], saved["seed"], saved["ema"]) == (2, 0.001, 3, False)
    r = runner.invoke(app, [*fit, "--steps", "3", "--resume", "latest", "--set", "seed=3"])
    assert r.exit_code == 0, r.output
    assert _summary(r.output)["steps"] == 3
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e.get("event") == "resume"] == [2]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "steps"], "--set expects key=value, got 'steps'"),
        (["--set", "stepz=3"], "stepz: Extra inputs are not permitted"),
        (["--resolution", "12"], "settings: resolution 12 must be a multiple of 8"),
        (["--set", "lr=-1"], "lr: Input should be greater than 0"),
        (["--config", "{missing}"], "No such file"),
        (["--config", "{broken}"], "Invalid value for --config"),
        (["--resume", "{missing}"], "error: no checkpoint at"),
        (["--set", "latents=yes"], "error: latents = 'yes' but no latents.json"),
    ],
)
def test_fit_errors_exit_2_with_a_message(
    release: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "broken.toml").write_text("[train\nsteps = ")
    paths = {"missing": str(tmp_path / "missing"), "broken": str(tmp_path / "broken.toml")}
    args = [a.format(**paths) for a in args]
    fit = ["train", "fit", "--data", str(release), "--out", str(tmp_path / "run")]
    r = CliRunner().invoke(app, [*fit, "--set", "num_workers=0", "--steps", "1", *args])
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.replace("│", " ").split())  # rich boxes and wraps usage errors
    assert message in text, r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_build_config_reads_train_keys_of_a_pipeline_config_or_a_bare_file(tmp_path: Path) -> None:
    """`--config` says its [train] table is used: a pipeline config without one failed on
    its other sections ('run: Extra inputs are not permitted')."""
    from ccurate.train.cli import build_config

    pipeline = tmp_path / "pipeline.toml"
    pipeline.write_text('[run]\nwork_dir = "w"\n\n[ingest]\nthreads = 4\n')
    assert build_config(pipeline, [], steps=7).steps == 7
    with_train = tmp_path / "with_train.toml"
    with_train.write_text('[run]\nwork_dir = "w"\n\n[train]\nsteps = 5\n')
    assert build_config(with_train, []).steps == 5
    bare = tmp_path / "bare.toml"
    bare.write_text("steps = 3\n")
    assert build_config(bare, []).steps == 3
