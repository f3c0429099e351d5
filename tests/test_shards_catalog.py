"""Catalog (DuckDB): record runs and releases, query, stats, diff; and the shards CLI."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from ccurate.record import Sample, samples_to_table
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
    # what the newest release left out of the filters' keepers, with its reasons
    excluded = pq.read_table(world["r2"] / "excluded.parquet")["reason"].to_pylist()
    assert st["latest_release_excluded"] == dict(Counter(excluded)) and excluded


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


def test_diff_tells_a_split_policy_change_from_a_licence_change(world: dict) -> None:
    """A release that also writes its commercial samples into the noncommercial superset
    split moves them, but their licence family is the same: the diff said
    'licence_family_changed' for every one."""
    cfg = ShardsConfig(samples_per_shard=6, noncommercial_includes_commercial=True)
    r3 = write_release(
        world["kept"][:1],
        world["dropped"],
        world["root"] / "rel",
        cfg,
        name="v3",
        run_info=RUN_INFO,
    )
    man2 = pq.read_table(world["r2"] / "manifest.parquet").to_pylist()
    commercial = {r["key"] for r in man2 if r["license_family"] == "commercial"}
    assert commercial and len(commercial) < len(man2)
    with Catalog(world["cat"]) as cat:
        rows = cat.diff_table(world["r2"], r3).to_pylist()
    moved = {r["key"]: r["why"] for r in rows if r["change"] == "moved"}
    assert set(moved) == commercial
    assert set(moved.values()) == {"split_policy_changed"}
    assert {r["change"] for r in rows if r["key"] not in commercial} == {"unchanged"}


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


def _drop(key: str, reason: str, by: str = "filter") -> Sample:
    s = Sample(key=key, url=f"https://example.org/{key}.jpg", license="CC-BY-4.0")
    s.drop(reason, by)
    return s


def _fake_release(d: Path, rows: dict[str, str], excluded: list[tuple[str, str]]) -> Path:
    """The two files a diff reads: manifest (key, split) and excluded (key, reason), in order."""
    d.mkdir(parents=True)
    pq.write_table(
        pa.table({"key": list(rows), "split": list(rows.values())}), d / "manifest.parquet"
    )
    ex = pa.table(
        {"key": [k for k, _ in excluded], "reason": [r for _, r in excluded]},
        schema=pa.schema([("key", pa.string()), ("reason", pa.string())]),
    )
    pq.write_table(ex, d / "excluded.parquet")
    return d


def test_diff_reasons_each_key_once(tmp_path: Path) -> None:
    """Every kind of change and reason, each key counted once: a key met twice in a release's
    inputs is excluded twice (its reason, then duplicate_key) and must not be counted twice;
    'previously dropped' gives the latest run's reason, and v10 is later than v9."""
    runs = tmp_path / "runs"
    runs.mkdir()

    def run(name: str, kept: list[str], dropped: list[Sample]) -> tuple[list[str], list[str]]:
        prefix = runs / name
        ok = [Sample(key=k, url=f"https://example.org/{k}.jpg", license="CC0-1.0") for k in kept]
        pq.write_table(samples_to_table(ok), f"{prefix}.parquet")
        pq.write_table(samples_to_table(dropped), f"{prefix}.dropped.parquet")
        return [str(prefix)], [f"{prefix}.dropped.parquet"]

    a = _fake_release(
        tmp_path / "a",
        {"k1": "commercial", "k2": "commercial", "k3": "commercial", "k4": "noncommercial",
         "k8": "commercial", "k9": "commercial"},
        [("k6", "image_error")],
    )  # fmt: skip
    b = _fake_release(
        tmp_path / "b",
        {"k1": "commercial", "k4": "commercial", "k5": "commercial", "k6": "commercial",
         "k7": "commercial"},
        [("k2", "not_releasable"), ("k2", "duplicate_key"), ("k1", "duplicate_key"),
         ("k1", "duplicate_key")],
    )  # fmt: skip
    with Catalog(tmp_path / "cat") as cat:
        cat.record_run(*run("v9", ["k1"], [_drop("k7", "watermark")]), "v9")
        cat.record_run(
            *run(
                "v10", ["k1", "k2", "k9"], [_drop("k7", "low_aesthetic"), _drop("k3", "takedown")]
            ),
            "v10",
        )
        d = cat.diff(a, b)
        keys = cat.diff_table(a, b)["key"].to_pylist()
    assert sorted(keys) == sorted({f"k{i}" for i in range(1, 10)})  # one row per key
    assert (d["a"], d["b"]) == ("a", "b")
    assert (d["added"], d["removed"], d["moved"], d["unchanged"]) == (3, 4, 1, 1)
    assert d["added_why"] == {
        "new": 1,
        "previously_dropped:low_aesthetic": 1,
        "was_excluded:image_error": 1,
    }
    assert d["removed_why"] == {
        "dropped:takedown": 1,
        "excluded:not_releasable": 1,
        "not_in_release_inputs": 1,
        "unknown": 1,
    }


