"""Ingest sources (URL lists, WARC files, page lists) and the plan that partitions them.

A *source* turns some input into `Sample` records: image URLs to fetch (URL
lists, images found in WARC pages) or HTML pages to fetch and parse (page
lists, `mime="text/html"`). `plan_sources` streams every source into fixed-size
parquet partitions that the downloader consumes; the plan is deterministic and
published with a marker, so a rerun returns the same partitions.

Conventions follow img2dataset: `url_col` (default "url"), `caption_col`
(default "caption", read into `alt_text`), every other column carried into
`sample.extra`. Decisions:

- An input column whose name is a `Sample` field (e.g. `status`, `title`) is
  carried as `input_<name>` so it cannot overwrite the record's own field.
- A row without a usable http(s) URL still becomes a record, dropped as
  `bad_url` (a JSON line that does not parse: `bad_row`), keyed by file and row
  so keys stay unique; `extra` gets `source_file` and `source_row`.
- Reading is streamed: parquet by row batches, csv/tsv/jsonl (optionally
  `.gz`) line by line. A csv/tsv record is held to `MAX_RECORD_CHARS`
  characters and `MAX_RECORD_LINES` physical lines (an unclosed quote would
  otherwise swallow the rest of the file into one field): a record past either,
  or a quoted field still open at the end of the file, is dropped as `bad_row`
  and parsing resumes at the physical line after the one it started on. A jsonl
  line past `MAX_RECORD_CHARS` is a `bad_row` too. Memory is bounded by the caps.
- Text is decoded as the source's `encoding` (default utf-8, a BOM skipped),
  strictly: a row holding bytes that do not decode is dropped as
  `bad_encoding`, never kept with U+FFFD in its URL or caption.
- A file that stops being readable part-way (a truncated or corrupt `.gz`, an
  unreadable parquet row group) keeps the rows read before the damage and adds
  one record dropped as `source_damaged` (`extra["error"]` says where); the
  plan goes on with the next file and source. Damage before the header (or a
  parquet footer) is read is a `SourceError`, as an unreadable file is.
- Wikimedia Commons fields that limit use but are not licences (Restrictions,
  AttributionRequired, UsageTerms, Copyrighted) are carried in `extra` as
  `wikimedia_restrictions`, `wikimedia_attribution_required`,
  `wikimedia_usage_terms`, `wikimedia_copyrighted` (when the row has them).
"""

from __future__ import annotations

import codecs
import csv
import glob as globmod
import gzip
import hashlib
import io
import json
import re
import shutil
import sys
import zlib
from collections import Counter, deque
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Annotated, Any, Literal
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator

from ccurate.configbase import Section
from ccurate.ingest.metadata import flickr_evidence, wikimedia_evidence
from ccurate.ingest.warc import iter_warc
from ccurate.record import LicenseEvidence, Sample, make_key, samples_to_table
from ccurate.shardio import atomic_path, write_json_atomic, write_partition
from ccurate.stage import StageStats

REASONS: dict[str, str] = {
    "bad_url": "input row without a usable http(s) URL (empty, not a string, other scheme)",
    "bad_row": "input line that could not be parsed (invalid JSON, not an object, a csv "
    "record past MAX_RECORD_CHARS / MAX_RECORD_LINES or with a quote never closed)",
    "bad_encoding": "input row with bytes that do not decode in the source's `encoding`",
    "source_damaged": "the unreadable rest of a file (truncated or corrupt .gz, an unreadable "
    "parquet row group): the rows before it are kept",
    "duplicate_url": "the same (url, page_url) again in the plan: the first one is kept",
}

PLANNED_MARKER = "_PLANNED"
PLANNED_DROPPED = "planned-dropped.parquet"  # no .done marker: list_shards() skips it
PARTITION_FMT = "part-{:05d}"
_PART_RE = re.compile(r"^\.?part-\d{5}\.(parquet|done)")
_GLOB_CHARS = re.compile(r"[*?\[]")
_SAMPLE_FIELDS = {f.name for f in fields(Sample)}
_FORMATS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
_DEFAULT_CAPTION = "caption"
# A csv/tsv record (all its fields) or a jsonl line, in characters. img2dataset captions
# are a few hundred characters and one of 64 KiB is already absurd; 1 MiB leaves room for
# wide rows (EXIF or extmetadata json columns) and bounds what one broken quote can hold.
MAX_RECORD_CHARS = 1 << 20
# Physical lines one csv/tsv record may span (a quoted caption with newlines): an unclosed
# quote reaches this first in a list of short rows, and loses at most this many rows' parse
MAX_RECORD_LINES = 256
_SURROGATE = re.compile("[\ud800-\udfff]")  # an undecodable byte under surrogateescape
# what reading a damaged file raises (zlib.error: corrupt deflate data inside a .gz)
_READ_ERRORS = (OSError, EOFError, zlib.error, pa.ArrowException, UnicodeError)
_WARC_SUFFIXES = (".warc", ".warc.gz", ".wat", ".wat.gz")  # CC names WATs *.warc.wat.gz
_WARC_WHAT = "a .warc[.gz] or .wat[.gz] file, a directory of them, or a glob"


