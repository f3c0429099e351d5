"""The spine: record round-trips, shard files publish atomically, executors resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from ccurate.executor import LocalExecutor, ShardTask, run_task, tasks_for
from ccurate.record import (
    Decision,
    LicenseEvidence,
    Sample,
    make_key,
    samples_to_table,
    table_to_samples,
)
from ccurate.shardio import (
    ShardWriter,
    is_done,
    iter_samples,
    list_shards,
    read_dropped,
    write_partition,
)
from ccurate.stage import Filter, FilterStage, Stage


def jpeg(seed: int, size: tuple[int, int] = (32, 24)) -> bytes:
    img = Image.new("RGB", size, (seed * 37 % 255, seed * 91 % 255, seed * 13 % 255))
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def sample(i: int, **kw) -> Sample:
    url = f"http://example.org/img/{i}.jpg"
    return Sample(
        key=make_key(url), url=url, alt_text=f"photo {i}", image=jpeg(i), mime="image/jpeg", **kw
    )


def test_key_is_stable_and_depends_on_page():
    assert make_key("http://a/x.jpg") == make_key("http://a/x.jpg")
    assert make_key("http://a/x.jpg", "http://a/p1") != make_key("http://a/x.jpg", "http://a/p2")
    assert len(make_key("http://a/x.jpg")) == 16


def test_record_roundtrip_keeps_everything_and_extra_columns():
    s = sample(
        1, license_evidence=[LicenseEvidence("page", "link_rel_license", "https://cc/by/4.0/")]
    )
    s.extra = {"similarity": 0.31, "source_id": "abc"}
    s.record(Decision("quality", True, None, {"blur": 12.5}))
    s.record(Decision("watermark", False, "watermark", {"p": 0.9}))
    back = table_to_samples(samples_to_table([s], with_image=True))[0]
    assert back == s
    assert (
        back.status == "dropped"
        and back.drop_reason == "watermark"
        and back.dropped_by == "watermark"
    )
    assert back.scores == {"quality.blur": 12.5, "watermark.p": 0.9}
    assert back.extra == {"similarity": 0.31, "source_id": "abc"}


def test_shard_writer_publishes_atomically_and_streams_back(tmp_path: Path):
    prefix = tmp_path / "s" / "shard-00000"
    w = ShardWriter(prefix)
    kept = [sample(i) for i in range(5)]
    dropped = sample(99)
    dropped.drop("too_small", "quality")
    for s in [*kept, dropped]:
        w.write(s)
    assert not any(
        p.name.startswith("shard-00000") for p in prefix.parent.iterdir()
    )  # nothing visible yet
    w.commit({"stage": "t"})
    assert is_done(prefix)
    back = [s for b in iter_samples(prefix, batch_size=2) for s in b]
    assert [s.key for s in back] == [s.key for s in kept]
    assert [s.image for s in back] == [s.image for s in kept]
    d = read_dropped(prefix).to_pylist()
    assert d[0]["drop_reason"] == "too_small" and d[0]["image"] == dropped.image


def test_shard_bytes_are_deterministic(tmp_path: Path):
    for name in ("a", "b"):
        w = ShardWriter(tmp_path / name / "shard-00000")
        for i in range(3):
            w.write(sample(i))
        w.commit({})
    assert (tmp_path / "a/shard-00000.tar").read_bytes() == (
        tmp_path / "b/shard-00000.tar"
    ).read_bytes()


def test_shard_writer_refuses_duplicate_keys(tmp_path: Path):
    w = ShardWriter(tmp_path / "shard-00000")
    w.write(sample(1))
    with pytest.raises(ValueError, match="duplicate key"):
        w.write(sample(1))
    w.abort()
    assert list(tmp_path.iterdir()) == []


class _OddDropper(Filter):
    name = "odd"

    def decide(self, s: Sample) -> Decision:
        n = int(s.url.rsplit("/", 1)[1].split(".")[0])
        return self.reject("odd_number", n=n) if n % 2 else self.keep(n=n)


class _Loser(Stage):
    name = "loser"

    def process(self, batch: list[Sample]) -> list[Sample]:
        return batch[1:]


def _inputs(tmp_path: Path, n_shards: int = 3, per: int = 4) -> list[str]:
    prefixes = []
    for k in range(n_shards):
        prefix = tmp_path / "in" / f"part-{k:05d}"
        w = ShardWriter(prefix)
        for i in range(k * per, (k + 1) * per):
            w.write(sample(i))
        w.commit({})
        prefixes.append(str(prefix))
    return prefixes


def test_filter_stage_counts_drops_and_keeps_side_output(tmp_path: Path):
    inputs = _inputs(tmp_path)
    stats = LocalExecutor(1, progress=False).map(
        FilterStage([_OddDropper()]), tasks_for(inputs, tmp_path / "out")
    )
    assert (stats.n_in, stats.n_kept, stats.n_dropped) == (12, 6, 6)
    assert stats.drops == {"odd_number": 6}
    outs = list_shards(tmp_path / "out")
    assert len(outs) == 3
    kept = [s for p in outs for b in iter_samples(p) for s in b]
    assert all(s.scores["odd.n"] % 2 == 0 for s in kept)
    dropped = [r for p in outs for r in read_dropped(p).to_pylist()]
    assert sorted(r["scores"][0][1] for r in dropped) == [1, 3, 5, 7, 9, 11]


def test_stage_that_loses_samples_is_an_error(tmp_path: Path):
    inputs = _inputs(tmp_path, 1)
    with pytest.raises(RuntimeError, match="must return every input sample"):
        run_task(_Loser(), ShardTask(inputs[0], str(tmp_path / "out" / "part-00000")))
    assert not is_done(tmp_path / "out" / "part-00000")
    assert not list((tmp_path / "out").glob("part-00000.*"))


def test_rerun_skips_finished_and_redoes_unfinished(tmp_path: Path):
    inputs = _inputs(tmp_path)
    tasks = tasks_for(inputs, tmp_path / "out")
    LocalExecutor(1, progress=False).map(FilterStage([_OddDropper()]), tasks)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.tar")}
    # simulate a kill: shard 1 lost its marker and has a stray temporary
    Path(tasks[1].dst + ".done").unlink()
    (tmp_path / "out" / ".part-00001.tar.tmp-1-x").write_bytes(b"partial")
    stats = LocalExecutor(1, progress=False).map(FilterStage([_OddDropper()]), tasks)
    assert stats.skipped_shards == 2 and stats.shards == 3 and stats.n_in == 12
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.tar")}
    assert after == before
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_process_pool_gives_same_result_as_in_process(tmp_path: Path):
    inputs = _inputs(tmp_path)
    LocalExecutor(1, progress=False).map(
        FilterStage([_OddDropper()]), tasks_for(inputs, tmp_path / "a")
    )
    LocalExecutor(2, progress=False).map(
        FilterStage([_OddDropper()]), tasks_for(inputs, tmp_path / "b")
    )
    for name in ("part-00000", "part-00001", "part-00002"):
        assert (tmp_path / "a" / f"{name}.tar").read_bytes() == (
            tmp_path / "b" / f"{name}.tar"
        ).read_bytes()
        assert pq.read_table(tmp_path / "a" / f"{name}.parquet") == pq.read_table(
            tmp_path / "b" / f"{name}.parquet"
        )


def test_partition_without_images_reads_back(tmp_path: Path):
    recs = [Sample(key=make_key(f"http://x/{i}"), url=f"http://x/{i}") for i in range(3)]
    write_partition(tmp_path / "part-00000", recs)
    back = [s for b in iter_samples(tmp_path / "part-00000") for s in b]
    assert [s.url for s in back] == [r.url for r in recs] and all(s.image is None for s in back)


def test_metadata_json_is_valid_json():
    s = sample(3)
    data = json.loads(s.metadata_json())
    assert data["key"] == s.key and "image" not in data


class _CpuShare(Filter):
    """Records the core share its worker process was given (`worker_cpus`)."""

    name = "cpus"

    def decide(self, s: Sample) -> Decision:
        from ccurate.executor import worker_cpus

        return self.keep(cpus=worker_cpus())


def test_each_worker_process_gets_its_share_of_the_cores(tmp_path: Path):
    from ccurate.executor import usable_cpus

    inputs = _inputs(tmp_path, n_shards=2, per=2)

    def shares(workers: int, out: str) -> set[float]:
        LocalExecutor(workers, progress=False).map(
            FilterStage([_CpuShare()]), tasks_for(inputs, tmp_path / out)
        )
        got: set[float] = set()
        for name in ("part-00000", "part-00001"):
            for scores in pq.read_table(tmp_path / out / f"{name}.parquet")["scores"].to_pylist():
                got.add(dict(scores)["cpus.cpus"])
        return got

    assert shares(1, "in_process") == {float(usable_cpus())}  # in-process: every usable core
    assert shares(2, "two_workers") == {float(max(1, usable_cpus() // 2))}


def test_tar_writer_writes_the_bytes_tarfile_writes(tmp_path: Path):
    import tarfile

    from ccurate.tario import TarWriter

    members = [
        ("0123456789abcdef.jpg", bytes(range(256)) * 81),  # not a whole block
        ("0123456789abcdef.json", b'{"k": 1}'),
        ("empty.txt", b""),
        ("exact.bin", b"x" * 1024),  # whole blocks: no padding
        ("d/" + "n" * 94 + ".txt", b"long"),  # 100 bytes: the longest plain name
        ("p" * 120 + "/long-name.txt", b"prefix"),  # over 100: USTAR prefix field
        ("caf\u00e9-\u5199\u771f.json", b"{}"),  # non-ASCII, UTF-8 encoded
    ]
    for n in (1, 3, len(members)):  # archive ends padded to different record fill levels
        ours, ref = tmp_path / f"ours{n}.tar", tmp_path / f"ref{n}.tar"
        with TarWriter(ours) as tw:
            for name, data in members[:n]:
                tw.add(name, data)
            end = tw.offset
        with tarfile.open(ref, "w", format=tarfile.USTAR_FORMAT, encoding="utf-8") as tf:
            for name, data in members[:n]:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime, info.uid, info.gid = len(data), 0o644, 0, 0, 0
                info.uname = info.gname = ""
                tf.addfile(info, io.BytesIO(data))
        assert ours.read_bytes() == ref.read_bytes()
        with tarfile.open(ours) as tf:
            got = [(m.name, tf.extractfile(m).read()) for m in tf]
        assert got == members[:n]
        assert end == sum(512 + -(-len(d) // 512) * 512 for _, d in members[:n])


def test_shard_index_is_the_table_of_its_samples(tmp_path: Path):
    # the writer keeps the rows it made for the json members; the index must be what
    # samples_to_table makes of the same samples, extra columns included
    samples = [sample(i) for i in range(4)]
    samples[1].extra["source_col"] = "a"
    samples[3].extra["other"] = [1, 2]
    samples[2].scores["q.blur"] = 3.5
    w = ShardWriter(tmp_path / "part-00000")
    for s in samples:
        w.write(s)
    w.commit({})
    got = pq.read_table(tmp_path / "part-00000.parquet")
    want = samples_to_table(samples)
    assert got.schema.names == want.schema.names
    assert got.to_pylist() == want.to_pylist()
    assert got.column_names[-2:] == ["source_col", "other"]
