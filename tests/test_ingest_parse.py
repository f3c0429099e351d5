"""HTML/WARC parsing and structured licence metadata (ingest.html, ingest.warc, ingest.metadata)."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
import zlib
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastwarc.warc import ArchiveIterator, WarcRecordType
from resiliparse.parse.encoding import bytes_to_str, detect_encoding

from ccurate.ingest.html import (
    MAX_TEXT,
    PageExtract,
    extract_images,
    parse_srcset,
)
from ccurate.ingest.metadata import flickr_evidence, wikimedia_evidence
from ccurate.ingest.warc import REASONS as WARC_REASONS
from ccurate.ingest.warc import iter_warc
from ccurate.record import LicenseEvidence, make_key

PAGE = "https://example.org/blog/post.html"
BY_SA_4 = "https://creativecommons.org/licenses/by-sa/4.0/"
BY_4 = "https://creativecommons.org/licenses/by/4.0/"


def ev(sample_or_page) -> list[tuple[str, str, str]]:
    items = (
        sample_or_page.page_license_evidence
        if isinstance(sample_or_page, PageExtract)
        else sample_or_page.license_evidence
    )
    return [(e.scope, e.kind, e.value) for e in items]


def one(html: str, url: str = PAGE, **kw):
    page = extract_images(html, url, **kw)
    assert page.error is None
    return page


def by_url(page: PageExtract) -> dict:
    return {s.url: s for s in page.images}


# --------------------------------------------------------------------------- real WARCs
class _StdlibImgs(HTMLParser):
    """An independent reading of <img> start tags to cross-check lexbor: count and alt texts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.n = 0
        self.alts: set[str] = set()

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.n += 1
            a = dict(attrs)
            if (a.get("src") or "").strip() and (a.get("alt") or "").strip():
                self.alts.add(" ".join((a.get("alt") or "").split()))


def test_wikipedia_page_licence_is_page_scope_not_image(real_fixtures: Path):
    st: Counter[str] = Counter()
    path = real_fixtures / "cc-main-2024-22-wikipedia-escopete.warc.gz"
    samples = list(iter_warc(path, stats=st))
    assert st["html_pages"] == 1 and st["page_error"] == 0
    assert samples and all(s.kept for s in samples)
    page_url = "https://an.wikipedia.org/wiki/Escopete"
    for s in samples:
        assert s.page_url == page_url and s.source_url == page_url
        assert s.key == make_key(s.url, page_url)
        assert s.url.startswith(("https://", "http://"))
        scopes = {e.scope for e in s.license_evidence}
        assert scopes == {"page"}, (s.url, ev(s))  # CC BY-SA is the page's, not the image's
        assert ("page", "link_rel_license", f"{BY_SA_4}deed.an") in ev(s)
        assert ("page", "cc_link", BY_SA_4) in ev(s)
        assert s.extra["warc_file"] == "cc-main-2024-22-wikipedia-escopete.warc.gz"
    # README: 9 img[alt] (the attribute, empty ones included)
    assert sum(s.alt_text is not None for s in samples) == 9
    urls = by_url_list(samples)
    # srcset: the 2x candidate wins, protocol-relative URLs become https
    escudo = next(s for s in samples if "Escudo_de_Escopete" in s.url)
    assert escudo.url.startswith("https://upload.wikimedia.org/") and "/140px-" in escudo.url
    assert escudo.alt_text == "Escudo d'armas"  # entity decoded
    assert len(urls) == len(set(urls))
    assert all(s.title for s in samples)


def by_url_list(samples) -> list[str]:
    return [s.url for s in samples]


def test_cc_main_excerpt_finds_every_img_and_alt(real_fixtures: Path):
    path = real_fixtures / "cc-main-2020-34-excerpt.warc.gz"
    # an independent reading with the stdlib parser over the same pages, page by page
    ref: dict[str, _StdlibImgs] = {}
    with open(path, "rb") as fh:
        for rec in ArchiveIterator(fh, record_types=WarcRecordType.response, parse_http=True):
            body = rec.reader.read()
            p = _StdlibImgs()
            p.feed(bytes_to_str(body, detect_encoding(body, from_html_meta=True) or "utf-8"))
            ref[rec.headers.get("WARC-Target-URI") or ""] = p
    assert len(ref) == 16
    st: Counter[str] = Counter()
    samples = list(iter_warc(path, stats=st))
    assert st["responses"] == 16 and st["html_pages"] == 16 and st["page_error"] == 0
    # every <img> is a sample or counted as skipped (empty src, repeated on its page)
    assert st["images"] + st["img_skipped"] == sum(p.n for p in ref.values()) > 100
    assert st["images"] == len(samples)
    # the alt texts found are the stdlib's, page by page; one missing only where its image
    # URL repeats on the page (the first occurrence is kept, another alt is not merged in)
    for page_url, p in ref.items():
        found = {s.alt_text for s in samples if s.page_url == page_url and s.alt_text}
        assert found <= p.alts, page_url
        if found != p.alts:
            assert any(s.extra.get("repeats_in_page") for s in samples if s.page_url == page_url)
    assert sum(len(p.alts) for p in ref.values()) > 20
    alts = {s.alt_text for s in samples}
    assert "Стратегия пожарной безопасности" in alts  # windows-1251 page decoded
    assert "用心专注，服务专业" in alts  # gb2312 page decoded
    assert all(s.extra["warc_offset"] is not None for s in samples)