class SourceError(ValueError):
    """A `[[sources]]` entry that cannot be read as configured (no such file, a column it
    names is missing, an unknown format, an unreadable file): the user's config or data,
    so the CLI reports it as a config error (exit 2), not as a step that cannot run yet."""


class UrlListSource(Section):
    """A list of image URLs (img2dataset style): parquet, csv, tsv or jsonl (+ .gz)."""

    type: Literal["urls"] = "urls"
    path: str = ""  # a file, a directory of such files, or a glob
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = "auto"
    url_col: str = "url"
    caption_col: str | None = _DEFAULT_CAPTION  # missing column tolerated only for the default
    license_col: str | None = None  # -> LicenseEvidence(scope="input", kind="column", value)
    # "flickr": license_col holds Flickr API licence ids (YFCC100M, CommonCatalog's source),
    # recorded as metadata evidence `flickr:N`; "raw": values as given
    license_format: Literal["raw", "flickr"] = "raw"
    # a Wikimedia Commons `imageinfo.extmetadata` object (or its JSON text) per row: licence
    # evidence (LicenseUrl, License, ...) and attribution (Artist, ObjectName) from it
    extmetadata_col: str | None = None
    author_col: str | None = None  # attribution columns (e.g. a Flickr owner's name)
    title_col: str | None = None
    page_url_col: str | None = None
    extra_cols: list[str] | None = None  # None: carry every other column; []: none
    # text encoding of csv/tsv/jsonl files (e.g. "cp1252" for an Excel export); a row with
    # bytes that do not decode in it is dropped as bad_encoding
    encoding: str = "utf-8"

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        """An unknown name would only fail when the first file is opened, as a read error."""
        try:
            info = codecs.lookup(v)
        except LookupError:
            raise ValueError(
                f"unknown text encoding {v!r}; use a Python codec name such as "
                '"utf-8", "cp1252" or "latin-1"'
            ) from None
        if not getattr(info, "_is_text_encoding", True):  # e.g. "base64", "rot13"
            raise ValueError(f"{v!r} is not a text encoding (bytes <-> str)")
        return v

    @model_validator(mode="after")
    def _flickr_needs_its_column(self) -> UrlListSource:
        """Without a column to read, `license_format = "flickr"` was silently ignored and
        every row was dropped as license_unknown."""
        if self.license_format == "flickr" and not self.license_col:
            raise ValueError(
                'license_format = "flickr" reads Flickr licence ids from license_col: '
                'set license_col (e.g. "license")'
            )
        return self

    def named_cols(self) -> list[tuple[str, str]]:
        """(setting, column) of every column a setting names (the caption's too)."""
        named = [
            ("url_col", self.url_col),
            ("caption_col", self.caption_col),
            ("license_col", self.license_col),
            ("extmetadata_col", self.extmetadata_col),
            ("author_col", self.author_col),
            ("title_col", self.title_col),
            ("page_url_col", self.page_url_col),
        ]
        return [(opt, col) for opt, col in named if col]


class WarcSource(Section):
    """WARC or WAT files (Common Crawl): images of every HTML response.

    `format="auto"` reads WARC responses and WAT (JSON `metadata`) records alike,
    so a folder may mix `.warc.gz` and `.warc.wat.gz` files; "warc" or "wat"
    reads only that kind. A WAT gives image URL + alt text without the HTML
    (about 1/3 the download), but only page-scope licence evidence and no
    `srcset` candidates (see `ccurate.ingest.wat`).
    """

    type: Literal["warc"] = "warc"
    path: str = ""  # a .warc[.gz] / .wat[.gz] file, a directory of them, or a glob
    format: Literal["auto", "warc", "wat"] = "auto"
    user_agent_token: str = "ccurate"  # <meta name="ccurate" content="noai"> opts out too


class PageListSource(Section):
    """HTML pages to fetch; the downloader parses them with `extract_images`."""

    type: Literal["pages"] = "pages"
    urls: list[str] = Field(default_factory=list)
    path: str | None = None  # text file (optionally .gz): one URL a line, '#' comments


Source = Annotated[UrlListSource | WarcSource | PageListSource, Field(discriminator="type")]


# --------------------------------------------------------------------------- helpers
def _label(src: Section) -> str:
    path = getattr(src, "path", None)
    kind = getattr(src, "type", "?")
    return f"{kind} source {path!r}" if path else f"{kind} source"