def test_diff_of_real_releases_with_repeated_inputs(world: dict, tmp_path: Path) -> None:
    """A release built from inputs that list a shard three times holds the same samples."""
    kept = world["kept"]
    rep = write_release(
        kept + kept[:1] + kept[:1],
        world["dropped"],
        tmp_path / "rel",
        ShardsConfig(samples_per_shard=6),
        name="v1x",
        run_info=RUN_INFO,
    )
    m1 = pq.read_table(world["r1"] / "manifest.parquet")["key"].to_pylist()
    with Catalog(tmp_path / "cat") as cat:
        d = cat.diff(world["r1"], rep)
        # no excluded.parquet (a release copied without it): the diff still works
        (tmp_path / "bare").mkdir()
        (tmp_path / "bare" / "manifest.parquet").write_bytes(
            (world["r1"] / "manifest.parquet").read_bytes()
        )
        bare = cat.diff(tmp_path / "bare", world["r1"])
    assert d["unchanged"] == len(set(m1)) and d["added"] == d["removed"] == d["moved"] == 0
    assert (bare["a"], bare["unchanged"]) == ("bare", len(set(m1)))


def test_catalog_file_empty_run_and_statements(tmp_path: Path) -> None:
    db = tmp_path / "elsewhere" / "mine.duckdb"
    with Catalog(db) as cat:  # a .duckdb path names the file itself
        assert cat.record_run([], [], "nothing") == {"kept": 0, "dropped": 0}
        st = cat.stats()
        assert st["runs"] == 1 and st["samples"] == 0
        assert st["caption_cache_rows"] is None  # no caption_cache folder
        assert cat.query("-- nothing to run").num_columns == 0  # no statement, no result
    assert sorted(p.name for p in db.parent.iterdir()) == ["mine.duckdb"]
    with Catalog(db, read_only=True) as cat:
        assert cat.query("SELECT run_id, kept, dropped FROM runs").to_pylist() == [
            {"run_id": "nothing", "kept": 0, "dropped": 0}
        ]


def test_failed_records_change_nothing(world: dict, tmp_path: Path) -> None:
    """A run or release that fails to record (a missing input, a corrupt manifest) rolls
    back: what was recorded before under the same name is still there."""
    import duckdb

    with Catalog(tmp_path / "cat") as cat:
        cat.record_run(world["kept"][:1], world["dropped"], "r")
        cat.record_release(world["r2"])
        before = cat.stats()
        history = cat.query("SELECT count(*) AS n FROM sample_runs WHERE run_id = 'r'")
        with pytest.raises(duckdb.IOException):
            cat.record_run([*world["kept"][:1], str(tmp_path / "gone")], [], "r")
        broken = tmp_path / "v2-copy"
        shutil.copytree(world["r2"], broken)
        (broken / "manifest.parquet").write_bytes(b"PAR1 not really")
        with pytest.raises(duckdb.Error):
            cat.record_release(broken)  # its _SUCCESS names it v2 too
        with pytest.raises(ValueError, match="not a complete release"):
            cat.record_release(tmp_path)
        assert cat.stats() == before
        assert cat.query("SELECT count(*) AS n FROM sample_runs WHERE run_id = 'r'") == history
        assert cat.query("SELECT path FROM releases")["path"].to_pylist() == [
            str(world["r2"].resolve())
        ]
        with pytest.raises(KeyError, match="unknown release 'v7'"):
            cat.diff("v2", "v7")


