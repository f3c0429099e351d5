"""Review of the release readers and the MDS export: random access on damaged or foreign
tars, long member names, and an export that is killed, fails, or is rerun."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ccurate.shards.config import ShardsConfig
from ccurate.shards.mds import MDSWriter, export_mds, read_mds
from ccurate.shards.read import iter_tar, read_at, release_shards
from ccurate.shards.release import write_release
from ccurate.shards.synth import make_inputs


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("review")
    kept, dropped = make_inputs(root / "in", n_shards=1, per_shard=8, dropped_per_shard=1)
    cfg = ShardsConfig(samples_per_shard=3)
    return write_release(
        kept, dropped, root / "out", cfg, name="v1", run_info={"date": "2025-06-01"}
    )


def _copy(release: Path, dest: Path) -> Path:
    shutil.copytree(release, dest)
    return dest


def _rows(release: Path) -> list[dict]:
    return pq.read_table(release / "manifest.parquet").to_pylist()


# --------------------------------------------------------------------------- read_at


def test_read_at_on_a_truncated_shard_names_it_instead_of_returning_short_bytes(
    release: Path, tmp_path: Path
) -> None:
    rel = _copy(release, tmp_path / "rel")
    row = _rows(rel)[0]
    shard = rel / row["shard"]
    _key, fields = read_at(rel, row["shard"], row["offset"])
    image_len = len(fields["jpg"])
    # cut the file inside the sample's image
    with open(shard, "r+b") as fh:
        fh.truncate(row["offset"] + 512 + image_len // 2)
    with pytest.raises(ValueError, match=rf"{row['shard']}.*truncated"):
        read_at(rel, row["shard"], row["offset"])


def test_read_at_on_a_corrupt_header_is_a_value_error_naming_the_shard(
    release: Path, tmp_path: Path
) -> None:
    rel = _copy(release, tmp_path / "rel")
    row = _rows(rel)[0]
    shard = rel / row["shard"]
    with open(shard, "r+b") as fh:
        fh.seek(row["offset"] + 10)
        fh.write(b"\xff\xfe")
    with pytest.raises(ValueError, match=rf"{row['shard']}.*checksum"):
        read_at(rel, row["shard"], row["offset"])
    # an offset that does not point at a header: the same clear error, not tarfile's
    with pytest.raises(ValueError, match=rf"{row['shard']}"):
        read_at(release, row["shard"], row["offset"] + 512)
    for bad in (-512, row["offset"] + 3):
        with pytest.raises(ValueError, match=rf"{row['shard']}: offset {bad} is not"):
            read_at(release, row["shard"], bad)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_read_at_reads_long_member_names_like_iter_tar(
    release: Path, tmp_path: Path, fmt: int
) -> None:
    """A shard repacked by a tool that writes GNU long names or pax paths (names over 100
    bytes): read_at gives the same sample as the streaming reader."""
    rel = _copy(release, tmp_path / "rel")
    name = "train/long-000000.tar"
    (rel / "train").mkdir()
    long_key = "d" * 120 + "/ünïcode-" + "k" * 110
    offsets = []
    with tarfile.open(rel / name, "w", format=fmt) as tf:
        for key in (long_key, "short"):
            offsets.append(tf.offset)
            for field, data in (("jpg", b"\xff\xd8img" + key.encode()), ("TXT", b"caption")):
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    want = list(iter_tar(rel / name))
    assert [k for k, _ in want] == [long_key, "short"]
    for off, (wkey, wfields) in zip(offsets, want, strict=True):
        assert read_at(rel, name, off) == (wkey, wfields)


# --------------------------------------------------------------------------- MDS export


def test_export_refuses_a_negative_size_limit(release: Path, tmp_path: Path) -> None:
    """Streaming's reader raises on a negative size_limit in index.json."""
    with pytest.raises(ValueError, match="size_limit"):
        export_mds(release, tmp_path / "m", size_limit=-1)
    with pytest.raises(ValueError, match="size_limit"):
        MDSWriter(tmp_path, {"x": "str"}, size_limit=-5)
    assert not (tmp_path / "m" / "commercial").exists()


