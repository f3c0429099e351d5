"""Spine edge cases: a stage failing inside a worker process, resume without re-preparing,
GPU worker counts, the filter-chain contract, atomic files, tar reading edge cases (GNU
base-256 sizes, pax headers without a path, empty and truncated files), records with null
columns, the run report with undecodable images, and the progress bar on a terminal."""

from __future__ import annotations

import io
import os
import random
import sys
import tarfile
from pathlib import Path

import pytest

from ccurate import executor as executor_mod
from ccurate.executor import LocalExecutor, ShardTask, run_task, tasks_for
from ccurate.progress import Progress
from ccurate.record import Decision, Sample, make_key, rows_to_table, table_to_samples
from ccurate.shardio import (
    ShardWriter,
    atomic_open,
    is_done,
    iter_samples,
    read_dropped,
)
from ccurate.stage import Filter, FilterStage, Resources, Stage
from ccurate.tario import TarWriter, _byte_sum, iter_members, iter_spans
from tests.test_spine import _inputs, sample


def _shard_files(out: Path, name: str) -> list[str]:
    return sorted(p.name for p in out.iterdir() if name in p.name)


# --------------------------------------------------------------------------- executor


class _FailsOn(Stage):
    """Raises on the sample whose URL ends with `bad` (a bug or a crash mid-shard)."""

    name = "fails"

    def __init__(self, bad: str | None) -> None:
        self.bad = bad

    def process(self, batch: list[Sample]) -> list[Sample]:
        for s in batch:
            if self.bad and s.url.endswith(self.bad):
                raise RuntimeError(f"boom on {s.url}")
        return batch


def test_a_stage_failing_in_a_worker_fails_the_map_and_only_its_shard(tmp_path: Path) -> None:
    """The worker's error reaches the caller; the failing shard leaves no file (not even
    a temporary); the other shards finish; a rerun redoes only the failed one."""
    inputs = _inputs(tmp_path)
    tasks = tasks_for(inputs, tmp_path / "out")
    with pytest.raises(RuntimeError, match=r"boom on http://example\.org/img/5\.jpg"):
        LocalExecutor(2, progress=False).map(_FailsOn("/5.jpg"), tasks)
    out = tmp_path / "out"
    assert _shard_files(out, "part-00001") == []
    assert is_done(tasks[0].dst) and is_done(tasks[2].dst)
    stats = LocalExecutor(2, progress=False).map(_FailsOn(None), tasks)
    assert (stats.shards, stats.skipped_shards, stats.n_in, stats.n_kept) == (3, 2, 12, 12)
    keys = [s.key for s in next(iter_samples(tasks[1].dst))]
    assert keys == [sample(i).key for i in range(4, 8)]


class _Preparing(Stage):
    """Records the calls of its global `prepare` step."""

    name = "preparing"

    def __init__(self) -> None:
        self.prepared: list[tuple[list[str], str]] = []

    def prepare(self, inputs: list[str], scratch_dir: str) -> None:
        self.prepared.append((inputs, scratch_dir))

    def process(self, batch: list[Sample]) -> list[Sample]:
        return batch