def is_http_url(url: object) -> bool:
    """An absolute http(s) URL with a host (what the downloader can fetch)."""
    if not isinstance(url, str) or not url.strip():
        return False
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)


def _expand(label: str, path: str, suffixes: tuple[str, ...], what: str) -> list[Path]:
    """A file, a directory (its files with `suffixes`), or a glob -> sorted files."""
    if not path:
        raise SourceError(f"{label}: `path` is empty; expected {what}")
    if _GLOB_CHARS.search(path):
        files = sorted(Path(p) for p in globmod.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise SourceError(f"{label}: glob {path!r} matches no file; expected {what}")
        return files
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(suffixes))
        if not files:
            raise SourceError(f"{label}: directory {path!r} holds no {'/'.join(suffixes)} file")
        return files
    if not p.is_file():
        raise SourceError(f"{label}: file {path!r} not found; expected {what}")
    return [p]


def _format_of(label: str, path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.name.lower().removesuffix(".gz")
    for suffix, kind in _FORMATS.items():
        if name.endswith(suffix):
            return kind
    raise SourceError(
        f"{label}: cannot tell the format of {path.name!r} from its suffix; expected one of "
        f"{sorted(_FORMATS)} (optionally .gz) or set `format`"
    )


def _open_text(path: Path, encoding: str = "utf-8") -> IO[str]:
    """Text of a (gzipped) file, undecodable bytes kept as lone surrogates
    (surrogateescape) so each row can be checked and dropped, not silently mangled."""
    if codecs.lookup(encoding).name == "utf-8":
        encoding = "utf-8-sig"  # skip a BOM (Excel writes one)
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(
            gzip.open(path, "rb"), encoding=encoding, errors="surrogateescape", newline=""
        )
    return open(path, encoding=encoding, errors="surrogateescape", newline="")


def _undecodable(value: Any) -> bool:
    """True when a value read from text holds a lone surrogate (bytes that did not decode,
    or a JSON `\\udXXX` escape that is not a pair): it cannot be a URL, a caption or a
    parquet string."""
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_undecodable(k) or _undecodable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_undecodable(v) for v in value)
    return False


@dataclass(frozen=True)
class _BadRow:
    """A row (or the unreadable rest of a file) that becomes one record dropped as `reason`."""

    reason: str
    error: str


class _Overrun(Exception):
    """A csv record past the caps, or a quoted field still open at the end of the file."""


class _LineFeed:
    """Physical lines for `csv.reader`, the lines of the record being read kept (bounded
    by the caps), so a runaway record can be dropped and the lines after its first one
    parsed again."""

    def __init__(self, fh: IO[str]) -> None:
        self.fh = fh
        self.pending: deque[str] = deque()  # lines of a dropped record, to parse again
        self.record: list[str] = []
        self.chars = 0

    def __iter__(self) -> _LineFeed:
        return self

    def __next__(self) -> str:
        if self.pending:
            line = self.pending.popleft()
        else:
            line = self.fh.readline(MAX_RECORD_CHARS + 1)  # a line of 10 GB is read in parts
            if not line:
                if self.record:  # csv would save the open field as it is: a silent swallow
                    raise _Overrun("the file ends inside a quoted field (a quote never closed)")
                raise StopIteration
        self.record.append(line)
        self.chars += len(line)
        if self.chars > MAX_RECORD_CHARS:
            raise _Overrun(f"record longer than {MAX_RECORD_CHARS} characters")
        if len(self.record) > MAX_RECORD_LINES:
            raise _Overrun(f"quoted field spans more than {MAX_RECORD_LINES} lines")
        return line

    def start(self) -> None:
        """A new record begins."""
        self.record, self.chars = [], 0

    def drop(self) -> None:
        """Forget the current record's first physical line; parse the rest again."""
        rest = self.record[1:]
        first_complete = self.record[0].endswith(("\n", "\r")) if self.record else True
        while not first_complete:  # the first line was read in parts: skip all of it
            if rest:
                first_complete = rest.pop(0).endswith(("\n", "\r"))
                continue
            part = (
                self.pending.popleft() if self.pending else self.fh.readline(MAX_RECORD_CHARS + 1)
            )
            first_complete = not part or part.endswith(("\n", "\r"))
        self.pending.extendleft(reversed(rest))
        self.start()


