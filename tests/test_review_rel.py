"""Release writer review fixes: an existing release handed back for other inputs, a killed
writer's full build folder never removed, memory per sample, one open file per licence id."""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ccurate.config import parse_config
from ccurate.executor import LocalExecutor
from ccurate.filters.license_filter import release_split
from ccurate.filters.licenses import all_licenses
from ccurate.pipeline import Pipeline, PipelineError
from ccurate.record import Decision, Sample, make_key
from ccurate.shardio import ShardWriter
from ccurate.shards import release as R
from ccurate.shards.config import ShardsConfig
from ccurate.shards.release import SUCCESS, is_release, verify, write_release
from ccurate.shards.synth import make_inputs, synth_image

RUN_INFO = {"date": "2025-06-01", "run_id": "review"}
_IMG = synth_image(random.Random(1), 8, 8)


def _sample(i: int, licence: str = "CC-BY-4.0", key: str | None = None) -> Sample:
    url = f"https://images.example.org/{i:08d}.jpg"
    s = Sample(
        key=key or make_key(url),
        url=url,
        license=licence,
        author=f"Author {i}",
        image=_IMG,
        mime="image/jpeg",
        width=8,
        height=8,
    )
    s.record(Decision("license", True))
    return s


def _shard(prefix: Path, samples: list[Sample]) -> str:
    w = ShardWriter(prefix)
    for s in samples:
        w.write(s)
    w.commit({"stage": "caption", "in": len(samples), "kept": len(samples), "dropped": 0})
    return str(prefix)


# --------------------------------------------------------------------------- 1. immutability


def test_a_named_release_is_not_handed_back_for_other_inputs_or_settings(tmp_path: Path) -> None:
    """`write_release(name=N)` returned an existing release N untouched whatever it was asked
    to publish: a sample taken down since stayed published and the caller was told it was
    built. Now other inputs or settings are refused; the same ones are still a no-op."""
    keep, gone = _sample(1), _sample(2, "CC-BY-NC-4.0")
    before = _shard(tmp_path / "a" / "in-0", [keep, gone])
    after = _shard(tmp_path / "b" / "in-0", [keep])  # the run after the takedown
    out = tmp_path / "out"
    rel = write_release([before], [], out, ShardsConfig(), name="mydata", run_info=RUN_INFO)
    stamp = (rel / SUCCESS).stat().st_mtime_ns
    with pytest.raises(FileExistsError, match=r"release 'mydata' exists .* other inputs") as e:
        write_release([after], [], out, ShardsConfig(), name="mydata", run_info=RUN_INFO)
    assert "immutable" in str(e.value) and "new release name" in str(e.value)
    with pytest.raises(FileExistsError, match=r"other \[shards\] settings \(samples_per_shard\)"):
        write_release([before], [], out, ShardsConfig(samples_per_shard=7), name="mydata")
    # the same inputs elsewhere (names, not paths, count) and settings: the release, untouched
    again = _shard(tmp_path / "c" / "in-0", [keep, gone])
    assert write_release([again], [], out, ShardsConfig(), name="mydata") == rel
    assert (rel / SUCCESS).stat().st_mtime_ns == stamp and verify(rel) == []
    assert write_release([after], [], out, ShardsConfig(), name="mydata-2").name == "mydata-2"


def _caption_step(pipe: Pipeline, samples: list[Sample]) -> None:
    d = pipe.step_dir("caption")
    for p in d.glob("*"):
        p.unlink()
    d.mkdir(parents=True, exist_ok=True)
    _shard(d / "shard-00000", samples)
    (d / "_COMPLETE").write_text("{}")


