"""Dedup reference sets (`against`, `previous`): every input a decontamination promise
rests on is read, or refused loudly, and what was read is counted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ccurate.executor import LocalExecutor, tasks_for
from ccurate.filters.dedup import DedupConfig, DedupStage
from ccurate.filters.dedup_reference import load_reference, reference_files
from ccurate.filters.hashing import hex_to_u64
from ccurate.shards.release import SUCCESS
from ccurate.tario import TarWriter
from tests.test_filters_dedup import encode, jpeg_copy, photo, plan, sample, write_shard


def _summary(tmp: Path) -> dict:
    return json.loads((tmp / "scratch" / "dedup_summary.json").read_text())


def test_webdataset_tars_are_read_member_by_member(tmp_path: Path) -> None:
    """A webdataset eval set used to be skipped (folder) or hashed as one "image" (file)."""
    evals = [photo(100 + i) for i in range(3)]
    wds = tmp_path / "eval_wds"
    wds.mkdir()
    with TarWriter(wds / "eval-000000.tar") as tw:
        for i, im in enumerate(evals):
            tw.add(f"{i:06d}.jpg", encode(im, "JPEG", 95))
            tw.add(f"{i:06d}.txt", b"a caption")
    crawl = [sample(f"copy{i}.jpg", jpeg_copy(im)) for i, im in enumerate(evals)]
    for label, path in (("dir", wds), ("file", wds / "eval-000000.tar")):
        _, d = plan(tmp_path / label, [crawl], against=[str(path)])
        for i, s in enumerate(crawl):
            assert d[s.key]["reason"] == "contaminated"
            assert d[s.key]["duplicate_of"] == f"{wds / 'eval-000000.tar'}#{i:06d}.jpg"
        assert _summary(tmp_path / label)["against_rows"] == 3  # the captions are no rows


def test_a_shard_tar_is_read_through_its_parquet_index(tmp_path: Path) -> None:
    """A pipeline shard (tar + parquet index) is one set of rows, not two."""
    s = sample("a.png", encode(photo(7)))
    prefix = write_shard(tmp_path / "prev" / "part-00000", [s])
    assert reference_files([str(tmp_path / "prev")]) == [Path(f"{prefix}.parquet")]
    assert len(load_reference([str(tmp_path / "prev")]).keys) == 1


def test_extension_variants_are_read(tmp_path: Path) -> None:
    im = photo(110)
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "a.jfif").write_bytes(encode(im, "JPEG", 95))
    (ev / "b.JPG").write_bytes(encode(photo(111), "JPEG", 95))
    pq.write_table(
        pa.table({"key": ["c"], "phash": [sample("c.png", encode(im)).phash]}), ev / "H.PARQUET"
    )
    ref = load_reference([str(ev)])
    assert ref.keys.to_pylist() == ["c", str(ev / "a.jfif"), str(ev / "b.JPG")]
    assert ref.code_ok.all()
    s = sample("copy.jpg", jpeg_copy(im))
    _, d = plan(tmp_path, [[s]], against=[str(ev)])
    assert d[s.key]["reason"] == "contaminated"


@pytest.mark.parametrize("dtype", [pa.int64(), pa.uint64()])
def test_integer_phash_columns_are_read_as_unsigned_64_bit(
    tmp_path: Path, dtype: pa.DataType
) -> None:
    """`int(str(imagehash.phash(im)), 16)` stored as int64 (negative past 2**63) or uint64."""
    evals = [photo(120 + i) for i in range(4)]
    hexes = [str(sample(f"e{i}.png", encode(im)).phash) for i, im in enumerate(evals)]
    ints = [int(h, 16) for h in hexes]
    if dtype == pa.int64():
        ints = [v - (1 << 64) if v >= 1 << 63 else v for v in ints]
    ref_file = tmp_path / "ev.parquet"
    pq.write_table(
        pa.table({"key": list("abcd"), "phash": pa.array([*ints[:3], None], dtype)}), ref_file
    )
    ref = load_reference([str(ref_file)])
    want, _ = hex_to_u64(hexes)
    assert ref.code_ok.tolist() == [True, True, True, False]
    assert ref.code[:3].tolist() == want[:3].tolist()
    crawl = [sample(f"copy{i}.jpg", jpeg_copy(im)) for i, im in enumerate(evals[:3])]
    _, d = plan(tmp_path, [crawl], against=[str(ref_file)])
    assert [d[s.key]["duplicate_of"] for s in crawl] == ["a", "b", "c"]


def test_a_hash_column_of_another_type_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "ev.parquet"
    pq.write_table(pa.table({"key": ["a"], "phash": pa.array([1.5], pa.float64())}), f)
    with pytest.raises(ValueError, match=r"ev\.parquet: column phash is double"):
        load_reference([str(f)])


@pytest.mark.parametrize("what", ["empty", "truncated", "unknown", "bad hex", "no rows"])
def test_a_path_without_a_usable_hash_is_an_error_naming_it(tmp_path: Path, what: str) -> None:
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"key": ["g"], "phash": ["0123456789abcdef"]}), good)
    ev = tmp_path / "ev"
    ev.mkdir()
    if what == "truncated":
        (ev / "a.jpg").write_bytes(encode(photo(130), "JPEG", 95)[:200])
    elif what == "unknown":
        (ev / "a.tar.gz").write_bytes(b"\x1f\x8b not read")
    elif what == "bad hex":
        pq.write_table(pa.table({"phash": ["not-a-hash", "", None]}), ev / "h.parquet")
    elif what == "no rows":
        pq.write_table(pa.table({"phash": pa.array([], pa.string())}), ev / "h.parquet")
    with pytest.raises(ValueError, match=f"dedup reference {ev} gives no usable hash"):
        load_reference([str(good), str(ev)])
    s = sample("a.png", encode(photo(131)))
    with pytest.raises(ValueError, match=str(ev)):
        plan(tmp_path / "p", [[s]], previous=[str(ev)])


def test_what_was_not_read_is_logged_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    im = photo(140)
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "notes.txt").write_text("no image")
    (ev / "a.png").write_bytes(encode(im))
    (ev / "b.jpg").write_bytes(encode(photo(141), "JPEG", 95)[:200])
    pq.write_table(
        pa.table({"key": ["x", "y"], "sha256": ["f" * 64, "g" * 64], "phash": ["zz", None]}),
        ev / "h.parquet",
    )
    s = sample("copy.jpg", jpeg_copy(im))
    with caplog.at_level(logging.WARNING, logger="ccurate.filters.dedup_reference"):
        _, d = plan(tmp_path, [[s]], against=[str(ev)])
    assert d[s.key]["reason"] == "contaminated"
    summary = _summary(tmp_path)
    assert summary["against_rows"] == 4 and summary["against_usable"] == 2  # a.png, x's sha
    assert summary["against_unread"] == {
        "skipped_files": 1,
        "undecodable_images": 1,
        "unparsable": {"sha256": 1, "phash": 1},
    }
    assert summary["previous_rows"] == 0
    (msg,) = [r.getMessage() for r in caplog.records if "dedup reference" in r.getMessage()]
    assert "2 of 4 rows usable" in msg and "notes.txt" in msg and "1 undecodable" in msg


def _release(root: Path, rows: dict[str, list], dhash: bool) -> Path:
    """A finished release as shards/release.py lays it out: only the manifest has hashes."""
    root.mkdir(parents=True)
    cols = {"release": ["v1"] * len(rows["key"]), **rows}
    if not dhash:
        cols.pop("dhash")
    pq.write_table(pa.table(cols), root / "manifest.parquet")
    pq.write_table(
        pa.table({"key": ["gone"], "reason": ["not_releasable"]}), root / "excluded.parquet"
    )
    (root / "commercial").mkdir()
    write_shard(root / "commercial" / "commercial-000000", [])
    (root / "README.md").write_text("card")
    (root / SUCCESS).write_text("")
    return root


@pytest.mark.parametrize("dhash", [True, False])
def test_a_release_folder_is_read_through_its_manifest(tmp_path: Path, dhash: bool) -> None:
    """`previous = ["releases/v1"]` failed on excluded.parquet, which has no hashes."""
    a, b = photo(150), photo(151)
    rel_a, rel_b = sample("a.png", encode(a)), sample("b.png", encode(b))
    rows = {
        k: [getattr(s, k) for s in (rel_a, rel_b)]
        for k in ("key", "sha256", "pixel_sha256", "phash", "dhash")
    }
    rel = _release(tmp_path / "releases" / "v1", rows, dhash)
    assert reference_files([str(tmp_path / "releases")]) == [rel / "manifest.parquet"]
    ref = load_reference([str(rel)], "phash", check=True)
    assert ref.keys.to_pylist() == [rel_a.key, rel_b.key]
    assert ref.check_ok is not None and ref.check_ok.all() == dhash
    # a release from before the dhash column: counted and said, as near matching is weaker
    assert ref.report.get("without_dhash", 0) == (0 if dhash else 2)
    copy = sample("a-copy.jpg", jpeg_copy(a))
    _, d = plan(tmp_path / "p", [[copy]], previous=[str(rel)])
    assert d[copy.key]["reason"] == "duplicate_near" and d[copy.key]["duplicate_of"] == rel_a.key


def test_repeated_keys_are_counted_as_the_stage_drops_them(tmp_path: Path) -> None:
    """A key in two shards was dropped twice by the stage but counted once in the summary."""
    a = photo(75)
    first = sample("a.png", encode(a))
    again = sample("a.png", encode(a))  # same URL ingested into another shard
    other = sample("a-copy.png", encode(a), license="cc0-1.0")
    kept = sample("b.png", encode(photo(76)))
    kept_again = sample("b.png", encode(photo(76)))
    prefixes = [
        write_shard(tmp_path / "in" / "shard-00000", [first, kept]),
        write_shard(tmp_path / "in" / "shard-00001", [again, other, kept_again]),
    ]
    stats = LocalExecutor(workers=1, progress=False).map(
        DedupStage(DedupConfig()), tasks_for(prefixes, tmp_path / "out")
    )
    (found,) = (tmp_path / "out").rglob("dedup_summary.json")
    summary = json.loads(found.read_text())
    assert summary["repeated_keys"] == 2
    assert {k: v for k, v in summary["drops"].items() if v} == dict(stats.drops)
    assert dict(stats.drops) == {"duplicate_exact": 2}
    assert (summary["kept"], summary["dropped"]) == (stats.n_kept, stats.n_dropped) == (3, 2)
    assert np.sum(list(summary["drops"].values())) == summary["dropped"]
