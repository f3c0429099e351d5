"""Damaged and awkward URL lists: every row ends kept or dropped with a counted reason.

A stray quote, a cut .gz, a bad parquet row group or bytes in another encoding cost the
rows they touch (dropped with `bad_row`, `source_damaged`, `bad_encoding`), never the rest
of the file or the plan; Flickr ids as pandas writes them and Commons' restrictions on use
reach the record.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from ccurate.ingest import sources
from ccurate.ingest.sources import (
    PLANNED_MARKER,
    REASONS,
    PageListSource,
    UrlListSource,
    iter_source,
    iter_url_list,
    plan_sources,
)
from ccurate.record import Sample


def _rows(src: UrlListSource) -> list[Sample]:
    out = list(iter_url_list(src))
    for s in out:
        assert s.kept or s.drop_reason in REASONS, s.drop_reason
    return out


# --------------------------------------------------------------------------- finding 2
def test_unclosed_quote_costs_one_row_not_the_rest_of_the_file(tmp_path: Path) -> None:
    lines = ["url,caption"] + [f"http://x.example/{i}.jpg,caption {i}" for i in range(1000)]
    lines[11] = 'http://x.example/10.jpg,"The Road to'  # a truncated, quoted caption
    lines[600] = 'http://x.example/599.jpg,"a caption\nover two lines, with ""quotes"""'
    path = tmp_path / "list.csv"
    path.write_text("\n".join(lines) + "\n")
    out = _rows(UrlListSource(path=str(path)))
    assert len(out) == 1000  # one outcome per data row
    bad = [s for s in out if not s.kept]
    assert [(s.drop_reason, s.extra["source_row"]) for s in bad] == [("bad_row", 10)]
    assert "quote" in bad[0].extra["error"] or "lines" in bad[0].extra["error"]
    by_url = {s.url: s for s in out if s.kept}
    assert by_url["http://x.example/11.jpg"].alt_text == "caption 11"  # parsed again
    assert by_url["http://x.example/599.jpg"].alt_text == (
        'a caption\nover two lines, with "quotes"'
    )
    assert max(len(s.alt_text or "") for s in out) < 100


def test_quote_open_at_the_end_and_overlong_records_are_bad_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a quote still open when the file ends: csv would keep the rest of the file as the field
    path = tmp_path / "tail.tsv"
    path.write_text('url\tcaption\nhttp://a.test/1.jpg\t"open\nhttp://a.test/2.jpg\tfine\n')
    out = _rows(UrlListSource(path=str(path)))
    assert [(s.url, s.drop_reason) for s in out] == [
        ("", "bad_row"),
        ("http://a.test/2.jpg", None),
    ]
    # a record past MAX_RECORD_CHARS, even a single physical line, is read in bounded parts
    monkeypatch.setattr(sources, "MAX_RECORD_CHARS", 1000)
    path = tmp_path / "long.csv"
    path.write_text(
        "url,caption\nhttp://a.test/1.jpg,ok\n"
        f"http://a.test/2.jpg,{'x' * 5000}\n"
        f'http://a.test/3.jpg,"{"y" * 300}\n{"z" * 900}"\n'
        "http://a.test/4.jpg,ok\n"
    )
    out = _rows(UrlListSource(path=str(path)))
    assert [(s.url[:20], s.drop_reason) for s in out] == [
        ("http://a.test/1.jpg", None),
        ("", "bad_row"),
        ("", "bad_row"),
        ("z" * 20, "bad_url"),  # the record's second line, parsed again as a row of its own
        ("http://a.test/4.jpg", None),
    ]
    jl = tmp_path / "long.jsonl"
    jl.write_text(
        json.dumps({"url": "http://a.test/1.jpg", "caption": "z" * 5000})
        + "\n"
        + json.dumps({"url": "http://a.test/2.jpg"})
        + "\n"
    )
    out = _rows(UrlListSource(path=str(jl)))
    assert [(s.url, s.drop_reason) for s in out] == [("", "bad_row"), ("http://a.test/2.jpg", None)]


# --------------------------------------------------------------------------- finding 5
def test_flickr_ids_written_by_pandas_are_read(tmp_path: Path) -> None:
    path = tmp_path / "flickr.csv"
    path.write_text(
        "url,license\nhttp://a.test/1.jpg,4.0\nhttp://a.test/2.jpg,\n"
        "http://a.test/3.jpg,9.0\nhttp://a.test/4.jpg,4.5\n"
    )
    out = _rows(UrlListSource(path=str(path), license_col="license", license_format="flickr"))
    ev = [[(e.scope, e.kind, e.value) for e in s.license_evidence] for s in out]
    assert ev == [
        [("metadata", "flickr", "flickr:4")],
        [],
        [("metadata", "flickr", "flickr:9")],
        [("input", "column", "4.5")],  # not a licence id: raw, the filter refuses it
    ]


# --------------------------------------------------------------------------- finding 6
def _cut(blob: bytes, lose: int) -> bytes:
    return blob[: len(blob) - lose]


