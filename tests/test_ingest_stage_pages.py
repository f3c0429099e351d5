"""IngestStage edges on a loopback server: what an extracted image inherits from its page
record, parser failures, malformed URLs in a batch, and the stage's lifecycle."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from PIL import Image

from ccurate.ingest.config import IngestConfig
from ccurate.ingest.html import PageExtract
from ccurate.ingest.stage import REASONS, IngestStage
from ccurate.record import LicenseEvidence, Sample, make_key
from tests.httpserver import Reply, TestServer, serve

BY = "https://creativecommons.org/licenses/by/4.0/"
BY_SA = "https://creativecommons.org/licenses/by-sa/4.0/"


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (90, 70), (20, 120, 200)).save(buf, "JPEG")
    return buf.getvalue()


JPEG = _jpeg()


def stage(**cfg) -> IngestStage:
    base = dict(allow_private=True, retries=0, total_timeout=4.0, threads=4, image_size=32)
    return IngestStage(IngestConfig(**{**base, **cfg}))


def process(records: list[Sample], **cfg) -> list[Sample]:
    st = stage(**cfg)
    st.setup()
    try:
        return st.process(records)
    finally:
        st.teardown()


@pytest.fixture()
def srv() -> Iterator[TestServer]:
    with serve() as ts:
        yield ts


def test_images_inherit_the_page_records_evidence_and_columns(srv: TestServer):
    srv.route("/i/a.jpg", Reply(body=JPEG, content_type="image/jpeg"))
    html = f"""<!doctype html><html><head><link rel="license" href="{BY_SA}"></head><body>
    <figure><img src="/i/a.jpg" width="640"><a rel="license" href="{BY}">BY</a></figure>
    </body></html>"""
    url = srv.route("/p.html", Reply(body=html.encode(), content_type="text/html"))
    page = Sample(key=make_key(url), url=url, page_url=url, mime="text/html")
    page.license_evidence = [
        LicenseEvidence("input", "column", "CC-BY-4.0"),
        LicenseEvidence("page", "link_rel_license", BY_SA),  # already found on the page
    ]
    page.extra = {"source": "list-1", "html_width": 1}
    (img,) = process([page])
    assert img.kept and img.url == srv.url("/i/a.jpg") and img.page_url == url
    assert [(e.scope, e.kind, e.value) for e in img.license_evidence] == [
        ("container", "rel_license", BY),
        ("page", "link_rel_license", BY_SA),
        ("input", "column", "CC-BY-4.0"),
    ]
    # the page record's columns fill in; the image's own values are not overwritten
    assert img.extra["source"] == "list-1" and img.extra["html_width"] == 640


def test_a_page_the_parser_cannot_read_is_a_page_error(
    srv: TestServer, monkeypatch: pytest.MonkeyPatch
):
    import ccurate.ingest.html as html_mod

    monkeypatch.setattr(
        html_mod, "extract_images", lambda *a, **k: PageExtract(images=[], error="X: broken")
    )
    url = srv.route("/p.html", Reply(body=b"<html><img src=a.jpg>", content_type="text/html"))
    (out,) = process([Sample(key=make_key(url), url=url, page_url=url, mime="text/html")])
    assert out.drop_reason == "page_error" and out.dropped_by == "ingest" and out.url == url
    assert srv.hits["/a.jpg"] == 0


def test_malformed_urls_in_a_batch_get_a_reason_and_the_rest_goes_on(srv: TestServer):
    good = srv.route("/g.jpg", Reply(body=JPEG, content_type="image/jpeg"))
    urls = ["http://[::1/x.jpg", good, "http://[bad"]  # urlsplit raises on these
    out = process([Sample(key=make_key(u), url=u) for u in urls])
    assert [s.url for s in out] == urls
    assert out[1].kept and out[1].height == 32
    assert [out[0].drop_reason, out[2].drop_reason] == ["bad_scheme", "bad_scheme"]
    assert "bad_scheme" in REASONS


def test_setup_is_idempotent_and_describe_says_if_hashes_are_computed():
    st = stage()
    assert st.describe()["hashes"] is None  # not set up: unknown yet
    st.setup()
    try:
        client, pool = st._client, st._pool
        st.setup()
        assert st._client is client and st._pool is pool  # no second client or pool
        d = st.describe()
        assert d["hashes"] is True and d["image_size"] == 32 and d["robots_token"] == "ccurate"
    finally:
        st.teardown()
    assert st._client is None and st._policies is None