def test_the_pipeline_refuses_a_named_release_whose_inputs_changed(tmp_path: Path) -> None:
    """With a fixed `run.release_name`, a shard rerun after a takedown reported success and
    handed back the old release (the guard compared settings, not the inputs digest it
    computes): the taken-down sample stayed published."""
    cfg = parse_config(
        {
            "run": {
                "work_dir": str(tmp_path / "work"),
                "release_dir": str(tmp_path / "releases"),
                "release_name": "mydata-2026-12",
            }
        }
    )
    pipe = Pipeline(cfg, LocalExecutor(1, progress=False))
    keep, gone = _sample(1), _sample(2)
    _caption_step(pipe, [keep, gone])
    pipe.shard()
    rel = tmp_path / "releases" / "mydata-2026-12"
    assert is_release(rel)
    pipe.shard()  # the same inputs: a no-op
    _caption_step(pipe, [keep])
    with pytest.raises(PipelineError, match=r"'mydata-2026-12' exists .* other inputs"):
        pipe.shard()
    keys = pq.read_table(rel / "manifest.parquet").column("key").to_pylist()
    assert sorted(keys) == sorted([keep.key, gone.key])  # untouched, and not reported as new


# --------------------------------------------------------------------------- 2. stale builds


def test_a_writer_killed_while_hashing_leaves_nothing_behind(tmp_path: Path) -> None:
    """The build folder lost `.work` before the longest phase (hashing and fsyncing every
    file), so a writer killed there left a hidden full release that later writers of other
    names (a rebuild's next generation) never removed."""
    ins, drops = make_inputs(tmp_path / "in", n_shards=1, per_shard=6)
    out = tmp_path / "out"
    child = textwrap.dedent(f"""
        import os, signal
        import ccurate.shards.release as R
        from ccurate.shards.config import ShardsConfig
        R._sha256sums = lambda root: os.kill(os.getpid(), signal.SIGKILL)
        R.write_release({ins!r}, {drops!r}, {str(out)!r}, ShardsConfig(), name="gen-1",
                        run_info={RUN_INFO!r})
    """)
    r = subprocess.run([sys.executable, "-c", child], check=False)
    assert r.returncode == -9
    (left,) = out.glob(".tmp-gen-1-*")
    assert (left / "manifest.parquet").is_file() and not (left / ".work").exists()
    rel = write_release(ins, drops, out, ShardsConfig(), name="gen-2", run_info=RUN_INFO)
    assert is_release(rel) and not list(out.glob(".tmp-*"))
    assert verify(rel) == []  # the marker never reaches a published release


def test_stale_build_folders_are_told_from_other_tools(tmp_path: Path) -> None:
    """A writer killed between the end of its build and the rename left a complete release
    under its temporary name, which no later writer of another name removed; another
    tool's temporary folder (an MDS export) must still be left alone."""
    ins, drops = make_inputs(tmp_path / "in", n_shards=1, per_shard=4)
    out = tmp_path / "out"
    done = write_release(ins, drops, out, ShardsConfig(), name="gen-1", run_info=RUN_INFO)
    renamed = out / ".tmp-gen-1-4242"  # killed just before its rename
    os.rename(done, renamed)
    other = out / ".tmp-commercial-99"  # an MDS export's temporary
    other.mkdir()
    (other / "shard.00000.mds").write_bytes(b"half")
    (other / SUCCESS).write_text(json.dumps({"release": "gen-1"}))  # not its name: not ours
    rel = write_release(ins, drops, out, ShardsConfig(), name="gen-3", run_info=RUN_INFO)
    assert is_release(rel)
    assert not renamed.exists() and other.exists()


# --------------------------------------------------------------------------- 3. memory


def _peak(tmp: Path, n: int) -> int:
    p = _shard(tmp / "in-0", [_sample(i, "CC-BY-NC-4.0") for i in range(n)])
    cfg = ShardsConfig(splits=["commercial"])  # every sample excluded: nothing decoded
    tracemalloc.start()
    try:
        write_release([p], [], tmp / "out", cfg, name="r", run_info=RUN_INFO)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_release_writer_memory_does_not_grow_per_sample(tmp_path: Path) -> None:
    """Every key seen (a set of str) and every excluded row (a dict each, written at the
    end) stayed in memory for the whole build: about 500 B a sample, ~47 GiB for 100M."""
    small = _peak(tmp_path / "small", 1100)
    big = _peak(tmp_path / "big", 3100)
    per_sample = (big - small) / 2000
    assert per_sample < 100, f"{per_sample:.0f} B of Python memory per extra sample"
    excluded = pq.read_table(tmp_path / "big" / "out" / "r" / "excluded.parquet")
    assert excluded.num_rows == 3100 and set(excluded.column("reason").to_pylist()) == {
        "split_not_published"
    }


