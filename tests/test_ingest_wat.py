"""WAT ingestion: Common Crawl metadata records -> the same samples as the WARC path."""

from __future__ import annotations

import gzip
import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ccurate.ingest.sources import WarcSource, check_source, iter_source
from ccurate.ingest.warc import STATS, iter_warc
from ccurate.ingest.wat import extract_wat_images
from ccurate.record import make_key
from tests.test_ingest_parse import OPTOUT_PAGE_REASONS

DATA = Path(__file__).parent / "data" / "wat"


# --------------------------------------------------------------------------- builders
def _record(rtype: str, uri: str, ctype: str, block: bytes, refers: str = "") -> bytes:
    """One WARC/1.0 record with CRLF framing, as warcio and Common Crawl write it."""
    head = (
        f"WARC/1.0\r\nWARC-Type: {rtype}\r\n"
        + (f"WARC-Target-URI: {uri}\r\n" if uri else "")
        + "WARC-Date: 2024-05-18T01:58:10Z\r\n"
        f"WARC-Record-ID: <urn:uuid:{uuid.uuid4()}>\r\n"
        + (f"WARC-Refers-To: {refers}\r\n" if refers else "")
        + f"Content-Type: {ctype}\r\nContent-Length: {len(block)}\r\n\r\n"
    )
    return head.encode() + block + b"\r\n\r\n"


def wat_record(doc: dict[str, Any] | bytes, uri: str = "") -> bytes:
    block = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return _record("metadata", uri, "application/json", block)


def warcinfo() -> bytes:
    return _record("warcinfo", "", "application/warc-fields", b"software: test\r\n")


def response_doc(
    uri: str,
    links: list[dict[str, str]] | None = None,
    *,
    head: dict[str, Any] | None = None,
    status: str | None = "200",
    headers: dict[str, Any] | None = None,
    http: bool = True,
) -> dict[str, Any]:
    """A WAT JSON for one response, in Common Crawl's layout (see ingest/wat.py)."""
    hrm: dict[str, Any] = {
        "Headers": {"Content-Type": "text/html; charset=UTF-8", **(headers or {})},
        "HTML-Metadata": {"Head": head or {}, "Links": links or []},
    }
    if status is not None:
        hrm["Response-Message"] = {"Status": status, "Reason": "X", "Version": "HTTP/1.1"}
    payload: dict[str, Any] = {"Actual-Content-Type": "application/http; msgtype=response"}
    if http:
        payload["HTTP-Response-Metadata"] = hrm
    return {
        "Container": {"Filename": "CC-MAIN-x.warc.gz", "Offset": "1234", "Compressed": True},
        "Envelope": {
            "Format": "WARC",
            "WARC-Header-Metadata": {"WARC-Type": "response", "WARC-Target-URI": uri},
            "Payload-Metadata": payload,
        },
    }


def request_doc(uri: str) -> dict[str, Any]:
    return {
        "Container": {"Filename": "CC-MAIN-x.warc.gz", "Offset": "0"},
        "Envelope": {
            "WARC-Header-Metadata": {"WARC-Type": "request", "WARC-Target-URI": uri},
            "Payload-Metadata": {
                "Actual-Content-Type": "application/http; msgtype=request",
                "HTTP-Request-Metadata": {"Request-Message": {"Method": "GET", "Path": "/"}},
            },
        },
    }


def write_gz(path: Path, records: list[bytes]) -> Path:
    path.write_bytes(b"".join(gzip.compress(r) for r in records))  # one gzip member a record
    return path


def ev(sample: Any) -> list[tuple[str, str, str]]:
    return [(e.scope, e.kind, e.value) for e in sample.license_evidence]


IMG = "IMG@/src"


