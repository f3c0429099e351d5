"""`files_sha256`: content digests of weight files, remembered by file identity across runs."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from ccurate import weights
from ccurate.weights import cache_dir, files_sha256


@pytest.fixture
def later(monkeypatch):
    """The clock 10 s on: files written by the test count as settled (`_RACY_NS`)."""
    real = weights.time.time_ns
    monkeypatch.setattr(weights.time, "time_ns", lambda: real() + 10_000_000_000)


@pytest.fixture
def reads(monkeypatch):
    """Counts the files actually read (hashed) by `files_sha256`."""
    seen: list[str] = []
    real = hashlib.file_digest

    def counting(fh, digest):  # type: ignore[no-untyped-def]
        seen.append(fh.name)
        return real(fh, digest)

    monkeypatch.setattr(weights.hashlib, "file_digest", counting)
    return seen


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_digests_are_the_contents_and_read_once(tmp_path, reads, later):
    memo = tmp_path / "memo" / "d.json"
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"alpha" * 1000)
    b.write_bytes(b"beta")
    first = files_sha256([a, b], memo)
    assert first == {a: _sha(b"alpha" * 1000), b: _sha(b"beta")}
    assert len(reads) == 2 and memo.is_file()
    again = files_sha256([a, b], memo)  # e.g. the next worker, or tomorrow's run
    assert again == first and len(reads) == 2  # nothing read again


def test_a_file_rewritten_in_place_with_the_same_size_and_mtime_is_hashed_again(
    tmp_path, reads, later
):
    memo = tmp_path / "d.json"
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"A" * 4096)
    st = f.stat()
    old = files_sha256([f], memo)[f]
    time.sleep(0.02)  # the next clock tick: the test clock is ahead, the file times are not
    f.write_bytes(b"B" * 4096)  # retrained: same name and size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # even the old mtime (rsync -a, touch -r)
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    new = files_sha256([f], memo)[f]
    assert new == _sha(b"B" * 4096) != old
    assert len(reads) == 2


def test_a_copy_elsewhere_has_the_same_digest(tmp_path):
    memo = tmp_path / "d.json"
    a = tmp_path / "x" / "w.bin"
    a.parent.mkdir()
    a.write_bytes(b"weights")
    b = tmp_path / "y" / "w.bin"
    b.parent.mkdir()
    b.write_bytes(b"weights")
    assert files_sha256([a], memo)[a] == files_sha256([b], memo)[b]


def test_corrupt_or_unwritable_memo_is_only_a_cache(tmp_path, reads, later):
    f = tmp_path / "w.bin"
    f.write_bytes(b"w")
    memo = tmp_path / "d.json"
    memo.write_text("{not json")
    assert files_sha256([f], memo)[f] == _sha(b"w")
    assert json.loads(memo.read_text())  # rewritten whole
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    assert files_sha256([f], blocker / "d.json")[f] == _sha(b"w")  # cannot write: still right


def test_memo_forgets_files_that_are_gone(tmp_path, later):
    memo = tmp_path / "d.json"
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    files_sha256([a], memo)
    a.unlink()
    files_sha256([b], memo)
    assert list(json.loads(memo.read_text())) == [str(b.resolve())]


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CCURATE_CACHE_DIR", str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"
    monkeypatch.delenv("CCURATE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "ccurate"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == Path(tmp_path / "home" / ".cache" / "ccurate")


def test_a_file_changed_just_now_is_not_remembered(tmp_path, reads):
    """Within a clock tick a rewrite can keep size, times and inode: such a file is hashed
    every time until it has settled."""
    memo = tmp_path / "d.json"
    f = tmp_path / "fresh.bin"
    f.write_bytes(b"new")
    files_sha256([f], memo)
    files_sha256([f], memo)
    assert len(reads) == 2 and not memo.exists()
