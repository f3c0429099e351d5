"""Review tests: WAT attribute decoding and odd text (ingest/wat.py); lookup errors
per image and clear manifest errors (ccurate/lookup.py)."""

from __future__ import annotations

import gzip
import io
import json
import re
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastwarc.warc import ArchiveIterator, WarcRecordType
from PIL import Image

from ccurate.demo.corpus import landscape
from ccurate.ingest.html import extract_images
from ccurate.ingest.warc import iter_warc
from ccurate.ingest.wat import extract_wat_images, unescape_attr
from ccurate.lookup import ReleaseLookupError, lookup
from ccurate.record import make_key
from ccurate.takedown import hash_image_bytes

REAL = Path("/work/shared/fixtures/real")
IMG = "IMG@/src"


# --------------------------------------------------------------------------- WAT builders
def _record(rtype: str, uri: str, ctype: str, block: bytes) -> bytes:
    head = (
        f"WARC/1.0\r\nWARC-Type: {rtype}\r\nWARC-Target-URI: {uri}\r\n"
        "WARC-Date: 2024-05-18T01:58:10Z\r\n"
        f"WARC-Record-ID: <urn:uuid:{uuid.uuid4()}>\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(block)}\r\n\r\n"
    )
    return head.encode() + block + b"\r\n\r\n"


def _doc(uri: str, links: list[dict[str, str]], head: dict[str, Any] | None = None) -> dict:
    return {
        "Container": {"Filename": "CC-MAIN-x.warc.gz", "Offset": "7"},
        "Envelope": {
            "WARC-Header-Metadata": {"WARC-Type": "response", "WARC-Target-URI": uri},
            "Payload-Metadata": {
                "HTTP-Response-Metadata": {
                    "Response-Message": {"Status": "200"},
                    "Headers": {"Content-Type": "text/html"},
                    "HTML-Metadata": {"Head": head or {}, "Links": links},
                }
            },
        },
    }


def _wat_file(path: Path, uri: str, block: bytes) -> Path:
    path.write_bytes(gzip.compress(_record("metadata", uri, "application/json", block)))
    return path


# --------------------------------------------------------------------------- entities
def test_unescape_attr_decodes_only_complete_references():
    assert unescape_attr("a.jpg?w=1&amp;h=2") == "a.jpg?w=1&h=2"
    assert unescape_attr("&quot;Keep&quot; &#39;calm&#x27; &lt;b&gt;") == "\"Keep\" 'calm' <b>"
    # legacy names without ';' stay raw: Common Crawl's writer has decoded values itself
    # since 2019, and a second decode turned '&reg_no=3' into '®_no=3'
    assert unescape_attr("?a=1&copy=2&notit;&ord=[t]") == "?a=1&copy=2&notit;&ord=[t]"
    assert unescape_attr("&copy 2020 &amp") == "&copy 2020 &amp"
    assert unescape_attr("no refs") == "no refs"


