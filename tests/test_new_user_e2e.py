"""A new user's own data, end to end through the CLI: an img2dataset parquet with extra
columns (float, list, struct, nulls, non-ASCII captions, a `status` column), a Flickr CSV,
a TSV, a Wikimedia JSONL.gz holding the real Commons `imageinfo` answer, HTML pages with CC
markup and the real Common Crawl WARC; served on loopback. One pipeline run (module
fixture) is checked as a user would: the release layout, each published record, extra
columns in the json and in manifest.parquet, DuckDB over the release and the work dir,
`stats`/`query`, an idempotent rerun, `--retry-failed`, and clear config errors."""

from __future__ import annotations

import csv
import gzip
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner, Result

from ccurate.cli import app
from ccurate.ingest.metadata import wikimedia_evidence
from tests.httpserver import Reply, TestServer, serve

runner = CliRunner()


def _cli(*args: str) -> Result:
    return runner.invoke(app, list(args), env={"COLUMNS": "400"})


def _jpeg(seed: int) -> bytes:
    """A photo-like 320x240 JPEG: textured (passes quality), distinct per seed (no dedup)."""
    import io

    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:240, 0:320]
    waves = np.stack(
        [
            np.sin(x / r.uniform(5, 40) + r.uniform(0, 6)) * np.cos(y / r.uniform(5, 40))
            for _ in "rgb"
        ],
        -1,
    )
    blocks = r.integers(0, 255, (13, 17, 3)).repeat(20, 0).repeat(20, 1)[:240, :320]
    a = 0.6 * (waves * 127 + 128 + r.normal(0, 20, waves.shape)) + 0.4 * blocks
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=92)
    return buf.getvalue()


class World:
    def __init__(self, root: Path, ts: TestServer, cfg: Path) -> None:
        self.root, self.ts, self.cfg = root, ts, cfg
        self.work = root / "out" / "work"
        self.releases = root / "out" / "releases"

    def records(self, release: str = "v1") -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for tar in sorted((self.releases / release).glob("*/*.tar")):
            with tarfile.open(tar) as tf:
                for m in tf.getmembers():
                    if m.name.endswith(".json"):
                        fh = tf.extractfile(m)
                        assert fh is not None
                        rec = json.loads(fh.read())
                        out[rec["url"].rsplit("/", 1)[-1]] = rec
        return out


CAPTIONS = ["Ein schöner Hund im Schnee", "東京の夜景", "café à Paris — ñandú", None]
BY = "https://creativecommons.org/licenses/by/4.0/"