# --------------------------------------------------------------------------- URL lists
class _Rows:
    """The rows of one URL-list file, streamed, after its columns were checked."""

    def __init__(self, src: UrlListSource, path: Path) -> None:
        self.src, self.path = src, path
        self.label = _label(src)
        self.fmt = _format_of(self.label, path, src.format)
        if self.fmt == "parquet" and path.name.lower().endswith(".gz"):
            raise SourceError(
                f"{self.label}: {path.name!r} is a gzipped parquet file, which cannot be read "
                "in row batches (parquet compresses inside and needs random access): gunzip it"
            )

    def _check(self, columns: list[str]) -> None:
        src, cols = self.src, set(columns)
        # the default caption column may be absent (a list of bare URLs)
        want = [(o, c) for o, c in src.named_cols() if (o, c) != ("caption_col", _DEFAULT_CAPTION)]
        for opt, col in want:
            if col not in cols:
                raise SourceError(
                    f"{self.label}: column {col!r} ({opt}) not found in {self.path.name}; "
                    f"columns are {sorted(cols)[:50]}; set `{opt}` to one of them"
                )
        for col in src.extra_cols or []:
            if col not in cols:
                raise SourceError(
                    f"{self.label}: column {col!r} (extra_cols) not found in {self.path.name}; "
                    f"columns are {sorted(cols)[:50]}"
                )

    def __iter__(self) -> Generator[tuple[int, dict[str, Any] | _BadRow], None, None]:
        """(row index, row) pairs; a row that cannot be used comes as (index, `_BadRow`).

        Damage after the header (a truncated .gz, an unreadable row group) ends the file
        with one `source_damaged` row, so the rows before it and the other sources stay;
        damage before it is a `SourceError`, as for a file that cannot be read at all.
        """
        self._started = False
        nxt = 0
        rows = (
            self._parquet()
            if self.fmt == "parquet"
            else self._jsonl()
            if self.fmt == "jsonl"
            else self._csv("\t" if self.fmt == "tsv" else ",")
        )
        try:
            for i, row in rows:
                self._started = True
                nxt = i + 1
                yield i, row
        except (*_READ_ERRORS, csv.Error) as exc:
            if not self._started:
                raise SourceError(
                    f"{self.label}: cannot read {self.path} as {self.fmt}: {exc}"
                ) from exc
            why = f"{type(exc).__name__}: {exc}; rows from {nxt} on not read"
            yield nxt, _BadRow("source_damaged", why[:500])

    def _parquet(self) -> Iterator[tuple[int, dict[str, Any] | _BadRow]]:
        pf = pq.ParquetFile(self.path)
        self._check(pf.schema_arrow.names)
        self._started = True
        columns = None
        if self.src.extra_cols is not None:
            wanted = [col for _, col in self.src.named_cols()] + self.src.extra_cols
            columns = [c for c in dict.fromkeys(wanted) if c in pf.schema_arrow.names]
        i = 0
        for group in range(pf.metadata.num_row_groups):
            # row group by row group: an unreadable one is one drop, the next ones are read
            first, n = i, pf.metadata.row_group(group).num_rows
            try:
                for batch in pf.iter_batches(batch_size=4096, row_groups=[group], columns=columns):
                    for row in batch.to_pylist():
                        yield i, row
                        i += 1
            except (pa.ArrowException, OSError) as exc:
                why = f"row group {group} unreadable ({type(exc).__name__}: {exc}); "
                why += f"rows {i} to {first + n - 1} not read"
                yield i, _BadRow("source_damaged", why[:500])
                i = max(i + 1, first + n)  # later rows keep their row numbers

    def _csv(self, delimiter: str) -> Iterator[tuple[int, dict[str, Any] | _BadRow]]:
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # the feed's caps bound records
        with _open_text(self.path, self.src.encoding) as fh:
            feed = _LineFeed(fh)
            reader = csv.reader(feed, delimiter=delimiter)
            try:
                header = next(reader, None)
            except (_Overrun, csv.Error) as exc:
                raise SourceError(f"{self.label}: unreadable header in {self.path}: {exc}") from exc
            if header is None:
                return  # an empty file: no header, no rows
            if _undecodable(header):
                raise SourceError(
                    f"{self.label}: the header of {self.path} does not decode as "
                    f"{self.src.encoding!r}; set `encoding`"
                )
            self._check(header)
            self._started = True
            width = len(header)
            i = 0
            while True:
                feed.start()
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except (_Overrun, csv.Error) as exc:
                    feed.drop()
                    yield i, _BadRow("bad_row", f"unparsable csv record: {exc}")
                    i += 1
                    continue
                if not cells:
                    continue  # a blank line (csv.DictReader skips them too)
                if any(_undecodable(c) for c in cells):
                    yield i, _BadRow("bad_encoding", f"bytes that are not {self.src.encoding}")
                    i += 1
                    continue
                out: dict[str, Any] = dict(zip(header, cells, strict=False))
                for name in header[len(cells) :]:
                    out[name] = None  # a short row (DictReader's restval)
                if len(cells) > width:
                    out["csv_overflow"] = delimiter.join(cells[width:])
                yield i, out
                i += 1

    def _jsonl(self) -> Iterator[tuple[int, dict[str, Any] | _BadRow]]:
        checked = False
        with _open_text(self.path, self.src.encoding) as fh:
            i = 0
            while line := fh.readline(MAX_RECORD_CHARS + 1):
                if len(line) > MAX_RECORD_CHARS:  # skip the rest of an over-long line
                    while line and not line.endswith(("\n", "\r")):
                        line = fh.readline(MAX_RECORD_CHARS + 1)
                    yield i, _BadRow("bad_row", f"line longer than {MAX_RECORD_CHARS} characters")
                    i += 1
                    continue
                if not line.strip():
                    continue
                if _undecodable(line):
                    yield i, _BadRow("bad_encoding", f"bytes that are not {self.src.encoding}")
                    i += 1
                    continue
                try:
                    obj = json.loads(line)
                except (ValueError, RecursionError):  # RecursionError: nested past the stack
                    obj = None
                if not isinstance(obj, dict):
                    yield i, _BadRow("bad_row", "not a JSON object")
                    i += 1
                    continue
                if "\\u" in line and _undecodable(obj):  # a `"\\udc80"` escape: no text
                    yield i, _BadRow("bad_encoding", "a JSON string escape of a lone surrogate")
                    i += 1
                    continue
                if not checked:
                    self._check(list(obj))  # jsonl has no header: the first object stands for it
                    checked = True
                yield i, obj
                i += 1


