"""The takedown list, matching a release input against it, and the opt-out re-check."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from PIL import Image
from typer.testing import CliRunner

from ccurate.demo.corpus import landscape
from ccurate.filters.hashing import hamming
from ccurate.optout_recheck import OptoutRecheckStage
from ccurate.record import Sample, make_key
from ccurate.takedown import (
    TakedownError,
    TakedownList,
    hash_image_bytes,
    image_entry,
    load_entries,
    make_entry,
    normalize_url,
)
from ccurate.takedown_match import Blocklist, match_index
from tests.httpserver import Reply, serve


def _jpeg(img: Image.Image, q: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=q)
    return buf.getvalue()


# --------------------------------------------------------------------------- entries


def test_entries_are_validated_and_normalised() -> None:
    e = make_entry("url", "HTTP://Photos.Example.ORG/a/B.jpg#top", "dmca", "tester")
    assert e.value == "http://photos.example.org/a/B.jpg"  # path case kept, fragment dropped
    assert e.id == make_entry("url", "http://photos.example.org/a/B.jpg").id
    assert make_entry("domain", "*.Example.org").value == "example.org"
    assert make_entry("domain", "https://sub.example.org/x").value == "sub.example.org"
    assert make_entry("author", "  Ana   RUIZ ").value == "ana ruiz"
    assert make_entry("sha256", "AB" * 32).value == "ab" * 32
    for kind, value in [
        ("url", "ftp://x/y.jpg"),
        ("url", "not a url"),
        ("domain", "a b"),
        ("sha256", "abc"),
        ("phash", "xyz"),
        ("author", "   "),
        ("nonsense", "x"),
    ]:
        with pytest.raises(TakedownError):
            make_entry(kind, value)


def test_list_add_is_idempotent_and_load_names_the_bad_line(tmp_path: Path) -> None:
    lst = TakedownList(tmp_path)
    assert lst.load() == []
    first = lst.add(
        [
            make_entry("url", "http://a.example/x.jpg", "r", "me"),
            make_entry("author", "Li Wei", "r", "me"),
        ]
    )
    assert [added for _, added in first] == [True, True]
    again = lst.add([make_entry("url", "http://A.example/x.jpg", "other reason", "you")])
    assert [added for _, added in again] == [False]
    loaded = lst.load()
    assert [(e.kind, e.value, e.added_by) for e in loaded] == [
        ("url", "http://a.example/x.jpg", "me"),
        ("author", "li wei", "me"),
    ]
    for line in loaded:
        assert line.added_at and line.reason == "r"
    with open(lst.path, "a") as fh:
        fh.write('{"kind": "sha256", "value": "nothex"}\n')
    with pytest.raises(TakedownError, match=r"takedowns\.jsonl:3: .*sha256"):
        load_entries(lst.path)


def test_image_entry_hashes_like_ingest(tmp_path: Path) -> None:
    img = landscape(3, 400, 300)
    f = tmp_path / "photo.jpg"
    f.write_bytes(_jpeg(img))
    e = image_entry(f, "mine", "me")
    h = hash_image_bytes(f.read_bytes())
    assert (e.kind, e.value, e.phash, e.pixel_sha256) == (
        "image",
        h.sha256,
        h.phash,
        h.pixel_sha256,
    )
    small = hash_image_bytes(_jpeg(img.resize((200, 150)), 60))
    assert hamming(small.phash, h.phash) <= 6  # a resized, recompressed copy stays near
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(TakedownError, match=r"bad\.jpg"):
        image_entry(bad)


def test_cli_add_and_list(tmp_path: Path) -> None:
    from ccurate.cli import app

    img = tmp_path / "mine.jpg"
    img.write_bytes(_jpeg(landscape(4, 320, 240)))
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "takedown",
            "add",
            "--catalog",
            str(tmp_path / "cat"),
            "--url",
            "http://x.example/a.jpg",
            "--image",
            str(img),
            "--domain",
            "spam.example",
            "--reason",
            "asked by owner",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert [(r["kind"], r["added"]) for r in rows] == [
        ("url", True),
        ("domain", True),
        ("image", True),
    ]
    assert rows[2]["phash"] and rows[2]["source"] == "mine.jpg"
    res = runner.invoke(
        app,
        ["takedown", "add", "--catalog", str(tmp_path / "cat"), "--url", "http://x.example/a.jpg"],
    )
    assert res.exit_code == 0 and "already listed" in res.output
    res = runner.invoke(app, ["takedown", "list", "--catalog", str(tmp_path / "cat"), "--json"])
    assert [json.loads(line)["reason"] for line in res.output.splitlines()] == [
        "asked by owner"
    ] * 3
    res = runner.invoke(
        app, ["takedown", "add", "--catalog", str(tmp_path / "cat"), "--sha256", "123"]
    )
    assert res.exit_code == 2 and "sha256" in res.output
    res = runner.invoke(app, ["takedown", "add", "--url", "http://x.example/b.jpg"])
    assert res.exit_code == 2 and "--catalog" in res.output


# --------------------------------------------------------------------------- matching


def _index(rows: list[dict[str, Any]]) -> pa.Table:
    cols = ["key", "url", "page_url", "author", "sha256", "pixel_sha256", "phash"]
    return pa.table({c: pa.array([r.get(c) for r in rows], pa.string()) for c in cols})


def test_match_index_by_every_kind_and_near_copies() -> None:
    base = hash_image_bytes(_jpeg(landscape(11, 400, 300)))
    copy = hash_image_bytes(_jpeg(landscape(11, 400, 300).resize((300, 225)), 70))
    other = hash_image_bytes(_jpeg(landscape(12, 400, 300)))
    far = hash_image_bytes(_jpeg(landscape(13, 400, 300)))
    assert hamming(base.phash, other.phash) > 10 and hamming(base.phash, far.phash) > 10
    rows = [
        {"key": "k-url", "url": "https://Img.Example.com/p/1.jpg", "phash": far.phash},
        {"key": "k-page", "url": "http://o.org/2.jpg", "page_url": "http://site.org/gallery"},
        {"key": "k-dom", "url": "http://cdn.blocked.net/3.jpg"},
        {"key": "k-notdom", "url": "http://notblocked.net/3.jpg"},
        {"key": "k-author", "url": "http://o.org/4.jpg", "author": " li WEI"},
        {"key": "k-sha", "url": "http://o.org/5.jpg", "sha256": "ab" * 32},
        {"key": "k-img", "url": "http://o.org/6.jpg", "phash": copy.phash},
        {"key": "k-copy-of-url", "url": "http://mirror.org/7.jpg", "phash": far.phash},
        {"key": "k-clean", "url": "http://o.org/8.jpg", "phash": other.phash, "author": "Ana Ruiz"},
        {"key": "k-removed", "url": "http://o.org/9.jpg"},
    ]
    block = Blocklist()
    block.add_entries(
        [
            make_entry("url", "https://img.example.com/p/1.jpg"),
            make_entry("page_url", "http://site.org/gallery"),
            make_entry("domain", "blocked.net"),
            make_entry("author", "Li Wei"),
            make_entry("sha256", "AB" * 32),
            make_entry("image", base.sha256, phash=base.phash, pixel_sha256=base.pixel_sha256),
        ],
        radius=8,
    )
    block.add_removals(
        pa.table(
            {
                "key": ["k-removed"],
                "sha256": [None],
                "pixel_sha256": [None],
                "phash": [None],
                "reason": ["optout_tdmrep"],
            },
            schema=pa.schema(
                [(c, pa.string()) for c in ("key", "sha256", "pixel_sha256", "phash", "reason")]
            ),
        ),
        radius=8,
    )
    got = {r["key"]: r for r in match_index(_index(rows), block, radius=8).to_pylist()}
    assert set(got) == {
        "k-url",
        "k-page",
        "k-dom",
        "k-author",
        "k-sha",
        "k-img",
        "k-copy-of-url",
        "k-removed",
    }
    assert got["k-removed"]["reason"] == "optout_tdmrep"
    assert all(got[k]["reason"] == "takedown" for k in got if k != "k-removed")
    assert "copy of k-url" in got["k-copy-of-url"]["detail"]
    assert "phash" in got["k-img"]["detail"]


def test_match_index_radius_is_respected() -> None:
    h = hash_image_bytes(_jpeg(landscape(21, 400, 300)))
    flipped = f"{int(h.phash, 16) ^ 0b111:016x}"  # 3 bits away
    block = Blocklist()
    block.add_entries([make_entry("phash", h.phash, radius=2)], radius=8)
    assert match_index(_index([{"key": "a", "phash": flipped}]), block).num_rows == 0
    block = Blocklist()
    block.add_entries([make_entry("phash", h.phash, radius=3)], radius=8)
    assert match_index(_index([{"key": "a", "phash": flipped}]), block).num_rows == 1


# --------------------------------------------------------------------------- re-check


def test_optout_recheck_reads_headers_robots_and_pages() -> None:
    from ccurate.ingest.config import IngestConfig

    with serve() as ts:
        page_ok = ts.route(
            "/ok.html",
            Reply(body=b"<html><body><img src='/a.jpg'></body></html>", content_type="text/html"),
        )
        page_meta = ts.route(
            "/meta.html",
            Reply(
                body=b"<html><head><meta name='robots' content='noai'></head><body></body></html>",
                content_type="text/html",
            ),
        )
        ts.route(
            "/robots.txt",
            Reply(body=b"User-agent: ccurate\nDisallow: /private/\n", content_type="text/plain"),
        )
        img = _jpeg(landscape(1, 64, 48))
        urls = {
            "ok": ts.route("/a.jpg", Reply(body=img, content_type="image/jpeg")),
            "xrobots": ts.route(
                "/b.jpg",
                Reply(
                    body=img, content_type="image/jpeg", headers=[("X-Robots-Tag", "ccurate: noai")]
                ),
            ),
            "robots": ts.route("/private/c.jpg", Reply(body=img, content_type="image/jpeg")),
            "gone": ts.route("/d.jpg", Reply(404, b"no")),
            "busy": ts.route("/e.jpg", Reply(503, b"later")),
            "meta": ts.route("/f.jpg", Reply(body=img, content_type="image/jpeg")),
        }
        pages = {"meta": page_meta}
        batch = [
            Sample(key=make_key(u), url=u, page_url=pages.get(name, page_ok))
            for name, u in urls.items()
        ]
        stage = OptoutRecheckStage(IngestConfig(allow_private=True, retries=0), threads=4)
        stage.setup()
        try:
            out = stage.process(batch)
        finally:
            stage.teardown()
        got = {name: s.extra["optout_recheck"] for name, s in zip(urls, out, strict=True)}
        kept = {name: s.kept for name, s in zip(urls, out, strict=True)}
        assert ts.hits["/ok.html"] == 1  # one page check shared by the images on it
    assert got == {
        "ok": "ok",
        "xrobots": "optout_x_robots_tag",
        "robots": "optout_robots_txt",
        "gone": "gone:http_404",
        "busy": "transient:http_503",
        "meta": "optout_meta_robots",
    }
    assert kept == {
        "ok": True,
        "xrobots": False,
        "robots": False,
        "gone": True,
        "busy": True,
        "meta": False,
    }


def test_recheck_treats_a_failing_robots_txt_as_come_back_later() -> None:
    from ccurate.ingest.config import IngestConfig

    with serve() as ts:
        ts.route("/robots.txt", Reply(503, b"down"))
        u = ts.route("/a.jpg", Reply(body=_jpeg(landscape(2, 64, 48)), content_type="image/jpeg"))
        stage = OptoutRecheckStage(IngestConfig(allow_private=True, retries=0), threads=1)
        stage.setup()
        try:
            (s,) = stage.process([Sample(key=make_key(u), url=u)])
        finally:
            stage.teardown()
    assert s.kept and s.extra["optout_recheck"] == "transient:robots_http_503"


def test_normalize_url_rejects_non_http() -> None:
    assert normalize_url(" https://A.B/c ") == "https://a.b/c"
    with pytest.raises(TakedownError):
        normalize_url("mailto:x@y")


@pytest.mark.parametrize("padding", [0, 100])  # a popcount scan, then the multi-index path
def test_near_matching_is_the_same_for_few_and_many_references(padding: int) -> None:
    import numpy as np

    rng = np.random.default_rng(padding)
    h = hash_image_bytes(_jpeg(landscape(31, 400, 300))).phash
    rows = [
        {"key": f"r{i}", "phash": f"{int(h, 16) ^ (1 << i) ^ (1 << (i + 9)):016x}"}
        for i in range(5)
    ]  # each 2 bits from h
    rows.append({"key": "far", "phash": f"{int(h, 16) ^ 0xFFFF_FFFF:016x}"})
    block = Blocklist()
    pad = [make_entry("phash", f"{int(c):016x}") for c in rng.integers(0, 2**63, padding)]
    block.add_entries([*pad, make_entry("phash", h)], radius=3)
    got = match_index(_index(rows), block, radius=3)
    assert sorted(got["key"].to_pylist()) == [f"r{i}" for i in range(5)]
    assert all("2 bits" in d for d in got["detail"].to_pylist())
