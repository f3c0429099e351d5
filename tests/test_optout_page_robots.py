"""Ingest and the opt-out re-check apply the same page-level opt-outs: the page origin's
robots.txt for an image with a `page_url` (ingest used to check only the image's origin),
and every meta opt-out of a page on its own (the re-check used to read the first-ranked)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ccurate.ingest.config import IngestConfig
from ccurate.optout_recheck import OptoutRecheckStage
from ccurate.record import Sample, make_key
from tests.httpserver import Reply, TestServer, serve
from tests.test_ingest_download import FAST, img_reply, run


@pytest.fixture()
def page_srv() -> Iterator[TestServer]:
    with serve() as ts:
        yield ts


@pytest.fixture()
def cdn() -> Iterator[TestServer]:
    with serve() as ts:
        yield ts


def recheck(url: str, page_url: str, **cfg: Any) -> str:
    st = OptoutRecheckStage(IngestConfig(allow_private=True, **FAST, **cfg), threads=2)
    st.setup()
    try:
        return st.check(url, page_url)
    finally:
        st.teardown()


def robots(text: str) -> Reply:
    return Reply(body=text.encode(), content_type="text/plain")


PAGE = Reply(body=b"<html><body><img src='x'></body></html>", content_type="text/html")


@pytest.mark.parametrize(
    ("text", "page_path", "reason"),
    [
        ("User-agent: ccurate\nDisallow: /\n", "/post", "optout_robots_txt"),
        ("User-agent: *\nDisallow: /*/private/\n", "/en/private/post", "optout_robots_txt"),
        ("User-agent: *\nDisallow: /private/\n", "/public/post", None),
        ("User-agent: otherbot\nDisallow: /\n", "/post", None),
    ],
)
def test_page_origin_robots_txt_applies_to_an_image_on_another_origin(
    page_srv: TestServer, cdn: TestServer, text: str, page_path: str, reason: str | None
):
    page_srv.route("/robots.txt", robots(text))
    page = page_srv.route(page_path, PAGE)
    imgs = [cdn.route(f"/{i}.jpg", img_reply()) for i in range(3)]
    out = run([Sample(key=make_key(u, page), url=u, page_url=page) for u in imgs])
    assert [s.drop_reason for s in out] == [reason] * 3
    assert page_srv.hits["/robots.txt"] == 1  # cached per origin
    assert sum(cdn.hits[f"/{i}.jpg"] for i in range(3)) == (0 if reason else 3)
    # the re-check, which fetches the page, reaches the same verdict
    assert recheck(imgs[0], page) == (reason or "ok")


def test_page_path_robots_txt_on_the_image_origin(cdn: TestServer):
    """Same origin, different path: the page's path is checked, not only the image's."""
    cdn.route("/robots.txt", robots("User-agent: *\nDisallow: /private/\n"))
    page = cdn.route("/private/post", PAGE)
    img = cdn.route("/img/a.jpg", img_reply())
    (out,) = run([Sample(key=make_key(img, page), url=img, page_url=page)])
    assert out.drop_reason == "optout_robots_txt" and cdn.hits["/img/a.jpg"] == 0
    assert recheck(img, page) == "optout_robots_txt"


def test_page_origin_policies_follow_the_config(page_srv: TestServer, cdn: TestServer):
    page_srv.route("/robots.txt", robots("User-agent: *\nDisallow: /\n"))
    page_srv.route(
        "/.well-known/tdmrep.json", Reply(body=b'[{"location": "/", "tdm-reservation": 1}]')
    )
    page = page_srv.route("/post", PAGE)
    img = cdn.route("/a.jpg", img_reply())

    def one(**cfg: Any) -> Sample:
        (s,) = run([Sample(key=make_key(img, page), url=img, page_url=page)], **cfg)
        return s

    assert one(respect_robots_txt=False).drop_reason == "optout_tdmrep"
    assert recheck(img, page, respect_robots_txt=False) == "optout_tdmrep"
    assert one(respect_robots_txt=False, respect_tdmrep=False).kept
    assert page_srv.hits["/robots.txt"] == 0  # not honoured: not fetched
    # no page_url, or the page is the image itself: only the image's origin counts
    (s,) = run([Sample(key=make_key(img), url=img)])
    assert s.kept and page_srv.hits["/robots.txt"] == 0


def test_unparsable_page_url_is_no_policy(cdn: TestServer):
    img = cdn.route("/a.jpg", img_reply())
    (s,) = run([Sample(key=make_key(img, "x"), url=img, page_url="ftp://e.test/p")])
    assert s.kept


TWO_OPTOUTS = (
    b"<html><head><meta name='robots' content='noai'><meta name='tdm-reservation' content='1'>"
    b"</head><body><img src='/a.jpg'></body></html>"
)


@pytest.mark.parametrize(
    ("cfg", "outcome"),
    [
        ({}, "optout_meta_robots"),
        ({"respect_meta_robots": False}, "optout_tdmrep"),  # the TDM reservation still counts
        ({"respect_tdmrep": False}, "optout_meta_robots"),
        ({"respect_meta_robots": False, "respect_tdmrep": False}, "ok"),
    ],
)
def test_recheck_reads_every_page_optout_as_ingest_does(
    cdn: TestServer, cfg: dict[str, Any], outcome: str
):
    cdn.route("/robots.txt", Reply(404))
    page = cdn.route("/post", Reply(body=TWO_OPTOUTS, content_type="text/html"))
    img = cdn.route("/a.jpg", img_reply())
    assert recheck(img, page, **cfg) == outcome
    (s,) = run([Sample(key=make_key(page), url=page, page_url=page, mime="text/html")], **cfg)
    assert (s.drop_reason or "ok") == outcome