# extra[key] <- wikimedia_evidence's attribution field: Commons' statements on use
_WIKI_TERMS = {
    "wikimedia_restrictions": "restrictions",
    "wikimedia_attribution_required": "attribution_required",
    "wikimedia_usage_terms": "usage_terms",
    "wikimedia_copyrighted": "copyrighted",
}


def _carry(name: str) -> str:
    return f"input_{name}" if name in _SAMPLE_FIELDS else name


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):  # None / NaN cell
        return None
    text = " ".join(str(value).split())
    return text or None


def _row_licence(
    src: UrlListSource, row: dict[str, Any]
) -> tuple[list[LicenseEvidence], dict[str, Any]]:
    """Licence evidence and attribution (author, title, credit) a row carries, raw as
    everywhere in ingest: the licence filter normalises. A Flickr id that is not one stays raw
    input evidence (the filter then drops it as unknown); unreadable extmetadata adds nothing.
    `credit` is the attribution the licensor requests (CC BY 4.0 §3(a)(1)(A)(i)): Commons'
    `Attribution`, HTML stripped (its `Credit` is the file's source, e.g. "Own work").
    `terms`: Commons' statements that limit use (`_WIKI_TERMS`), for `extra`."""
    evidence: list[LicenseEvidence] = []
    attribution: dict[str, Any] = {}
    if src.extmetadata_col:
        ext = row.get(src.extmetadata_col)
        if isinstance(ext, str) and ext.strip():
            try:
                ext = json.loads(ext)
            except (ValueError, RecursionError):
                ext = None
        if isinstance(ext, dict):
            ev, wiki = wikimedia_evidence(ext)
            evidence += ev
            # statements that limit use without being a licence (personality rights,
            # trademarks, ...): raw in `extra`, so filters and the release can see them
            terms = {k: wiki.get(f) for k, f in _WIKI_TERMS.items() if wiki.get(f) is not None}
            attribution = {
                "terms": terms,
                "author": wiki.get("author"),
                "title": wiki.get("title"),
                "credit": wiki.get("attribution"),
            }
    cell = row.get(src.license_col) if src.license_col else None
    lic = _text(cell)
    if lic is not None:
        if src.license_format == "flickr":
            try:
                evidence.append(flickr_evidence(cell))  # type: ignore[arg-type]
            except ValueError:
                evidence.append(LicenseEvidence("input", "column", lic))
        else:
            evidence.append(LicenseEvidence("input", "column", lic))
    for key, col in (("author", src.author_col), ("title", src.title_col)):
        value = _text(row.get(col)) if col else None
        if value is not None:
            attribution[key] = value
    return evidence, attribution