def test_clipped_response_is_recorded_not_raised(real_fixtures: Path):
    st: Counter[str] = Counter()
    out = list(iter_warc(real_fixtures / "clipped-response.warc.gz", stats=st))
    assert st["page_error"] == 1 and st["html_pages"] == 0
    assert len(out) == 1
    rec = out[0]
    assert not rec.kept and rec.drop_reason == "page_error" and rec.drop_reason in WARC_REASONS
    assert rec.mime == "text/html" and rec.url.startswith("http://www.houstonpress.com/")
    assert "truncated" in rec.extra["error"]


# --------------------------------------------------------------------------- synthetic WARCs
def _warc_record(
    uri: str, status: str, headers: dict[str, str], body: bytes, warc_extra: str = ""
) -> bytes:
    """One WARC response record; `uri=""` leaves WARC-Target-URI out, `warc_extra` adds
    WARC header lines (each ending in CRLF)."""
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    block = head.encode() + b"\r\n" + body
    warc = (
        "WARC/1.0\r\nWARC-Type: response\r\n"
        f"WARC-Record-ID: <urn:uuid:{random.Random(uri + warc_extra).getrandbits(64):032x}>\r\n"
        "WARC-Date: 2024-05-01T00:00:00Z\r\n"
        + (f"WARC-Target-URI: {uri}\r\n" if uri else "")
        + warc_extra
        + "Content-Type: application/http; msgtype=response\r\n"
        f"Content-Length: {len(block)}\r\n\r\n"
    )
    return warc.encode() + block + b"\r\n\r\n"


# (page, image) -> drop reason of the opt-out pages the WARC tests (and the WAT tests) build
OPTOUT_PAGE_REASONS: dict[tuple[str, str], str | None] = {
    ("ok", "a.jpg"): None,
    ("ok", "b.jpg"): None,
    ("robots", "a.jpg"): "optout_meta_robots",
    ("robots", "b.jpg"): "optout_meta_robots",
    ("tdm", "a.jpg"): "optout_tdmrep",
    ("tdm", "b.jpg"): "optout_tdmrep",
    ("xr", "a.jpg"): "optout_x_robots_tag",
    ("xr", "b.jpg"): "optout_x_robots_tag",
    ("xr-other", "a.jpg"): None,  # addressed to another bot
    ("xr-other", "b.jpg"): None,
    ("tdmh", "a.jpg"): "optout_tdmrep",
    ("tdmh", "b.jpg"): "optout_tdmrep",
}


def test_warc_optouts_status_types_and_plain_warc(tmp_path: Path):
    html = b'<html><head>%s</head><body><img src="/a.jpg" alt="A"><img src="/b.jpg"></body></html>'
    recs = [
        _warc_record("http://s.test/ok", "200 OK", {"Content-Type": "text/html"}, html % b""),
        _warc_record(
            "http://s.test/robots",
            "200 OK",
            {"Content-Type": "text/html; charset=utf-8"},
            html % b'<meta name="robots" content="index, NoAI">',
        ),
        _warc_record(
            "http://s.test/tdm",
            "200 OK",
            {"Content-Type": "text/html"},
            html % b'<meta name="tdm-reservation" content="1">',
        ),
        _warc_record(
            "http://s.test/xr",
            "200 OK",
            {"Content-Type": "text/html", "X-Robots-Tag": "noimageai"},
            html % b"",
        ),
        _warc_record(
            "http://s.test/xr-other",
            "200 OK",
            {"Content-Type": "text/html", "X-Robots-Tag": "otherbot: noai"},
            html % b"",
        ),
        _warc_record(
            "http://s.test/tdmh",
            "200 OK",
            {"Content-Type": "text/html", "tdm-reservation": "1"},
            html % b"",
        ),
        _warc_record("http://s.test/img.png", "200 OK", {"Content-Type": "image/png"}, b"\x89PNG"),
        _warc_record("http://s.test/moved", "301 Moved", {"Location": "/ok"}, b""),
    ]
    plain = tmp_path / "x.warc"
    plain.write_bytes(b"".join(recs))
    gz = tmp_path / "x.warc.gz"
    gz.write_bytes(b"".join(gzip.compress(r) for r in recs))
    for path in (plain, gz):
        st: Counter[str] = Counter()
        out = list(iter_warc(path, stats=st))
        assert st["non_html"] == 1 and st["non_2xx"] == 1 and st["optout_pages"] == 4
        reasons = {
            (str(s.page_url).rsplit("/", 1)[1], s.url.rsplit("/", 1)[1]): s.drop_reason for s in out
        }
        assert reasons == OPTOUT_PAGE_REASONS
        assert all(s.url.startswith("http://s.test/") for s in out)


