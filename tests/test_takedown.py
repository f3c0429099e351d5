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
from ccurate.takedown_match import MATCH_COLUMNS, Blocklist, match_index
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


def _recheck(
    batch: list[Sample], threads: int = 4, **cfg: Any
) -> tuple[list[str | None], list[bool]]:
    from ccurate.ingest.config import IngestConfig

    stage = OptoutRecheckStage(IngestConfig(allow_private=True, retries=0, **cfg), threads=threads)
    try:
        out = stage.process(batch)  # no setup(): process sets up on first use
    finally:
        stage.teardown()
    return [s.extra["optout_recheck"] for s in out], [s.kept for s in out]


def _html(head: str = "") -> Reply:
    return Reply(
        body=f"<html><head>{head}</head><body></body></html>".encode(), content_type="text/html"
    )


def test_recheck_reads_what_the_page_answers() -> None:
    """The page of a sample whose image is fine: a dead page leaves the sample alone, a
    failing one says come back later, an opt-out in its headers or meta removes it."""
    with serve() as ts:
        img = ts.route("/a.jpg", Reply(body=_jpeg(landscape(5, 64, 48)), content_type="image/jpeg"))
        pages = {
            "gone": ts.route("/gone.html", Reply(404, b"no")),
            "busy": ts.route("/busy.html", Reply(503, b"later")),
            "header": ts.route(
                "/h.html",
                Reply(
                    body=b"<html></html>",
                    content_type="text/html",
                    headers=[("X-Robots-Tag", "noai")],
                ),
            ),
            "tdm": ts.route("/tdm.html", _html("<meta name='tdm-reservation' content='1'>")),
            "meta": ts.route("/m.html", _html("<meta name='ccurate' content='noimageai'>")),
            "plain": ts.route("/p.html", _html("<title>fine</title>")),
        }
        batch = [Sample(key=make_key(img, p), url=img, page_url=p) for p in pages.values()]
        got, kept = _recheck(batch)
        # the same signals, not honoured: nothing is removed for them
        batch2 = [Sample(key=make_key(img, p), url=img, page_url=p) for p in pages.values()]
        got2, _ = _recheck(batch2, respect_tdmrep=False, respect_meta_robots=False)
    assert dict(zip(pages, got, strict=True)) == {
        "gone": "gone:http_404",
        "busy": "transient:http_503",
        "header": "optout_x_robots_tag",
        "tdm": "optout_tdmrep",
        "meta": "optout_meta_robots",
        "plain": "ok",
    }
    assert dict(zip(pages, kept, strict=True)) == {
        "gone": True,
        "busy": True,
        "header": False,
        "tdm": False,
        "meta": False,
        "plain": True,
    }
    assert dict(zip(pages, got2, strict=True))["tdm"] == "ok"
    assert dict(zip(pages, got2, strict=True))["meta"] == "ok"


def test_recheck_of_a_host_that_is_down_or_throttled_keeps_the_sample() -> None:
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/x.jpg"
    with serve() as ts:
        ts.route("/robots.txt", Reply(429, b"slow down"))
        busy = ts.route(
            "/a.jpg", Reply(body=_jpeg(landscape(6, 64, 48)), content_type="image/jpeg")
        )
        got, kept = _recheck(
            [Sample(key=make_key(dead), url=dead), Sample(key=make_key(busy), url=busy)]
        )
    assert got == ["transient:connection_error", "transient:robots_http_429"]
    assert kept == [True, True]


def test_each_recheck_reads_robots_txt_afresh() -> None:
    """A site that starts disallowing us after a release: the next re-check removes it."""
    with serve() as ts:
        ts.route("/robots.txt", Reply(body=b"User-agent: *\nAllow: /\n", content_type="text/plain"))
        u = ts.route("/g/a.jpg", Reply(body=_jpeg(landscape(7, 64, 48)), content_type="image/jpeg"))
        before, _ = _recheck([Sample(key=make_key(u), url=u)])
        ts.route(
            "/robots.txt",
            Reply(body=b"User-agent: ccurate\nDisallow: /g/\n", content_type="text/plain"),
        )
        after, kept = _recheck([Sample(key=make_key(u), url=u)])
        assert ts.hits["/robots.txt"] == 2
    assert before == ["ok"] and after == ["optout_robots_txt"] and kept == [False]