# --------------------------------------------------------------------------- real record
def test_real_common_crawl_wat_record(tmp_path: Path):
    doc = (DATA / "cc-main-2016-07-01marocain.wat.json").read_bytes()
    uri = "http://01marocain.online.fr/"
    path = write_gz(
        tmp_path / "CC-MAIN-x.warc.wat.gz",
        [warcinfo(), wat_record(request_doc(uri), uri), wat_record(doc, uri)],
    )
    st: Counter[str] = Counter()
    out = list(iter_warc(path, stats=st))
    assert len(out) == 1
    s = out[0]
    assert s.kept and s.url == "http://01marocain.online.fr/themes/02/logo.gif"
    assert s.page_url == uri and s.key == make_key(s.url, uri)
    assert s.alt_text == ""  # alt="" (decorative) stays '' not None, as in the HTML path
    assert s.title == "01marocain" and s.license_evidence == []
    assert s.extra["warc_file"] == path.name and isinstance(s.extra["warc_offset"], int)
    assert s.extra["source_warc_offset"] == 846
    assert s.extra["source_warc_file"].startswith("CC-MAIN-20160205193905-00000")
    assert st["wat_records"] == 2 and st["wat_other"] == 1 and st["responses"] == 1
    assert st["html_pages"] == 1 and st["images"] == 1
    assert st["payload_truncated"] == 1  # WARC-Truncated: length in the envelope
    assert set(st) <= set(STATS)


# --------------------------------------------------------------------------- extraction
def test_images_alt_base_and_page_scope_evidence():
    html = {
        "Head": {
            "Title": "  A   page ",
            "Base": "http://cdn.test/img/",
            "Link": [
                {"path": "LINK@/href", "rel": "stylesheet", "url": "/s.css"},
                {"path": "LINK@/href", "rel": "License", "url": "/lic"},
            ],
            "Metas": [
                {"name": "author", "content": "Page Author"},
                {
                    "name": "dcterms.license",
                    "content": "https://creativecommons.org/licenses/by/4.0/",
                },
                {"http-equiv": "content-type", "content": "text/html"},
            ],
        },
        "Links": [
            {"path": IMG, "url": "a.jpg", "alt": "  a\n cat  ", "title": "T"},
            {"path": IMG, "url": "/b.png#frag"},
            {"path": IMG, "url": "a.jpg", "alt": "again"},
            {"path": IMG, "url": "data:image/png;base64,xx"},
            {"path": IMG, "url": "javascript:void(0)"},
            {"path": IMG, "url": ""},
            {"path": IMG, "url": "c.jpg", "alt": "© 2020 Jane Roe"},
            {"path": "A@/href", "url": "https://creativecommons.org/licenses/by-sa/4.0/"},
            {"path": "A@/href", "url": "/terms", "rel": "license"},
            {"path": "A@/href", "url": "https://creativecommons.org/about/"},
            {"path": "SCRIPT@/src", "url": "x.js"},
        ],
    }
    page = extract_wat_images(html, "http://site.test/p/1")
    assert page.error is None and page.title == "A page" and page.n_img == 7
    got = [(s.url, s.alt_text) for s in page.images]
    assert got == [
        ("http://cdn.test/img/a.jpg", "a cat"),
        ("http://cdn.test/b.png", None),
        ("http://cdn.test/img/c.jpg", "© 2020 Jane Roe"),
    ]
    assert page.skipped == Counter(duplicate_in_page=1, data_uri=1, bad_url=1, empty_src=1)
    a, b, c = page.images
    assert a.extra["repeats_in_page"] == 1 and a.extra["page_author"] == "Page Author"
    assert a.title == "T" and b.title == "A page"  # img title, else the page <title>
    assert a.key == make_key(a.url, "http://site.test/p/1") and a.source_url == a.page_url
    page_ev = [
        ("page", "meta_license", "https://creativecommons.org/licenses/by/4.0/"),
        ("page", "link_rel_license", "http://cdn.test/lic"),
        ("page", "cc_link", "https://creativecommons.org/licenses/by-sa/4.0/"),
        ("page", "rel_license", "http://cdn.test/terms"),
    ]
    assert ev(a) == ev(b) == page_ev  # no container in a WAT: all page scope
    assert ev(c) == [("image", "text", "© 2020 Jane Roe"), *page_ev]
    # each image its own list (the stage appends to it); the page's items are shared, not
    # copied per image (a hostile page with many images cost GBs)
    assert a.license_evidence is not b.license_evidence
    assert a.license_evidence[0] is b.license_evidence[0]