def _row_sample(src: UrlListSource, path: Path, i: int, row: dict[str, Any] | _BadRow) -> Sample:
    if isinstance(row, _BadRow):
        s = Sample(
            key=make_key(f"bad-row:{path}:{i}"),
            url="",
            extra={"source_file": str(path), "source_row": i, "error": row.error},
        )
        s.drop(row.reason, "ingest")
        return s
    used = {col for _, col in src.named_cols()}
    raw_url = row.get(src.url_col)
    page = row.get(src.page_url_col) if src.page_url_col else None
    page_url = page.strip() if isinstance(page, str) and page.strip() else None
    caption = row.get(src.caption_col) if src.caption_col else None
    evidence, attribution = _row_licence(src, row)
    keep_cols = src.extra_cols
    extra = {
        _carry(k): v
        for k, v in row.items()
        if k not in used and (keep_cols is None or k in keep_cols)
    }
    ok = is_http_url(raw_url)
    url = raw_url.strip() if isinstance(raw_url, str) else ("" if raw_url is None else str(raw_url))
    s = Sample(
        key=make_key(url, page_url) if ok else make_key(f"bad-row:{path}:{i}"),
        url=url,
        page_url=page_url,
        alt_text=caption if caption is None or isinstance(caption, str) else str(caption),
        license_evidence=evidence,
        author=attribution.get("author"),
        title=attribution.get("title"),
        credit=attribution.get("credit"),
        source_url=page_url,
        extra={**extra, **attribution.get("terms", {})},
    )
    if not ok:
        s.extra.update(source_file=str(path), source_row=i)
        s.drop("bad_url", "ingest")
    return s


def iter_url_list(src: UrlListSource) -> Iterator[Sample]:
    for path in _expand(
        _label(src),
        src.path,
        tuple(_FORMATS) + tuple(f"{k}.gz" for k in _FORMATS),
        "a parquet/csv/tsv/jsonl file, a directory of them, or a glob",
    ):
        for i, row in _Rows(src, path):
            yield _row_sample(src, path, i, row)


# --------------------------------------------------------------------------- pages, WARCs
def _page_sample(url: str, where: str, i: int) -> Sample:
    url = url.strip()
    if _undecodable(url):  # bytes that are not UTF-8: the URL is not known, not fetched
        s = Sample(
            key=make_key(f"bad-row:{where}:{i}"),
            url=url.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
            mime="text/html",
            extra={"source_file": where, "source_row": i, "error": "bytes that are not utf-8"},
        )
        s.drop("bad_encoding", "ingest")
        return s
    if is_http_url(url):
        return Sample(key=make_key(url), url=url, page_url=url, source_url=url, mime="text/html")
    s = Sample(
        key=make_key(f"bad-row:{where}:{i}"),
        url=url,
        mime="text/html",
        extra={"source_file": where, "source_row": i},
    )
    s.drop("bad_url", "ingest")
    return s


def iter_pages(src: PageListSource) -> Iterator[Sample]:
    for i, url in enumerate(src.urls):
        yield _page_sample(url, "urls", i)
    if src.path is not None:
        for path in _expand(
            _label(src),
            src.path,
            (".txt", ".txt.gz"),
            "a text file of page URLs (one a line), a directory or a glob",
        ):
            i = 0
            try:
                with _open_text(path) as fh:
                    for line in fh:
                        line = line.strip()
                        if not line or line.startswith("#"):
                            continue
                        yield _page_sample(line, str(path), i)
                        i += 1
            except _READ_ERRORS as exc:
                if not i:
                    raise SourceError(f"{_label(src)}: cannot read {path}: {exc}") from exc
                s = Sample(  # a damaged tail: the lines before it stay, as for URL lists
                    key=make_key(f"bad-row:{path}:{i}"),
                    url="",
                    mime="text/html",
                    extra={"source_file": str(path), "source_row": i, "error": str(exc)[:500]},
                )
                s.drop("source_damaged", "ingest")
                yield s


def iter_warcs(src: WarcSource, stats: Counter[str] | None = None) -> Iterator[Sample]:
    for path in _expand(
        _label(src),
        src.path,
        _WARC_SUFFIXES,
        _WARC_WHAT,
    ):
        yield from iter_warc(
            path, stats=stats, user_agent_token=src.user_agent_token, fmt=src.format
        )


def iter_source(
    src: UrlListSource | WarcSource | PageListSource, stats: Counter[str] | None = None
) -> Iterator[Sample]:
    """The records of one source, streamed. Bad config raises ValueError naming source and cause.

    `stats` (optional) collects WARC counters (see `ccurate.ingest.warc.STATS`).
    """
    if isinstance(src, UrlListSource):
        return iter_url_list(src)
    if isinstance(src, WarcSource):
        return iter_warcs(src, stats)
    if isinstance(src, PageListSource):
        return iter_pages(src)
    raise SourceError(f"unknown source type {type(src).__name__}; expected urls, warc or pages")


def check_source(src: UrlListSource | WarcSource | PageListSource) -> None:
    """Fail fast on bad config: files exist, formats are known, URL-list columns are there."""
    if isinstance(src, UrlListSource):
        for path in _expand(
            _label(src),
            src.path,
            tuple(_FORMATS) + tuple(f"{k}.gz" for k in _FORMATS),
            "a parquet/csv/tsv/jsonl file, a directory of them, or a glob",
        ):
            rows = _Rows(src, path).__iter__()
            try:
                next(rows, None)  # reads the header (or first object) and checks the columns
            finally:
                rows.close()
    elif isinstance(src, WarcSource):
        _expand(
            _label(src),
            src.path,
            _WARC_SUFFIXES,
            _WARC_WHAT,
        )
    elif isinstance(src, PageListSource) and src.path is not None:
        _expand(
            _label(src),
            src.path,
            (".txt", ".txt.gz"),
            "a text file of page URLs (one a line), a directory or a glob",
        )