def test_a_failed_export_leaves_no_temp_dir_and_names_the_shard(
    release: Path, tmp_path: Path
) -> None:
    rel = _copy(release, tmp_path / "rel")
    bad = release_shards(rel, "commercial")[-1]
    with open(bad, "r+b") as fh:
        fh.truncate(bad.stat().st_size // 2)
    out = tmp_path / "mds"
    with pytest.raises(ValueError, match=bad.name):
        export_mds(rel, out, splits=["commercial"])
    assert list(out.iterdir()) == []


_KILLER = """
import os, sys
import ccurate.shards.mds as mds
real = mds.MDSWriter.finish
calls = []
def finish(self):
    calls.append(1)
    if len(calls) == 2:  # the second split: die before its index is written
        os.kill(os.getpid(), 9)
    real(self)
mds.MDSWriter.finish = finish
mds.export_mds(sys.argv[1], sys.argv[2])
"""


def test_a_killed_export_is_resumed_by_a_rerun(release: Path, tmp_path: Path) -> None:
    """Killed mid-export (SIGKILL): the finished split is kept, the rerun (same arguments, no
    overwrite) completes the rest, and the killed run's temp folder is removed."""
    out = tmp_path / "mds"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, str(release), str(out)], capture_output=True, timeout=120
    )
    assert proc.returncode == -9, proc.stderr.decode()
    assert (out / "commercial" / "index.json").is_file()
    assert not (out / "noncommercial").exists()
    assert [p.name for p in out.glob(".tmp-noncommercial-*")]  # what the kill left
    first = (out / "commercial" / "index.json").read_bytes()
    done = export_mds(release, out)
    assert set(done) == {"commercial", "noncommercial"}
    assert (out / "commercial" / "index.json").read_bytes() == first
    assert sorted(p.name for p in out.iterdir()) == ["commercial", "noncommercial"]
    for split, path in done.items():
        keys = [r["key"] for r in _rows(release) if r["split"] == split]
        assert [s["key"] for s in read_mds(path)] == keys
    # a split exported with other settings is still refused without overwrite
    with pytest.raises(FileExistsError, match="overwrite"):
        export_mds(release, out, splits=["commercial"], size_limit=5_000)


def test_a_split_named_twice_is_exported_once(release: Path, tmp_path: Path) -> None:
    done = export_mds(release, tmp_path / "m", splits=["commercial", "commercial"])
    assert list(done) == ["commercial"]
    rows = [r for r in _rows(release) if r["split"] == "commercial"]
    assert len(list(read_mds(done["commercial"]))) == len(rows)


def test_mds_index_json_is_what_streaming_reads(release: Path, tmp_path: Path) -> None:
    """Every shard_info has exactly MDSReader's constructor arguments (extra keys are a
    TypeError in `reader_from_json`), and the export's own record is no index key."""
    done = export_mds(release, tmp_path / "m", splits=["commercial"])
    index = json.loads((done["commercial"] / "index.json").read_text())
    assert set(index) == {"version", "shards"}
    for info in index["shards"]:
        assert set(info) == {
            "column_encodings",
            "column_names",
            "column_sizes",
            "compression",
            "format",
            "hashes",
            "raw_data",
            "samples",
            "size_limit",
            "version",
            "zip_data",
        }
        assert set(info["raw_data"]) == {"basename", "bytes", "hashes"}
    assert os.path.basename(done["commercial"]) == "commercial"


def test_iter_tar_on_a_garbage_header_names_the_shard(release: Path, tmp_path: Path) -> None:
    """Garbage in a header's checksum field (not octal) fails as a ValueError naming the shard,
    like a truncated or bad-checksum shard, so an export or loader says which file."""
    rel = _copy(release, tmp_path / "rel")
    row = _rows(rel)[1]
    shard = rel / row["shard"]
    with open(shard, "r+b") as fh:
        fh.seek(row["offset"] + 148)
        fh.write(b"\x14" * 8)
    with pytest.raises(ValueError, match=rf"{shard}"):
        list(iter_tar(shard))
    with pytest.raises(ValueError, match=rf"{row['shard']}.*checksum"):
        read_at(rel, row["shard"], row["offset"])
