"""Review regressions for the ingest stage and structured metadata: one image that cannot be
encoded or hashed must not sink its batch, a TDM reservation must count when meta robots is
not honoured, and Commons extmetadata HTML/null/multilingual values must read cleanly."""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from ccurate.ingest.config import IngestConfig
from ccurate.ingest.metadata import strip_html, wikimedia_evidence
from ccurate.ingest.stage import REASONS, IngestStage
from ccurate.record import Sample, make_key
from tests.httpserver import Reply, TestServer, serve
from tests.test_ingest_stage_pages import process


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h), 128).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def srv() -> Iterator[TestServer]:
    with serve() as ts:
        yield ts


def test_an_image_the_encoder_refuses_is_dropped_alone(srv: TestServer):
    # 70000 x 2 decodes fine (140k pixels) but JPEG cannot store a side over 65500:
    # Pillow raises OSError while encoding, which used to abort the whole batch
    wide = srv.route("/wide.png", Reply(body=_png(70000, 2), content_type="image/png"))
    good = srv.route("/good.png", Reply(body=_png(40, 30), content_type="image/png"))
    out = process([Sample(key=make_key(u), url=u) for u in (wide, good)], resize_mode="no")
    assert [s.url for s in out] == [wide, good]
    assert out[0].drop_reason == "decode_error" and out[0].dropped_by == "ingest"
    assert out[0].image is None and "decode_error" in REASONS
    assert out[1].kept and (out[1].width, out[1].height) == (40, 30)


def test_a_hasher_failure_drops_that_image_not_the_batch():
    st = IngestStage(IngestConfig(threads=2, image_size=32))
    st.setup()
    calls = []

    def flaky(img: Image.Image) -> tuple[str, str, str]:
        calls.append(img.size)
        if len(calls) == 1:
            raise ValueError("hasher bug")
        return "0" * 64, "0" * 16, "0" * 16

    st._hasher = flaky
    try:
        recs = [
            Sample(
                key=make_key(f"warc://{i}"), url=f"http://example.com/{i}.png", image=_png(40, 30)
            )
            for i in range(2)
        ]
        out = st.process(recs)
    finally:
        st.teardown()
    assert sorted(str(s.drop_reason) for s in out) == ["None", "decode_error"]
    assert len(out) == 2 and sum(s.kept for s in out) == 1


def test_tdm_reservation_counts_when_meta_robots_is_not_honoured(srv: TestServer):
    srv.route("/a.png", Reply(body=_png(40, 30), content_type="image/png"))
    html = (
        b'<html><head><meta name="robots" content="noai">'
        b'<meta name="tdm-reservation" content="1"></head><body><img src="/a.png"></body></html>'
    )
    url = srv.route("/p.html", Reply(body=html, content_type="text/html"))
    page = Sample(key=make_key(url), url=url, page_url=url, mime="text/html")
    (out,) = process([page], respect_meta_robots=False)
    assert out.url == url and out.drop_reason == "optout_tdmrep"
    assert srv.hits["/a.png"] == 0
    # both honoured: meta robots is reported; neither honoured: the image is fetched
    (out,) = process([copy.deepcopy(page)])
    assert out.drop_reason == "optout_meta_robots"
    (img,) = process([copy.deepcopy(page)], respect_meta_robots=False, respect_tdmrep=False)
    assert img.kept and img.url == srv.url("/a.png")


@pytest.mark.parametrize(
    ("html", "text"),
    [
        (
            'Photo by <a href="//commons.wikimedia.org/wiki/User:PtrQs">PtrQs</a>.',
            "Photo by PtrQs.",
        ),
        (
            '<a href="/wiki/User:X">X</a> (<a href="/wiki/User_talk:X">talk</a>)',
            "X (talk)",
        ),
        ('<a href="/a">Ann</a>, <a href="/b">Bob</a>', "Ann, Bob"),
        ("<span>Jo</span><span>hn</span>", "John"),
        ("Line one<br>line two", "Line one line two"),
        ("<p>One</p><p>Two</p>", "One Two"),
    ],
)
def test_strip_html_reads_markup_as_a_browser_shows_it(html: str, text: str):
    assert strip_html(html) == text


