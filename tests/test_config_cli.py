"""Config files are validated with messages naming the key; the CLI is conventional."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ccurate.cli import app
from ccurate.config import ConfigError, load_config

runner = CliRunner()


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_and_relative_paths(tmp_path: Path):
    cfg = load_config(write(tmp_path, '[[sources]]\ntype = "urls"\npath = "list.parquet"\n'))
    assert cfg.run.workers == 1
    assert Path(cfg.run.work_dir) == tmp_path / "work"
    assert Path(cfg.sources[0].path) == tmp_path / "list.parquet"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[run]\nworkers = 0\n", "run.workers"),
        ("[run]\nwokers = 2\n", "run.wokers"),
        ("[run]\nworkers = 'many'\n", "run.workers"),
        ("[filters.license]\npolicy = 'anything-goes'\n", "filters.license.policy"),
        ("[[sources]]\ntype = 'ftp'\n", "sources.0"),
        ("[caption]\nnum_beams = -1\n", "caption.num_beams"),
        ("[run\n", "invalid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, needle: str):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert needle in str(err.value)


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in [
        "demo",
        "run",
        "ingest",
        "filter",
        "caption",
        "shard",
        "train",
        "licenses",
        "query",
        "stats",
    ]:
        assert cmd in result.stdout, cmd


@pytest.mark.parametrize("cmd", ["run", "ingest", "filter", "caption", "shard", "demo"])
def test_every_command_has_help(cmd: str):
    result = runner.invoke(app, [cmd, "--help"])
    assert result.exit_code == 0 and "Usage" in result.stdout


def test_bad_config_exits_2_with_message(tmp_path: Path):
    result = runner.invoke(app, ["run", str(write(tmp_path, "[run]\nworkers = 0\n"))])
    assert result.exit_code == 2
    assert "run.workers" in result.output


def test_step_without_input_exits_3(tmp_path: Path):
    cfg = write(tmp_path, "[run]\nwork_dir = 'w'\n")
    result = runner.invoke(app, ["filter", str(cfg)])
    assert result.exit_code == 3
    assert "run it first" in result.output


def test_console_script_entry_point():
    exe = Path(sys.executable).parent / "ccurate"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ccurate ")