def test_prepare_runs_once_over_every_input_and_not_when_all_is_done(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    tasks = tasks_for(inputs, tmp_path / "out")
    stage = _Preparing()
    first = LocalExecutor(1, progress=False).map(stage, tasks)
    assert stage.prepared == [(inputs, str(tmp_path / "out" / "_prepare"))]
    again = LocalExecutor(1, progress=False).map(stage, tasks)
    assert len(stage.prepared) == 1  # nothing left to do: no global step either
    assert (again.n_in, again.n_kept, again.skipped_shards) == (first.n_in, first.n_kept, 3)


class _GpuStage(_Preparing):
    @property
    def resources(self) -> Resources:
        return Resources(gpus=1)


@pytest.mark.parametrize("gpus, want", [(0, 1), (2, 2), (8, 4)])
def test_gpu_stages_get_at_most_one_worker_per_visible_gpu(
    monkeypatch: pytest.MonkeyPatch, gpus: int, want: int
) -> None:
    monkeypatch.setattr(executor_mod, "_visible_gpus", lambda: gpus)
    ex = LocalExecutor(4, progress=False)
    assert ex._workers_for(_GpuStage(), n_tasks=10) == want
    assert ex._workers_for(_Preparing(), n_tasks=10) == 4  # CPU stages: the workers asked
    assert ex._workers_for(_Preparing(), n_tasks=3) == 3  # never more than the tasks


# --------------------------------------------------------------------------- stage contract


class _Short(Filter):
    """A broken batched filter: one decision fewer than samples."""

    name = "short"

    @property
    def resources(self) -> Resources:
        return Resources(cpus=2, memory_gb=3)

    def decide(self, sample: Sample) -> Decision:
        return self.keep()

    def decide_batch(self, samples: list[Sample]) -> list[Decision]:
        return [self.keep() for _ in samples[1:]]

    def describe(self) -> dict:
        return {"broken": True}


class _Gpu(_Short):
    name = "gpu"

    @property
    def resources(self) -> Resources:
        return Resources(gpus=1, memory_gb=2)

    def describe(self) -> dict:
        return {}


def test_a_filter_returning_too_few_decisions_fails_its_shard(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path, n_shards=1)
    dst = tmp_path / "out" / "part-00000"
    with pytest.raises(RuntimeError, match="filter short returned 3 decisions for 4 samples"):
        run_task(FilterStage([_Short()]), ShardTask(inputs[0], str(dst)))
    assert not is_done(dst) and _shard_files(tmp_path / "out", "part-00000") == []


def test_a_filter_chain_declares_what_its_filters_need() -> None:
    chain = FilterStage([_Short(), _Gpu()])
    assert chain.resources == Resources(cpus=2, gpus=1, memory_gb=5)
    assert FilterStage([]).resources == Resources()
    assert chain.describe() == {"short": {"broken": True}, "gpu": {}}


# --------------------------------------------------------------------------- shard files


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "d" / "stats.json"
    path.parent.mkdir()
    path.write_text("old")
    with pytest.raises(OSError, match="disk full"), atomic_open(path, "w") as fh:
        fh.write("new, half written")
        raise OSError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["stats.json"]
    with atomic_open(path, "w") as fh:
        fh.write("new")
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["stats.json"]


def test_dropped_samples_without_their_images_when_asked(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path / "part-00000", keep_dropped_images=False)
    gone = sample(1)
    gone.drop("too_small", "quality")
    w.write(gone)
    w.write(sample(2))
    w.commit({})
    dropped = read_dropped(tmp_path / "part-00000")
    assert "image" not in dropped.column_names  # bytes let go at write time, not kept in memory
    assert gone.image is None
    rows = dropped.to_pylist()
    assert [(r["key"], r["drop_reason"]) for r in rows] == [(gone.key, "too_small")]
    assert [s.image for s in next(iter_samples(tmp_path / "part-00000"))] == [sample(2).image]


# --------------------------------------------------------------------------- tar reading


def _with_checksum(hdr: bytearray) -> bytes:
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr)


def test_header_byte_sum_is_exact_at_its_extremes() -> None:
    """The checksum's fast byte sum (two Adler-32 halves) equals `sum` everywhere, also
    where a modulus-65,521 sum would wrap: all-0xFF halves sum to 65,280."""
    rng = random.Random(0)
    headers = [bytes(512), b"\xff" * 512, b"\xff" * 256 + bytes(256), bytes(256) + b"\xff" * 256]
    headers += [rng.randbytes(512) for _ in range(200)]
    assert [_byte_sum(h) for h in headers] == [sum(h) for h in headers]