def test_commons_credit_line_keeps_its_punctuation(real_fixtures: Path):
    info = json.loads((real_fixtures / "wikimedia_commons_imageinfo.json").read_text())
    item = info["imageinfo"][0]
    ext = item["extmetadata"]
    ext["Attribution"]["value"] += ", CC BY-SA 4.0"  # as Commons writes credit lines
    _, attribution = wikimedia_evidence(item)
    assert attribution["attribution"] == "Photo by PtrQs, CC BY-SA 4.0"
    assert attribution["author"] == "PtrQs"


def test_null_extmetadata_gives_no_evidence_instead_of_crashing(real_fixtures: Path):
    info = json.loads((real_fixtures / "wikimedia_commons_imageinfo.json").read_text())
    item = info["imageinfo"][0]
    item["extmetadata"] = None
    evidence, attribution = wikimedia_evidence(item)
    assert evidence == [] and attribution["author"] is None


def test_multilingual_extmetadata_values_take_english_then_the_first():
    ext = {
        "Artist": {"value": {"de": "<a>Anna</a>", "en": "<a>Ann</a>", "_type": "lang"}},
        "ImageDescription": {"value": {"fr": "Un arbre", "_type": "lang"}},
        "LicenseShortName": {"value": {"en": "CC BY 4.0", "_type": "lang"}},
    }
    evidence, attribution = wikimedia_evidence(ext)
    assert attribution["author"] == "Ann"
    assert attribution["title"] == "Un arbre"
    assert [e.value for e in evidence] == ["CC BY 4.0"]


def test_flickr_ids_are_ascii_integers_and_whole_floats():
    from ccurate.ingest.metadata import flickr_evidence

    assert flickr_evidence(4.0).value == "flickr:4"  # pandas' integer column with gaps
    assert flickr_evidence(" 10 ").value == "flickr:10"
    for bad in ("٤", "²", 4.5, float("nan"), "-1", "by-sa"):
        with pytest.raises(ValueError, match="Flickr licence id"):
            flickr_evidence(bad)


def test_backslashes_in_image_urls_resolve_as_a_browser_does():
    """WHATWG URLs: in http(s) URLs a backslash before the query is a slash (IIS-era pages
    write `..\\img\\a.jpg`); urljoin kept it as a character and resolved a path that the
    browser never requests. The query keeps its backslashes."""
    from ccurate.ingest.html import extract_images

    html = (
        '<html><body><img src="..\\img\\a.jpg" alt="a">'
        '<img src="https:\\\\cdn.test\\b.jpg?q=x\\y" alt="b"></body></html>'
    )
    urls = [s.url for s in extract_images(html, "https://h.test/dir/page.html").images]
    assert urls == ["https://h.test/img/a.jpg", "https://cdn.test/b.jpg?q=x\\y"]


def test_a_licence_link_element_in_the_body_is_recorded_once():
    """`<link rel=license>` in the head is page evidence; one in the body matched both the
    head-link pass and the marked-node pass and was recorded twice under two kinds. In the
    body it is a marked node: page-level when no container owns it, else the container's."""
    from ccurate.ingest.html import extract_images

    html = (
        "<html><head></head><body><link rel=license "
        'href="https://creativecommons.org/licenses/by/4.0/"><img src="/a.jpg" alt="x"></body>'
        "</html>"
    )
    (img,) = extract_images(html, "https://h.test/p").images
    lic = [(e.scope, e.kind) for e in img.license_evidence if "creativecommons" in e.value]
    assert lic == [("page", "rel_license")]
    owned = html.replace("<body><link", "<body><figure><link").replace(
        "</body>", "</figure></body>"
    )
    (img,) = extract_images(owned, "https://h.test/p").images
    lic = [(e.scope, e.kind) for e in img.license_evidence if "creativecommons" in e.value]
    assert lic == [("container", "rel_license")]