def test_warc_raw_captures_with_http_codings(tmp_path: Path):
    html = b'<html><body><img src="/z.jpg" alt="zipped"></body></html>'
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (html[:20], html[20:])) + b"0\r\n\r\n"
    recs = [
        _warc_record(
            "http://r.test/gz",
            "200 OK",
            {"Content-Type": "text/html", "Content-Encoding": "gzip"},
            gzip.compress(html),
        ),
        _warc_record(
            "http://r.test/ch",
            "200 OK",
            {"Content-Type": "text/html", "Transfer-Encoding": "chunked"},
            chunked,
        ),
        _warc_record(
            "http://r.test/br",
            "200 OK",
            {"Content-Type": "text/html", "Content-Encoding": "br"},
            b"\x0b\x02\x80",
        ),
        _warc_record(
            "http://r.test/badgz",
            "200 OK",
            {"Content-Type": "text/html", "Content-Encoding": "gzip"},
            b"not gzip",
        ),
    ]
    path = tmp_path / "raw.warc"
    path.write_bytes(b"".join(recs))
    out = {str(s.page_url).rsplit("/", 1)[1]: s for s in iter_warc(path)}
    assert out["gz"].url == "http://r.test/z.jpg" and out["gz"].alt_text == "zipped"
    assert out["ch"].url == "http://r.test/z.jpg" and out["ch"].alt_text == "zipped"
    for bad in ("br", "badgz"):
        assert out[bad].drop_reason == "page_error" and out[bad].url == f"http://r.test/{bad}"


def test_warc_garbage_tail_and_missing_file(tmp_path: Path):
    good = _warc_record(
        "http://s.test/p", "200 OK", {"Content-Type": "text/html"}, b'<img src="x.jpg">'
    )
    path = tmp_path / "bad.warc.gz"
    path.write_bytes(gzip.compress(good) + random.Random(1).randbytes(5000))
    out = list(iter_warc(path))  # must not raise
    assert [s.url for s in out if s.kept] == ["http://s.test/x.jpg"]
    with pytest.raises(ValueError, match=r"nope\.warc"):
        list(iter_warc(tmp_path / "nope.warc"))


# --------------------------------------------------------------------------- evidence placement
def test_figure_rel_license_is_container_and_comes_first():
    html = """<html><head><title>Blog</title>
    <link rel="license" href="/site-license"></head><body>
    <figure><img src="a.jpg" alt="A cat" title="Cat on a mat">
      <figcaption>Photo by Jane Doe,
        <a rel="license" href="https://creativecommons.org/licenses/by/4.0/">CC BY 4.0</a>
      </figcaption>
    </figure>
    <p><img src="b.jpg" alt="other"></p>
    <footer><a href="https://creativecommons.org/licenses/by-nc/4.0/">site CC BY-NC</a></footer>
    </body></html>"""
    page = one(html)
    imgs = by_url(page)
    a = imgs["https://example.org/blog/a.jpg"]
    b = imgs["https://example.org/blog/b.jpg"]
    assert ev(a)[0] == ("container", "rel_license", "https://creativecommons.org/licenses/by/4.0/")
    # the caption of a container with a licence link, as written (the link's URL after its
    # text): words beside the licence ("not for commercial use") reach the licence reader
    assert ev(a)[1] == (
        "container",
        "text",
        "Photo by Jane Doe, https://creativecommons.org/licenses/by/4.0/ CC BY 4.0",
    )
    assert ev(a)[2:] == ev(page)
    assert a.author == "Jane Doe" and a.title == "Cat on a mat" and a.alt_text == "A cat"
    assert ev(page) == [
        ("page", "link_rel_license", "https://example.org/site-license"),
        ("page", "cc_link", "https://creativecommons.org/licenses/by-nc/4.0/"),
        ("page", "text", "site CC BY-NC"),  # the footer's words: what its licence covers
    ]
    # the figure's licence is not the other image's, nor the page's
    assert ev(b) == ev(page)
    assert b.author is None and b.title == "Blog"


def test_ccrel_about_the_image_is_image_scope_with_attribution():
    """`about` naming the image: image scope with its attribution. A one-image `xmlns:cc`
    div *without* `about` (2.jpg) was once read as that image's container; in RDFa such a
    block sets no subject, so its `cc:license` and `dct:title` are about the inherited
    subject, the document: page evidence, and the title is not the image's (a page licence
    at image level would pass an image-level-only policy). The block is the image's
    container when its `typeof` makes a new subject typed as an image (3.jpg)."""
    html = """<body><div xmlns:cc="http://creativecommons.org/ns#" about="https://cdn.example.org/p/1.jpg">
      <img src="https://cdn.example.org/p/1.jpg">
      <a rel="cc:attributionURL" property="cc:attributionName"
         href="https://example.org/~ann">Ann Author</a>
      <a rel="license" href="http://creativecommons.org/licenses/by-sa/3.0/">CC BY-SA</a>
    </div>
    <div xmlns:cc="http://creativecommons.org/ns#"><img src="2.jpg">
      <span property="cc:license" resource="http://creativecommons.org/licenses/by/2.0/"></span>
      <span property="dct:title">Sunset</span></div>
    <div xmlns:cc="http://creativecommons.org/ns#" typeof="dcmitype:StillImage"><img src="3.jpg">
      <span property="cc:license" resource="http://creativecommons.org/licenses/by/3.0/"></span>
      <span property="dct:title">Dawn</span></div></body>"""
    imgs = by_url(one(html))
    page_ev = [("page", "ccrel", "http://creativecommons.org/licenses/by/2.0/")]
    first = imgs["https://cdn.example.org/p/1.jpg"]
    assert ev(first) == [
        ("image", "ccrel", "http://creativecommons.org/licenses/by-sa/3.0/"),
        *page_ev,
    ]
    assert first.author == "Ann Author"
    assert first.extra["attribution_url"] == "https://example.org/~ann"
    second = imgs["https://example.org/blog/2.jpg"]
    assert ev(second) == page_ev
    assert second.title is None  # the document's dct:title; the page has no <title>
    third = imgs["https://example.org/blog/3.jpg"]
    assert ev(third) == [
        ("container", "ccrel", "http://creativecommons.org/licenses/by/3.0/"),
        *page_ev,
    ]
    assert third.title == "Dawn"