# --------------------------------------------------------------------------- the plan
class _KeySet:
    """Keys seen so far at 8 bytes each: a small hash set spilled into a sorted uint64 array."""

    def __init__(self, spill: int = 1 << 20) -> None:
        self.spill = spill
        self.recent: set[int] = set()
        self.frozen = np.empty(0, dtype=np.uint64)

    def add(self, key: str) -> bool:
        """True when the key is new (and now recorded)."""
        k = int(key, 16)
        if k in self.recent:
            return False
        if self.frozen.size:
            i = int(np.searchsorted(self.frozen, np.uint64(k)))
            if i < self.frozen.size and int(self.frozen[i]) == k:
                return False
        self.recent.add(k)
        if len(self.recent) >= self.spill:
            fresh = np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent))
            self.frozen = np.union1d(self.frozen, fresh)
            self.recent.clear()
        return True


def _coerce_extras(samples: list[Sample]) -> None:
    """Make every extra column single-typed (JSON strings where Python types mix)."""
    kinds: dict[str, set[type]] = {}
    for s in samples:
        for k, v in s.extra.items():
            if v is not None:
                kinds.setdefault(k, set()).add(type(v))
    mixed = {k for k, t in kinds.items() if len(t) > 1 or t & {dict, list}}
    for s in samples:
        for k in mixed & s.extra.keys():
            v = s.extra[k]
            if v is not None and not isinstance(v, str):
                s.extra[k] = json.dumps(v, default=str, ensure_ascii=False)


def _safe_table(samples: list[Sample]) -> pa.Table:
    try:
        return samples_to_table(samples)
    except (pa.ArrowException, TypeError, ValueError):
        _coerce_extras(samples)
        return samples_to_table(samples)


def _unify(schemas: list[pa.Schema]) -> pa.Schema:
    """One schema for all chunks: same-typed columns keep their type, conflicts become string."""
    order: list[str] = []
    types: dict[str, list[pa.DataType]] = {}
    for sch in schemas:
        for f in sch:
            if f.name not in types:
                order.append(f.name)
                types[f.name] = []
            if not pa.types.is_null(f.type):
                types[f.name].append(f.type)
    out = []
    for name in order:
        ts = types[name]
        t = ts[0] if ts and all(x == ts[0] for x in ts) else (pa.null() if not ts else pa.string())
        out.append(pa.field(name, t))
    return pa.schema(out)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    cols = []
    for f in schema:
        if f.name not in table.column_names:
            cols.append(pa.nulls(len(table), f.type))
            continue
        col = table.column(f.name)
        if col.type != f.type:
            try:
                col = col.cast(f.type)
            except (pa.ArrowException, NotImplementedError):
                col = pa.array(
                    [None if v is None else json.dumps(v, default=str) for v in col.to_pylist()],
                    type=f.type,
                )
        cols.append(col)
    return pa.table(cols, schema=schema)


class _DroppedSink:
    """Dropped plan records, spilled in chunks and merged into one parquet at the end."""

    def __init__(self, out_dir: Path, chunk: int) -> None:
        self.tmp = out_dir / ".planned-dropped.tmp"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.chunk = max(1, chunk)
        self.buf: list[Sample] = []
        self.files: list[Path] = []
        self.count = 0

    def add(self, s: Sample) -> None:
        self.buf.append(s)
        self.count += 1
        if len(self.buf) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            f = self.tmp / f"{len(self.files):05d}.parquet"
            pq.write_table(_safe_table(self.buf), f)
            self.files.append(f)
            self.buf = []

    def finish(self, path: Path) -> None:
        self.flush()
        if not self.files:
            with atomic_path(path) as tmp:
                pq.write_table(samples_to_table([]), tmp, compression="zstd")
        else:
            schema = _unify([pq.read_schema(f) for f in self.files])
            with atomic_path(path) as tmp:
                writer = pq.ParquetWriter(tmp, schema, compression="zstd")
                try:
                    for f in self.files:
                        for batch in pq.ParquetFile(f).iter_batches(batch_size=self.chunk):
                            writer.write_table(_conform(pa.Table.from_batches([batch]), schema))
                finally:
                    writer.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _source_spec(src: Section) -> dict[str, Any]:
    """A source's settings for the plan fingerprint; `encoding` only when it is not the
    default, so plans made before the setting existed still match their config."""
    spec = src.model_dump(mode="json")
    if isinstance(src, UrlListSource) and spec.get("encoding") == "utf-8":
        del spec["encoding"]
    return spec