def test_wat_attribute_entities_decoded_like_the_html_path():
    """webarchive-commons copies attribute values raw (LAION's WAT-derived URLs hold
    `&amp;`): URL, key, alt, title, base, meta and page title must match the page's."""
    uri = "http://ent.test/p"
    body = (
        b"<html><head><title>Tom &amp; Jerry &eacute;t&eacute;</title>"
        b'<base href="http://cdn.ent.test/x/?v=1&amp;w=2">'
        b'<meta name="license" content="https://creativecommons.org/licenses/by/4.0/?a=1&amp;b=2">'
        b'<meta name="author" content="Ren&eacute;e">'
        b"</head><body>"
        b'<img src="a.jpg?w=1&amp;h=2&copy=3" alt="&quot;Keep calm&quot; &amp; go" '
        b'title="A &#38; B">'
        b'<img src="b.jpg" alt="&copy; 2020 Jane">'
        b"</body></html>"
    )
    html_page = extract_images(body, uri)
    wat_page = extract_wat_images(
        {
            "Head": {
                "Title": "Tom &amp; Jerry &eacute;t&eacute;",
                "Base": "http://cdn.ent.test/x/?v=1&amp;w=2",
                "Metas": [
                    {
                        "name": "license",
                        "content": "https://creativecommons.org/licenses/by/4.0/?a=1&amp;b=2",
                    },
                    {"name": "author", "content": "Ren&eacute;e"},
                ],
            },
            "Links": [
                {
                    "path": IMG,
                    "url": "a.jpg?w=1&amp;h=2&copy=3",
                    "alt": "&quot;Keep calm&quot; &amp; go",
                    "title": "A &#38; B",
                },
                {"path": IMG, "url": "b.jpg", "alt": "&copy; 2020 Jane"},
            ],
        },
        uri,
    )
    got = [(s.key, s.url, s.alt_text, s.title) for s in wat_page.images]
    assert got == [(s.key, s.url, s.alt_text, s.title) for s in html_page.images]
    assert got[0][1] == "http://cdn.ent.test/x/a.jpg?w=1&h=2&copy=3"
    assert got[0][2] == '"Keep calm" & go' and got[0][3] == "A & B"
    assert wat_page.title == html_page.title == "Tom & Jerry été"
    for a, b in zip(html_page.images, wat_page.images, strict=True):
        ev = [(e.scope, e.kind, e.value) for e in b.license_evidence]
        assert ev == [(e.scope, e.kind, e.value) for e in a.license_evidence]
        assert b.extra["page_author"] == a.extra["page_author"] == "Renée"


_TAG = re.compile(rb"<(img|link|meta|base)\b([^>]*)>", re.I)
_ATTR = re.compile(rb"""([\w:-]+)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+))""")


def _raw_wat_links(body: bytes) -> dict[str, Any]:
    """HTML-Metadata as webarchive-commons writes it: attribute values copied raw."""
    head: dict[str, Any] = {"Link": [], "Metas": []}
    links: list[dict[str, str]] = []
    for m in _TAG.finditer(body):
        attrs = {
            a.group(1).decode().lower(): (a.group(2) or a.group(3) or a.group(4) or b"").decode()
            for a in _ATTR.finditer(m.group(2))
        }
        tag = m.group(1).decode().lower()
        if tag == "img" and "src" in attrs:
            links.append({"path": IMG, "url": attrs["src"]})
            links[-1].update({k: attrs[k] for k in ("alt", "title") if k in attrs})
        elif tag == "link" and "href" in attrs:
            head["Link"].append({"path": "LINK@/href", "url": attrs["href"]})
            head["Link"][-1].update({k: attrs[k] for k in ("rel", "type") if k in attrs})
        elif tag == "meta" and "name" in attrs:
            head["Metas"].append({k: attrs[k] for k in ("name", "content") if k in attrs})
        elif tag == "base" and "href" in attrs:
            head["Base"] = attrs["href"]
    t = re.search(rb"<title>(.*?)</title>", body, re.S)
    if t:
        head["Title"] = t.group(1).decode()
    return {"Head": head, "Links": links}


def test_real_wikipedia_capture_wat_parity():
    """The real an.wikipedia capture (alt="Escudo d&#39;armas"), as a WAT would hold it."""
    src = REAL / "cc-main-2024-22-wikipedia-escopete.warc.gz"
    with open(src, "rb") as fh:
        rec = next(iter(ArchiveIterator(fh, record_types=WarcRecordType.response)))
        uri = rec.headers["WARC-Target-URI"]
        body = rec.reader.read()
    html_page = extract_images(body, uri, encoding="utf-8")
    wat_page = extract_wat_images(_raw_wat_links(body), uri)
    assert len(wat_page.images) == len(html_page.images) >= 9
    assert [s.alt_text for s in wat_page.images] == [s.alt_text for s in html_page.images]
    assert "Escudo d'armas" in {s.alt_text for s in wat_page.images}
    # a WAT keeps `src` only; where the page has no srcset the keys agree
    same = sum(a.key == b.key for a, b in zip(html_page.images, wat_page.images, strict=True))
    with_srcset = sum(b"srcset=" in m.group(2) for m in _TAG.finditer(body))
    assert same >= len(wat_page.images) - with_srcset and same > 0
    lic = {e.value for e in wat_page.page_license_evidence if e.kind == "link_rel_license"}
    assert lic == {e.value for e in html_page.page_license_evidence if e.kind == "link_rel_license"}
    assert lic