def test_gnu_base256_sizes_are_read_as_tarfile_reads_them(tmp_path: Path) -> None:
    """GNU tar writes numbers too big for octal fields (members of 8 GiB and more) in
    base-256: a 0x80 byte, then the value big-endian."""
    path = tmp_path / "b.tar"
    data = bytes(range(256)) * 3
    with TarWriter(path) as tw:
        tw.add("big.bin", data)
        tw.add("next.txt", b"after")
    raw = bytearray(path.read_bytes())
    hdr = bytearray(raw[:512])
    hdr[124:136] = b"\x80" + len(data).to_bytes(11, "big")
    raw[:512] = _with_checksum(hdr)
    path.write_bytes(bytes(raw))
    with tarfile.open(path) as tf:
        want = [(m.name, tf.extractfile(m).read()) for m in tf]  # type: ignore[union-attr]
    assert want == [("big.bin", data), ("next.txt", b"after")]
    assert list(iter_members(path)) == want


def test_pax_headers_without_a_path_and_global_headers(tmp_path: Path) -> None:
    path = tmp_path / "p.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers={"origin": "x"}) as tf:
        for name, data, pax in [
            ("a.txt", b"first", {"comment": "no path here"}),
            ("b.json", b"{}", {}),
            ("c/" + "d" * 120 + ".txt", b"long", {"comment": "and a path"}),
        ]:
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(data), pax
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        want = [(m.name, tf.extractfile(m).read()) for m in tf]  # type: ignore[union-attr]
    assert [n for n, _ in want][:2] == ["a.txt", "b.json"]
    assert list(iter_members(path)) == want


def test_empty_and_truncated_tars(tmp_path: Path) -> None:
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    assert list(iter_members(empty)) == [] and list(iter_spans(empty)) == []
    path = tmp_path / "t.tar"
    with TarWriter(path) as tw:
        tw.add("a.jpg", b"a" * 1000)
        tw.add("b.jpg", b"b" * 3000)
        tw.close()  # closing twice changes nothing
        end = tw.offset
    whole = path.read_bytes()
    assert len(whole) == 10240 and whole[end:] == bytes(10240 - end)
    # cut inside b.jpg's data: a.jpg comes out whole, then an error, never a short b.jpg
    for cut in (512 + 1024 + 512 + 1500, 512 + 1024 + 300):  # in the data; in the header
        (tmp_path / "cut.tar").write_bytes(whole[:cut])
        got: list[tuple[str, bytes]] = []
        with pytest.raises(ValueError, match=r"cut\.tar: truncated tar"):
            for member in iter_members(tmp_path / "cut.tar"):
                got.append(member)
        assert got == [("a.jpg", b"a" * 1000)]
    with pytest.raises(ValueError, match="truncated tar"):
        list(iter_spans(tmp_path / "cut.tar"))
    # a file that ends right after a member (no end-of-archive blocks) is read, as tarfile does
    (tmp_path / "noend.tar").write_bytes(whole[:end])
    assert [n for n, _ in iter_members(tmp_path / "noend.tar")] == ["a.jpg", "b.jpg"]


# --------------------------------------------------------------------------- records


def test_rows_with_null_or_missing_columns_read_back_as_kept_samples() -> None:
    """Rows from elsewhere (a list converted to records, a table concatenated with another
    schema) have nulls for status and duplicate_count: they are kept, counted once."""
    url = "http://example.org/x.jpg"
    t = rows_to_table([{"key": make_key(url), "url": url, "source_col": "s1"}])
    assert t.column("status").null_count == 1 and t.column("duplicate_count").null_count == 1
    (s,) = table_to_samples(t)
    assert s.kept and s.status == "ok" and s.duplicate_count == 1
    assert s.extra == {"source_col": "s1"} and s.scores == {} and s.decisions == []
    back = table_to_samples(rows_to_table([s.to_row()]))[0]
    assert back == s


# --------------------------------------------------------------------------- report, progress