def test_recheck_stage_travels_to_workers_and_sets_up_once() -> None:
    """Executors pickle stages (process pools, Ray): a set-up stage leaves its client, pool
    and lock behind and the copy sets up its own on first use."""
    import pickle

    from ccurate.ingest.config import IngestConfig

    with serve() as ts:
        u = ts.route("/a.jpg", Reply(body=_jpeg(landscape(8, 64, 48)), content_type="image/jpeg"))
        stage = OptoutRecheckStage(IngestConfig(allow_private=True, retries=0), threads=2)
        stage.setup()
        client = stage._client
        stage.setup()  # idempotent: the same client, no second pool
        assert stage._client is client
        try:
            stage.process([Sample(key=make_key(u), url=u)])
            copy = pickle.loads(pickle.dumps(stage))
        finally:
            stage.teardown()
        assert copy._client is None and copy._pool is None and copy._pages == {}
        try:
            (s,) = copy.process([Sample(key=make_key(u), url=u)])
        finally:
            copy.teardown()
    assert s.extra["optout_recheck"] == "ok" and s.kept


def test_a_failing_page_check_fails_every_sample_of_that_page_without_hanging() -> None:
    """Samples sharing a page wait for one check; if it raises they get the error too
    (without it they would wait forever)."""
    import threading
    import time

    from ccurate.ingest.config import IngestConfig

    with serve() as ts:
        img = _jpeg(landscape(9, 64, 48))
        urls = [ts.route(f"/{i}.jpg", Reply(body=img, content_type="image/jpeg")) for i in range(2)]
        page = ts.url("/page.html")
        stage = OptoutRecheckStage(IngestConfig(allow_private=True, retries=0), threads=2)
        calls: list[str] = []

        def broken(url: str) -> str:
            calls.append(url)
            time.sleep(0.3)  # the other sample is waiting for this page by now
            raise RuntimeError("parser exploded")

        stage._check_page = broken  # type: ignore[method-assign]
        errors: list[BaseException] = []

        def run() -> None:
            try:
                stage.process([Sample(key=make_key(u, page), url=u, page_url=page) for u in urls])
            except BaseException as e:
                errors.append(e)
            finally:
                stage.teardown()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(timeout=20)
        hung = t.is_alive()
        for fut in list(stage._pages.values()):  # on failure: free the waiters so pytest can exit
            if not fut.done():
                fut.set_result("ok")
        assert not hung, "re-check hung on a failed page check"
    assert calls == [page]
    assert [str(e) for e in errors] == ["parser exploded"]


def test_an_unparsable_page_does_not_remove_the_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*a: Any, **k: Any) -> None:
        raise ValueError("not html at all")

    monkeypatch.setattr("ccurate.ingest.html.extract_images", explode)
    with serve() as ts:
        u = ts.route("/a.jpg", Reply(body=_jpeg(landscape(10, 64, 48)), content_type="image/jpeg"))
        page = ts.route("/p.html", _html())
        got, kept = _recheck([Sample(key=make_key(u, page), url=u, page_url=page)])
        assert ts.hits["/p.html"] == 1
    assert got == ["ok"] and kept == [True]


# --------------------------------------------------------------------------- release gate


def _write_index(path: Path, rows: list[dict[str, Any]], cols: list[str]) -> str:
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({c: pa.array([r.get(c) for r in rows], pa.string()) for c in cols}), path
    )
    return str(path).removesuffix(".parquet")


