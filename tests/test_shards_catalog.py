"""Catalog (DuckDB): record runs and releases, query, stats, diff; and the shards CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from ccurate.shards.catalog import Catalog
from ccurate.shards.cli import register
from ccurate.shards.config import ShardsConfig
from ccurate.shards.mds import read_mds
from ccurate.shards.release import write_release
from ccurate.shards.synth import make_inputs

RUN_INFO = {"date": "2025-06-01"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("cat")
    kept, dropped = make_inputs(root / "in", n_shards=2, per_shard=12)
    cfg = ShardsConfig(samples_per_shard=6)
    r1 = write_release(kept, dropped, root / "rel", cfg, name="v1", run_info=RUN_INFO)
    # second run: the first shard only, and one more sample taken down
    r2 = write_release(kept[:1], dropped, root / "rel", cfg, name="v2", run_info=RUN_INFO)
    cat_dir = root / "catalog"
    (cat_dir / "caption_cache").mkdir(parents=True)
    pq.write_table(
        pa.table({"sha256": ["a", "b"], "model": ["m", "m"], "caption": ["x", "y"]}),
        cat_dir / "caption_cache" / "part-0.parquet",
    )
    with Catalog(cat_dir) as cat:
        cat.record_run(kept, dropped, "run1")
        cat.record_release(r1)
        cat.record_run(kept[:1], dropped, "run2")
        cat.record_release(r2)
    return {"root": root, "kept": kept, "dropped": dropped, "r1": r1, "r2": r2, "cat": cat_dir}


def test_record_and_query(world: dict) -> None:
    n_kept = sum(pq.read_metadata(f"{p}.parquet").num_rows for p in world["kept"])
    dropped = pa.concat_tables(
        [pq.read_table(p, columns=["key", "drop_reason"]) for p in world["dropped"]]
    )
    with Catalog(world["cat"]) as cat:
        t = cat.query("SELECT status, count(*) AS n FROM samples GROUP BY 1 ORDER BY 1")
        assert dict(zip(t["status"].to_pylist(), t["n"].to_pylist(), strict=True)) == {
            "dropped": dropped.num_rows,
            "ok": n_kept,
        }
        # the latest run decides the status; first_run is remembered
        t = cat.query("SELECT DISTINCT first_run, last_run FROM samples ORDER BY 2")
        assert ("run1", "run2") in zip(
            t["first_run"].to_pylist(), t["last_run"].to_pylist(), strict=True
        )
        reasons = cat.query(
            "SELECT key, drop_reason, license_decision FROM samples WHERE status = 'dropped'"
        ).to_pylist()
        want = dict(
            zip(dropped["key"].to_pylist(), dropped["drop_reason"].to_pylist(), strict=True)
        )
        assert {r["key"]: r["drop_reason"] for r in reasons} == want
        for r in reasons:
            if r["drop_reason"] == "license_unknown":
                assert r["license_decision"] == "license_unknown"
        assert cat.query("SELECT count(*) AS n FROM sample_runs")["n"][0].as_py() == (
            n_kept
            + dropped.num_rows
            + sum(pq.read_metadata(f"{p}.parquet").num_rows for p in world["kept"][:1])
            + dropped.num_rows
        )
        # which releases contain a sample
        man1 = pq.read_table(world["r1"] / "manifest.parquet")
        man2 = pq.read_table(world["r2"] / "manifest.parquet")
        both = set(man1["key"].to_pylist()) & set(man2["key"].to_pylist())
        rel = cat.query("SELECT key, releases FROM sample_releases").to_pylist()
        assert {r["key"] for r in rel if r["releases"] == ["v1", "v2"]} == both
        # manifests view over every recorded release
        t = cat.query("SELECT release, count(*) AS n FROM manifests GROUP BY 1 ORDER BY 1")
        assert t.to_pylist() == [
            {"release": "v1", "n": man1.num_rows},
            {"release": "v2", "n": man2.num_rows},
        ]
        assert cat.query("SELECT count(*) AS n FROM caption_cache")["n"][0].as_py() == 2


def test_record_run_is_idempotent(world: dict) -> None:
    with Catalog(world["cat"]) as cat:
        before = cat.stats()
        cat.record_run(world["kept"][:1], world["dropped"], "run2")
        assert cat.stats() == before


def test_stats(world: dict) -> None:
    with Catalog(world["cat"], read_only=True) as cat:
        st = cat.stats()
    assert st["runs"] == 2 and st["samples"] == st["urls"]
    assert st["releases"] == {
        "v1": pq.read_metadata(world["r1"] / "manifest.parquet").num_rows,
        "v2": pq.read_metadata(world["r2"] / "manifest.parquet").num_rows,
    }
    assert sum(st["drop_reasons"].values()) == st["by_status"]["dropped"]
    assert st["caption_cache_rows"] == 2


def test_diff(world: dict) -> None:
    m1 = set(pq.read_table(world["r1"] / "manifest.parquet")["key"].to_pylist())
    m2 = set(pq.read_table(world["r2"] / "manifest.parquet")["key"].to_pylist())
    with Catalog(world["cat"]) as cat:
        d = cat.diff("v1", "v2")
        assert d["removed"] == len(m1 - m2) > 0 and d["added"] == len(m2 - m1) == 0
        assert d["unchanged"] == len(m1 & m2)
        # removed samples were kept by the run but not among v2's inputs
        assert d["removed_why"] == {"not_in_release_inputs": len(m1 - m2)}
        back = cat.diff(world["r2"], world["r1"])  # by path works too
        assert back["added"] == len(m1 - m2) and back["added_why"] == {"new": len(m1 - m2)}
        t = cat.diff_table("v1", "v2")
        assert set(t.filter(pa.compute.equal(t["change"], "removed"))["key"].to_pylist()) == m1 - m2


def test_diff_explains_a_takedown(world: dict, tmp_path: Path) -> None:
    """A sample dropped by a later run (e.g. a takedown) is reported with that reason."""
    from ccurate.record import table_to_samples
    from ccurate.shardio import ShardWriter, iter_samples

    man = pq.read_table(world["r2"] / "manifest.parquet")
    victim = man["key"][0].as_py()
    w = ShardWriter(tmp_path / "shard-00000")
    for batch in iter_samples(world["kept"][0]):
        for s in batch:
            if s.key == victim:
                s.drop("takedown", "dedup")
            w.write(s)
    w.commit({})
    prefix = str(tmp_path / "shard-00000")
    cat_dir = tmp_path / "cat"
    with Catalog(cat_dir) as cat:
        cat.record_run(world["kept"][:1], [], "a")
        cat.record_release(world["r2"])
        cat.record_run([prefix], [f"{prefix}.dropped.parquet"], "b")
        r3 = write_release(
            [prefix],
            [f"{prefix}.dropped.parquet"],
            tmp_path / "rel",
            ShardsConfig(samples_per_shard=6),
            name="v3",
            run_info=RUN_INFO,
        )
        cat.record_release(r3)
        d = cat.diff("v2", "v3")
    assert d["removed"] == 1 and d["removed_why"] == {"dropped:takedown": 1}
    assert table_to_samples(pq.read_table(f"{prefix}.dropped.parquet"))[0].key == victim


def test_cli(world: dict, tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    cat = str(world["cat"])
    r = runner.invoke(
        app, ["query", "SELECT count(*) AS n FROM releases", "--catalog", cat, "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == [{"n": 2}]
    r = runner.invoke(app, ["query", "SELECT name FROM releases ORDER BY 1", "--catalog", cat])
    assert r.exit_code == 0 and "v1" in r.output and "v2" in r.output
    r = runner.invoke(app, ["stats", "--catalog", cat, "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["runs"] == 2
    r = runner.invoke(app, ["diff", "v1", "v2", "--catalog", cat, "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["removed"] > 0
    out = tmp_path / "mds"
    r = runner.invoke(app, ["export", str(world["r1"]), "--format", "mds", "--out", str(out)])
    assert r.exit_code == 0, r.output
    n = sum(1 for _ in read_mds(out / "commercial"))
    man = pq.read_table(world["r1"] / "manifest.parquet")
    assert n == sum(1 for s in man["split"].to_pylist() if s == "commercial")
    r = runner.invoke(app, ["export", str(world["r1"]), "--format", "csv", "--out", str(out)])
    assert r.exit_code != 0
    r = runner.invoke(app, ["stats", "--catalog", str(tmp_path / "nothing")])
    assert r.exit_code != 0
