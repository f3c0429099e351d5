"""Ingest sources (URL lists, WARCs, page lists) and the partition plan (ingest.sources)."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import tracemalloc
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydantic import TypeAdapter, ValidationError

from ccurate.ingest.sources import (
    PLANNED_DROPPED,
    PLANNED_MARKER,
    REASONS,
    PageListSource,
    Source,
    UrlListSource,
    WarcSource,
    iter_source,
    plan_sources,
)
from ccurate.record import make_key, table_to_samples
from ccurate.shardio import iter_samples, list_shards

LAION = "laion_sample_10000.parquet"


@pytest.fixture(scope="module")
def laion_rows(real_fixtures: Path) -> list[dict]:
    return pq.read_table(real_fixtures / LAION).to_pylist()


def laion_src(real_fixtures: Path, **kw) -> UrlListSource:
    return UrlListSource(path=str(real_fixtures / LAION), url_col="URL", caption_col="TEXT", **kw)


# --------------------------------------------------------------------------- URL lists
def test_laion_parquet_every_row_is_a_record(real_fixtures: Path, laion_rows):
    samples = list(iter_source(laion_src(real_fixtures)))
    assert len(samples) == len(laion_rows) == 10_000
    for row, s in zip(laion_rows, samples, strict=True):
        assert s.url == row["URL"].strip() and s.alt_text == row["TEXT"]
        assert s.extra["__index_level_0__"] == row["__index_level_0__"]  # carried through
    dropped = [s for s in samples if not s.kept]
    assert dropped, "the real sample holds a row without a URL"
    for s in dropped:
        assert s.drop_reason == "bad_url" and s.drop_reason in REASONS
        assert not s.url.startswith(("http://", "https://"))
        assert laion_rows[s.extra["source_row"]]["URL"] == s.url
    kept = [s for s in samples if s.kept]
    assert all(s.key == make_key(s.url) for s in kept)
    assert len({s.key for s in dropped}) == len(dropped)


def test_default_caption_column_may_be_missing_others_may_not(real_fixtures: Path):
    src = UrlListSource(path=str(real_fixtures / LAION), url_col="URL")  # caption_col="caption"
    first = next(iter_source(src))
    assert first.alt_text is None and "TEXT" in first.extra
    with pytest.raises(ValueError, match=r"'alt'.*caption_col"):
        list(
            iter_source(
                UrlListSource(path=str(real_fixtures / LAION), url_col="URL", caption_col="alt")
            )
        )
    with pytest.raises(ValueError, match=r"urls source .*laion.*'url'.*URL"):
        list(iter_source(UrlListSource(path=str(real_fixtures / LAION))))
    with pytest.raises(ValueError, match=r"'lic'.*license_col"):
        list(iter_source(laion_src(real_fixtures, license_col="lic")))
    with pytest.raises(ValueError, match=r"missing\.parquet.*not found"):
        list(iter_source(UrlListSource(path="/nonexistent/missing.parquet")))
    with pytest.raises(ValueError, match=r"format"):
        list(iter_source(UrlListSource(path=str(real_fixtures / "README.md"))))


def _write_lists(tmp: Path, rows: list[dict]) -> dict[str, Path]:
    cols = list(rows[0])
    paths = {
        "csv": tmp / "l.csv",
        "tsv": tmp / "l.tsv",
        "jsonl": tmp / "l.jsonl.gz",
        "csvgz": tmp / "l.csv.gz",
    }
    for key, delim in (("csv", ","), ("tsv", "\t")):
        with open(paths[key], "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, cols, delimiter=delim)
            w.writeheader()
            w.writerows(rows)
    with gzip.open(paths["csvgz"], "wt", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, cols)
        w.writeheader()
        w.writerows(rows)
    with gzip.open(paths["jsonl"], "wt", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return paths


def test_csv_tsv_jsonl_gz_agree_with_parquet(tmp_path: Path, laion_rows, real_fixtures: Path):
    rows = [
        {
            "url": r["URL"],
            "caption": r["TEXT"],
            "lic": "CC BY 4.0" if i % 2 else "",
            "page": f"https://shop.example/p/{i}",
            "status": "in stock",
            "shop": f"s{i % 3}",
        }
        for i, r in enumerate(laion_rows[:300])
    ]
    paths = _write_lists(tmp_path, rows)
    results = {}
    for name, path in paths.items():
        src = UrlListSource(path=str(path), license_col="lic", page_url_col="page")
        results[name] = list(iter_source(src))
    ref = results["csv"]
    assert len(ref) == 300
    for name, samples in results.items():
        assert [(s.key, s.url, s.alt_text, s.page_url, s.status) for s in samples] == [
            (s.key, s.url, s.alt_text, s.page_url, s.status) for s in ref
        ], name
    for r, s in zip(rows, ref, strict=True):
        assert s.page_url == s.source_url == r["page"]
        if s.kept:
            assert s.key == make_key(r["url"], r["page"])
        ev = [(e.scope, e.kind, e.value) for e in s.license_evidence]
        assert ev == ([("input", "column", "CC BY 4.0")] if r["lic"] else [])
        # a column named like a Sample field is carried under a prefixed name
        assert s.extra == {"input_status": "in stock", "shop": r["shop"]}
        assert s.status in ("ok", "dropped")
    only = UrlListSource(path=str(paths["tsv"]), extra_cols=["shop"])
    assert next(iter_source(only)).extra == {"shop": "s0"}


def test_bad_rows_are_recorded_not_dropped_silently(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"url": "https://a.test/1.jpg", "n": 1}),
                json.dumps({"url": "", "n": 2}),
                json.dumps({"url": "ftp://a.test/x.jpg", "n": 3}),
                json.dumps({"url": 17, "n": 4}),
                json.dumps({"n": 5}),
                "{not json",
                "[1, 2]",
                "",
                "[" * 100_000 + "]" * 100_000,  # nested past the stack: RecursionError
                '{"a": ' * 50_000 + "1" + "}" * 50_000,
                json.dumps({"url": " https://a.test/2.jpg ", "n": "six", "deep": {"a": [1]}}),
            ]
        )
    )
    out = list(iter_source(UrlListSource(path=str(path))))
    assert [(s.kept, s.drop_reason) for s in out] == [
        (True, None),
        (False, "bad_url"),
        (False, "bad_url"),
        (False, "bad_url"),
        (False, "bad_url"),
        (False, "bad_row"),
        (False, "bad_row"),
        (False, "bad_row"),
        (False, "bad_row"),
        (True, None),
    ]
    assert out[-1].url == "https://a.test/2.jpg"
    assert len({s.key for s in out}) == len(out)
    assert all("source_row" in s.extra for s in out if not s.kept)


def test_url_list_reading_is_streamed(tmp_path: Path, real_fixtures: Path):
    path = tmp_path / "big.csv.gz"
    n = 6_000
    with gzip.open(path, "wt", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["url", "caption", "x"])
        for i in range(n):
            w.writerow([f"https://img.example/{i}.jpg", f"caption number {i} " * 3, i])
    for src in (UrlListSource(path=str(path)), laion_src(real_fixtures)):
        tracemalloc.start()
        count = sum(1 for _ in iter_source(src))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert count in (n, 10_000)
        # holding every record takes 14 MB (csv) / 24 MB (LAION); streaming stays under 5
        assert peak < 5e6, peak


def test_page_list_and_warc_sources(tmp_path: Path, real_fixtures: Path):
    listing = tmp_path / "pages.txt"
    listing.write_text("# pages\nhttps://a.test/one\n\nnot-a-url\nhttp://b.test/two\n")
    out = list(iter_source(PageListSource(urls=["https://c.test/x"], path=str(listing))))
    assert [(s.url, s.kept) for s in out] == [
        ("https://c.test/x", True),
        ("https://a.test/one", True),
        ("not-a-url", False),
        ("http://b.test/two", True),
    ]
    for s in out:
        assert s.mime == "text/html"
        if s.kept:
            assert s.key == make_key(s.url) and s.page_url == s.url
    warcs = tmp_path / "w"
    warcs.mkdir()
    for name in ("cc-main-2024-22-wikipedia-escopete.warc.gz", "clipped-response.warc.gz"):
        shutil.copy(real_fixtures / name, warcs / name)
    by_dir = list(iter_source(WarcSource(path=str(warcs))))
    by_glob = list(iter_source(WarcSource(path=str(warcs / "*.warc.gz"))))
    assert [s.key for s in by_dir] == [s.key for s in by_glob]
    assert sum(not s.kept for s in by_dir) == 1  # the clipped page
    with pytest.raises(ValueError, match="no file"):
        list(iter_source(WarcSource(path=str(tmp_path / "*.warc"))))


def test_source_configs_are_a_discriminated_union(real_fixtures: Path):
    ta = TypeAdapter(list[Source])
    got = ta.validate_python(
        [
            {"type": "warc", "path": "x.warc.gz"},
            {"type": "pages", "urls": ["https://a.test/"]},
            {"type": "urls", "path": "l.parquet", "url_col": "URL", "caption_col": None},
        ]
    )
    assert [type(s) for s in got] == [WarcSource, PageListSource, UrlListSource]
    with pytest.raises(ValidationError):
        ta.validate_python([{"type": "urls", "path": "x", "colum": "typo"}])
    with pytest.raises(ValidationError):
        ta.validate_python([{"type": "ftp"}])


# --------------------------------------------------------------------------- the plan
def _plan_inputs(tmp: Path, real_fixtures: Path) -> list:
    # the first 5,000 real LAION rows (they hold a repeated URL and a row without one)
    laion = tmp / "laion5k.parquet"
    pq.write_table(pq.read_table(real_fixtures / LAION).slice(0, 5000), laion)
    dup = tmp / "dups.jsonl"
    dup.write_text(
        json.dumps({"url": "https://a.test/1.jpg", "k": 1})
        + "\n"
        + json.dumps({"url": "https://a.test/1.jpg", "k": "two"})
        + "\n"
        + json.dumps({"url": "", "k": 3})
        + "\n"
    )
    return [
        UrlListSource(path=str(laion), url_col="URL", caption_col="TEXT"),
        UrlListSource(path=str(dup)),
        WarcSource(path=str(real_fixtures / "*.warc.gz")),
        PageListSource(urls=["https://p.test/a", "https://p.test/a"]),
    ]


def _plan_content(prefixes: list[str]) -> list[list[tuple]]:
    out = []
    for p in prefixes:
        samples = table_to_samples(pq.read_table(f"{p}.parquet"))
        out.append([(s.key, s.url, s.page_url, s.alt_text) for s in samples])
    return out


def test_plan_is_deterministic_unique_and_published(tmp_path: Path, real_fixtures: Path):
    sources = _plan_inputs(tmp_path, real_fixtures)
    a = plan_sources(sources, tmp_path / "a", partition_size=1500)
    b = plan_sources(sources, tmp_path / "b", partition_size=1500)
    assert [Path(p).name for p in a] == [f"part-{i:05d}" for i in range(len(a))]
    assert _plan_content(a) == _plan_content(b)
    marker = json.loads((tmp_path / "a" / PLANNED_MARKER).read_text())
    counts = [len(c) for c in _plan_content(a)]
    assert marker["counts"] == counts and all(c == 1500 for c in counts[:-1])
    assert marker["total"] == sum(counts)
    assert [str(p) for p in list_shards(tmp_path / "a")] == a  # .done markers, dropped file skipped
    dropped = table_to_samples(pq.read_table(tmp_path / "a" / PLANNED_DROPPED))
    assert marker["dropped"] == len(dropped)
    reasons: dict[str, int] = {}
    for s in dropped:
        reasons[str(s.drop_reason)] = reasons.get(str(s.drop_reason), 0) + 1
    assert reasons == marker["drops"]
    assert reasons["duplicate_url"] >= 3  # LAION's own repeat, the jsonl repeat, the page repeat
    assert reasons["bad_url"] >= 2 and reasons["page_error"] == 1
    # every key once across partitions and side file; repeats point at the first
    todo_keys = [k for part in _plan_content(a) for k, *_ in part]
    all_keys = todo_keys + [s.key for s in dropped]
    assert len(all_keys) == len(set(all_keys))
    for s in dropped:
        if s.drop_reason == "duplicate_url":
            assert s.duplicate_of in set(todo_keys)
    # no input record is lost: records in = to-do + dropped
    assert sum(src["records"] for src in marker["sources"]) == len(all_keys)
    # partitions are readable by the executor's shard reader (no images: parquet-only)
    first = next(iter_samples(a[0], batch_size=100))
    assert len(first) == 100 and all(s.image is None for s in first)


def test_plan_rerun_is_idempotent_and_resumes(tmp_path: Path, real_fixtures: Path):
    sources = _plan_inputs(tmp_path, real_fixtures)
    out = tmp_path / "plan"
    # an earlier run died half way: stale partitions, no marker
    out.mkdir()
    (out / "part-00042.parquet").write_bytes(b"junk")
    (out / "part-00042.done").write_text("{}")
    (out / "keep-me.txt").write_text("not ours")
    first = plan_sources(sources, out, partition_size=2000)
    assert not (out / "part-00042.parquet").exists() and (out / "keep-me.txt").exists()
    mtimes = {p: Path(f"{p}.parquet").stat().st_mtime_ns for p in first}
    # with the marker present nothing is read or rewritten, even if an input vanished
    (tmp_path / "dups.jsonl").unlink()
    again = plan_sources(sources, out, partition_size=2000)
    assert again == first
    assert {p: Path(f"{p}.parquet").stat().st_mtime_ns for p in again} == mtimes
    with pytest.raises(ValueError, match="other sources"):
        plan_sources(sources, out, partition_size=10)


def test_plan_bad_config_fails_before_writing(tmp_path: Path, real_fixtures: Path):
    out = tmp_path / "plan"
    with pytest.raises(ValueError, match=r"'nope'.*url_col"):
        plan_sources(
            [
                PageListSource(urls=["https://a.test/"]),
                UrlListSource(path=str(real_fixtures / LAION), url_col="nope"),
            ],
            out,
        )
    assert not out.exists()
    with pytest.raises(ValueError, match="partition_size"):
        plan_sources([], out, partition_size=0)


# --------------------------------------------------------------------------- bad inputs, options
def test_unreadable_or_misconfigured_lists_name_the_source_and_the_cause(tmp_path: Path):
    """Every one fails in `check_source` (before a plan is written) with a message that says
    which source, which file and what to do."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no list here")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    raw = gzip.compress(
        b"url,caption\n" + b"".join(b"https://a.test/%d.jpg,c\n" % i for i in range(3000))
    )
    (tmp_path / "cut.csv.gz").write_bytes(raw[: len(raw) // 3])  # a download that stopped
    (tmp_path / "list.parquet.gz").write_bytes(gzip.compress(b"PAR1...PAR1"))
    (tmp_path / "l.csv").write_text("url,caption\nhttps://a.test/1.jpg,hi\n")
    cases = [
        (UrlListSource(), r"`path` is empty"),
        (UrlListSource(path=str(tmp_path / "empty")), r"directory .*empty.* holds no .*\.csv"),
        (
            UrlListSource(path=str(tmp_path / "bad.parquet")),
            r"cannot read .*bad\.parquet as parquet",
        ),
        (
            UrlListSource(path=str(tmp_path / "list.parquet.gz")),
            r"'list\.parquet\.gz' is a gzipped parquet file.*gunzip it",
        ),
        (
            UrlListSource(path=str(tmp_path / "l.csv"), extra_cols=["shop"]),
            r"column 'shop' \(extra_cols\) not found in l\.csv; columns are \['caption', 'url'\]",
        ),
        (
            PageListSource(path=str(tmp_path / "pages.txt")),
            r"pages source .*pages\.txt.* not found",
        ),
    ]
    for src, pattern in cases:
        out = tmp_path / f"plan-{type(src).__name__}"
        with pytest.raises(ValueError, match=pattern):
            plan_sources([src], out)
        assert not out.exists(), pattern
    # a list cut off after its header keeps the rows before the cut and names the damage in
    # one counted `source_damaged` row (tests/test_ingest_sources_damage.py: the other sources)
    plan_sources([UrlListSource(path=str(tmp_path / "cut.csv.gz"))], tmp_path / "plan")
    marker = json.loads((tmp_path / "plan" / PLANNED_MARKER).read_text())
    assert marker["drops"] == {"source_damaged": 1}
    assert 0 < marker["total"] < 3000 and marker["sources"][0]["records"] == marker["total"] + 1


def test_img2dataset_options_format_and_column_selection(tmp_path: Path, real_fixtures: Path):
    # a list without a known suffix: `format` says what it is
    listing = tmp_path / "urls.txt"
    listing.write_text("link\ttext\tlicence\nhttps://a.test/1.jpg\thello\tCC0\n")
    (s,) = iter_source(
        UrlListSource(path=str(listing), format="tsv", url_col="link", caption_col="text")
    )
    assert (s.url, s.alt_text, s.extra) == ("https://a.test/1.jpg", "hello", {"licence": "CC0"})
    with pytest.raises(ValueError, match=r"cannot tell the format of 'urls\.txt'"):
        list(iter_source(UrlListSource(path=str(listing))))
    # parquet reads only the columns it needs when extra_cols is given (save_additional_columns)
    none = list(iter_source(laion_src(real_fixtures, extra_cols=[])))
    assert len(none) == 10_000
    assert all(set(s.extra) == {"source_file", "source_row"} for s in none if not s.kept)
    assert all(s.extra == {} for s in none if s.kept)
    some = next(iter_source(laion_src(real_fixtures, extra_cols=["__index_level_0__"])))
    assert set(some.extra) == {"__index_level_0__"} and some.alt_text
    only_url = next(
        iter_source(UrlListSource(path=str(real_fixtures / LAION), url_col="URL", extra_cols=[]))
    )
    assert only_url.alt_text is None and only_url.extra == {}  # default caption col absent


def test_csv_edge_rows(tmp_path: Path):
    """More fields than the header: kept in `csv_overflow`; an empty file: no records;
    a URL that does not even parse: a `bad_url` record."""
    f = tmp_path / "l.csv"
    f.write_text(
        "url,caption\n"
        "https://a.test/1.jpg,a caption,with,commas\n"
        "http://[::1/broken.jpg,bracket never closed\n"
        "https://[::1]/ok.jpg,an IPv6 literal\n"
    )
    got = list(iter_source(UrlListSource(path=str(f))))
    assert [(s.kept, s.drop_reason) for s in got] == [
        (True, None),
        (False, "bad_url"),
        (True, None),
    ]
    assert got[0].alt_text == "a caption" and got[0].extra == {"csv_overflow": "with,commas"}
    assert got[1].url == "http://[::1/broken.jpg" and got[1].extra["source_row"] == 1
    empty = tmp_path / "e.csv"
    empty.write_text("")
    assert list(iter_source(UrlListSource(path=str(empty)))) == []


def test_plan_stores_columns_whose_type_varies(tmp_path: Path):
    """JSON lists do not promise one type per column: a column holding ints, strings and
    objects is stored as text (JSON for objects) in partitions and in the dropped file."""
    rows = [
        {"url": "", "a": 1},
        {"url": "", "a": 2},
        {"url": "", "a": {"x": 1}, "b": "y"},  # a later chunk: another type, a new column
        {"url": "", "a": {"x": 2}, "b": "z"},
        {"url": "https://a.test/1.jpg", "n": 1},
        {"url": "https://a.test/2.jpg", "n": "two"},
    ]
    f = tmp_path / "l.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    parts = plan_sources([UrlListSource(path=str(f))], tmp_path / "plan", partition_size=2)
    assert len(parts) == 1
    assert pq.read_table(f"{parts[0]}.parquet").column("n").to_pylist() == ["1", "two"]
    dropped = pq.read_table(tmp_path / "plan" / PLANNED_DROPPED)
    assert dropped.column("a").to_pylist() == ["1", "2", '{"x": 1}', '{"x": 2}']
    assert dropped.column("b").to_pylist() == [None, None, "y", "z"]
    assert not (tmp_path / "plan" / ".planned-dropped.tmp").exists()


def test_plan_key_set_spills_and_still_finds_repeats():
    from ccurate.ingest.sources import _KeySet

    keys = [make_key(f"https://a.test/{i}.jpg") for i in range(10)]
    ks = _KeySet(spill=4)
    assert all(ks.add(k) for k in keys)
    assert ks.frozen.size == 8 and len(ks.recent) == 2  # two spills into the sorted array
    assert list(ks.frozen) == sorted(ks.frozen)
    assert not any(ks.add(k) for k in keys)  # repeats found in the spilled part and the set
    assert ks.add(make_key("https://a.test/new.jpg"))


def test_dropped_records_are_spilled_in_chunks(tmp_path: Path):
    """Millions of bad rows must not pile up in memory: every `chunk` records go to disk."""
    from ccurate.ingest.sources import _DroppedSink
    from ccurate.record import Sample

    sink = _DroppedSink(tmp_path, chunk=2)
    for i in range(5):
        s = Sample(key=make_key(f"bad-row:x:{i}"), url="", extra={"i": i})
        s.drop("bad_url", "ingest")
        sink.add(s)
    assert len(sink.files) == 2 and len(sink.buf) == 1
    sink.finish(tmp_path / PLANNED_DROPPED)
    assert pq.read_table(tmp_path / PLANNED_DROPPED).column("i").to_pylist() == list(range(5))


def test_parquet_extra_cols_skip_reading_other_columns(tmp_path: Path):
    """A list with a heavy column (embedded image bytes, embeddings): `extra_cols=[]` never
    materialises it, so memory stays small."""
    import pyarrow as pa

    n, size = 48, 256 * 1024
    path = tmp_path / "heavy.parquet"
    pq.write_table(
        pa.table(
            {
                "url": [f"https://a.test/{i}.jpg" for i in range(n)],
                "jpg": [bytes([i]) * size for i in range(n)],
            }
        ),
        path,
        compression="none",
    )

    def peak(src: UrlListSource) -> int:
        tracemalloc.start()
        count = sum(1 for _ in iter_source(src))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert count == n
        return top

    assert peak(UrlListSource(path=str(path))) > n * size  # every row carries its bytes
    assert peak(UrlListSource(path=str(path), extra_cols=[])) < n * size // 4


# --------------------------------------------------------------------------- structured licences
def test_commons_extmetadata_and_flickr_ids_become_evidence_and_attribution(
    tmp_path: Path, real_fixtures: Path
):
    """Lists from Wikimedia Commons (an extmetadata object per row, or its JSON text) and
    from Flickr (API licence ids, owner names: YFCC100M, CommonCatalog's source) carry the
    licence and the attribution the release must credit, through the licence filter."""
    from ccurate.filters.license_filter import LicenseConfig, LicenseFilter

    info = json.loads((real_fixtures / "wikimedia_commons_imageinfo.json").read_text())
    item = info["imageinfo"][0]
    page = item["descriptionurl"]
    jsonl = tmp_path / "commons.jsonl"
    rows = [
        {"url": "https://upload.test/a.jpg", "page": page, "ext": item["extmetadata"]},
        {"url": "https://upload.test/b.jpg", "page": page, "ext": json.dumps(item)},
        {"url": "https://upload.test/c.jpg", "page": page, "ext": "{not json"},
    ]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = UrlListSource(path=str(jsonl), page_url_col="page", extmetadata_col="ext")
    a, b, c = iter_source(src)
    for s in (a, b):
        values = [(e.scope, e.kind, e.value) for e in s.license_evidence]
        assert ("metadata", "wikimedia", "cc-by-sa-4.0") in values
        assert s.author == "PtrQs" and s.source_url == page
        assert "ext" not in s.extra  # a named column is not carried again
        lf = LicenseFilter(LicenseConfig())
        d = lf.decide(s)
        assert d.keep and s.license == "CC-BY-SA-4.0", (d, s.license)
    assert c.license_evidence == [] and c.author is None  # unreadable: nothing, no crash
    assert not LicenseFilter(LicenseConfig()).decide(c).keep

    csv_path = tmp_path / "flickr.csv"
    csv_path.write_text(
        "photo,license,owner,title,page\n"
        "https://farm.test/1.jpg,4,Ana  Lima,Lone\ttree,https://flickr.test/p/1\n"
        "https://farm.test/2.jpg,0,Bo,,https://flickr.test/p/2\n"
        "https://farm.test/3.jpg,CC BY 2.0,Cy,,https://flickr.test/p/3\n"
        "https://farm.test/4.jpg,,Di,,https://flickr.test/p/4\n"
    )
    fsrc = UrlListSource(path=str(csv_path), url_col="photo", license_col="license",
                         license_format="flickr", author_col="owner", title_col="title",
                         page_url_col="page")  # fmt: skip
    s1, s2, s3, s4 = iter_source(fsrc)
    assert [(e.scope, e.kind, e.value) for e in s1.license_evidence] == [
        ("metadata", "flickr", "flickr:4")
    ]
    assert (s1.author, s1.title) == ("Ana Lima", "Lone tree")
    assert s2.license_evidence[0].value == "flickr:0" and s2.title is None
    # not an id: kept raw as the column's value, the filter decides
    assert [(e.scope, e.value) for e in s3.license_evidence] == [("input", "CC BY 2.0")]
    assert s4.license_evidence == []
    lf = LicenseFilter(LicenseConfig())
    decisions = [lf.decide(s) for s in (s1, s2, s4)]
    assert decisions[0].keep and s1.license == "CC-BY-2.0"
    assert not decisions[1].keep and not decisions[2].keep  # all rights reserved; none

    with pytest.raises(ValueError, match=r"column 'owner_name' \(author_col\) not found"):
        list(iter_source(fsrc.model_copy(update={"author_col": "owner_name"})))


def test_a_repeat_keeps_its_key_when_unrelated_rows_change(tmp_path: Path):
    """A repeat was re-keyed by the count of drops before it: an earlier row fixed upstream
    (a bad URL now good) changed the key of every later repeat."""

    def repeat_keys(first_url: str, name: str) -> list[str]:
        path = tmp_path / f"{name}.jsonl"
        rows = [first_url, "https://a.test/x.jpg", "https://a.test/x.jpg", "https://a.test/x.jpg"]
        path.write_text("".join(json.dumps({"url": u}) + "\n" for u in rows))
        plan_sources([UrlListSource(path=str(path))], tmp_path / name, partition_size=10)
        dropped = table_to_samples(pq.read_table(tmp_path / name / PLANNED_DROPPED))
        return [s.key for s in dropped if s.drop_reason == "duplicate_url"]

    before = repeat_keys("ftp://a.test/bad.jpg", "before")  # a bad_url drop comes first
    after = repeat_keys("https://a.test/fixed.jpg", "after")
    assert len(before) == 2 and len(set(before)) == 2 and before == after