def test_url_takedown_of_a_merged_duplicate_removes_the_released_copy(tmp_path: Path) -> None:
    """Dedup kept one copy of an image found at two URLs; a takedown names the URL that was
    dropped as its duplicate: the released copy (same bytes, or a near pHash) goes too."""
    from ccurate.release_gate import gate_decisions

    near = f"{int('8f373714acfcf4d0', 16) ^ 0b11:016x}"  # 2 bits away
    dups = pa.table(
        {
            "key": ["dup-1", "dup-2"],
            "url": ["http://mirror.example/a.jpg", "http://other.example/z.jpg"],
            "page_url": [None, None],
            "author": [None, None],
            "sha256": ["aa" * 32, "cc" * 32],
            "pixel_sha256": ["bb" * 32, None],
            "phash": ["8f373714acfcf4d0", None],
        },
        schema=pa.schema([(c, pa.string()) for c in MATCH_COLUMNS]),
    )
    cols = ["key", "url", "sha256", "pixel_sha256", "phash"]  # old inputs: no page/author
    old = _write_index(
        tmp_path / "old.parquet",
        [
            {"key": "same-bytes", "url": "http://site.example/a.jpg", "sha256": "aa" * 32},
            {"key": "same-pixels", "url": "http://site.example/b.jpg", "pixel_sha256": "bb" * 32},
            {"key": "near", "url": "http://site.example/c.jpg", "phash": near},
            {"key": "other", "url": "http://site.example/d.jpg", "sha256": "cc" * 32},
            {"key": "clean", "url": "http://site.example/e.jpg", "sha256": "dd" * 32},
        ],
        cols,
    )
    entries = [make_entry("url", "http://mirror.example/a.jpg", "DMCA")]
    empty = pa.schema([(c, pa.string()) for c in MATCH_COLUMNS]).empty_table()
    removals = pa.schema(
        [(c, pa.string()) for c in ("key", "sha256", "pixel_sha256", "phash", "reason")]
    ).empty_table()
    got = gate_decisions(tmp_path / "g.parquet", [old], [], entries, removals, {}, {}, dups, 4)
    why = {r["key"]: r for r in got.to_pylist()}
    assert set(why) == {"same-bytes", "same-pixels", "near"}
    for r in why.values():
        assert r["reason"] == "takedown" and r["scope"] == "all"
    assert "dropped duplicate" in why["same-bytes"]["detail"]
    assert "dup-1" in why["same-bytes"]["detail"]
    # without the duplicates table only the taken-down URL itself could match (none here)
    none = gate_decisions(tmp_path / "h.parquet", [old], [], entries, removals, {}, {}, empty, 4)
    assert none.num_rows == 0


def test_author_takedown_of_a_merged_duplicate_removes_the_released_copy(
    tmp_path: Path,
) -> None:
    """The author's own upload was dropped as a duplicate of a copy released under another
    name: an author takedown must remove the released copy (the gate built its matcher of
    dropped duplicates without the authors, so nothing went)."""
    from ccurate.release_gate import gate_decisions

    dups = pa.table(
        {"key": ["dup-1"], "url": ["http://own.example/a.jpg"], "page_url": [None],
         "author": ["Ana Lima"], "sha256": ["aa" * 32], "pixel_sha256": [None],
         "phash": [None]},
        schema=pa.schema([(c, pa.string()) for c in MATCH_COLUMNS]),
    )  # fmt: skip
    old = _write_index(
        tmp_path / "old.parquet",
        [{"key": "copy", "url": "http://aggregator.example/a.jpg", "sha256": "aa" * 32}],
        ["key", "url", "sha256", "pixel_sha256", "phash"],
    )
    entries = [make_entry("author", "Ana Lima", "author's request")]
    removals = pa.schema(
        [(c, pa.string()) for c in ("key", "sha256", "pixel_sha256", "phash", "reason")]
    ).empty_table()
    got = gate_decisions(tmp_path / "g.parquet", [old], [], entries, removals, {}, {}, dups, 4)
    assert got.column("key").to_pylist() == ["copy"]
    assert got.column("reason").to_pylist() == ["takedown"]


