"""Dedup reference sets built to hurt: link loops, FIFOs and devices, huge members, corrupt
files. Each is read once, skipped and counted, or an error naming the file; never a hang, a
whole multi-GB copy, or a silent skip."""

from __future__ import annotations

import logging
import os
import socket
import tarfile
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ccurate.filters.dedup_reference import load_reference, reference_files
from ccurate.shards.release import SUCCESS
from ccurate.tario import TarWriter
from tests.test_filters_dedup import encode, photo


def _png(seed: int, side: int = 32) -> bytes:
    return encode(photo(seed, side, side))


@pytest.mark.timeout(60)
def test_links_are_followed_once_and_loops_end(tmp_path: Path) -> None:
    """Two links back to the folder walked 2^40 paths (a hang); one read each file 41 times."""
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "a.png").write_bytes(_png(1))
    os.symlink(".", ev / "loop1")
    os.symlink("..", ev / "loop2")  # to the folder above, which holds ev again
    os.symlink("a.png", ev / "same.png")  # one file under two names
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "b.png").write_bytes(_png(2))
    os.symlink(outside, ev / "ext1")  # out of the tree: followed, once
    os.symlink(outside, ev / "ext2")
    assert reference_files([str(ev)]) == [ev / "a.png", ev / "ext1" / "b.png"]
    ref = load_reference([str(ev)])
    assert ref.keys.to_pylist() == [str(ev / "a.png"), str(ev / "ext1" / "b.png")]
    # ext2, loop1, same.png: already read; loop2 leads to tmp_path, whose ev is read and
    # whose outside was read through ext1
    assert ref.report["skipped_files"] == 5


def test_oversized_images_are_counted_not_read(tmp_path: Path) -> None:
    small, big = _png(3, 16), _png(4, 96)
    cap = (len(small) + len(big)) // 2
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "small.png").write_bytes(small)
    (ev / "big.png").write_bytes(big)
    with TarWriter(ev / "set.tar") as tw:
        tw.add("0.png", big)
        tw.add("1.png", small)
    ref = load_reference([str(ev)], max_bytes=cap)
    assert ref.keys.to_pylist() == [str(ev / "set.tar") + "#1.png", str(ev / "small.png")]
    assert ref.report["oversized_images"] == 2 and ref.report["usable"] == 2
    assert "oversized_images" not in load_reference([str(ev)]).report  # only when there are


def _sparse_tar(path: Path, size: int) -> None:
    """A tar whose member `big.jpg` is `size` bytes of zeros (a hole on disk), then a PNG."""
    big = tarfile.TarInfo("big.jpg")
    big.size = size
    ok = tarfile.TarInfo("ok.png")
    data = _png(5)
    ok.size = len(data)
    with open(path, "wb") as f:
        f.write(big.tobuf(tarfile.GNU_FORMAT))
        f.seek(512 + size)
        f.write(ok.tobuf(tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512 + 1024))


def test_a_huge_tar_member_or_file_is_not_read_into_memory(tmp_path: Path) -> None:
    """A 3 GB member was copied whole into a bytes object (6.4 GB peak, or MemoryError)."""
    size = 200_000_000  # over the default cap; sparse, so nothing is written
    tar = tmp_path / "huge.tar"
    _sparse_tar(tar, size)
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "ok.png").write_bytes(_png(6))
    with open(ev / "huge.png", "wb") as f:
        f.truncate(size)
    tracemalloc.start()
    try:
        ref = load_reference([str(tar), str(ev)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000
    assert ref.report["oversized_images"] == 2 and ref.report["usable"] == 2


def test_special_files_are_counted_and_named_in_the_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "ok.png").write_bytes(_png(7))
    os.mkfifo(ev / "fifo.jpg")
    monkeypatch.chdir(ev)  # a socket path is capped at ~108 bytes: bind a relative one
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("sock.png")
    os.symlink(tmp_path / "nowhere.jpg", ev / "dangling.jpg")
    os.symlink("/dev/null", ev / "null.jpg")
    (ev / ".hidden.png").write_bytes(_png(8))
    pq.write_table(pa.table({"phash": ["0123456789abcdef"]}), ev / "x.dropped.parquet")
    try:
        with caplog.at_level(logging.WARNING, logger="ccurate.filters.dedup_reference"):
            ref = load_reference([str(ev)])
    finally:
        sock.close()
    assert ref.keys.to_pylist() == [str(ev / "ok.png")]
    assert ref.report["skipped_files"] == 6
    (msg,) = [r.getMessage() for r in caplog.records]
    for why in ("FIFO", "socket", "device", "dangling link", "hidden", "side output"):
        assert why in msg
    with pytest.raises(ValueError, match=r"fifo\.jpg is a FIFO, not a file or folder"):
        load_reference([str(ev / "fifo.jpg")])
    with pytest.raises(ValueError, match=r"null\.jpg is a device"):
        load_reference([str(ev / "null.jpg")])


def test_tar_members_that_are_no_image_or_sidecar_are_counted(tmp_path: Path) -> None:
    tar = tmp_path / "set.tar"
    with TarWriter(tar) as tw:
        tw.add("0.png", _png(9))
        tw.add("0.json", b"{}")  # a webdataset sidecar: not an image, not counted
        tw.add("0.txt", b"a caption")
        tw.add("noext", _png(10))
        tw.add("1.mp4", b"\0" * 64)
    ref = load_reference([str(tar)])
    assert ref.keys.to_pylist() == [f"{tar}#0.png"]
    assert ref.report["skipped_members"] == 2


def test_image_rows_are_one_array_per_file(tmp_path: Path) -> None:
    """Five one-row arrays per tar member cost ~6 KB a member (6 GB for a 1M-image set)."""
    tar = tmp_path / "set.tar"
    with TarWriter(tar) as tw:
        for i in range(5):
            tw.add(f"{i}.png", _png(20 + i, 16))
    ref = load_reference([str(tar)], check=True)
    assert ref.keys.num_chunks == 1 and len(ref.keys) == 5 and ref.code_ok.all()


def test_rows_without_a_key_are_named_by_file_and_row(tmp_path: Path) -> None:
    f = tmp_path / "h.parquet"
    key = pa.array([None, 7, None, 9], pa.int64())
    pq.write_table(pa.table({"key": key, "phash": ["0123456789abcdef"] * 4}), f)
    assert load_reference([str(f)]).keys.to_pylist() == [f"{f}#row=0", "7", f"{f}#row=2", "9"]


def test_read_errors_name_the_file(tmp_path: Path) -> None:
    ev = tmp_path / "ev"
    ev.mkdir()
    pq.write_table(pa.table({"phash": ["0123456789abcdef"]}), ev / "a.parquet")
    (ev / "b.parquet").write_bytes(b"PAR1" + bytes(500) + b"PAR1")
    with pytest.raises((ValueError, OSError), match=r"dedup reference .*b\.parquet: "):
        load_reference([str(ev)])
    rel = tmp_path / "rel"
    rel.mkdir()
    (rel / SUCCESS).write_text("")
    (rel / "manifest.parquet").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"rel/manifest\.parquet: Arrow"):
        load_reference([str(rel)])
    f = tmp_path / "struct.parquet"
    pq.write_table(pa.table({"key": pa.array([{"a": 1}]), "phash": ["0123456789abcdef"]}), f)
    with pytest.raises(ValueError, match=r"struct\.parquet: column key is struct"):
        load_reference([str(f)])