def test_malformed_html_metadata_is_an_error_not_a_raise():
    page = extract_wat_images({"Links": 5}, "http://x.test/")  # type: ignore[dict-item]
    assert page.error and page.images == []
    assert extract_wat_images({"Links": [7, None]}, "http://x.test/").images == []


# --------------------------------------------------------------------------- the file loop
def test_optouts_skips_and_errors_like_the_warc_path(tmp_path: Path):
    links = [{"path": IMG, "url": "/a.jpg", "alt": "A"}, {"path": IMG, "url": "/b.jpg"}]

    def doc(name: str, **kw: Any) -> bytes:
        uri = f"http://s.test/{name}"
        return wat_record(response_doc(uri, links, **kw), uri)

    recs = [
        warcinfo(),
        doc("ok"),
        doc("robots", head={"Metas": [{"name": "robots", "content": "index, NoAI"}]}),
        doc("tdm", head={"Metas": [{"name": "tdm-reservation", "content": "1"}]}),
        doc("xr", headers={"X-Robots-Tag": "noimageai"}),
        doc("xr-list", headers={"x-robots-tag": ["index", "ccurate: noai"]}),
        doc("xr-other", headers={"X-Robots-Tag": "otherbot: noai"}),
        doc("tdmh", headers={"tdm-reservation": "1"}),
        doc("img", headers={"Content-Type": "image/png"}),
        doc("moved", status="301"),
        doc("dns", http=False),
        doc("nostatus", status=None),
        wat_record(b'{"Envelope": {"WARC-Header-Metadata": ', "http://s.test/badjson"),
        wat_record(b"[1, 2]", "http://s.test/notobj"),
        wat_record(request_doc("http://s.test/ok"), "http://s.test/ok"),
        # a WARC's own metadata record (not JSON): ignored in auto mode
        _record("metadata", "http://s.test/ok", "application/warc-fields", b"fetchTimeMs: 5\r\n"),
    ]
    path = write_gz(tmp_path / "x.warc.wat.gz", recs)
    st: Counter[str] = Counter()
    out = list(iter_warc(path, stats=st))
    reasons = {
        (str(s.page_url).rsplit("/", 1)[1], s.url.rsplit("/", 1)[1]): s.drop_reason for s in out
    }
    assert reasons == {
        **OPTOUT_PAGE_REASONS,  # the same pages as the WARC path's test
        ("xr-list", "a.jpg"): "optout_x_robots_tag",
        ("xr-list", "b.jpg"): "optout_x_robots_tag",
        ("nostatus", "nostatus"): "page_error",
        ("badjson", "badjson"): "page_error",
        ("notobj", "notobj"): "page_error",
    }
    errors = [s for s in out if s.drop_reason == "page_error"]
    assert all(s.mime == "text/html" and s.key == make_key(s.url) for s in errors)
    assert all(s.extra["error"] for s in errors)
    assert st["non_html"] == 2 and st["non_2xx"] == 1 and st["optout_pages"] == 5
    assert st["page_error"] == 3 and st["wat_other"] == 1 and st["html_pages"] == 7
    assert st["images"] == 14 and st["wat_records"] == 14
    # the format option picks record types: "warc" reads no metadata record at all
    assert list(iter_warc(path, fmt="warc")) == []


def test_corrupt_tail_and_plain_uncompressed_wat(tmp_path: Path):
    uri = "http://t.test/p"
    good = wat_record(response_doc(uri, [{"path": IMG, "url": "x.jpg", "alt": "x"}]), uri)
    gz = tmp_path / "bad.warc.wat.gz"
    gz.write_bytes(gzip.compress(good) + b"\x1f\x8b\x08\x00garbage" * 300)
    out = list(iter_warc(gz))  # must not raise
    assert [s.url for s in out if s.kept] == ["http://t.test/x.jpg"]
    assert all(s.drop_reason == "page_error" for s in out if not s.kept)
    plain = tmp_path / "p.wat"
    plain.write_bytes(warcinfo() + good)
    assert [(s.url, s.alt_text) for s in iter_warc(plain, fmt="wat")] == [
        ("http://t.test/x.jpg", "x")
    ]