def test_refetched_records_are_superseded_or_withdrawn(tmp_path: Path) -> None:
    from ccurate.release_gate import gate_decisions, superseded_keys

    old = _write_index(
        tmp_path / "old.parquet",
        [{"key": k} for k in ("k-ok", "k-lic", "k-404", "k-opt", "k-no")],
        ["key"],
    )
    outcomes = {
        "k-ok": ("ok", None, None),
        "k-lic": ("dropped", "license_not_allowed", "license"),  # a filter: licence changed
        "k-404": ("dropped", "http_404", "ingest"),  # a dead link keeps the old record
        "k-opt": ("dropped", "optout_x_robots_tag", "ingest"),
        "k-new": ("ok", None, None),  # not in the old release input
    }
    sup = superseded_keys([old], outcomes)
    assert sup == {
        "k-ok": "superseded",
        "k-lic": "license_not_allowed",
        "k-opt": "optout_x_robots_tag",
    }
    assert superseded_keys([old], {}) == {}
    removals = pa.schema(
        [(c, pa.string()) for c in ("key", "sha256", "pixel_sha256", "phash", "reason")]
    ).empty_table()
    empty = pa.schema([(c, pa.string()) for c in MATCH_COLUMNS]).empty_table()
    got = gate_decisions(tmp_path / "g.parquet", [old], [], [], removals, {}, sup, empty, 8)
    rows = {r["key"]: (r["reason"], r["detail"], r["scope"]) for r in got.to_pylist()}
    assert rows == {
        "k-ok": ("superseded", "fetched again in this generation", "previous"),
        "k-lic": ("license_not_allowed", "fetched again: now license_not_allowed", "previous"),
        "k-opt": ("optout_x_robots_tag", "fetched again: now optout_x_robots_tag", "previous"),
    }


def test_gate_stage_travels_to_workers_and_drops_by_scope(tmp_path: Path) -> None:
    import pickle

    import pyarrow.parquet as pq

    from ccurate.release_gate import GATE_SCHEMA, ReleaseGateStage

    path = tmp_path / "gate.parquet"
    pq.write_table(
        pa.table(
            {
                "key": ["t", "s", "o"],
                "reason": ["takedown", "superseded", "optout_tdmrep"],
                "detail": ["e1 url", "fetched again in this generation", "opt-out found"],
                "scope": ["all", "previous", "all"],
            },
            schema=GATE_SCHEMA,
        ),
        path,
    )

    def batch() -> list[Sample]:
        return [Sample(key=k, url=f"http://a.example/{k}.jpg") for k in ("t", "s", "o", "x")]

    prev = ReleaseGateStage(str(path), previous=True)
    prev.setup()
    copy = pickle.loads(pickle.dumps(prev))
    assert copy._decisions is None and prev._decisions is not None  # reloaded, not shipped
    assert copy.describe() == {"decisions": str(path), "previous": True}
    out = copy.process(batch())  # loads the decisions on first use
    assert [(s.kept, s.drop_reason, s.dropped_by) for s in out] == [
        (False, "takedown", "takedown"),
        (False, "superseded", "rebuild"),
        (False, "optout_tdmrep", "takedown"),
        (True, None, None),
    ]
    assert out[0].extra["removed_because"] == "e1 url"
    new = ReleaseGateStage(str(path), previous=False).process(batch())
    assert [s.kept for s in new] == [False, True, False, True]  # superseded: old records only