def test_ccrel_attributes_on_the_img_element():
    html = (
        '<img src="x.jpg" xmlns:cc="http://creativecommons.org/ns#" rel="license" '
        'resource="https://creativecommons.org/licenses/by/4.0/">'
    )
    (s,) = one(html).images
    assert ev(s) == [("image", "ccrel", "https://creativecommons.org/licenses/by/4.0/")]


def test_page_level_forms_and_public_domain_tools():
    html = """<html><head><link rel="License" href="https://creativecommons.org/publicdomain/zero/1.0/">
    <meta name="author" content="Site Owner"></head>
    <body><div itemscope itemtype="https://schema.org/WebPage">
      <img src="x.jpg">
      <p>Text under <a rel="license nofollow" href="https://creativecommons.org/licenses/by/4.0/deed.de">BY</a>.</p>
    </div>
    <div id="foot">Old photos: <a href="https://creativecommons.org/publicdomain/mark/1.0/">PDM</a>
    <a href="https://example.org/creativecommons-info">not a licence</a></div></body></html>"""
    page = one(html)
    assert ev(page) == [
        ("page", "link_rel_license", "https://creativecommons.org/publicdomain/zero/1.0/"),
        ("page", "rel_license", "https://creativecommons.org/licenses/by/4.0/deed.de"),
        ("page", "cc_link", "https://creativecommons.org/publicdomain/mark/1.0/"),
    ]
    (s,) = page.images
    assert ev(s) == ev(page)  # a page-wide itemscope is no image container
    assert s.author is None and s.extra["page_author"] == "Site Owner"


def test_rights_text_near_image_and_in_footer():
    html = """<body>
    <div class="wp-caption"><img src="a.jpg">
      <p class="wp-caption-text">© 2021 Max Muster. Credit: Max Muster</p></div>
    <img src="b.jpg" alt="Skyline (c) 2019 Foo">
    <footer><p>Copyright 2024 ACME Inc. All rights reserved.</p>
      <a href="/privacy">Copyright policy</a></footer>
    </body>"""
    page = one(html)
    imgs = by_url(page)
    a = imgs["https://example.org/blog/a.jpg"]
    b = imgs["https://example.org/blog/b.jpg"]
    assert ev(a)[0][:2] == ("container", "text") and "© 2021 Max Muster" in ev(a)[0][2]
    assert a.author == "Max Muster"
    assert ev(b)[0][:2] == ("image", "text") and "(c) 2019 Foo" in ev(b)[0][2]
    (pg,) = ev(page)
    assert pg[:2] == ("page", "text") and "All rights reserved" in pg[2]


def test_no_evidence_at_all():
    page = one("<html><head><title>T</title></head><body><p>Hi</p><img src=x.jpg></body></html>")
    (s,) = page.images
    assert s.license_evidence == [] and page.page_license_evidence == []
    assert s.title == "T" and s.author is None and s.alt_text is None


def test_schema_org_imageobject_licence():
    html = """<body><div itemscope itemtype="https://schema.org/ImageObject">
      <img itemprop="contentUrl" src="p.jpg"><link itemprop="license" href="https://creativecommons.org/licenses/by/4.0/">
      <span itemprop="creator">Pat</span></div></body>"""
    (s,) = one(html).images
    assert ev(s) == [
        ("container", "schema_license", "https://creativecommons.org/licenses/by/4.0/")
    ]
    assert s.author == "Pat"


def test_nested_figures_do_not_lend_their_licence():
    html = """<body><figure class="gallery">
      <figure><img src="1.jpg"><a rel="license" href="https://creativecommons.org/licenses/by/4.0/">by</a></figure>
      <figure><img src="2.jpg"></figure>
      <a rel="license" href="https://creativecommons.org/licenses/by-sa/4.0/">gallery</a></figure></body>"""
    imgs = by_url(one(html))
    assert ev(imgs["https://example.org/blog/1.jpg"]) == [
        ("container", "rel_license", "https://creativecommons.org/licenses/by/4.0/"),
        ("container", "rel_license", "https://creativecommons.org/licenses/by-sa/4.0/"),
    ]
    assert ev(imgs["https://example.org/blog/2.jpg"]) == [
        ("container", "rel_license", "https://creativecommons.org/licenses/by-sa/4.0/"),
    ]


