"""Releases and the catalog from a consumer's side: what a diff calls a change, which files
a release is, what its published files may say, valid `--json`, and keys webdataset groups."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from ccurate.record import Sample
from ccurate.shardio import ShardWriter
from ccurate.shards.catalog import Catalog
from ccurate.shards.cli import register
from ccurate.shards.config import ShardsConfig
from ccurate.shards.mds import export_mds, read_mds
from ccurate.shards.read import iter_tar, release_shards
from ccurate.shards.release import input_labels, verify, write_release
from ccurate.shards.synth import synth_image, synth_sample

RUN_INFO = {"date": "2025-06-01"}
BY = ("CC-BY-4.0", "https://creativecommons.org/licenses/by/4.0/")
BY_SA = ("CC-BY-SA-4.0", "https://creativecommons.org/licenses/by-sa/4.0/")
BY_NC = ("CC-BY-NC-4.0", "https://creativecommons.org/licenses/by-nc/4.0/")
CC0 = ("CC0-1.0", "https://creativecommons.org/publicdomain/zero/1.0/")


def _inputs(root: Path, n: int, tweak: Callable[[int, Sample], None] | None = None) -> list[str]:
    """One finished input shard of `n` synthetic samples (the same ones for a given n),
    each changed by `tweak(i, sample)`."""
    rng = random.Random(0)
    w = ShardWriter(root / "shard-00000")
    for i in range(n):
        s = synth_sample(i, rng)
        s.license, s.license_url = BY
        if tweak:
            tweak(i, s)
        w.write(s)
    w.commit({"stage": "caption", "in": n, "kept": n, "dropped": 0, "drops": {}})
    return [str(root / "shard-00000")]


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


# --------------------------------------------------------------------------- diff (F3)


def test_diff_reports_licence_image_and_caption_changes_with_reasons(tmp_path: Path) -> None:
    """A key in the same splits of both releases was 'unchanged' whatever else changed: a
    licence within its family (CC BY -> CC BY-SA adds ShareAlike, CC0 -> CC BY attribution),
    the image bytes, the caption. Each is a change with its reason, in the summary too."""
    n = 8

    def v2(i: int, s: Sample) -> None:
        if i == 0:
            s.license, s.license_url = BY_SA
        elif i == 1:
            s.license, s.license_url = CC0
        elif i == 2:
            s.image = synth_image(random.Random(99), s.width or 64, s.height or 48, "JPEG")
            s.mime = "image/jpeg"
        elif i == 3:
            s.caption = "a different caption"
            s.alt_text = "a different alt text"
        elif i == 4:
            s.license, s.license_url = BY_NC  # another family: moved, with its licences
        elif i == 5:
            s.license, s.license_url = BY_SA
            s.caption = "another caption"
            s.alt_text = "another alt text"

    def v1(i: int, s: Sample) -> None:
        if i == 1:
            s.license, s.license_url = BY  # CC BY in v1 -> CC0 in v2 (both commercial)

    a = _inputs(tmp_path / "a", n, v1)
    b = _inputs(tmp_path / "b", n, v2)
    cfg = ShardsConfig(samples_per_shard=4)
    r1 = write_release(a, [], tmp_path / "rel", cfg, name="v1", run_info=RUN_INFO)
    r2 = write_release(b, [], tmp_path / "rel", cfg, name="v2", run_info=RUN_INFO)
    keys = [r["key"] for r in pq.read_table(r1 / "manifest.parquet").to_pylist()]
    with Catalog(tmp_path / "cat") as cat:
        for prefixes, rel in ((a, r1), (b, r2)):
            cat.record_run(prefixes, [], run_id=rel.name)
            cat.record_release(rel)
        rows = {r["key"]: r for r in cat.diff_table("v1", "v2").to_pylist()}
        d = cat.diff("v1", "v2")
    got = {keys.index(k): (r["change"], r["why"], r["detail"]) for k, r in rows.items()}
    img_a, img_b = (
        pq.read_table(r / "manifest.parquet").to_pylist()[2]["image_sha256"][:12] for r in (r1, r2)
    )
    assert got == {
        0: ("changed", "licence_changed", "licence CC-BY-4.0 -> CC-BY-SA-4.0"),
        1: ("changed", "licence_changed", "licence CC-BY-4.0 -> CC0-1.0"),
        2: ("changed", "image_changed", f"image {img_a} -> {img_b}"),
        3: ("changed", "caption_changed", "caption changed"),
        4: ("moved", "licence_family_changed", "licence CC-BY-4.0 -> CC-BY-NC-4.0"),
        5: (
            "changed",
            "licence_changed,caption_changed",
            "licence CC-BY-4.0 -> CC-BY-SA-4.0; caption changed",
        ),
        6: ("unchanged", None, None),
        7: ("unchanged", None, None),
    }
    assert (d["added"], d["removed"], d["moved"], d["changed"], d["unchanged"]) == (0, 0, 1, 5, 2)
    assert d["moved_why"] == {"licence_family_changed": 1}
    assert d["changed_why"] == {"licence_changed": 3, "caption_changed": 2, "image_changed": 1}
    assert d["licence_changes"] == {
        "CC-BY-4.0 -> CC-BY-SA-4.0": 2,
        "CC-BY-4.0 -> CC-BY-NC-4.0": 1,
        "CC-BY-4.0 -> CC0-1.0": 1,
    }
    # the CLI: the summary by default, every changed key with --keys
    runner = CliRunner()
    cat_opt = ["--catalog", str(tmp_path / "cat")]
    r = runner.invoke(_app(), ["diff", "v1", "v2", *cat_opt, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["changed_why"] == d["changed_why"]
    r = runner.invoke(_app(), ["diff", "v1", "v2", *cat_opt, "--keys", "--json"])
    listed = {x["key"]: x["why"] for x in json.loads(r.output)}
    assert listed == {k: v["why"] for k, v in rows.items() if v["change"] != "unchanged"}


# ------------------------------------------------------------------ a release's files (F4-F6)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("consumer")
    inputs = _inputs(root / "in", 9)
    cfg = ShardsConfig(samples_per_shard=4)
    return write_release(inputs, [], root / "out", cfg, name="v1", run_info=RUN_INFO)


def test_caption_columns_mean_what_the_card_says(release: Path) -> None:
    """The index's `caption` is the `.txt` text (img2dataset's meaning), json `caption` the
    synthetic caption only, json `text` the `.txt` text: two meanings of one name, which the
    card now spells out for consumers of img2dataset layouts."""
    sources = set()
    for tar in release_shards(release):
        index = {r["key"]: r for r in pq.read_table(tar.with_suffix(".parquet")).to_pylist()}
        for key, f in iter_tar(tar):
            rec, row, txt = json.loads(f["json"]), index[key], f["txt"].decode()
            sources.add(rec["caption_source"])
            assert row["caption"] == rec["text"] == txt
            assert row["synthetic_caption"] == (rec["caption"] or None)
            assert (row["status"], row["error_message"]) == ("success", None)
            if rec["caption_source"] == "alt_text_fallback":
                assert rec["caption"] == "" and txt == rec["alt_text"]
    assert {"synthetic", "alt_text_fallback"} <= sources
    card = (release / "README.md").read_text()
    assert "The `.parquet` index's `caption` is that text (img2dataset's meaning)" in card
    assert '`caption` the model\'s output only ("" when the text came from alt text)' in card


def test_verify_reports_unlisted_files_and_readers_skip_them(release: Path, tmp_path: Path) -> None:
    """A tar that SHA256SUMS does not list (a copy, a half-synced or injected shard) was
    'intact' to verify and read by release_shards and the MDS export."""
    rel = tmp_path / "rel"
    shutil.copytree(release, rel)
    listed = release_shards(rel)
    stray = rel / "commercial" / "commercial-000099.tar"
    shutil.copy(listed[0], stray)
    (rel / "commercial" / "notes.txt").write_text("x")
    assert verify(rel) == ["commercial/commercial-000099.tar", "commercial/notes.txt"]
    assert release_shards(rel) == listed and stray not in release_shards(rel, "commercial")
    done = export_mds(rel, tmp_path / "mds", splits=["commercial"])
    man = pq.read_table(rel / "manifest.parquet").to_pylist()
    assert sum(1 for _ in read_mds(done["commercial"])) == sum(
        1 for r in man if r["split"] == "commercial"
    )
    stray.unlink()
    (rel / "commercial" / "notes.txt").unlink()
    assert verify(rel) == []
    # a line taken out of SHA256SUMS: _SUCCESS holds its digest, and that file is unlisted
    sums = rel / "SHA256SUMS"
    lines = sums.read_text().splitlines(keepends=True)
    sums.write_text("".join(lines[1:]))
    assert verify(rel) == ["SHA256SUMS", lines[0].split("  ", 1)[1].strip()]


def test_excluded_detail_holds_no_builder_path(tmp_path: Path) -> None:
    """A duplicate key's exclusion detail was the input's absolute path: a published,
    checksummed file that leaked the builder's work dir and changed with it."""
    sums = []
    for where in ("alice/work", "bob/elsewhere/deeper"):
        inputs = _inputs(tmp_path / where / "40_caption", 3)
        rel = write_release(
            inputs + inputs, [], tmp_path / where / "out", ShardsConfig(), name="v1",
            run_info=RUN_INFO,
        )  # fmt: skip
        rows = pq.read_table(rel / "excluded.parquet").to_pylist()
        assert [(r["reason"], r["detail"]) for r in rows] == [("duplicate_key", "shard-00000")] * 3
        sums.append((rel / "SHA256SUMS").read_text())
    assert sums[0] == sums[1]  # the bytes depend on the inputs, not where they lay
    assert input_labels(["/w/40_caption/shard-00001", "/w/41_retry/shard-00001"]) == {
        "/w/40_caption/shard-00001": "40_caption/shard-00001",
        "/w/41_retry/shard-00001": "41_retry/shard-00001",
    }