def _fingerprint(sources: Iterable[Section], partition_size: int) -> str:
    spec = json.dumps(
        {"sources": [_source_spec(s) for s in sources], "partition_size": partition_size},
        sort_keys=True,
    )
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _clear_plan(out_dir: Path) -> None:
    """Remove what an unfinished earlier plan left (only files with our names)."""
    for p in out_dir.iterdir():
        if (
            _PART_RE.match(p.name)
            or p.name == PLANNED_DROPPED
            or p.name.startswith(f".{PLANNED_DROPPED}")
        ):
            p.unlink()
    shutil.rmtree(out_dir / ".planned-dropped.tmp", ignore_errors=True)


def plan_sources(
    sources: list[UrlListSource | WarcSource | PageListSource],
    out_dir: str | Path,
    partition_size: int = 1000,
) -> list[str]:
    """Stream all sources into parquet partitions `out_dir/part-00000...`; return their prefixes.

    Partitions hold only records to fetch (each with a `.done` marker, so
    `ccurate.shardio.list_shards(out_dir)` finds them). Dropped records
    (`bad_url`, `bad_row`, `duplicate_url`, WARC opt-outs and page errors) go to
    `out_dir/planned-dropped.parquet`. Keys are unique across the plan: a
    repeated (url, page_url) is dropped as `duplicate_url`. The marker
    `_PLANNED` (json: partitions with counts, drops, per-source counts) is
    written last; when it exists the recorded partitions are returned without
    reading any source. A marker from different sources is an error.
    """
    if partition_size < 1:
        raise ValueError(f"partition_size must be >= 1, got {partition_size}")
    out = Path(out_dir)
    fp = _fingerprint(sources, partition_size)
    marker = out / PLANNED_MARKER
    if marker.exists():
        with open(marker) as fh:
            done = json.load(fh)
        if done.get("config") != fp:
            raise ValueError(
                f"{out} already holds a plan of other sources or partition size "
                f"(marker {marker}); plan into a fresh directory or delete it"
            )
        return [str(out / p["name"]) for p in done["partitions"]]
    for src in sources:
        check_source(src)
    out.mkdir(parents=True, exist_ok=True)
    _clear_plan(out)

    keys = _KeySet()
    dropped = _DroppedSink(out, partition_size)
    drops: Counter[str] = Counter()
    warc_stats: Counter[str] = Counter()
    parts: list[dict[str, Any]] = []
    per_source: list[dict[str, Any]] = []
    buf: list[Sample] = []

    def flush() -> None:
        name = PARTITION_FMT.format(len(parts))
        prefix = out / name
        try:
            write_partition(prefix, buf)
        except (pa.ArrowException, TypeError, ValueError):
            _coerce_extras(buf)
            write_partition(prefix, buf)
        stats = StageStats("plan", n_in=len(buf), n_kept=len(buf), shards=1)
        write_json_atomic(f"{prefix}.done", stats.to_json())
        parts.append({"name": name, "count": len(buf)})
        buf.clear()

    repeats: Counter[str] = Counter()  # repeats are rare: a counter of them only
    for src in sources:
        n = n_todo = 0
        for s in iter_source(src, warc_stats):
            n += 1
            if not keys.add(s.key):
                # keys stay unique across partitions and side file: the repeat is re-keyed and
                # points at the first record; a record dropped for another reason keeps it
                if s.kept:
                    s.drop("duplicate_url", "ingest")
                # the n-th repeat of its key: stable when unrelated rows come and go (the
                # drop count so far re-keyed it whenever an earlier row changed status)
                repeats[s.key] += 1
                s.duplicate_of = s.key
                s.key = make_key(f"dup:{s.key}:{repeats[s.key]}")
            if not s.kept:
                drops[s.drop_reason or "dropped"] += 1
                dropped.add(s)
                continue
            n_todo += 1
            buf.append(s)
            if len(buf) >= partition_size:
                flush()
        per_source.append({"source": _label(src), "records": n, "to_fetch": n_todo})
    if buf:
        flush()
    dropped.finish(out / PLANNED_DROPPED)
    write_json_atomic(
        marker,
        {
            "version": 1,
            "config": fp,
            "partition_size": partition_size,
            "partitions": parts,
            "prefixes": [p["name"] for p in parts],
            "counts": [p["count"] for p in parts],
            "total": sum(p["count"] for p in parts),
            "drops": dict(sorted(drops.items())),
            "dropped": dropped.count,
            "dropped_file": PLANNED_DROPPED,
            "sources": per_source,
            "warc": dict(sorted(warc_stats.items())),
        },
    )
    return [str(out / p["name"]) for p in parts]