# --------------------------------------------------------------------------- image URLs
def test_srcset_lazy_load_base_and_skips():
    html = """<html><head><base href="https://static.example.net/assets/"></head><body>
    <img src="small.jpg"
      srcset="small.jpg 320w, https://img.example.net/c_fill,w_1200/big.jpg 1200w, mid.jpg 800w">
    <img src="data:image/gif;base64,R0lGOD" data-src="lazy1.jpg">
    <img src="blank.gif" data-srcset="l2-1x.jpg 1x, l2-2x.jpg 2x">
    <img data-lazy-src="lazy3.jpg"><img data-original="//cdn.example.net/lazy4.jpg#frag">
    <picture><source srcset="pic.webp 2x, pic-small.webp 1x" type="image/webp"><img></picture>
    <img src="data:image/png;base64,AAAA"><img src=""><img>
    <img src="javascript:alert(1)"><img src="mid.jpg"><img src="small.jpg">
    </body></html>"""
    page = one(html, "https://example.org/a/b.html")
    assert [s.url for s in page.images] == [
        "https://img.example.net/c_fill,w_1200/big.jpg",
        "https://static.example.net/assets/lazy1.jpg",
        "https://static.example.net/assets/l2-2x.jpg",
        "https://static.example.net/assets/lazy3.jpg",
        "https://cdn.example.net/lazy4.jpg",
        "https://static.example.net/assets/pic.webp",
        "https://static.example.net/assets/mid.jpg",
        "https://static.example.net/assets/small.jpg",
    ]
    assert page.skipped == Counter({"data_uri": 1, "empty_src": 2, "bad_url": 1})
    assert page.n_img == len(page.images) + sum(page.skipped.values())
    assert all(s.page_url == "https://example.org/a/b.html" for s in page.images)


def test_duplicate_image_in_page_keeps_first():
    page = one('<img src="x.jpg" alt="first"><img src="./x.jpg" alt="second"><img src="x.jpg#y">')
    (s,) = page.images
    assert s.alt_text == "first" and page.skipped["duplicate_in_page"] == 2
    assert s.extra["repeats_in_page"] == 2


def test_parse_srcset_tokeniser():
    # per the HTML spec a comma inside a URL does not split it (CDN transforms)
    assert parse_srcset("a.jpg, b.jpg 2x,c,d.jpg 100w") == [
        ("a.jpg", 1.0, "x"),
        ("b.jpg", 2.0, "x"),
        ("c,d.jpg", 100.0, "w"),
    ]
    assert parse_srcset("u(1,2).jpg 10w, v.jpg 20w") == [
        ("u(1,2).jpg", 10.0, "w"),
        ("v.jpg", 20.0, "w"),
    ]
    assert parse_srcset("  ") == [] and parse_srcset(None) == []
    assert parse_srcset("x.jpg bogus, y.jpg 3q") == [("x.jpg", 1.0, "x"), ("y.jpg", 1.0, "x")]


# --------------------------------------------------------------------------- robustness
@pytest.mark.parametrize(
    "html",
    [
        random.Random(7).randbytes(20000),
        b"",
        "<html><body><div><img src='a.jpg' alt='x'><p><figure><img src=b.jpg <a href=",
        "<img src=a.jpg alt='" + "x" * 1_000_000 + "'>",
        "<img src='" + "a" * 100_000 + ".jpg'>",
        b'<meta charset="utf-8"><img src="\xff\xfe.jpg" alt="caf\xe9 \xc3(">',
        "<img src=a.jpg alt='\udcff lone surrogate'>",
        "<" * 5000 + "img src=x.jpg>",
        b"\x00\x00<img\x00 src=a.jpg>",
    ],
)
def test_malformed_html_never_raises(html):
    page = extract_images(html, PAGE)
    assert isinstance(page, PageExtract)
    for s in page.images:
        assert s.url.startswith("http") and len(s.url) <= 8192
        assert s.alt_text is None or len(s.alt_text) <= MAX_TEXT


def test_bad_page_url_and_encoding_labels():
    page = extract_images(
        b"<img src=a.jpg><img src='https://x.test/b.jpg'>", "not a url", encoding="bogus-charset"
    )
    assert page.error is None and [s.url for s in page.images] == ["https://x.test/b.jpg"]
    latin = "<img src=a.jpg alt='Café'>".encode("latin-1")
    (s,) = extract_images(latin, PAGE, encoding="ISO-8859-1").images
    assert s.alt_text == "Café"


