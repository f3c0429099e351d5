"""WAT/WARC review fixes: resync after archive damage, shared page evidence, `format="wat"`
over WARC metadata records, and WAT values that Common Crawl's writer already decoded."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tracemalloc
import uuid
from collections import Counter
from pathlib import Path

import pytest
from fastwarc.warc import ArchiveIterator

from ccurate.ingest.html import extract_images
from ccurate.ingest.sources import WarcSource, iter_source
from ccurate.ingest.warc import _SCAN, STATS, iter_warc
from ccurate.ingest.wat import extract_wat_images, unescape_attr
from ccurate.record import Sample

CC_WARC = "cc-main-2020-34-excerpt.warc.gz"
IMG = "IMG@/src"


def wat_record(block: bytes, uri: str) -> bytes:
    """One WAT metadata record, CRLF-framed as Common Crawl writes it."""
    head = (
        f"WARC/1.0\r\nWARC-Type: metadata\r\nWARC-Target-URI: {uri}\r\n"
        f"WARC-Record-ID: <urn:uuid:{uuid.uuid4()}>\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(block)}\r\n\r\n"
    )
    return head.encode() + block + b"\r\n\r\n"


def response_doc(uri: str, links: list[dict[str, str]]) -> bytes:
    """The WAT JSON of one HTML 200 response (layout in ingest/wat.py)."""
    hrm = {
        "Response-Message": {"Status": "200"},
        "Headers": {"Content-Type": "text/html"},
        "HTML-Metadata": {"Head": {}, "Links": links},
    }
    env = {
        "WARC-Header-Metadata": {"WARC-Type": "response", "WARC-Target-URI": uri},
        "Payload-Metadata": {"HTTP-Response-Metadata": hrm},
    }
    return json.dumps({"Container": {"Filename": "CC-MAIN-x.warc.gz"}, "Envelope": env}).encode()


def _members(n: int = 6) -> list[bytes]:
    """One gzip member per WAT record, as Common Crawl writes them: page i has image ai.jpg."""
    return [
        gzip.compress(
            wat_record(
                response_doc(f"http://p{i}.test/", [{"path": IMG, "url": f"a{i}.jpg"}]),
                f"http://p{i}.test/",
            )
        )
        for i in range(n)
    ]


def _read(path: Path) -> tuple[list[Sample], list[Sample], Counter[str]]:
    st: Counter[str] = Counter()
    out = list(iter_warc(path, stats=st))
    assert set(st) <= set(STATS)
    return [s for s in out if s.kept], [s for s in out if s.drop_reason == "page_error"], st


# --------------------------------------------------------------------------- 1. resync
@pytest.mark.parametrize("damage", ["bad_crc", "corrupt_deflate", "cut_short", "junk"])
def test_damaged_gzip_member_mid_file_costs_only_itself(tmp_path: Path, damage: str) -> None:
    """One damaged gzip member mid-file used to end the whole file (every later record
    lost) behind one page_error that named the previous, good record's offset."""
    m = _members()
    at = len(m[0]) + len(m[1])
    if damage == "bad_crc":
        bad = bytearray(m[2])
        bad[-8] ^= 0xFF
        span = [bytes(bad)]
    elif damage == "corrupt_deflate":
        bad = bytearray(m[2])
        bad[len(bad) // 2] ^= 0xFF
        span = [bytes(bad)]
    elif damage == "cut_short":
        span = [m[2][:60]]
    else:  # junk between members; member 2 itself stays readable
        span = [b"GARBAGE \x1f\x8b\x08 not a member", m[2]]
    path = tmp_path / "x.warc.wat.gz"
    path.write_bytes(b"".join([*m[:2], *span, *m[3:]]))
    kept, errs, st = _read(path)
    want = {f"http://p{i}.test/a{i}.jpg" for i in range(6)}
    if damage != "junk":
        want.discard("http://p2.test/a2.jpg")
    assert {s.url for s in kept} == want
    assert len(errs) == 1 and errs[0].extra["warc_offset"] == at
    assert errs[0].url.endswith(f"#offset={at}")
    skipped = len(span[0])
    assert f"{skipped} bytes skipped" in errs[0].extra["error"]
    assert st["archive_resyncs"] == 1 and st["archive_bytes_skipped"] == skipped
    assert st["page_error"] == 1


def test_long_damaged_span_is_scanned_in_chunks(tmp_path: Path) -> None:
    """The next member is found past several scan chunks, and false member headers in
    the junk (which do not inflate to `WARC/`) are passed over."""
    m = _members(3)
    junk = (b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4) * (3 * _SCAN // 1028)
    path = tmp_path / "x.warc.wat.gz"
    path.write_bytes(m[0] + junk + m[1] + m[2])
    kept, errs, st = _read(path)
    assert [s.url for s in kept] == [f"http://p{i}.test/a{i}.jpg" for i in range(3)]
    assert len(errs) == 1 and errs[0].extra["warc_offset"] == len(m[0])
    assert st["archive_bytes_skipped"] == len(junk) > 2 * _SCAN


def test_no_record_after_the_damage_says_how_many_bytes_were_lost(tmp_path: Path) -> None:
    m = _members(3)
    bad = bytearray(m[2])
    bad[-8] ^= 0xFF
    path = tmp_path / "x.warc.wat.gz"
    path.write_bytes(m[0] + m[1] + bytes(bad))
    kept, errs, st = _read(path)
    assert len(kept) == 2 and len(errs) == 1
    assert errs[0].extra["warc_offset"] == len(m[0]) + len(m[1])
    assert f"{len(bad)} bytes to the end of the file skipped" in errs[0].extra["error"]
    assert st["archive_bytes_skipped"] == len(bad) and not st["archive_resyncs"]


def test_junk_in_an_uncompressed_warc_resyncs_at_the_next_record_line(tmp_path: Path) -> None:
    """Uncompressed files resume at the next `WARC/` line after the damage."""
    recs = [gzip.decompress(x) for x in _members(4)]
    path = tmp_path / "x.warc.wat"
    path.write_bytes(recs[0] + recs[1] + b"JUNK\r\n" + recs[2] + recs[3])
    kept, errs, st = _read(path)
    assert len(kept) == 4 and len(errs) == 1
    assert errs[0].extra["warc_offset"] == len(recs[0]) + len(recs[1])
    assert st["archive_bytes_skipped"] == len(b"JUNK\r\n")


def test_real_cc_warc_with_one_damaged_member_loses_that_page_only(
    real_fixtures: Path, tmp_path: Path
) -> None:
    raw = (real_fixtures / CC_WARC).read_bytes()
    offs = [r.stream_pos for r in ArchiveIterator(io.BytesIO(raw))]  # one member a record
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    intact, damaged = tmp_path / "a" / CC_WARC, tmp_path / "b" / CC_WARC
    shutil.copy(real_fixtures / CC_WARC, intact)
    resp = [
        r.stream_pos
        for r in ArchiveIterator(io.BytesIO(raw))
        if r.headers["WARC-Type"] == "response"
    ]
    start = resp[5]
    end = offs[offs.index(start) + 1]
    bad = bytearray(raw)
    bad[(start + end) // 2] ^= 0xFF
    damaged.write_bytes(bytes(bad))
    whole, _, full = _read(intact)
    kept, errs, st = _read(damaged)
    assert len(errs) == 1 and errs[0].extra["warc_offset"] == start
    assert st["html_pages"] == full["html_pages"] - 1 == 15
    lost = {s.page_url for s in whole} - {s.page_url for s in kept}
    assert len(lost) <= 1  # the damaged page's images, nothing else
    by_key = {s.key: s.metadata_json() for s in whole}
    assert all(by_key[s.key] == s.metadata_json() for s in kept)


# --------------------------------------------------------------------------- 2. evidence
def test_page_evidence_is_shared_not_copied_per_image() -> None:
    """Every image got its own deep copy of up to 100 page-evidence items: a hostile page
    under the size cap cost GBs (about 12.5 kB an image at 100 items)."""
    links = [
        {
            "path": "A@/href",
            "rel": "license",
            "url": f"https://creativecommons.org/licenses/by/4.0/?v={i}",
        }
        for i in range(100)
    ]
    links += [{"path": IMG, "url": f"/{i}"} for i in range(2000)]
    tracemalloc.start()
    try:
        page = extract_wat_images({"Head": {}, "Links": links}, "http://x.test/")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    a, b = page.images[0], page.images[1]
    assert len(a.license_evidence) == 100
    assert a.license_evidence == b.license_evidence == page.page_license_evidence
    assert all(x is y for x, y in zip(a.license_evidence, b.license_evidence, strict=True))
    assert a.license_evidence is not b.license_evidence  # each image still owns its list
    assert peak / len(page.images) < 5000, peak / len(page.images)


def test_html_path_shares_page_evidence_items_too() -> None:
    cc = "".join(
        f'<a rel="license" href="https://creativecommons.org/licenses/by/4.0/?v={i}">l</a>'
        for i in range(50)
    )
    imgs = "".join(f'<img src="/{i}.jpg" alt="Photo &copy; Jane">' for i in range(20))
    page = extract_images(f"<html><body>{cc}{imgs}</body></html>", "http://x.test/")
    a, b = page.images[0], page.images[1]
    shared = [e for e in a.license_evidence if e.scope == "page"]
    assert len(shared) == 50 and shared == page.page_license_evidence
    assert all(any(e is x for x in b.license_evidence) for e in shared)
    assert a.license_evidence is not b.license_evidence
    own = [e for e in a.license_evidence if e.scope != "page"]
    assert own and not any(e is x for e in own for x in b.license_evidence)


# --------------------------------------------------------------------------- 3. wat mode
def test_wat_format_skips_a_warcs_own_metadata_records(real_fixtures: Path, tmp_path: Path) -> None:
    """`format="wat"` parsed a CC WARC's application/warc-fields metadata records as WAT
    JSON: one false page_error per capture (16 in this real excerpt)."""
    shutil.copy(real_fixtures / CC_WARC, tmp_path / "a.warc.gz")
    m = _members(1)[0]
    bad_json = gzip.compress(
        wat_record(b'{"Envelope": {', "http://broken.test/")  # claims JSON, is not
    )
    (tmp_path / "b.warc.wat.gz").write_bytes(m + bad_json)
    st: Counter[str] = Counter()
    out = list(iter_source(WarcSource(path=str(tmp_path), format="wat"), st))
    errs = [s for s in out if s.drop_reason == "page_error"]
    assert [s.url for s in errs] == ["http://broken.test/"]
    assert [s.url for s in out if s.kept] == ["http://p0.test/a0.jpg"]
    assert st["not_wat"] == 16 and st["wat_records"] == 2 and st["page_error"] == 1


# --------------------------------------------------------------------------- 4. entities
def test_only_complete_character_references_are_decoded() -> None:
    """CC's writer has decoded values itself since 2019: decoding again turned a decoded
    `&reg_no=3` into `®_no=3` (another URL and key than the WARC path's)."""
    assert unescape_attr("/img.php?id=7&reg_no=3") == "/img.php?id=7&reg_no=3"
    assert unescape_attr("/list?x[]=1&not[]=2&copy=3&amp") == "/list?x[]=1&not[]=2&copy=3&amp"
    assert unescape_attr("&copy 2020 &#39 &notit;") == "&copy 2020 &#39 &notit;"
    # raw values (webarchive-commons, CC before 2019) still read as the HTML parser reads them
    assert unescape_attr("a.jpg?w=1&amp;h=2&#x3D;&#61;") == "a.jpg?w=1&h=2=="
    assert unescape_attr("&quot;Keep&quot; &#39;calm&#x27; &copy; J") == "\"Keep\" 'calm' © J"


def test_decoded_wat_values_give_the_warc_paths_urls_and_keys() -> None:
    uri = "http://shop.test/p"
    html = (
        b"<html><head><title>Fish &amp; Chips &copy 2020</title></head><body>"
        b'<img src="/img.php?id=7&amp;reg_no=3" alt="Q&amp;A">'
        b'<img src="/list?x[]=1&amp;not[]=2">'
        b"</body></html>"
    )
    wat = {  # what CC's current writer stores for this page: every value decoded once
        "Head": {"Title": "Fish & Chips \u00a9 2020"},
        "Links": [
            {"path": IMG, "url": "/img.php?id=7&reg_no=3", "alt": "Q&A"},
            {"path": IMG, "url": "/list?x[]=1&not[]=2"},
        ],
    }
    a = extract_images(html, uri)
    b = extract_wat_images(wat, uri)
    got = [(s.url, s.key, s.alt_text, s.title) for s in b.images]
    assert got == [(s.url, s.key, s.alt_text, s.title) for s in a.images]
    assert got[0][0] == "http://shop.test/img.php?id=7&reg_no=3"
    # the title: a raw old-style one keeps a legacy `&copy` without `;` as written
    raw = extract_wat_images({"Head": {"Title": "Fish &amp; Chips &copy 2020"}}, uri)
    assert raw.title == "Fish & Chips &copy 2020"