# --------------------------------------------------------------------------- query --json (F7)


def test_query_json_is_strict_json(tmp_path: Path) -> None:
    """`--json` printed NaN and Infinity, which strict parsers (JS, Go, serde) reject:
    non-finite floats are null, in lists and structs too."""
    with Catalog(tmp_path / "cat") as cat:
        cat.record_run([], [], "r0")
    sql = (
        "SELECT 'nan'::DOUBLE AS a, 'inf'::DOUBLE AS b, '-inf'::FLOAT AS c, 1.5::DOUBLE AS d, "
        "['nan'::DOUBLE, 2.0] AS e, {'x': 'inf'::DOUBLE} AS f"
    )

    def strict(text: str) -> object:
        def refuse(name: str) -> None:
            raise ValueError(f"not JSON: {name}")

        return json.loads(text, parse_constant=refuse)

    r = CliRunner().invoke(_app(), ["query", sql, "--catalog", str(tmp_path / "cat"), "--json"])
    assert r.exit_code == 0, r.output
    assert strict(r.output) == [
        {"a": None, "b": None, "c": None, "d": 1.5, "e": [None, 2.0], "f": {"x": None}}
    ]


# --------------------------------------------------------------------------- keys (F8)


@pytest.mark.parametrize(
    "bad", ["img.2024.a", "a/b", "__x", "-lead", "k" * 65, "", "caf\u00e9", "sp ace"]
)
def test_write_release_refuses_keys_webdataset_cannot_group(tmp_path: Path, bad: str) -> None:
    """A dotted key was published (webdataset then read key `img` with field `2024.a.jpg`)
    and a long one crashed the writer mid-release: refused up front, nothing published."""

    def rekey(i: int, s: Sample) -> None:
        if i == 1:
            s.key = bad

    inputs = _inputs(tmp_path / "in", 3, rekey)
    with pytest.raises(ValueError, match="cannot be published: a release key is 1-64"):
        write_release(inputs, [], tmp_path / "out", ShardsConfig(), name="v1", run_info=RUN_INFO)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".release.lock"]


def test_write_release_takes_the_longest_allowed_key(tmp_path: Path) -> None:
    key = "K_-9" * 16  # 64 characters: `{key}.alt.txt` still fits a tar name

    def rekey(i: int, s: Sample) -> None:
        if i == 0:
            s.key = key

    inputs = _inputs(tmp_path / "in", 2, rekey)
    cfg = ShardsConfig(caption_source="both")
    rel = write_release(inputs, [], tmp_path / "out", cfg, name="v1", run_info=RUN_INFO)
    import webdataset as wds

    got = [
        s["__key__"]
        for t in release_shards(rel)
        for s in wds.WebDataset(str(t), shardshuffle=False)
    ]
    assert key in got and verify(rel) == []