# --------------------------------------------------------------------------- opt-outs
@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ('<meta name="robots" content="noai">', "optout_meta_robots"),
        ('<meta name="ROBOTS" content="index,follow,noimageai">', "optout_meta_robots"),
        ('<meta name="ccurate" content="NoAI">', "optout_meta_robots"),
        ('<meta name="otherbot" content="noai">', None),
        ('<meta name="robots" content="noindex, nofollow">', None),
        ('<meta name="tdm-reservation" content="1">', "optout_tdmrep"),
        ('<meta name="tdm-reservation" content="0">', None),
        (
            '<meta name="tdm-reservation" content="1"><meta name="robots" content="noai">',
            "optout_meta_robots",
        ),
    ],
)
def test_meta_optouts(meta, expected):
    page = one(f"<html><head>{meta}</head><body><img src=a.jpg></body></html>")
    assert page.optout == expected
    assert all(s.kept for s in page.images)  # extract leaves the decision to the caller
    samples = page.samples()
    assert [s.drop_reason for s in samples] == [expected]
    assert all(s.kept == (expected is None) for s in samples)


def test_user_agent_token_is_configurable():
    html = '<meta name="mybot" content="noai"><img src=a.jpg>'
    assert one(html).optout is None
    assert one(html, user_agent_token="MyBot").optout == "optout_meta_robots"


# --------------------------------------------------------------------------- metadata
def test_wikimedia_extmetadata(real_fixtures: Path):
    info = json.loads((real_fixtures / "wikimedia_commons_imageinfo.json").read_text())
    ext = info["imageinfo"][0]["extmetadata"]
    evidence, attribution = wikimedia_evidence(ext)
    assert evidence == [
        LicenseEvidence("metadata", "wikimedia", "https://creativecommons.org/licenses/by-sa/4.0"),
        LicenseEvidence("metadata", "wikimedia", "cc-by-sa-4.0"),
    ]
    assert attribution["author"] == "PtrQs"  # HTML link stripped
    assert attribution["attribution"] == "Photo by PtrQs"
    assert attribution["attribution_required"] is True
    assert attribution["credit"] == "Own work"
    assert attribution["title"] == "20120925 PlozevetBretagne LoneTree DSC07971 PtrQs"
    assert attribution["license_name"] == "CC BY-SA 4.0"


def test_wikimedia_fallbacks_and_flat_values():
    evidence, attribution = wikimedia_evidence(
        {"LicenseShortName": "Public domain", "Artist": "A &amp; B", "NonFree": "true"}
    )
    assert [e.value for e in evidence] == ["Public domain", "NonFree"]
    assert attribution["author"] == "A & B" and attribution["attribution_required"] is None
    assert wikimedia_evidence({}) == ([], wikimedia_evidence({})[1])
    with pytest.raises(ValueError):
        wikimedia_evidence(["not", "a", "dict"])  # type: ignore[arg-type]