# --------------------------------------------------------------------------- odd text
def test_lone_surrogates_in_wat_json_are_dropped(tmp_path: Path):
    """A `\\udXXX` escape without its pair (a Python-written WAT, a cut emoji) must not
    reach the shard writers, which cannot encode it."""
    uri = "http://sur.test/p"
    doc = _doc(uri, [{"path": IMG, "url": "i\ud83d.jpg", "alt": "cat \ud83d", "title": "\udc00t"}])
    block = json.dumps(doc).encode()  # ensure_ascii: the lone surrogates become escapes
    assert b"\\ud83d" in block
    st: Counter[str] = Counter()
    (s,) = list(iter_warc(_wat_file(tmp_path / "s.warc.wat.gz", uri, block), stats=st))
    assert s.kept and (s.url, s.alt_text, s.title) == ("http://sur.test/i.jpg", "cat", "t")
    for v in (s.url, s.alt_text, s.title, s.key):
        (v or "").encode("utf-8")  # raises on a surrogate


def test_non_utf8_byte_in_wat_json_keeps_the_record(tmp_path: Path):
    uri = "http://latin.test/p"
    block = json.dumps(_doc(uri, [{"path": IMG, "url": "x.jpg", "alt": "caf\u00e9"}])).encode()
    block = block.replace(b"caf\\u00e9", b"caf\xe9")  # one raw Latin-1 byte
    st: Counter[str] = Counter()
    out = list(iter_warc(_wat_file(tmp_path / "l.warc.wat.gz", uri, block), stats=st))
    assert [(s.url, s.alt_text, s.kept) for s in out] == [
        ("http://latin.test/x.jpg", "caf\ufffd", True)
    ]
    assert st["page_error"] == 0 and st["images"] == 1
    # still a page_error when the JSON itself is broken
    bad = _wat_file(tmp_path / "b.warc.wat.gz", uri, b'{"Envelope": \xe9')
    (err,) = list(iter_warc(bad))
    assert err.drop_reason == "page_error" and err.key == make_key(uri)


# --------------------------------------------------------------------------- lookup
def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _release(root: Path, table: pa.Table) -> Path:
    root.mkdir(parents=True)
    pq.write_table(table, root / "manifest.parquet")
    (root / "_SUCCESS").write_text("")
    return root


def test_unreadable_image_reported_and_the_rest_answered(tmp_path: Path):
    data = _jpeg(landscape(7, 320, 240))
    h = hash_image_bytes(data)
    rel = _release(
        tmp_path / "r1",
        pa.table({"key": ["k1"], "sha256": [h.sha256], "phash": [h.phash], "license": ["CC0"]}),
    )
    good = tmp_path / "good.jpg"
    good.write_bytes(data)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[:400])
    missing = tmp_path / "missing.png"
    with pytest.raises(ReleaseLookupError, match=r"cut\.jpg"):
        lookup([good, cut], rel)  # default: a clear error, as before
    res = lookup([cut, good, missing], rel, skip_unreadable=True)
    assert [r.query for r in res] == [str(cut), str(good), str(missing)]
    assert res[0].error and "cut.jpg" in res[0].error and res[0].matches == []
    assert res[2].error and "not found" in res[2].error
    assert res[1].error is None
    assert [(m.key, m.match, m.license) for m in res[1].matches] == [("k1", "sha256", "CC0")]
    assert res[0].to_json()["error"] == res[0].error


def test_manifest_without_key_column_says_so(tmp_path: Path):
    rel = _release(tmp_path / "r2", pa.table({"sha256": ["0" * 64], "phash": ["0" * 16]}))
    img = tmp_path / "q.jpg"
    img.write_bytes(_jpeg(landscape(8, 64, 48)))
    with pytest.raises(ReleaseLookupError, match="no key column"):
        lookup([img], rel)