def test_truncated_gz_lists_keep_their_rows_and_the_plan_goes_on(tmp_path: Path) -> None:
    jl = tmp_path / "cut.jsonl.gz"
    jl.write_bytes(
        _cut(
            gzip.compress(
                "".join(
                    json.dumps({"url": f"http://j.test/{i}.jpg", "caption": f"c{i}"}) + "\n"
                    for i in range(5000)
                ).encode()
            ),
            40,
        )
    )
    cs = tmp_path / "cut.csv.gz"
    cs.write_bytes(
        _cut(
            gzip.compress(
                b"url,caption\n" + b"".join(b"http://c.test/%d.jpg,c\n" % i for i in range(3000))
            ),
            3000,
        )
    )
    good = tmp_path / "good.csv"
    good.write_text("url\n" + "".join(f"http://ok.test/{i}.jpg\n" for i in range(10)))
    plan = tmp_path / "plan"
    srcs = [UrlListSource(path=str(p)) for p in (jl, cs, good)]
    plan_sources(srcs, plan, 1000)
    marker = json.loads((plan / PLANNED_MARKER).read_text())
    assert marker["drops"] == {"source_damaged": 2}
    counts = [s["to_fetch"] for s in marker["sources"]]
    assert counts[0] > 4000 and counts[1] > 100 and counts[2] == 10
    dropped = pq.read_table(plan / sources.PLANNED_DROPPED).to_pylist()
    assert sorted(Path(r["source_file"]).name for r in dropped) == ["cut.csv.gz", "cut.jsonl.gz"]
    assert all("not read" in r["error"] for r in dropped)
    # a page list cut the same way keeps its lines too
    pages = tmp_path / "pages.txt.gz"
    pages.write_bytes(
        _cut(gzip.compress(b"".join(b"https://p.test/%d\n" % i for i in range(3000))), 200)
    )
    out = list(iter_source(PageListSource(path=str(pages))))
    assert out[-1].drop_reason == "source_damaged" and all(s.kept for s in out[:-1])
    assert len(out) > 100


def test_unreadable_parquet_row_group_is_one_drop(tmp_path: Path) -> None:
    path = tmp_path / "l.parquet"
    table = pa.table(
        {
            "url": [f"http://x.test/{i}.jpg" for i in range(300)],
            "caption": [f"caption number {i} " * 5 for i in range(300)],
        }
    )
    pq.write_table(table, path, row_group_size=100, compression="zstd")
    col = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    blob = bytearray(path.read_bytes())
    blob[start + 20 : start + col.total_compressed_size - 5] = b"U" * (
        col.total_compressed_size - 25
    )
    path.write_bytes(bytes(blob))
    out = _rows(UrlListSource(path=str(path)))
    bad = [s for s in out if not s.kept]
    assert [(s.drop_reason, s.extra["source_row"]) for s in bad] == [("source_damaged", 100)]
    kept = {s.url for s in out if s.kept}
    assert len(kept) == 200 and "http://x.test/99.jpg" in kept and "http://x.test/200.jpg" in kept


# --------------------------------------------------------------------------- finding 7
def test_bytes_in_another_encoding_are_dropped_or_decoded_as_configured(tmp_path: Path) -> None:
    path = tmp_path / "list.csv"
    path.write_bytes(
        "url,caption\nhttp://x.test/caf\xe9.jpg,Caf\xe9 cr\xe8me \u20ac5\nhttp://x.test/a.jpg,plain\n".encode(
            "cp1252"
        )
    )
    out = _rows(UrlListSource(path=str(path)))
    assert [(s.url, s.drop_reason) for s in out] == [
        ("", "bad_encoding"),
        ("http://x.test/a.jpg", None),
    ]
    assert not any("\ufffd" in (s.url + (s.alt_text or "")) for s in out)
    out = _rows(UrlListSource(path=str(path), encoding="cp1252"))
    assert (out[0].url, out[0].alt_text) == (
        "http://x.test/caf\xe9.jpg",
        "Caf\xe9 cr\xe8me \u20ac5",
    )
    jl = tmp_path / "l.jsonl"
    jl.write_bytes(
        b'{"url": "http://x.test/\xff.jpg"}\n{"url": "http://x.test/\\udc80.jpg"}\n'
        b'{"url": "http://x.test/ok.jpg", "caption": "caf\xc3\xa9"}\n'
    )
    out = _rows(UrlListSource(path=str(jl)))
    assert [s.drop_reason for s in out] == ["bad_encoding", "bad_encoding", None]
    assert out[2].alt_text == "caf\xe9"
    plan_sources([UrlListSource(path=str(jl))], tmp_path / "plan")  # parquet-writable
    with pytest.raises(ValidationError, match="unknown text encoding"):
        UrlListSource(path=str(path), encoding="latin-9000")
    with pytest.raises(ValidationError, match="not a text encoding"):
        UrlListSource(path=str(path), encoding="base64")


# --------------------------------------------------------------------------- finding 8
def test_commons_restrictions_reach_extra_and_the_plan(tmp_path: Path) -> None:
    ext = {
        "LicenseUrl": {"value": "https://creativecommons.org/licenses/by-sa/4.0"},
        "Restrictions": {"value": "personality|trademarked"},
        "AttributionRequired": {"value": "true"},
        "UsageTerms": {"value": "Creative Commons Attribution-Share Alike 4.0"},
        "Copyrighted": {"value": "True"},
    }
    path = tmp_path / "c.jsonl"
    path.write_text(
        json.dumps({"url": "http://w.test/a.jpg", "ext": ext})
        + "\n"
        + json.dumps({"url": "http://w.test/b.jpg", "ext": {"License": {"value": "cc0"}}})
        + "\n"
    )
    src = UrlListSource(path=str(path), extmetadata_col="ext")
    a, b = _rows(src)
    assert a.extra == {
        "wikimedia_restrictions": "personality|trademarked",
        "wikimedia_attribution_required": True,
        "wikimedia_usage_terms": "Creative Commons Attribution-Share Alike 4.0",
        "wikimedia_copyrighted": True,
    }
    assert b.extra == {}
    # restrictions are no licence evidence
    assert [e.value for e in a.license_evidence] == [
        "https://creativecommons.org/licenses/by-sa/4.0"
    ]
    (part,) = plan_sources([src], tmp_path / "plan")
    rows = pq.read_table(f"{part}.parquet").to_pylist()
    assert rows[0]["wikimedia_restrictions"] == "personality|trademarked"
    assert rows[1]["wikimedia_restrictions"] is None
