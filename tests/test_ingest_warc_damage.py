"""A WARC that ends early (an interrupted download) records the damage as a `page_error`.

FastWARC stops without an error at a gzip member or record cut short; the reader checks
the end of the file itself, and checks a skipped response's payload is all there before
counting it as `non_html`, so a clipped page is never blamed on its type.
"""

from __future__ import annotations

import gzip
import io
from collections import Counter
from pathlib import Path

import pytest
from fastwarc.warc import ArchiveIterator, WarcRecordType

from ccurate.ingest.warc import REASONS, STATS, iter_warc
from ccurate.record import Sample

REAL = Path("/work/shared/fixtures/real/cc-main-2020-34-excerpt.warc.gz")


@pytest.fixture(scope="module")
def real() -> bytes:
    if not REAL.exists():
        pytest.skip(f"{REAL} not available")
    return REAL.read_bytes()


def _read(path: Path) -> tuple[list[Sample], Counter[str]]:
    st: Counter[str] = Counter()
    out = list(iter_warc(path, stats=st))
    assert set(st) <= set(STATS)
    return out, st


def _errors(out: list[Sample]) -> list[Sample]:
    errs = [s for s in out if s.drop_reason == "page_error"]
    assert all(s.drop_reason in REASONS for s in errs)
    return errs


def test_cut_gzip_member_is_a_page_error_after_the_readable_pages(
    real: bytes, tmp_path: Path
) -> None:
    whole, full = _read(REAL)
    assert not _errors(whole) and full["html_pages"] == 16  # an intact file: no false alarm
    offs = [
        r.stream_pos
        for r in ArchiveIterator(io.BytesIO(real), record_types=WarcRecordType.response)
    ]
    for cut in (offs[4] + 20, offs[4] + 200, offs[9] + 3000, len(real) - 10):
        path = tmp_path / f"cut{cut}.warc.gz"
        path.write_bytes(real[:cut])
        out, st = _read(path)
        errs = _errors(out)
        assert len(errs) == 1, (cut, st)
        assert st["page_error"] == 1 and "warc_offset" in errs[0].extra
        assert st["non_html"] == full["non_html"] and st["non_2xx"] == full["non_2xx"], cut
        assert sum(s.drop_reason != "page_error" for s in out) > 0  # readable pages stay


def test_plain_warc_cut_in_http_headers_or_warc_header(real: bytes, tmp_path: Path) -> None:
    raw = gzip.decompress(real)
    plain = [
        r.stream_pos for r in ArchiveIterator(io.BytesIO(raw), record_types=WarcRecordType.response)
    ]
    whole = tmp_path / "whole.warc"
    whole.write_bytes(raw)
    out, full = _read(whole)
    assert not _errors(out)
    hdr = raw.index(b"\r\n\r\nHTTP/", plain[4]) + 4
    cuts = {
        "http_header": raw.index(b"\r\n", raw.index(b"Content-Type", hdr)) - 3,
        "warc_header": plain[7] + 30,
        "payload": plain[7] + 2000,
    }
    for name, cut in cuts.items():
        path = tmp_path / f"{name}.warc"
        path.write_bytes(raw[:cut])
        out, st = _read(path)
        assert len(_errors(out)) == 1, (name, st)
        assert st["non_html"] == full["non_html"], name  # the clipped page is no skip