def _corpus(root: Path, ts: TestServer, real: Path) -> Path:
    seed = iter(range(1000, 2000))

    def image(name: str, reply: Reply | list[Reply] | None = None) -> str:
        return ts.route(
            f"/img/{name}", reply or Reply(body=_jpeg(next(seed)), content_type="image/jpeg")
        )

    rows = [
        {
            "url": image(f"pq{i}.jpg"),
            "caption": cap,
            "similarity": 0.25 + i / 8,
            "NSFW": "UNLIKELY" if i % 2 else None,
            "tags": ["cc", str(i)],
            "meta": {"w": 320, "src": "ü"},
            "license": BY,
            "artist": f"Ärtist {i}",
            "status": "input-status",
        }
        for i, cap in enumerate(CAPTIONS)
    ]
    rows.append({**rows[0], "url": "", "caption": "no url"})  # bad_url
    pq.write_table(pa.Table.from_pylist(rows), root / "laion_like.parquet")
    with open(root / "flickr.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["photo_url", "title", "license", "owner_name", "page_url", "views"])
        for i, lic in enumerate([4, 0]):  # BY 2.0, all rights reserved
            w.writerow(
                [image(f"fl{i}.jpg"), f"Zürich {i}", lic, f"Owner Ø{i}", ts.url(f"/f/{i}"), 7]
            )
    # a transient failure first, then the image: for --retry-failed
    flaky = image(
        "flaky.jpg", [Reply(503, b"busy"), Reply(body=_jpeg(next(seed)), content_type="image/jpeg")]
    )
    (root / "list.tsv").write_text(
        "url\tcaption\tlicense\n"
        f"{image('tsv0.jpg')}\tTSV pic\thttps://creativecommons.org/publicdomain/zero/1.0/\n"
        f"{flaky}\tflaky\thttps://creativecommons.org/publicdomain/zero/1.0/\n",
        encoding="utf-8",
    )
    answer = json.loads((real / "wikimedia_commons_imageinfo.json").read_text())
    with gzip.open(root / "wiki.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"url": image("wk0.jpg"), "caption": "Wiki «ü»", "info": answer}) + "\n")
        f.write("not json\n")  # bad_row
    body = "".join(
        f'<figure><img src="{image(f"pg{j}.jpg")}" alt="Bild {j} — größer"><figcaption>Photo by '
        f'<a href="/u">Ånna</a>, <a rel="license" href="https://creativecommons.org/licenses/'
        'by-sa/4.0/">CC BY-SA 4.0</a></figcaption></figure>'
        for j in range(2)
    )
    page = f'<!doctype html><html><head><meta charset="utf-8"></head><body>{body}</body></html>'
    ts.route("/page.html", Reply(body=page.encode(), content_type="text/html; charset=utf-8"))
    cfg = root / "cfg.toml"
    cfg.write_text(
        f"""
[run]
work_dir = "out/work"
release_dir = "out/releases"
partition_size = 4

[[sources]]
type = "urls"
path = "laion_like.parquet"
license_col = "license"
author_col = "artist"

[[sources]]
type = "urls"
path = "flickr.csv"
url_col = "photo_url"
caption_col = "title"
license_col = "license"
license_format = "flickr"
author_col = "owner_name"
page_url_col = "page_url"

[[sources]]
type = "urls"
path = "list.tsv"
license_col = "license"

[[sources]]
type = "urls"
path = "wiki.jsonl.gz"
extmetadata_col = "info"

[[sources]]
type = "pages"
urls = ["{ts.url("/page.html")}"]

[[sources]]
type = "warc"
path = "{real / "cc-main-2024-22-wikipedia-escopete.warc.gz"}"

[ingest]
allow_networks = ["127.0.0.0/8"]
image_size = 256
retries = 0
connect_timeout = 1
total_timeout = 3

[filters.license]
strict_attribution = false

[shards]
samples_per_shard = 4
""",
        encoding="utf-8",
    )
    return cfg


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, real_fixtures: Path) -> Iterator[World]:
    root = tmp_path_factory.mktemp("newuser")
    with serve() as ts:
        cfg = _corpus(root, ts, real_fixtures)
        res = _cli("run", str(cfg), "--steps", "ingest,filter,dedup,caption,shard")
        assert res.exit_code == 0, res.output
        yield World(root, ts, cfg)


def test_release_layout_and_every_record_carries_its_provenance(world: World) -> None:
    rel = world.releases / "v1"
    for name in ["_SUCCESS", "manifest.parquet", "excluded.parquet", "ATTRIBUTION",
                 "SHA256SUMS", "release.json", "README.md"]:  # fmt: skip
        assert (rel / name).is_file(), name
    recs = world.records()
    assert {"pq0.jpg", "pq1.jpg", "pq2.jpg", "pq3.jpg", "fl0.jpg", "tsv0.jpg", "wk0.jpg",
            "pg0.jpg", "pg1.jpg"} == set(recs)  # fmt: skip
    for rec in recs.values():
        for f in ["url", "license", "license_url", "attribution", "sha256", "image_sha256",
                  "pixel_sha256", "phash"]:  # fmt: skip
            assert rec[f], (f, rec["url"])
        assert rec["width"] > 0 and rec["original_width"] == 320 and rec["image_bytes"] > 0
        assert rec["scores"] and {d["filter"] for d in rec["decisions"]} >= {"license", "dedup"}
        assert all(d["keep"] for d in rec["decisions"])
        assert "caption" in rec and "caption_model" in rec and rec["license_evidence"]
    assert recs["pq1.jpg"]["alt_text"] == "東京の夜景" and recs["pq1.jpg"]["author"] == "Ärtist 1"
    assert recs["pq3.jpg"]["alt_text"] == ""
    assert recs["pg0.jpg"]["page_url"].endswith("/page.html")
    assert recs["pg0.jpg"]["alt_text"] == "Bild 0 — größer" and recs["pg0.jpg"]["author"] == "Ånna"
    assert (
        recs["fl0.jpg"]["page_url"].endswith("/f/0") and recs["fl0.jpg"]["license"] == "CC-BY-2.0"
    )


def test_wikimedia_imageinfo_answer_is_read_whole() -> None:
    """A column holding Commons' `{"imageinfo": [{... "extmetadata": ...}]}` answer, as the
    API returns it, gave no evidence at all: every such row was dropped license_unknown."""
    from tests.conftest import REAL

    answer = json.loads((REAL / "wikimedia_commons_imageinfo.json").read_text())
    evidence, attribution = wikimedia_evidence(answer)
    assert [e.value for e in evidence] == [
        "https://creativecommons.org/licenses/by-sa/4.0",
        "cc-by-sa-4.0",
    ]
    assert attribution["author"] == "PtrQs"


def test_wikimedia_rows_are_published_with_their_licence(world: World) -> None:
    rec = world.records()["wk0.jpg"]
    assert rec["license"] == "CC-BY-SA-4.0" and rec["author"] == "PtrQs"


def test_extra_columns_reach_the_json_intact(world: World) -> None:
    recs = world.records()
    extra = recs["pq1.jpg"]["extra"]
    assert extra["similarity"] == "0.375" and extra["NSFW"] == "UNLIKELY"
    assert json.loads(extra["tags"]) == ["cc", "1"] and json.loads(extra["meta"]) == {
        "w": 320,
        "src": "ü",
    }
    assert extra["input_status"] == "input-status"  # a Sample field's name: carried, not taken
    assert recs["pq0.jpg"]["extra"]["NSFW"] == ""
    assert recs["fl0.jpg"]["extra"]["views"] == "7"


def test_manifest_has_the_extra_columns_typed_for_duckdb(world: World) -> None:
    """The manifest had no input column at all: no `WHERE similarity > x` on a release."""
    man = str(world.releases / "v1" / "manifest.parquet")
    con = duckdb.connect()
    rows = con.sql(
        f"SELECT split_part(url, '/', -1), similarity, tags, meta, NSFW FROM '{man}' "
        "WHERE similarity > 0.3 ORDER BY 1"
    ).fetchall()
    assert rows == [
        ("pq1.jpg", 0.375, ["cc", "1"], {"w": 320, "src": "ü"}, "UNLIKELY"),
        ("pq2.jpg", 0.5, ["cc", "2"], {"w": 320, "src": "ü"}, None),
        ("pq3.jpg", 0.625, ["cc", "3"], {"w": 320, "src": "ü"}, "UNLIKELY"),
    ]
    [(n, keys)] = con.sql(f"SELECT count(*), count(DISTINCT key) FROM '{man}'").fetchall()
    assert n == keys == len(world.records())


def test_duckdb_reads_the_work_dir_and_cli_stats_query(world: World) -> None:
    con = duckdb.connect()
    glob = world.work / "40_caption" / "*.parquet"
    [(n, sims)] = con.sql(
        f"SELECT count(*), count(similarity) FROM read_parquet('{glob}', union_by_name=true)"
    ).fetchall()
    assert n == len(world.records()) and sims == 4
    cat = str(world.work / "catalog")
    res = _cli("stats", "--catalog", cat, "--json")
    assert res.exit_code == 0, res.output
    stats = json.loads(res.stdout)
    assert stats["releases"] == {"v1": 9} and stats["by_status"]["ok"] == 9
    assert {"bad_url", "bad_row", "http_503", "license_not_allowed"} <= set(stats["drop_reasons"])
    res = _cli("query", "--catalog", cat, "--json", "SELECT avg(similarity) AS s FROM manifests")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == [{"s": pytest.approx((0.25 + 0.375 + 0.5 + 0.625) / 4)}]


def test_a_rerun_publishes_no_second_copy(world: World) -> None:
    """Every step resumed, yet the shard step published a byte-identical `v2`."""
    cat = str(world.work / "catalog")
    was = json.loads(_cli("stats", "--catalog", cat, "--json").stdout)
    before = sorted(p.name for p in world.releases.iterdir() if not p.name.startswith("."))
    res = _cli("run", str(world.cfg), "--steps", "ingest,filter,dedup,caption,shard")
    assert res.exit_code == 0, res.output
    after = sorted(p.name for p in world.releases.iterdir() if not p.name.startswith("."))
    assert before == after == ["v1"]
    stats = json.loads(_cli("stats", "--catalog", cat, "--json").stdout)
    assert stats["releases"] == {"v1": 9} and stats["samples"] == was["samples"]


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (
            ('caption_col = "title"', 'caption_col = "TITLE"'),
            "column 'TITLE' (caption_col) not found",
        ),
        (('path = "list.tsv"', 'path = "lost.tsv"'), "lost.tsv' not found"),
    ],
)
def test_a_missing_column_or_file_is_a_config_error(
    world: World, tmp_path: Path, edit: tuple[str, str], needle: str
) -> None:
    """They exited 3 ('cannot run', as for an unfinished step) instead of 2 (config error)."""
    text = world.cfg.read_text().replace(*edit).replace("out/", str(tmp_path / "o") + "/")
    cfg = world.root / f"bad-{tmp_path.name}.toml"
    cfg.write_text(text)
    res = _cli("ingest", str(cfg))
    assert res.exit_code == 2, res.output
    assert "config error" in res.output and needle in " ".join(res.output.split())
    assert "Traceback" not in res.output


