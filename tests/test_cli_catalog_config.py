"""`ccurate stats`, `query` and `diff` find the catalog through `-c/--config` like every
command that works on a run (relative paths against the config's folder, not the cwd);
`--catalog` still works and wins; a config whose catalog holds nothing, a missing config
and a missing catalog are one clear line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ccurate.cli import EXIT_CONFIG, app
from ccurate.shards.catalog import Catalog
from ccurate.shards.config import ShardsConfig
from ccurate.shards.release import write_release
from ccurate.shards.synth import make_inputs


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A config whose catalog (relative `work_dir`) holds two runs and releases v1, v2, and
    a second catalog elsewhere holding v1 only (to tell which one a command opened)."""
    root = tmp_path_factory.mktemp("proj")
    kept, dropped = make_inputs(root / "in", n_shards=2, per_shard=6)
    cfg = ShardsConfig(samples_per_shard=6)
    r1 = write_release(kept, dropped, root / "rel", cfg, name="v1", run_info={})
    r2 = write_release(kept[:1], dropped, root / "rel", cfg, name="v2", run_info={})
    proj = root / "proj"
    proj.mkdir()
    config = proj / "ccurate.toml"
    config.write_text('[run]\nwork_dir = "work"\n')
    with Catalog(proj / "work" / "catalog") as cat:
        cat.record_run(kept, dropped, "v1")
        cat.record_release(r1)
        cat.record_run(kept[:1], dropped, "v2")
        cat.record_release(r2)
    other = root / "other-catalog"
    with Catalog(other) as cat:
        cat.record_run(kept, dropped, "v1")
        cat.record_release(r1)
    return {"root": root, "config": config, "other": other}


def _cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cwd unrelated to the config: `work/catalog` does not exist here."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_stats_query_diff_use_the_catalog_the_config_names(
    project: dict[str, Path], elsewhere: Path
) -> None:
    config = str(project["config"])
    code, out, err = _cli("stats", "-c", config, "--json")
    assert code == 0, err
    assert set(json.loads(out)["releases"]) == {"v1", "v2"}

    # query sees the tables and the recorded releases' manifests
    sql = "SELECT count(DISTINCT key) AS n FROM manifests"
    code, out, err = _cli("query", "--config", config, "--json", sql)
    assert code == 0, err
    with Catalog(project["config"].parent / "work" / "catalog", read_only=True) as cat:
        want = cat.query("SELECT count(DISTINCT key) AS n FROM release_samples").to_pylist()
    assert json.loads(out) == want and want[0]["n"] > 0

    code, out, err = _cli("diff", "v1", "v2", "-c", config, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert (d["a"], d["b"]) == ("v1", "v2") and d["removed"] > 0


def test_catalog_wins_over_config(project: dict[str, Path], elsewhere: Path) -> None:
    other = str(project["other"])
    code, out, err = _cli("stats", "-c", str(project["config"]), "--catalog", other, "--json")
    assert code == 0, err
    assert set(json.loads(out)["releases"]) == {"v1"}
    # v2 is not recorded in the --catalog one: the config's catalog was not used
    code, _, err = _cli("diff", "v1", "v2", "--catalog", other, "-c", str(project["config"]))
    assert code == EXIT_CONFIG and "unknown release 'v2'" in err


@pytest.mark.parametrize("command", [["stats"], ["query", "SELECT 1"], ["diff", "v1", "v2"]])
def test_a_config_whose_catalog_holds_nothing_is_exit_2(
    command: list[str], tmp_path: Path, elsewhere: Path
) -> None:
    config = tmp_path / "fresh" / "ccurate.toml"
    config.parent.mkdir()
    config.write_text('[run]\nwork_dir = "w"\n')
    code, out, err = _cli(*command, "-c", str(config))
    assert code == EXIT_CONFIG, out
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert str(tmp_path / "fresh" / "w" / "catalog") in err  # resolved against the config
    assert str(config) in err  # and the message says which config named it


def test_bad_config_and_missing_catalog_are_exit_2(tmp_path: Path, elsewhere: Path) -> None:
    code, _, err = _cli("stats", "-c", str(tmp_path / "nope.toml"))
    assert code == EXIT_CONFIG and "config file not found" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nno_such_key = 1\n")
    code, _, err = _cli("query", "SELECT 1", "-c", str(bad))
    assert code == EXIT_CONFIG and "no_such_key" in err and "Traceback" not in err
    code, _, err = _cli("stats", "--catalog", str(tmp_path / "nothing"))
    assert code == EXIT_CONFIG and "no catalog at" in err
    code, _, err = _cli("stats")  # neither: work/catalog under the cwd, as before
    assert code == EXIT_CONFIG and str(Path("work") / "catalog") in err


@pytest.mark.parametrize("command", ["stats", "query", "diff"])
def test_help_names_config_and_catalog(command: str) -> None:
    r = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "--config" in r.stdout and "-c" in r.stdout and "--catalog" in r.stdout
    assert "wins over --config" in r.stdout