def test_duplicate_keys_and_excluded_rows_are_exact_when_streamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compact key set must flag exactly the keys a set of str flagged (the first one
    wins; upper-case hex and non-pipeline keys are keys of their own), and excluded.parquet
    streamed in small row groups holds the rows in order (as the old writer did)."""
    monkeypatch.setattr(R, "_EXCLUDED_CHUNK", 3, raising=False)
    monkeypatch.setattr(R, "_MANIFEST_BATCH", 7)
    rng = random.Random(3)
    pool = [f"{rng.getrandbits(64):016x}" for _ in range(40)]
    pool += ["ABCDEF0123456789", "abcdef0123456789", "custom_key-1", "0" * 16]
    inputs, expected, seen = [], [], set()
    for k in range(4):
        keys = list(dict.fromkeys(rng.choice(pool) for _ in range(90)))  # unique in a shard
        samples = [_sample(k * 1000 + i, key=key) for i, key in enumerate(keys)]
        inputs.append(_shard(tmp_path / f"d{k}" / "in-0", samples))
        for key in keys:
            if key in seen:
                expected.append((key, f"d{k}/in-0"))
            seen.add(key)
    rel = write_release(inputs, [], tmp_path / "out", ShardsConfig(), name="r", run_info=RUN_INFO)
    t = pq.read_table(rel / "excluded.parquet")
    got = [(r["key"], r["detail"]) for r in t.to_pylist() if r["reason"] == "duplicate_key"]
    assert got == expected and len(got) > 20
    assert sorted(pq.read_table(rel / "manifest.parquet").column("key").to_pylist()) == sorted(seen)


def test_seen_keys_answer_as_a_set_does() -> None:
    """`_SeenKeys.first_seen` over batches (duplicates inside a batch too, runs merged many
    times) gives what `key in seen; seen.add(key)` gave one key at a time."""
    rng = random.Random(5)
    pool = [f"{rng.getrandbits(64):016x}" for _ in range(600)] + ["F" * 16, "f" * 16, "k-1"]
    keys, ref = R._SeenKeys(), set()
    for _ in range(300):
        batch = [rng.choice(pool) for _ in range(rng.randint(0, 70))]
        want = []
        for k in batch:
            want.append(k not in ref)
            ref.add(k)
        assert keys.first_seen(batch) == want
    assert sum(len(r) for r in keys._runs) + len(keys._other) == len(ref)
    odd = R._SeenKeys()  # hex keys of other lengths are keys of their own, never spliced
    assert odd.first_seen(["a" * 15, "a" * 17]) == [True, True]
    assert odd.first_seen(["a" * 16, "a" * 16, "a" * 15]) == [True, False, False]


# --------------------------------------------------------------------------- 4. open files


def test_more_licence_ids_than_open_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One attribution spool file stayed open per licence id for the whole build: with more
    releasable ids than the open-file limit (the filter emits ~2,300) the release died
    with EMFILE. The spooled ATTRIBUTION must not depend on how often lines are flushed."""
    ids = sorted(i.spdx for i in all_licenses() if release_split(i.spdx))[:120]
    p = _shard(tmp_path / "in-0", [_sample(i, ids[i % len(ids)]) for i in range(240)])
    cfg = ShardsConfig(samples_per_shard=100_000)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, in_use + 60), hard))
    try:
        rel = write_release([p], [], tmp_path / "out", cfg, name="r", run_info=RUN_INFO)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    monkeypatch.setattr(R, "_CREDIT_BUFFER", 50)  # a flush every line or two
    again = write_release([p], [], tmp_path / "out2", cfg, name="r", run_info=RUN_INFO)
    text = (rel / "ATTRIBUTION").read_text(encoding="utf-8")
    assert text == (again / "ATTRIBUTION").read_text(encoding="utf-8")
    assert text.count("\n## ") == len(ids) and text.count("\n- ") == 240