def test_wat_and_warc_of_the_same_page_agree(tmp_path: Path):
    uri = "http://same.test/dir/page.html"
    body = (
        b"<html><head><title>Same page</title>"
        b'<base href="http://img.same.test/base/">'
        b'<link rel="license" href="https://creativecommons.org/licenses/by/4.0/">'
        b'<meta name="description" content="d"></head><body>'
        b'<p><img src="one.jpg" alt=" first\n image "></p>'
        b'<img src="/two.png" alt="">'
        b'<img src="three.gif">'
        b'<img src="one.jpg" alt="dup">'
        b'<a href="https://creativecommons.org/licenses/by-sa/4.0/">CC BY-SA</a>'
        b"</body></html>"
    )
    http = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + body
    warc = _record("response", uri, "application/http; msgtype=response", http)
    # the WAT record webarchive-commons writes for that page (attributes as parsed)
    doc = response_doc(
        uri,
        [
            {"path": IMG, "url": "one.jpg", "alt": " first\n image "},
            {"path": IMG, "url": "/two.png", "alt": ""},
            {"path": IMG, "url": "three.gif"},
            {"path": IMG, "url": "one.jpg", "alt": "dup"},
            {"path": "A@/href", "url": "https://creativecommons.org/licenses/by-sa/4.0/"},
        ],
        head={
            "Title": "Same page",
            "Base": "http://img.same.test/base/",
            "Link": [
                {
                    "path": "LINK@/href",
                    "rel": "license",
                    "url": "https://creativecommons.org/licenses/by/4.0/",
                }
            ],
            "Metas": [{"name": "description", "content": "d"}],
        },
    )
    w = list(iter_warc(write_gz(tmp_path / "p.warc.gz", [warcinfo(), warc])))
    t = list(iter_warc(write_gz(tmp_path / "p.warc.wat.gz", [warcinfo(), wat_record(doc, uri)])))
    assert [(s.url, s.alt_text) for s in t] == [(s.url, s.alt_text) for s in w]
    assert [s.url for s in t] == [
        "http://img.same.test/base/one.jpg",
        "http://img.same.test/two.png",
        "http://img.same.test/base/three.gif",
    ]
    assert [s.alt_text for s in t] == ["first image", "", None]
    for a, b in zip(w, t, strict=True):
        assert (a.key, a.title, a.kept) == (b.key, b.title, b.kept)
        assert sorted(ev(a)) == sorted(ev(b))
    # a file holding both: auto reads both, each format only its own records
    both = write_gz(tmp_path / "both.warc.gz", [warc, wat_record(doc, uri)])
    assert len(list(iter_warc(both))) == 2 * len(w)
    assert [s.extra.get("source_warc_file") for s in iter_warc(both, fmt="wat")] == [
        "CC-MAIN-x.warc.gz"
    ] * len(w)
    assert all("source_warc_file" not in s.extra for s in iter_warc(both, fmt="warc"))


def test_warc_source_reads_wat_files_and_format_option(tmp_path: Path):
    uri = "http://src.test/p"
    doc = response_doc(uri, [{"path": IMG, "url": "i.jpg", "alt": "i"}])
    folder = tmp_path / "wats"
    folder.mkdir()
    write_gz(folder / "CC-MAIN-1.warc.wat.gz", [warcinfo(), wat_record(doc, uri)])
    (folder / "notes.txt").write_text("ignored")
    src = WarcSource(path=str(folder))
    check_source(src)
    assert src.format == "auto"
    st: Counter[str] = Counter()
    assert [s.url for s in iter_source(src, st)] == ["http://src.test/i.jpg"]
    assert st["wat_records"] == 1
    assert list(iter_source(WarcSource(path=str(folder), format="warc"))) == []
    one = list(iter_source(WarcSource(path=str(folder / "*.wat.gz"), format="wat")))
    assert [s.alt_text for s in one] == ["i"]
    with pytest.raises(ValueError):
        WarcSource(path=str(folder), format="wet")  # type: ignore[arg-type]


def test_page_without_evidence_or_head():
    page = extract_wat_images(
        {"Links": [{"path": IMG, "url": "http://e.test/i.jpg"}]}, "http://e.test/"
    )
    assert page.title is None and page.optout is None
    assert page.images[0].license_evidence == [] and page.images[0].title is None