def test_flickr_evidence():
    assert flickr_evidence(4) == LicenseEvidence("metadata", "flickr", "flickr:4")
    assert flickr_evidence(" 10 ").value == "flickr:10"
    assert flickr_evidence("0").value == "flickr:0"
    for bad in ("CC BY 2.0", "-1", "", True, 4.5):
        with pytest.raises(ValueError):
            flickr_evidence(bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- bench
def test_html_parser_bench_runs(real_fixtures: Path):
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [
            sys.executable,
            str(repo / "bench" / "html_parsers.py"),
            "--rounds",
            "1",
            "--fixtures",
            str(real_fixtures),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    last = out.strip().splitlines()[-1]
    assert last.startswith("RESULT html_parsers ")
    kv = dict(item.split("=", 1) for item in last.split()[2:])
    assert kv["lexbor_imgs"] == kv["stdlib_imgs"]  # both parsers see the same <img> elements
    assert float(kv["lexbor_vs_stdlib"]) > 0


# --------------------------------------------------------------------------- edge cases
def test_about_names_its_image_or_the_page():
    """RDFa `about` makes a block a container only when it names an image inside it;
    `about="/node/1"` (Drupal) and `about=""` (the document itself) stay page-level."""
    html = f"""<body>
    <div about="/img/p.jpg"><img src="/img/p.jpg"><a rel="license" href="{BY_4}">BY</a></div>
    <div about="/node/1"><img src="/img/q.jpg">
      <a rel="license" href="https://creativecommons.org/licenses/by-nc/4.0/">NC</a></div>
    <div about=""><img src="/img/r.jpg"><a rel="license" href="{BY_SA_4}">SA</a></div>
    </body>"""
    page = one(html)
    imgs = by_url(page)
    page_ev = [
        ("page", "rel_license", "https://creativecommons.org/licenses/by-nc/4.0/"),
        ("page", "rel_license", BY_SA_4),
    ]
    assert ev(page) == page_ev
    assert ev(imgs["https://example.org/img/p.jpg"]) == [("image", "ccrel", BY_4), *page_ev]
    assert ev(imgs["https://example.org/img/q.jpg"]) == page_ev
    assert ev(imgs["https://example.org/img/r.jpg"]) == page_ev


def test_meta_licence_rights_and_img_itemprop():
    html = f"""<html><head><meta name="DCTERMS.license" content="/licence">
    <meta name="dc.rights" content="  (c) 2020   Jane Roe "></head>
    <body><img src="a.jpg" itemprop="license" content="{BY_4}"></body></html>"""
    page = one(html)
    assert ev(page) == [
        ("page", "meta_license", "https://example.org/licence"),
        ("page", "text", "(c) 2020 Jane Roe"),
    ]
    (s,) = page.images
    assert ev(s) == [("image", "schema_license", BY_4), *ev(page)]


def test_body_with_a_footer_class_is_not_the_footer():
    """`<body class="has-footer">` matches the footer selector but is the whole page: its
    text is not read as one footer; the end of the body is read instead."""
    filler = " ".join(["Lorem ipsum dolor sit amet."] * 80)
    html = f"""<body class="has-footer"><p>© 1999 Early Notice</p><img src=a.jpg>
    <p>{filler}</p><p>Site © 2024 ACME</p></body>"""
    page = one(html)
    (pg,) = ev(page)
    assert pg[:2] == ("page", "text") and "© 2024 ACME" in pg[2]
    assert "Early Notice" not in pg[2]  # only the last 1500 characters of the body


def test_srcset_descriptors_with_parentheses_and_bad_sizes():
    # a comma inside a parenthesised descriptor does not end the candidate
    assert parse_srcset("a.jpg (foo, bar) 2x, b.jpg 1x") == [
        ("a.jpg", 2.0, "x"),
        ("b.jpg", 1.0, "x"),
    ]
    assert parse_srcset("a.jpg ((x,y) 3x), b.jpg 1x")[1] == ("b.jpg", 1.0, "x")
    # NaN, infinite and negative sizes are invalid descriptors: ignored like 'bigw'
    assert parse_srcset("n.jpg nanw, i.jpg infw, m.jpg -5w, g.jpg bigw, o.jpg 1e400w") == [
        (u, 1.0, "x") for u in ("n.jpg", "i.jpg", "m.jpg", "g.jpg", "o.jpg")
    ]
    (s,) = one('<img srcset="n.jpg nanw, s.jpg 800w, l.jpg 1600w, i.jpg infw">').images
    assert s.url == "https://example.org/blog/l.jpg"  # the largest valid width


def test_unusable_urls_are_counted_not_kept():
    html = """<img srcset="data:image/png;base64,AAAA 1x, data:image/gif;base64,R0 2x">
    <img src="http://[::1/broken.jpg"><img data-src="http://[bad"><img src="ok.jpg">
    <a rel="license" href="http://[creativecommons.org/licenses/by/4.0/">x</a>
    <a href="https://[creativecommons.org/licenses/by/4.0/">y</a>"""
    page = one(html)
    assert [s.url for s in page.images] == ["https://example.org/blog/ok.jpg"]
    assert page.skipped == Counter({"data_uri": 1, "bad_url": 2})
    # a malformed licence link is kept raw (faithful) but never read as a CC licence
    assert ev(page) == [("page", "rel_license", "http://[creativecommons.org/licenses/by/4.0/")]
    from ccurate.filters.licenses import normalize

    assert normalize("http://[creativecommons.org/licenses/by/4.0/") is None


_CAFE = "<img src='a.jpg' alt='Café Ω'>"


@pytest.mark.parametrize(
    ("body", "charset"),
    [
        (("\ufeff<meta charset='utf-8'>" + _CAFE).encode("utf-16-le"), None),  # BOM wins
        (("\ufeff" + _CAFE).encode("utf-16-be"), None),
        (_CAFE.encode("utf-16-le"), "utf-16le"),  # HTTP charset, no BOM
        # declared UTF-16 but the bytes read as ASCII (no NULs): UTF-8, as browsers do
        (("<meta charset='utf-16'>" + _CAFE).encode(), None),
        (
            (
                '<meta http-equiv="Content-Type" content="text/html; charset=UTF-16LE">' + _CAFE
            ).encode(),
            None,
        ),
        (_CAFE.encode(), "utf-16"),
    ],
)
def test_utf16_pages_and_false_utf16_declarations(body: bytes, charset: str | None):
    (s,) = one(body, encoding=charset).images
    assert (s.url, s.alt_text) == ("https://example.org/blog/a.jpg", "Café Ω")


def test_codec_python_lacks_falls_back_to_utf8(monkeypatch: pytest.MonkeyPatch):
    import ccurate.ingest.html as html_mod

    # WHATWG names such as x-user-defined have no Python codec
    monkeypatch.setattr(html_mod, "detect_encoding", lambda *a, **k: "x-user-defined")
    (s,) = one("<img src=a.jpg alt='Café'>".encode()).images
    assert s.alt_text == "Café"


def test_lone_surrogates_in_str_input_keep_the_image():
    (s,) = one("<img src='a.jpg' alt='caf\udcff au lait'>").images
    assert s.url == "https://example.org/blog/a.jpg"
    assert s.alt_text is not None and "\udcff" not in s.alt_text
    s.alt_text.encode("utf-8")  # storable


def test_extract_images_turns_any_failure_into_error(monkeypatch: pytest.MonkeyPatch):
    import ccurate.ingest.html as html_mod

    def boom(*a, **k):
        raise RuntimeError("parser exploded")

    monkeypatch.setattr(html_mod, "_Page", boom)
    page = extract_images("<img src=a.jpg>", PAGE)
    assert page.images == [] and page.error == "RuntimeError: parser exploded"


def _one_record_warc(tmp_path: Path, name: str, rec: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(rec)
    return path


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"no size line at all", "without a chunk-size line"),
        (b"40\r\n<img src=x.jpg>\r\n0\r\n\r\n", "ends inside a chunk"),
        (b"zz\r\n<img src=x.jpg>\r\n0\r\n\r\n", "bad chunk size"),
        # int() reads a sign: -6 stepped back onto its own size line, forever
        (b"-6\r\n<img src=x.jpg>\r\n0\r\n\r\n", "bad chunk size"),
        (b"-8\r\n<img src=x.jpg>\r\n0\r\n\r\n", "bad chunk size"),
        (b"+6\r\n<img>\r\n0\r\n\r\n", "bad chunk size"),
        (b"0x6\r\n<img>\r\n0\r\n\r\n", "bad chunk size"),
    ],
)
def test_warc_broken_chunked_bodies_are_page_errors(tmp_path: Path, body: bytes, why: str):
    rec = _warc_record(
        "http://c.test/p",
        "200 OK",
        {"Content-Type": "text/html", "Transfer-Encoding": "chunked"},
        body,
    )
    st: Counter[str] = Counter()
    (out,) = list(iter_warc(_one_record_warc(tmp_path, "c.warc", rec), stats=st))
    assert out.drop_reason == "page_error" and out.url == "http://c.test/p"
    assert why in out.extra["error"] and st["page_error"] == 1 and st["html_pages"] == 0