def test_the_report_shows_undecodable_dropped_images_as_no_image(tmp_path: Path) -> None:
    from ccurate.report import write_report

    work = tmp_path / "work"
    w = ShardWriter(work / "20_filter" / "part-00000")
    broken, fine = sample(1), sample(2)
    broken.image = b"\xff\xd8 truncated"
    broken.drop("decode_error", "ingest")
    fine.drop("too_small", "quality")
    w.write(broken)
    w.write(fine)
    w.commit({})
    html = write_report(work).read_text()
    assert "<h3>decode_error (1)</h3>" in html and "<h3>too_small (1)</h3>" in html
    section = html.split("<h3>decode_error (1)</h3>", 1)[1].split("</div>\n", 1)[0]
    assert "no image" in section and "data:image/jpeg" not in section
    section = html.split("<h3>too_small (1)</h3>", 1)[1]
    assert "data:image/jpeg;base64," in section


def test_progress_on_a_terminal_and_in_a_log(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = Progress("filter", total=3)
    assert bar._rich is not None
    bar.advance()
    bar.advance(2)
    assert bar.done == 3 and bar._rich.tasks[0].completed == 3
    bar.close()
    assert bar._rich is None
    bar.close()  # closing twice is harmless
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    capsys.readouterr()
    log = Progress("dedup", total=2)
    log.advance(2)
    log.close()
    assert "[dedup] 2/2 (" in capsys.readouterr().err
    quiet = Progress("x", total=1, enabled=False)
    quiet.advance()
    assert capsys.readouterr().err == ""


class _Redirected(Stage):
    """A source stage whose inputs lead to one page: every input gives the same image key
    (two planned pages that redirect to the same page), the last one as a drop."""

    name = "ingest"
    preserves_keys = False

    def process(self, batch: list[Sample]) -> list[Sample]:
        out = []
        for s in batch:
            img = sample(999)
            if s is batch[-1]:
                img.drop("http_404", self.name)
            out.append(img)
        return out


def test_a_source_stage_making_one_key_twice_drops_the_repeat_not_the_shard(tmp_path: Path):
    """ShardWriter refuses a second row with a key: the whole shard failed. The repeat is
    now a `duplicate_url` drop under a key of its own naming the first; counts agree."""
    (src,) = _inputs(tmp_path, n_shards=1, per=3)
    dst = str(tmp_path / "out" / "part-00000")
    stats = run_task(_Redirected(), ShardTask(src, dst))
    assert is_done(dst)
    kept = [s for batch in iter_samples(dst) for s in batch]
    dropped = read_dropped(dst).to_pylist()
    first = sample(999).key
    assert [s.key for s in kept] == [first]
    assert [(r["drop_reason"], r["duplicate_of"]) for r in dropped] == [
        ("duplicate_url", first),
        ("duplicate_url", first),
    ]
    assert len({r["key"] for r in dropped} | {first}) == 3
    assert (stats.n_in, stats.n_kept, stats.n_dropped) == (3, 1, 2)
    assert dict(stats.drops) == {"duplicate_url": 2}


class _Counting(Stage):
    """Writes a file from `teardown` (a stage logs its totals there)."""

    name = "counting"

    def __init__(self, out: str) -> None:
        self.out = out

    def process(self, batch: list[Sample]) -> list[Sample]:
        return batch

    def teardown(self) -> None:
        Path(self.out, f"teardown-{os.getpid()}").write_text("done")


def test_pool_workers_tear_their_stage_down(tmp_path: Path):
    """Pool workers set the stage up but never tore it down: a caption stage's totals
    (captioned, cache hits, failed) were never logged with more than one worker."""
    marks = tmp_path / "marks"
    marks.mkdir()
    inputs = _inputs(tmp_path)
    LocalExecutor(2, progress=False).map(_Counting(str(marks)), tasks_for(inputs, tmp_path / "o"))
    assert len(list(marks.iterdir())) >= 1  # one per worker process that started
