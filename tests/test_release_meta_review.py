"""Review of what a release tells its users: ATTRIBUTION under hostile metadata, the card's
stage table, and why a release diff says a sample came or went."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ccurate.record import Sample, samples_to_table
from ccurate.shards.attribution import attribution_line, license_link, license_name, one_line
from ccurate.shards.catalog import Catalog
from ccurate.shards.config import ShardsConfig
from ccurate.shards.release import write_release
from tests.test_release_edges import _jpeg, _sample, _write_shard
from tests.test_shards_catalog import _drop, _fake_release

RUN_INFO = {"date": "2025-06-01", "run_id": "meta-review"}
RLO, PDF, FSI, PDI = "\u202e", "\u202c", "\u2068", "\u2069"


def _img(n: int, **kw: object) -> Sample:
    return _sample(n, image=_jpeg(40, 30, n), mime="image/jpeg", width=40, height=30, **kw)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("hostile")
    samples = [
        _img(0, author="Eve\n## CC0 1.0 Universal\n- forged entry", title="Line 1\r\nLine 2"),
        _img(1, author="<a href='x'>Bob</a> **bold**", title="שלום עולם", source_url="https://x/1"),
        _img(2, author=f"Mallory {RLO}0.4 YB CC{PDF}", title="Tab\there\x85next\u2028end"),
        _img(3, author="   ", title=None),  # blank author: the documented fallback
        _img(4, author="Ana", title="Zürich — 東京"),
    ]
    samples[1].license = "CC-BY-SA-3.0-DE"
    samples[3].license = "LicenseRef-CC-BY-2.0-FR"
    prefixes = _write_shard(tmp / "in-00000", samples)
    return write_release(prefixes, [], tmp / "out", ShardsConfig(), name="h", run_info=RUN_INFO)


def test_hostile_metadata_gives_one_attribution_line_per_sample(hostile: Path) -> None:
    """A newline in an author or title split the entry and forged a licence heading and an
    entry; a bidi override displayed the licence and its link reversed."""
    text = (hostile / "ATTRIBUTION").read_text()
    man = pq.read_table(hostile / "manifest.parquet").to_pylist()
    lines = text.splitlines()
    heads = [ln for ln in lines if ln.startswith("## ")]
    assert heads == [f"## {license_name(k)}" for k in sorted({r["license"] for r in man})]
    entries = [ln for ln in lines if ln.startswith("- ")]
    assert sorted(entries) == sorted(f"- {r['key']}: {r['attribution']}" for r in man)
    assert len(entries) == len(man) == 5
    body = lines[lines.index(heads[0]) :]
    allowed = ("## ", "Licence id: ", "- ")
    assert all(ln == "" or ln.startswith(allowed) for ln in body), body
    for r in man:
        assert "\n" not in r["attribution"] and "\r" not in r["attribution"]
        assert f"<{license_link(r['license'])}>" in r["attribution"]
    assert RLO not in text and PDF not in text
    assert "by Eve ## CC0 1.0 Universal - forged entry" in text
    assert '"Line 1 Line 2"' in text
    assert f'"{FSI}שלום עולם{PDI}"' in text  # RTL kept, isolated from the rest of the line
    de = next(e for e in entries if "שלום" in e)
    assert "CC BY-SA 3.0 DE" in de and "<https://creativecommons.org/licenses/by-sa/3.0/de/>" in de
    assert '"Tab here next end"' in text
    fr = next(e for e in entries if "CC BY 2.0 FR" in e)
    assert "Untitled — by unknown author — source: https://x.example/3.jpg" in fr
    assert '"Zürich — 東京" — by Ana' in text


def test_one_line() -> None:
    assert one_line(None) == one_line("") == one_line(" \n\t ") == ""
    assert one_line("a\x00b\x1fc\x7fd\x9fe") == "a b c d e"
    assert one_line(f"x{RLO}y\u2066z\u2069") == "xyz"
    assert one_line("مرحبا") == f"{FSI}مرحبا{PDI}"
    assert one_line("plain ascii") == "plain ascii"
    line = attribution_line(
        {"title": "t\nu", "author": "a\rb", "source_url": "https://s/\n", "license": "CC-BY-4.0"},
        [],
    )
    assert "\n" not in line and "\r" not in line and line.startswith('"t u" — by a b — source:')


def test_card_stage_table_says_not_recorded(tmp_path: Path) -> None:
    """Stage stats without counts printed 'None' in the card; a non-dict entry crashed it."""
    prefixes = _write_shard(tmp_path / "in-00000", [_img(0, author="A", title="T")])
    info = {**RUN_INFO, "stages": [{"stage": "filter"}, {"stage": "dedup", "in": 3}, 7]}
    rel = write_release(prefixes, [], tmp_path / "out", ShardsConfig(), name="c", run_info=info)
    card = (rel / "README.md").read_text()
    assert "None" not in card
    assert "| filter | not recorded | not recorded | not recorded |" in card
    assert "| dedup | 3 | not recorded | not recorded |" in card


def test_card_explains_an_ingest_row_of_pages_that_held_images(tmp_path: Path) -> None:
    """'| ingest | 34 | 255 | 4 |' did not add up and the card did not say why (34 pages
    held 259 images); the console summary did."""
    prefixes = _write_shard(tmp_path / "in-00000", [_img(0, author="A", title="T")])
    stages = [
        {"stage": "ingest", "in": 34, "kept": 255, "dropped": 4},
        {"stage": "filter", "in": 255, "kept": 200, "dropped": 55},
    ]
    info = {**RUN_INFO, "stages": stages}
    rel = write_release(prefixes, [], tmp_path / "out", ShardsConfig(), name="c", run_info=info)
    card = (rel / "README.md").read_text()
    assert "ingest: 34 inputs held 259 images (255 kept, 4 dropped)." in card
    assert "filter:" not in card.split("Stage counts:")[1].split("###")[0]  # it adds up


def _run(cat: Catalog, root: Path, name: str, kept: list[str], dropped: list[Sample]) -> None:
    prefix = root / name
    ok = [Sample(key=k, url=f"https://example.org/{k}.jpg", license="CC0-1.0") for k in kept]
    pq.write_table(samples_to_table(ok), f"{prefix}.parquet")
    pq.write_table(samples_to_table(dropped), f"{prefix}.dropped.parquet")
    cat.record_run([str(prefix)], [f"{prefix}.dropped.parquet"], name)


def test_diff_reasons_come_from_the_runs_of_the_two_releases(tmp_path: Path) -> None:
    """The pipeline records each run under its release's name. A later run (v3) that kept
    or dropped a sample again rewrote why v2 differs from v1: k1, dropped by run v2, was
    'not_in_release_inputs' once v3 kept it; k2, absent from run v2, took v3's drop; and
    k3, new in v2, became 'previously_dropped' by v3's takedown."""
    (tmp_path / "runs").mkdir()
    v1 = _fake_release(tmp_path / "v1", {"k1": "commercial", "k2": "commercial"}, [])
    v2 = _fake_release(tmp_path / "v2", {"k3": "commercial", "k4": "commercial"}, [])
    with Catalog(tmp_path / "cat") as cat:
        _run(cat, tmp_path / "runs", "v0", [], [_drop("k4", "low_aesthetic")])
        _run(cat, tmp_path / "runs", "v1", ["k1", "k2"], [])
        _run(cat, tmp_path / "runs", "v2", ["k3", "k4"], [_drop("k1", "watermark")])
        _run(
            cat,
            tmp_path / "runs",
            "v3",
            ["k1"],
            [_drop("k2", "low_aesthetic"), _drop("k3", "takedown")],
        )
        rows = {r["key"]: r["why"] for r in cat.diff_table(v1, v2).to_pylist()}
        d = cat.diff(v1, v2)
    assert rows == {
        "k1": "dropped:watermark",
        "k2": "not_in_release_inputs",
        "k3": "new",
        "k4": "previously_dropped:low_aesthetic",
    }
    assert d["removed_why"] == {"dropped:watermark": 1, "not_in_release_inputs": 1}
    assert d["added_why"] == {"new": 1, "previously_dropped:low_aesthetic": 1}