def test_cli_tables_errors_and_keys(world: dict, tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    cat = ["--catalog", str(world["cat"])]
    # table cells are data: [brackets] print as they are, never as rich markup
    r = runner.invoke(app, ["query", "SELECT 'a [bold]cat[/bold] [/red] x' AS caption", *cat])
    assert r.exit_code == 0, r.output
    assert "a [bold]cat[/bold] [/red] x" in r.output
    r = runner.invoke(app, ["stats", *cat])
    assert r.exit_code == 0 and "caption_cache_rows" in r.output and "v1" in r.output
    r = runner.invoke(app, ["diff", "v1", "v2", *cat])
    d = json.loads(runner.invoke(app, ["diff", "v1", "v2", *cat, "--json"]).output)
    assert r.exit_code == 0 and "not_in_release_inputs" in r.output
    r = runner.invoke(app, ["diff", "v1", "v2", *cat, "--keys", "--json"])
    rows = json.loads(r.output)
    assert r.exit_code == 0 and len(rows) == d["removed"] + d["added"] + d["moved"] > 0
    assert {row["change"] for row in rows} == {"removed"}
    # known mistakes: one line naming the problem, exit code 2, no traceback
    release = str(world["r1"])
    export = ["export", release, "--out", str(tmp_path / "mds")]
    assert runner.invoke(app, export).exit_code == 0
    assert runner.invoke(app, export).exit_code == 0  # the same export again: already done
    for args, message in [
        (["diff", "v1", "v9", *cat], "error: unknown release 'v9'"),
        (["stats", "--catalog", str(tmp_path / "none")], "error: no catalog at"),
        (["query", "SELECT * FROM no_such_table", *cat], "no_such_table"),
        ([*export, "--size-limit", "4096"], "exists (pass overwrite=True"),  # other settings
        ([*export, "--split", "comercial", "--overwrite"], "has no split 'comercial'"),
        (["export", str(tmp_path), "--out", str(tmp_path / "x")], "not a complete release"),
    ]:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output and "Traceback" not in r.output


def test_query_runs_queries_only(world: dict, tmp_path: Path) -> None:
    """`ccurate query` is read-only: DuckDB's read_only guards the database file, not the
    file system, so COPY ... TO overwrote any file (a release's manifest.parquet)."""
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    cat = str(world["cat"])
    target = tmp_path / "manifest.parquet"
    target.write_bytes(b"precious")
    for sql in (
        f"COPY (SELECT 1 AS x) TO '{target}' (FORMAT parquet)",
        f"SELECT 1; COPY (SELECT 1) TO '{target}'",
        f"ATTACH '{tmp_path / 'other.duckdb'}'",
    ):
        r = runner.invoke(app, ["query", sql, "--catalog", cat])
        assert r.exit_code == 2 and "runs " in r.output, (sql, r.output)
    assert target.read_bytes() == b"precious" and not (tmp_path / "other.duckdb").exists()
    for sql in ("WITH a AS (SELECT 1 AS n) SELECT * FROM a", "SHOW TABLES", "DESCRIBE samples",
                "EXPLAIN SELECT * FROM samples"):  # fmt: skip
        r = runner.invoke(app, ["query", sql, "--catalog", cat])
        assert r.exit_code == 0, (sql, r.output)
    with Catalog(world["cat"]) as writable:  # the library's own writer is not limited
        assert writable.query("SELECT count(*) AS n FROM runs")["n"][0].as_py() == 2


def test_query_cannot_write_read_other_files_or_fetch(world: dict, tmp_path: Path) -> None:
    """The statement type alone was not a guard: EXPLAIN ANALYZE ran the COPY it explained
    (a release manifest cut to one row), PRAGMA import_database ran a SQL file that
    overwrote the catalog, read_csv read any file, and an https path made DuckDB fetch an
    extension. One reading statement runs, in a sandbox of the views' own files."""
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    cat = str(world["cat"])
    target = tmp_path / "manifest.parquet"
    target.write_bytes(b"precious")
    secret = tmp_path / "secret.csv"
    secret.write_text("a\nsecret-value\n")
    imp = tmp_path / "imp"
    imp.mkdir()
    (imp / "schema.sql").write_text(f"COPY (SELECT 'gone' AS x) TO '{target}' (FORMAT csv);")
    (imp / "load.sql").write_text("")
    for sql, says in [
        (f"EXPLAIN ANALYZE COPY (SELECT 1 AS x) TO '{target}' (FORMAT csv)", "EXPLAIN COPY"),
        (f"PRAGMA import_database('{imp}')", "PRAGMAs that only read"),
        ("PRAGMA threads = 1", "refused: SET"),
        (f"SELECT * FROM read_csv('{secret}')", "disabled by configuration"),
        ("SELECT * FROM read_parquet('https://example.invalid/x.parquet')", "disabled"),
        ("SELECT 1; SELECT 2", "one statement; got 2"),
        ("", "one statement; got 0"),
    ]:
        r = runner.invoke(app, ["query", sql, "--catalog", cat])
        assert r.exit_code == 2 and says in " ".join(r.output.split()), (sql, r.output)
        assert "secret-value" not in r.output
    assert target.read_bytes() == b"precious"
    # a PIVOT without an IN list parses as a MULTI statement, whatever wraps it: a COPY of
    # one wrote a manifest the views read (inside the sandbox's allowed files)
    manifest = Path(world["r1"]) / "manifest.parquet"
    before = manifest.read_bytes()
    pivot = "PIVOT samples ON status USING count(*)"
    to = f"TO '{manifest}' (FORMAT parquet, USE_TMP_FILE false)"
    for sql in (f"COPY ({pivot}) {to}", f"EXPLAIN ANALYZE COPY ({pivot}) {to}"):
        r = runner.invoke(app, ["query", sql, "--catalog", cat])
        assert r.exit_code == 2 and "with COPY" in " ".join(r.output.split()), (sql, r.output)
    assert manifest.read_bytes() == before
    for sql in (
        "EXPLAIN ANALYZE SELECT count(*) FROM samples",
        "PRAGMA table_info('samples')",
        "PIVOT samples ON status USING count(*)",
        "WITH p AS (PIVOT samples ON status USING count(*)) SELECT * FROM p",
        "PIVOT (SELECT replace(status, 'a', 'b') AS s FROM samples) ON s USING count(*)",
        "SELECT count(*) AS n FROM manifests",
    ):
        r = runner.invoke(app, ["query", sql, "--catalog", cat])
        assert r.exit_code == 0, (sql, r.output)
    with Catalog(world["cat"], read_only=True) as ro:  # the views still read their files
        n = ro.query("SELECT count(*) AS n FROM manifests")["n"][0].as_py()
        assert n == ro.query("SELECT count(*) AS n FROM release_samples")["n"][0].as_py() > 0
