"""Images from the HTML responses of WARC files and from WAT files (Common Crawl), via FastWARC.

One record is in memory at a time (its payload capped at `MAX_PAGE_BYTES`),
so memory stays flat whatever the file size. Decisions:

- Opted-out pages (`<meta name=robots content=noai>`, TDMRep, `X-Robots-Tag`)
  still yield their images, already dropped with the reason, so the opt-out is
  counted per image in the run report.
- A record that cannot be used (payload shorter than its declared length, i.e.
  a clipped file; an unreadable record; a parser failure; a broken archive
  mid-file) yields one dropped *page record* with reason `page_error`
  (key `make_key(page_url)`, `mime="text/html"`, the cause in
  `extra["error"]`) and iteration goes on with the next record. Pass a
  `Counter` as `stats` to also get per-file counts (see `STATS`).
- Damage to the archive itself (a gzip member that does not inflate, junk
  between records, a member or record cut short) is one `page_error` at the
  damaged span's own offset, and reading resumes at the next record after it,
  so one bad spot does not cost the rest of the file. In a `.gz` that is the next
  gzip member header that inflates to `WARC/` (Common Crawl writes one member a
  record); in an uncompressed WARC, the next line starting `WARC/` whose header
  has a Content-Length (a record starting inside a damaged record's stated length
  is lost with it; a payload quoting a WARC header could be misread as a record).
  A file gzipped as one member cannot resume: the rest is skipped. The scan
  reads `_SCAN` bytes at a time; `archive_resyncs` and `archive_bytes_skipped`
  count what it did.
- Responses that are not HTML or not 2xx are skipped and counted: they are not
  image candidates.
- WAT files (`.warc.wat.gz`: `metadata` records whose JSON describes each
  capture, see `ingest.wat`) go through the same loop: `fmt="auto"` reads
  response records and `application/json` metadata records (so a WARC, a WAT,
  or a file holding both works), `"warc"` only responses, `"wat"` only those
  metadata records. Other metadata records (a WARC's own `application/warc-fields`)
  are counted as `not_wat`, never read as WAT JSON. A WAT record of a response
  counts in the same `STATS` and yields the same samples and drops as its page
  would; WAT records of requests or metadata are counted as `wat_other`.
  Unparsable JSON is a `page_error`.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

from fastwarc.warc import ArchiveIterator, WarcRecordType

from ccurate.ingest.html import PageExtract, extract_images
from ccurate.ingest.optout import tdm_header_reserved, x_robots_optout
from ccurate.ingest.wat import extract_wat_images, parse_wat_json, wat_response
from ccurate.record import Sample, make_key

REASONS: dict[str, str] = {
    "page_error": "a WARC record or page that could not be read or parsed (clipped, corrupt)",
    "optout_meta_robots": "the page's <meta name=robots> says noai/noimageai",
    "optout_tdmrep": "TDM rights reserved (<meta name=tdm-reservation content=1> or the header)",
    "optout_x_robots_tag": "the response's X-Robots-Tag header says noai/noimageai",
}

STATS: dict[str, str] = {
    "responses": "response records seen",
    "html_pages": "HTML 2xx responses parsed",
    "non_html": "responses skipped: not text/html or xhtml, or not HTTP (dns:)",
    "non_2xx": "responses skipped: HTTP status not 2xx",
    "page_error": "records skipped with a dropped page record",
    "payload_truncated": "pages parsed although the crawler truncated them (WARC-Truncated)",
    "optout_pages": "pages whose images were all dropped for an opt-out",
    "images": "image samples yielded (kept or dropped)",
    "img_skipped": "<img> elements without a usable URL or repeated on their page",
    "wat_records": "WAT (JSON metadata) records read",
    "wat_other": "WAT records of requests, metadata or warcinfo (no response to read)",
    "not_wat": "metadata records skipped: not application/json (a WARC's own warc-fields)",
    "archive_resyncs": "damaged spans of an archive skipped, reading resumed at the next record",
    "archive_bytes_skipped": "bytes of damaged archive spans skipped (to a record or the end)",
}

MAX_PAGE_BYTES = 8 * 1024 * 1024
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_RECORD_TYPES = {
    "auto": WarcRecordType.response | WarcRecordType.metadata,
    "warc": WarcRecordType.response,
    "wat": WarcRecordType.metadata,
}
_CHARSET = re.compile(r"charset\s*=\s*[\"']?([\w.:-]+)", re.IGNORECASE)


_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_WARC_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d{1,18})[ \t]*\r\n", re.IGNORECASE)
_SCAN = 1 << 16  # bytes read (and inflated) at a time by the end-of-file checks
_GZIP_MEMBER = b"\x1f\x8b\x08"


def _drained(reader: Any, expected: int) -> int:
    """Bytes of a record's payload left to read, up to `expected`, read in bounded chunks
    and discarded: a skipped response is checked for truncation without holding it."""
    n = 0
    while n < expected:
        chunk = reader.read(min(_SCAN, expected - n))
        if not chunk:
            break
        n += len(chunk)
    return n


def _gzip_members(fh: IO[bytes], start: int) -> Iterator[tuple[int, bytes, str | None]]:
    """(offset, first inflated bytes, None) for each gzip member from `start` on that
    inflates whole (CRC checked, output discarded), then (offset, b"", cause) for the
    first that does not, where the walk ends.

    FastWARC stops without an error at a member cut short (an interrupted download) and
    raises at one it cannot inflate without saying where: this finds the member.
    """
    fh.seek(start)
    if fh.read(3) != _GZIP_MEMBER:
        start = 0  # not a member start (one gzip member for the whole file): from the top
    fh.seek(start)
    member_at, pos = start, start
    d: Any = None
    head = b""
    buf = b""
    while True:
        if not buf:
            buf = fh.read(_SCAN)
            pos += len(buf)
            if not buf:
                break
        if d is None:
            if not buf.strip(b"\r\n\t \x00"):
                buf = b""  # padding after the last member
                continue
            d = zlib.decompressobj(31)  # gzip only
            member_at, head = pos - len(buf), b""
        try:
            head += d.decompress(buf, _SCAN)[: 8 - len(head)]
        except zlib.error as exc:
            yield member_at, b"", f"corrupt gzip member: {exc}"
            return
        if d.eof:
            yield member_at, head, None
            buf, d = d.unused_data, None
        else:
            buf = d.unconsumed_tail
    if d is not None:
        try:
            while not d.eof:  # inflate what input is left: a member may end in the last read
                out = d.decompress(d.unconsumed_tail, _SCAN)
                head += out[: 8 - len(head)]
                if not out and not d.unconsumed_tail:
                    break
        except zlib.error as exc:
            yield member_at, b"", f"corrupt gzip member: {exc}"
            return
        if not d.eof:
            yield member_at, b"", "the file ends inside a gzip member (truncated download?)"
            return
        yield member_at, head, None


def _plain_records(fh: IO[bytes], start: int, size: int) -> Iterator[tuple[int, bytes, str | None]]:
    """(offset, b"WARC/", None) for each record of an uncompressed WARC from `start` on,
    framed by its Content-Length, then (offset, b"", cause) for the first place where a
    record does not start or is cut short, where the walk ends."""
    pos = start
    while pos < size:
        fh.seek(pos)
        head = fh.read(_SCAN)
        lead = len(head) - len(head.lstrip(b"\r\n"))
        if lead == len(head):
            return  # blank lines at the end of the file
        at = pos + lead
        head = head[lead:]
        end = head.find(b"\r\n\r\n")
        m = _WARC_LENGTH.search(head, 0, end + 2) if end >= 0 else None
        if not head.startswith(b"WARC/") or m is None:
            yield at, b"", "unreadable bytes where a WARC record should start (truncated record?)"
            return
        block_end = at + end + 4 + int(m.group(1))  # the header, then its block
        if block_end > size:
            yield at, b"", "the file ends inside this record (truncated download?)"
            return
        yield at, b"WARC/", None
        pos = block_end + 4  # the CRLF CRLF after the block


def _units(
    fh: IO[bytes], start: int, gz: bool, size: int
) -> Iterator[tuple[int, bytes, str | None]]:
    """The gzip members (gz) or records (plain) of a file from `start` on, damage last."""
    return _gzip_members(fh, start) if gz else _plain_records(fh, start, size)


def _locate(
    fh: IO[bytes], start: int, gz: bool, size: int, *, read: bool, raised: Exception | None
) -> tuple[int, str] | None:
    """Where the damage that ended FastWARC's reading begins, and why; None: no damage.

    `start` is the last record the iterator gave (`read`) or where it began. The first
    member that does not inflate (or record that is cut) is the damage. FastWARC also
    ends quietly at an empty gzip member: one with members after it counts. When it
    raised and every member inflates, it met a member holding no WARC record, else a
    WARC header it could not frame: `start` itself (FastWARC may have misread the
    record's length there), so the scan for the next record begins right after it.
    """
    empty: int | None = None
    for at, head, why in _units(fh, start, gz, size):
        if why is not None:
            return at, why
        if empty is not None:
            return empty, "an empty gzip member, where FastWARC stops reading"
        if read and at <= start:
            continue  # the record read: FastWARC got past its header
        if not head:
            empty = at
        elif raised is not None and not head.startswith(b"WARC/"):
            return at, f"a gzip member that holds no WARC record ({raised})"
    if raised is None:
        return None
    return start, f"unreadable WARC record at or after this offset ({raised})"


def _starts_record(fh: IO[bytes], at: int, gz: bool) -> bool:
    """Whether a WARC record begins at `at`: a gzip member inflating to `WARC/`, or
    (plain) a `WARC/` line with a Content-Length in its header block."""
    fh.seek(at)
    data = fh.read(_SCAN)
    if not gz:
        end = data.find(b"\r\n\r\n")
        return end >= 0 and _WARC_LENGTH.search(data, 0, end + 2) is not None
    d = zlib.decompressobj(31)
    try:
        out = d.decompress(data, 8)
        while len(out) < 5 and d.unconsumed_tail and not d.eof:
            out += d.decompress(d.unconsumed_tail, 8)
    except zlib.error:
        return False
    return out.startswith(b"WARC/")


def _resync(fh: IO[bytes], start: int, gz: bool) -> int | None:
    """The offset of the first record start (`_starts_record`) at or after `start`, found
    in `_SCAN` chunks: a gzip member header `\\x1f\\x8b\\x08`, or (plain) `WARC/` at the
    start of a line. None when there is none before the end of the file."""
    magic = _GZIP_MEMBER if gz else b"\nWARC/"
    skip = 0 if gz else 1  # plain: the match starts at the newline before the record
    pos = start - skip
    while True:
        fh.seek(pos)
        chunk = fh.read(_SCAN + len(magic) - 1)  # overlaps the next chunk: no match cut
        if len(chunk) < len(magic):
            return None
        i = chunk.find(magic)
        while 0 <= i < _SCAN:
            if _starts_record(fh, pos + i + skip, gz):
                return pos + i + skip
            i = chunk.find(magic, i + 1)
        pos += _SCAN


def _dechunk(data: bytes) -> bytes:
    """Undo HTTP/1.1 chunked transfer coding (raw captures such as wget's keep it)."""
    out = bytearray()
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            raise ValueError("chunked body without a chunk-size line")
        token = data[pos:eol].split(b";", 1)[0].strip() or b"0"
        if not _CHUNK_SIZE.fullmatch(token):  # int() takes '-6': the loop would step back
            raise ValueError(f"bad chunk size {token[:20]!r}")
        size = int(token, 16)
        if size == 0:
            return bytes(out)
        start = eol + 2
        out += data[start : start + size]
        if start + size > len(data):
            raise ValueError("chunked body ends inside a chunk")
        pos = start + size + 2


def _decode_payload(body: bytes, transfer: str, encoding: str, cap: int) -> bytes:
    """The HTML bytes of a payload stored with its HTTP transfer/content coding.

    Common Crawl stores decoded payloads (and renames the headers), so this only
    matters for raw captures. Decompression is capped at `cap` bytes (a bomb
    gives a prefix, not an out-of-memory).
    """
    if "chunked" in transfer.lower():
        body = _dechunk(body)
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return body
    if enc in ("gzip", "x-gzip", "deflate"):
        wbits = 47 if enc != "deflate" else 15  # 47: gzip or zlib header, auto-detected
        try:
            return zlib.decompressobj(wbits).decompress(body, cap)
        except zlib.error:
            if enc == "deflate":  # raw deflate without zlib header, as some servers send
                return zlib.decompressobj(-15).decompress(body, cap)
            raise
    raise ValueError(f"unsupported Content-Encoding {encoding!r}")


def _page_error(page_url: str, warc: Path, offset: int | None, why: str) -> Sample:
    s = Sample(
        key=make_key(page_url),
        url=page_url,
        page_url=page_url,
        source_url=page_url,
        mime="text/html",
        extra={"warc_file": warc.name, "warc_offset": offset, "error": why[:500]},
    )
    s.drop("page_error", "ingest")
    return s


def _emit(
    page: PageExtract,
    x_robots: list[str],
    tdm_header: dict[str, list[str]],
    truncated: bool,
    extra: dict[str, object],
    st: Counter[str],
    user_agent_token: str,
) -> Iterator[Sample]:
    """The samples of one parsed page (WARC or WAT), header opt-outs applied, counted."""
    st["html_pages"] += 1
    if truncated:
        st["payload_truncated"] += 1
    # header opt-outs (the downloader's own rules, ingest.optout) outrank the page's
    if x_robots_optout(x_robots, user_agent_token):
        page.optout = "optout_x_robots_tag"
    elif tdm_header_reserved(tdm_header):
        page.optout = "optout_tdmrep"
    if page.optout:
        st["optout_pages"] += 1
    st["img_skipped"] += sum(page.skipped.values())
    for s in page.samples():
        s.extra.update(extra)
        st["images"] += 1
        yield s


def _wat_record(
    record: Any,
    path: Path,
    offset: int | None,
    page_url: str,
    st: Counter[str],
    user_agent_token: str,
    max_page_bytes: int,
) -> Iterator[Sample]:
    """The samples of one WAT metadata record (see `ingest.wat`), or its page_error."""
    st["wat_records"] += 1
    try:
        expected = int(record.content_length)
        if expected > max_page_bytes:
            raise ValueError(f"WAT record of {expected} bytes, over max_page_bytes")
        body = record.reader.read(expected)
        if len(body) < expected:
            raise ValueError(f"truncated record: {len(body)} of {expected} payload bytes")
        resp = wat_response(parse_wat_json(body), page_url)
    except Exception as exc:  # one bad record must not end the file
        st["page_error"] += 1
        yield _page_error(page_url, path, offset, f"{type(exc).__name__}: {exc}")
        return
    if resp is None:
        st["wat_other"] += 1
        return
    st["responses"] += 1
    page_url = resp.page_url
    if not resp.is_http:
        st["non_html"] += 1
        return
    if resp.status is None:
        st["page_error"] += 1
        yield _page_error(
            page_url, path, offset, "ValueError: unreadable HTTP status in WAT record"
        )
        return
    if not 200 <= resp.status < 300:
        st["non_2xx"] += 1
        return
    if resp.mime not in _HTML_TYPES and (resp.mime or resp.identified_type not in _HTML_TYPES):
        st["non_html"] += 1
        return
    page = extract_wat_images(resp.html or {}, page_url, user_agent_token=user_agent_token)
    if page.error:
        st["page_error"] += 1
        yield _page_error(page_url, path, offset, page.error)
        return
    extra: dict[str, object] = {"warc_file": path.name, "warc_offset": offset}
    if resp.source_file:  # the capture itself, in the WARC file this WAT describes
        extra["source_warc_file"] = resp.source_file
        extra["source_warc_offset"] = resp.source_offset
    tdm = {"tdm-reservation": resp.headers.get("tdm-reservation", [])}
    yield from _emit(
        page,
        resp.headers.get("x-robots-tag", []),
        tdm,
        resp.truncated,
        extra,
        st,
        user_agent_token,
    )


def iter_warc(
    path: str | Path,
    *,
    stats: Counter[str] | None = None,
    user_agent_token: str = "ccurate",
    max_page_bytes: int = MAX_PAGE_BYTES,
    fmt: Literal["auto", "warc", "wat"] = "auto",
) -> Iterator[Sample]:
    """Every image of every HTML response in a `.warc[.gz]` or `.wat[.gz]`; page URL = target URI.

    Images carry `extra["warc_file"]` and `extra["warc_offset"]` (the record's
    offset in the file read) so each sample can be traced back to its capture;
    from a WAT also `extra["source_warc_file"]`/`["source_warc_offset"]` (the
    capture's WARC). `fmt` picks the record types read (module docstring).
    Raises `ValueError` only when the file cannot be opened at all.
    """
    path = Path(path)
    st: Counter[str] = stats if stats is not None else Counter()
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed in finally; the generator may be abandoned
    except OSError as exc:
        raise ValueError(f"WARC file {path}: cannot open ({exc})") from exc
    offset: int | None = None
    page_url = path.resolve().as_uri()
    reported: int | None = None  # offset of the last record already yielded as page_error
    skipped: str | None = None  # the STATS counter the last record went to, if a skip
    since = 0  # where the current ArchiveIterator began reading
    last: int | None = None  # offset of the last record it gave
    try:
        size = path.stat().st_size
        gz = fh.read(2) == b"\x1f\x8b"
        fh.seek(0)
        records = ArchiveIterator(fh, record_types=_RECORD_TYPES[fmt], parse_http=True)
        while True:
            try:
                record = next(records)
            except Exception as exc:  # StopIteration too: FastWARC ends quietly at a cut member
                raised = None if isinstance(exc, StopIteration) else exc
                good = since if last is None else last  # the last record read, or the start
                with open(path, "rb") as scan:  # fh stays FastWARC's until it is reopened
                    damage = _locate(scan, good, gz, size, read=last is not None, raised=raised)
                    if damage is None:
                        break  # the file ended cleanly
                    at, why = damage
                    frm = max(at, good) + 1  # never a record again
                    resume = _resync(scan, frm, gz)
                lost = (size if resume is None else resume) - at
                st["archive_bytes_skipped"] += lost
                if at != reported:  # a record cut short was reported as it was read
                    if at == offset and skipped:  # the last record was clipped: not a skip
                        st[skipped] -= 1
                    st["page_error"] += 1
                    where = f"{path.resolve().as_uri()}#offset={at}"
                    what = "archive ends early" if raised is None else "archive unreadable"
                    tail = (
                        f"{lost} bytes skipped, reading resumed at offset {resume}"
                        if resume is not None
                        else f"{lost} bytes to the end of the file skipped: no record after them"
                    )
                    yield _page_error(where, path, at, f"{what}: {why}; {tail}")
                if resume is None:
                    break
                st["archive_resyncs"] += 1
                fh.seek(resume)
                records = ArchiveIterator(fh, record_types=_RECORD_TYPES[fmt], parse_http=True)
                since, last = resume, None
                continue
            offset = last = record.stream_pos
            skipped = None
            page_url = (record.headers.get("WARC-Target-URI") or "").strip().strip("<>")
            if not page_url:
                page_url = f"{path.resolve().as_uri()}#offset={offset}"
            if record.record_type == WarcRecordType.metadata:
                ctype = (record.headers.get("Content-Type") or "").strip().lower()
                if not ctype.startswith("application/json"):
                    # a WARC's own metadata (application/warc-fields), in "wat" mode too: a
                    # folder may mix WARCs and WATs, and these records are no damage
                    st["not_wat"] += 1
                    skipped = "not_wat"
                    continue
                for s in _wat_record(
                    record, path, offset, page_url, st, user_agent_token, max_page_bytes
                ):
                    if s.drop_reason == "page_error":
                        reported = offset
                    yield s
                continue
            st["responses"] += 1
            try:
                if not record.is_http:
                    st["non_html"] += 1  # dns:, whois: ... responses carry no HTTP message
                    skipped = "non_html"
                    continue
                http = record.http_headers
                status = http.status_code if http is not None else None
                ctype = (http.get("Content-Type") or "") if http is not None else ""
                if status is None:  # e.g. a file clipped inside the HTTP header block
                    raise ValueError("unreadable HTTP status line or headers")
                expected = int(record.content_length)
                skip = None
                mime = ctype.lower().split(";")[0].strip()
                if not 200 <= int(status) < 300:
                    skip = "non_2xx"
                elif mime not in _HTML_TYPES:
                    ident = (record.headers.get("WARC-Identified-Payload-Type") or "").lower()
                    if mime or ident not in _HTML_TYPES:
                        skip = "non_html"
                if skip is not None:
                    # a record clipped in its headers reads as a non-HTML or odd-status
                    # response: its payload must be all there before it counts as a skip
                    got = _drained(record.reader, expected)
                    if got < expected:
                        raise ValueError(f"truncated record: {got} of {expected} payload bytes")
                    st[skip] += 1
                    skipped = skip
                    continue
                body = record.reader.read(min(expected, max_page_bytes))
                if len(body) < min(expected, max_page_bytes):
                    raise ValueError(f"truncated record: {len(body)} of {expected} payload bytes")
                assert http is not None
                x_robots = list(http.get_multiple("X-Robots-Tag"))
                tdm_header = {"tdm-reservation": list(http.get_multiple("tdm-reservation"))}
                body = _decode_payload(
                    body,
                    http.get("Transfer-Encoding") or "",
                    http.get("Content-Encoding") or "",
                    max_page_bytes,
                )
            except Exception as exc:  # one bad record must not end the file
                st["page_error"] += 1
                reported = offset
                yield _page_error(page_url, path, offset, f"{type(exc).__name__}: {exc}")
                continue
            m = _CHARSET.search(ctype)
            page = extract_images(
                body,
                page_url,
                user_agent_token=user_agent_token,
                encoding=m.group(1) if m else None,
            )
            if page.error:
                st["page_error"] += 1
                reported = offset
                yield _page_error(page_url, path, offset, page.error)
                continue
            yield from _emit(
                page,
                x_robots,
                tdm_header,
                bool(record.headers.get("WARC-Truncated")),
                {"warc_file": path.name, "warc_offset": offset},
                st,
                user_agent_token,
            )
    finally:
        fh.close()