def test_retry_failed_then_a_new_release(world: World) -> None:
    """Runs last: the 503'd image comes back on --retry-failed and the next run publishes
    it in v2 (new inputs), nothing else duplicated."""
    res = _cli("ingest", str(world.cfg), "--retry-failed")
    assert res.exit_code == 0, res.output
    res = _cli("run", str(world.cfg), "--steps", "filter,dedup,caption,shard")
    assert res.exit_code == 0, res.output
    recs = world.records("v2")
    assert set(recs) == set(world.records("v1")) | {"flaky.jpg"}
    man = pq.read_table(world.releases / "v2" / "manifest.parquet")
    assert man.num_rows == len(set(man.column("key").to_pylist())) == 10
    assert world.ts.hits["/img/flaky.jpg"] == 2


def test_flickr_format_without_its_column_is_a_config_error(tmp_path: Path) -> None:
    """`license_format = "flickr"` with no `license_col` was ignored: every row of the list
    then dropped license_unknown, and nothing said why."""
    cfg = tmp_path / "cfg.toml"
    (tmp_path / "f.csv").write_text("url,license\nhttp://127.0.0.1:9/a.jpg,4\n")
    cfg.write_text('[[sources]]\ntype = "urls"\npath = "f.csv"\nlicense_format = "flickr"\n')
    res = _cli("ingest", str(cfg))
    assert res.exit_code == 2, res.output
    assert "config error" in res.output and "license_col" in res.output
    assert not (tmp_path / "work").exists()


def test_published_files_name_no_local_path(world: World) -> None:
    """The release states the config's paths relative to its folder: the builder's directory
    layout (`/home/<user>/...`) is not published, and the same project built in another
    checkout gives the same release.json."""
    rel = world.releases / "v1"
    root = str(world.root.resolve())
    for name in ["release.json", "README.md", "ATTRIBUTION", "SHA256SUMS"]:
        assert root not in (rel / name).read_text(encoding="utf-8"), name
    config = json.loads((rel / "release.json").read_text())["run_info"]["config"]
    assert config["run"]["work_dir"] == "out/work"  # as the config file says