def test_dropped_duplicates_survive_a_foreign_catalog(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import pyarrow.parquet as pq

    from ccurate.release_gate import dropped_duplicates, read_index

    cat = tmp_path / "catalog"
    cat.mkdir()
    (cat / "catalog.duckdb").write_bytes(b"not a duckdb file at all" * 100)
    gen = tmp_path / "dropped.parquet"
    pq.write_table(
        pa.table(
            {
                "key": ["a", "b"],
                "url": ["http://x.example/a.jpg", "http://x.example/b.jpg"],
                "sha256": ["aa" * 32, "bb" * 32],
                "duplicate_of": ["k", None],
            }
        ),
        gen,
    )
    no_dups = tmp_path / "nodup.parquet"
    pq.write_table(pa.table({"key": ["c"], "url": ["http://x.example/c.jpg"]}), no_dups)
    with caplog.at_level("WARNING", logger="ccurate.rebuild"):
        t = dropped_duplicates(cat, [str(gen), str(no_dups)])
    assert "not read for takedown expansion" in caplog.text
    assert t.column_names == MATCH_COLUMNS
    assert t.to_pylist() == [
        {
            "key": "a",
            "url": "http://x.example/a.jpg",
            "page_url": None,
            "author": None,
            "sha256": "aa" * 32,
            "pixel_sha256": None,
            "phash": None,
        }
    ]
    # an older release input without some columns reads as nulls there
    idx = read_index([str(no_dups).removesuffix(".parquet")], ["key", "url", "phash"])
    assert idx.to_pylist() == [{"key": "c", "url": "http://x.example/c.jpg", "phash": None}]
    assert read_index([], ["key"]).num_rows == 0


# --------------------------------------------------------------------------- list validation


def test_entry_checks_name_the_problem() -> None:
    with pytest.raises(TakedownError, match=r"radius: radius must be within 0\.\.32 bits"):
        make_entry("phash", "0" * 16, radius=33)
    with pytest.raises(TakedownError, match="an image entry needs its phash"):
        make_entry("image", "a" * 64)
    with pytest.raises(TakedownError, match="reason must not be empty"):
        make_entry("url", "http://a.example/x.jpg", reason="   ")
    with pytest.raises(TakedownError, match="not an http"):
        make_entry("url", "http://[::1/x.jpg")  # urlsplit itself refuses it
    with pytest.raises(TakedownError, match="phash"):
        make_entry("sha256", "a" * 64, phash="nothex")
    with pytest.raises(TakedownError, match="image file not found"):
        image_entry("/nonexistent/photo.jpg")
    e = make_entry("image", "A" * 64, phash="F" * 16, pixel_sha256="B" * 64, radius=4)
    assert (e.value, e.phash, e.pixel_sha256, e.radius) == ("a" * 64, "f" * 16, "b" * 64, 4)


def test_a_hand_edited_list_is_checked_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "takedowns.jsonl"
    good = make_entry("url", "http://a.example/x.jpg", "r", "me").model_dump_json()
    edited = json.loads(good) | {"value": "http://a.example/other.jpg"}  # id kept: stale
    for bad, why in [
        ("[1, 2]", "not a JSON object"),
        ('{"kind": "url", ', "invalid JSON"),
        (json.dumps(edited), "does not match kind and value"),
    ]:
        path.write_text(f"{good}\n\n{bad}\n")
        with pytest.raises(TakedownError, match=rf"takedowns\.jsonl:3: .*{why}"):
            load_entries(path)
    path.write_text(f"\n{good}\n\n")  # blank lines are fine
    assert [e.value for e in load_entries(path)] == ["http://a.example/x.jpg"]


def test_adding_to_a_list_saved_without_a_final_newline(tmp_path: Path) -> None:
    lst = TakedownList(tmp_path)
    first = make_entry("url", "http://a.example/x.jpg", "r", "me")
    lst.path.write_text(first.model_dump_json())  # an editor that drops the last newline
    lst.add([make_entry("author", "Li Wei", "r", "me")])
    assert [(e.kind, e.value) for e in lst.load()] == [
        ("url", "http://a.example/x.jpg"),
        ("author", "li wei"),
    ]


def test_added_by_without_a_user_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Containers often run as a uid with no passwd entry: getpass fails, the uid is used."""
    import getpass
    import os
    import socket

    def nobody() -> str:
        raise KeyError("getpwuid(): uid not found")

    monkeypatch.setattr(getpass, "getuser", nobody)
    e = make_entry("domain", "example.org")
    assert e.added_by == f"{os.getuid()}@{socket.gethostname()}"