def test_warc_deflate_with_and_without_zlib_header(tmp_path: Path):
    html = b'<html><body><img src="/d.jpg" alt="deflated"></body></html>'
    raw = zlib.compressobj(wbits=-15)
    raw_body = raw.compress(html) + raw.flush()
    recs = [
        _warc_record(
            f"http://d.test/{name}",
            "200 OK",
            {"Content-Type": "text/html", "Content-Encoding": "deflate"},
            body,
        )
        for name, body in (("zlib", zlib.compress(html)), ("raw", raw_body), ("bad", b"\x00junk"))
    ]
    path = tmp_path / "d.warc"
    path.write_bytes(b"".join(recs))
    out = {str(s.page_url).rsplit("/", 1)[1]: s for s in iter_warc(path)}
    for name in ("zlib", "raw"):
        assert out[name].kept and out[name].url == "http://d.test/d.jpg"
        assert out[name].alt_text == "deflated"
    assert out["bad"].drop_reason == "page_error"


def test_warc_compressed_bomb_is_cut_at_max_page_bytes(tmp_path: Path):
    """64 MiB of markup in a ~64 KiB gzip body: decoded up to the cap only, the image
    before the cap is found, the one after it is not (no out-of-memory, no error)."""
    html = b'<img src="/first.jpg">' + b" " * (64 << 20) + b'<img src="/last.jpg">'
    body = gzip.compress(html, compresslevel=1)
    assert len(body) < (1 << 20)
    rec = _warc_record(
        "http://b.test/p", "200 OK", {"Content-Type": "text/html", "Content-Encoding": "gzip"}, body
    )
    st: Counter[str] = Counter()
    out = list(
        iter_warc(_one_record_warc(tmp_path, "b.warc", rec), stats=st, max_page_bytes=1 << 20)
    )
    assert [s.url for s in out] == ["http://b.test/first.jpg"] and out[0].kept
    assert st["html_pages"] == 1 and st["page_error"] == 0


def test_warc_record_without_target_uri_and_truncated_flag(tmp_path: Path):
    html = b'<img src="https://x.test/abs.jpg"><img src="rel.jpg">'
    recs = [
        _warc_record("", "200 OK", {"Content-Type": "text/html"}, html),
        _warc_record(
            "http://t.test/p",
            "200 OK",
            {"Content-Type": "text/html"},
            b'<img src="/t.jpg">',
            warc_extra="WARC-Truncated: length\r\n",
        ),
    ]
    path = tmp_path / "n.warc"
    path.write_bytes(b"".join(recs))
    st: Counter[str] = Counter()
    out = list(iter_warc(path, stats=st))
    assert [s.url for s in out] == ["https://x.test/abs.jpg", "http://t.test/t.jpg"]
    # no target URI: the page is named by the file and the record's offset
    assert out[0].page_url == f"{path.resolve().as_uri()}#offset=0"
    assert st["img_skipped"] == 1  # rel.jpg resolves against file:// -> not http(s)
    # WARC-Truncated: still parsed, and counted
    assert st["payload_truncated"] == 1 and st["html_pages"] == 2 and out[1].kept


def test_warc_parser_error_becomes_a_page_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import ccurate.ingest.warc as warc_mod

    monkeypatch.setattr(
        warc_mod, "extract_images", lambda *a, **k: PageExtract(images=[], error="Boom: x")
    )
    rec = _warc_record("http://e.test/p", "200 OK", {"Content-Type": "text/html"}, b"<img src=a>")
    st: Counter[str] = Counter()
    (out,) = list(iter_warc(_one_record_warc(tmp_path, "e.warc", rec), stats=st))
    assert out.drop_reason == "page_error" and out.extra["error"] == "Boom: x"
    assert out.key == make_key("http://e.test/p") and st["page_error"] == 1
