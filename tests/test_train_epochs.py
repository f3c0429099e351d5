"""The trainer's data coverage: bad samples cost whole samples, empty captions are counted,
every data epoch shows each sample exactly once (any shard sizes, workers, aspect buckets),
and interrupted checkpoint writes leave nothing behind."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from ccurate.tario import TarWriter
from ccurate.train.decode import BadBatch, Decoder
from ccurate.train.loader import ShardDataset, TrainLoader
from ccurate.train.models import ByteTokenizer
from ccurate.train.stream import MemberReader, StreamSpec, count_samples, iter_tar
from ccurate.train.synthetic import write_image_release

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _decoder(seed: int = 7) -> Decoder:
    return Decoder("image", 16, 16, "synthetic", 0.5, seed, ByteTokenizer(48))


def _loader(shards, batch=2, workers=0, seed=7, buffer=4, buckets=None, state=None, epoch=None):
    spec = StreamSpec(tuple(shards), seed=seed, shuffle_shards=True, shuffle_buffer=buffer)
    ds = ShardDataset(spec, _decoder(seed), batch, 0, 1, workers, buckets, 1)
    total = sum(count_samples(s) for s in shards)
    return TrainLoader(ds, epoch or max(1, total // batch), state=state)


def _take(loader: TrainLoader, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        b = next(loader)
        loader.mark(b)
        out.append(b)
    return out


# ---- finding 4: a bad image costs its whole sample ------------------------------------


def test_bad_image_row_takes_the_stand_ins_caption_too(tmp_path):
    write_image_release(tmp_path, [4], resolution=16, bad_keys=["00000001"])
    raws = list(iter_tar(str(tmp_path / "shard-00000.tar")))
    b = _decoder().decode(raws, 0, MemberReader())
    assert b["bad"] == ["00000001"]
    # the stand-in is row 0: its pixels, its caption, its token ids
    assert torch.equal(b["pixels"][1], b["pixels"][0])
    assert b["captions"][1] == b["captions"][0] == "a synthetic caption of sample 00000000"
    assert torch.equal(b["input_ids"][1], b["input_ids"][0])
    assert not torch.equal(b["input_ids"][2], b["input_ids"][0])


def test_all_bad_batch_is_skipped_and_counted(tmp_path):
    keys = write_image_release(tmp_path, [6], resolution=16, bad_keys=["00000000", "00000001"])
    raws = list(iter_tar(str(tmp_path / "shard-00000.tar")))
    with pytest.raises(BadBatch) as info:
        _decoder().decode(raws[:2], 0, MemberReader())
    assert info.value.keys == ["00000000", "00000001"]
    # in the loader: no shuffling, batch 2 -> the first batch is all bad and is skipped
    spec = StreamSpec(tuple([str(tmp_path / "shard-00000.tar")]), 0, False, 1)
    ld = TrainLoader(ShardDataset(spec, _decoder(), 2), 3)
    got = _take(ld, 2)
    assert [b["keys"] for b in got] == [keys[2:4], keys[4:6]]
    assert got[0]["skipped"] == keys[:2]
    assert ld.stats["skipped_batches"] == 1 and ld.stats["skipped_samples"] == 2
    assert ld.stats["bad_samples"] == 0
    assert not any(b["captions"] and (b["pixels"] == 0).all() for b in got)


# ---- finding 10: empty captions are counted -------------------------------------------


def test_empty_captions_are_counted(tmp_path):
    write_image_release(tmp_path / "src", [3], resolution=16)
    reader = MemberReader()
    shard = tmp_path / "empty.tar"
    with TarWriter(shard) as tf:
        for raw in iter_tar(str(tmp_path / "src" / "shard-00000.tar")):
            for ext, m in raw.members.items():
                data = reader.read(m)
                if ext == "json" and raw.key != "00000002":
                    rec = json.loads(data)
                    rec["caption"], rec["alt_text"] = "", "  "
                    data = json.dumps(rec).encode()
                if ext == "txt" and raw.key != "00000002":
                    data = b" "
                tf.add(f"{raw.key}.{ext}", data)
    b = _decoder().decode(list(iter_tar(str(shard))), 0, reader)
    assert b["captions"][:2] == ["", ""] and b["captions"][2]
    assert b["empty"] == 2
    spec = StreamSpec((str(shard),), 0, False, 1)
    ld = TrainLoader(ShardDataset(spec, _decoder(), 3), 1)
    _take(ld, 2)
    assert ld.stats["empty_captions"] == 4


# ---- finding 6: every data epoch shows each sample once, whatever shards and workers -----


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> tuple[list[str], list[str]]:
    """28 samples in shards of 20, 3, 2, 1 and 2: a multiple of batch 2 x 2 workers."""
    root = tmp_path_factory.mktemp("uneven")
    keys = write_image_release(root, [20, 3, 2, 1, 2], resolution=16)
    return sorted(str(p) for p in root.glob("*.tar")), keys


def test_slots_of_a_data_epoch_partition_it_evenly(uneven):
    from ccurate.train.stream import slot_raw

    shards, keys = uneven
    spec = StreamSpec(tuple(shards), seed=3, shuffle_shards=True, shuffle_buffer=1)
    for n_slots in (1, 2, 3, 4, 5, 7, 9):
        for epoch in range(3):
            parts = [[r.key for r in slot_raw(spec, s, n_slots, epoch)] for s in range(n_slots)]
            assert Counter(k for p in parts for k in p) == Counter(keys), (n_slots, epoch)
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1, (n_slots, epoch, sizes)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_every_training_epoch_is_the_dataset_once(uneven, workers):
    shards, keys = uneven
    ld = _loader(shards, batch=2, workers=workers)
    try:
        assert ld.epoch_batches == 14
        for epoch in range(3):
            got = [k for b in _take(ld, ld.epoch_batches) for k in b["keys"]]
            assert Counter(got) == Counter(keys), (workers, epoch)
        state = ld.state()
    finally:
        ld.close()
    assert {int(w) for w in state["workers"]} == set(range(max(1, workers)))


def test_uneven_shards_resume_exactly_with_workers(uneven):
    shards, _ = uneven
    ld = _loader(shards, batch=2, workers=2)
    try:
        whole = [b["keys"] for b in _take(ld, 24)]
    finally:
        ld.close()
    first = _loader(shards, batch=2, workers=2)
    try:
        head = [b["keys"] for b in _take(first, 11)]
        state = first.state()
    finally:
        first.close()
    again = _loader(shards, batch=2, workers=2, state=state)
    try:
        tail = [b["keys"] for b in _take(again, 13)]
    finally:
        again.close()
    assert head + tail == whole


@pytest.mark.parametrize("indexed", [True, False])
def test_a_broken_shard_is_reported_by_one_slot(tmp_path, indexed):
    from ccurate.train.stream import slot_raw

    write_image_release(tmp_path, [6, 6], resolution=16)
    shards = sorted(str(p) for p in tmp_path.glob("*.tar"))
    sizes = [count_samples(s) for s in shards]
    data = Path(shards[1]).read_bytes()
    Path(shards[1]).write_bytes(data[: len(data) // 2] + b"\x01" * 700)  # bad header midway
    spec = StreamSpec(tuple(shards), seed=0, shuffle_shards=False, shuffle_buffer=1)
    from ccurate.train.stream import shard_counts

    if indexed:  # counted before it broke (as a release's index says)
        shard_counts(shards, [(n, "") for n in sizes])
    for n_slots in (2, 3, 4):
        errors: list[list[str]] = [[] for _ in range(n_slots)]
        got = [r.key for s in range(n_slots) for r in slot_raw(spec, s, n_slots, 0, errors[s])]
        assert len(got) == len(set(got)) and 6 <= len(got) < 12
        assert sum(len(e) for e in errors) == 1, (n_slots, errors)


# ---- finding 5: aspect buckets smaller than a batch still train, every data epoch ---------


@pytest.mark.parametrize("workers", [0, 2])
def test_bucket_leftovers_train_every_data_epoch(tmp_path, workers):
    from ccurate.train.stream import make_buckets

    keys = write_image_release(tmp_path, [11, 9], resolution=16)  # 3 aspects, 6-7 each
    shards = sorted(str(p) for p in tmp_path.glob("*.tar"))
    buckets = make_buckets(32, 8, 2.0)  # 3 buckets: (40, 24), (32, 32), (24, 40)
    spec = StreamSpec(tuple(shards), seed=1, shuffle_shards=True, shuffle_buffer=4)
    ds = ShardDataset(spec, _decoder(1), 4, 0, 1, workers, buckets, 1)
    ld = TrainLoader(ds, 5)
    per_epoch: dict[int, list[str]] = {}
    padded = 0
    try:
        while True:
            b = next(ld)
            _, epoch, _ = b["pos"]
            ld.mark(b)
            if epoch >= 3:
                break
            n = len(b["keys"]) - b["padded"]
            assert len(b["keys"]) == 4 and b["pixels"].shape[0] == 4
            per_epoch.setdefault(epoch, []).extend(b["keys"][:n])
            assert set(b["keys"][n:]) <= set(per_epoch[epoch])  # repeats of this epoch's
            padded += b["padded"]
    finally:
        ld.close()
    if workers == 2:  # the other worker may still be in an epoch: compare completed ones
        per_epoch = {e: v for e, v in per_epoch.items() if e < 2}
    for epoch, got in per_epoch.items():
        assert Counter(got) == Counter(keys), epoch
    assert padded > 0 and ld.stats["bucket_padding"] >= padded


def test_bucket_leftover_batch_resumes_exactly(tmp_path):
    from ccurate.train.stream import make_buckets

    write_image_release(tmp_path, [13], resolution=16)
    shards = [str(tmp_path / "shard-00000.tar")]
    buckets = make_buckets(32, 8, 2.0)  # 3 buckets: (40, 24), (32, 32), (24, 40)

    def loader(state=None):
        spec = StreamSpec(tuple(shards), seed=2, shuffle_shards=True, shuffle_buffer=4)
        return TrainLoader(ShardDataset(spec, _decoder(2), 4, 0, 1, 0, buckets, 1), 3, state=state)

    whole = [(b["keys"], b["padded"]) for b in _take(loader(), 12)]
    first = loader()
    head = [(b["keys"], b["padded"]) for b in _take(first, 5)]
    tail = [(b["keys"], b["padded"]) for b in _take(loader(first.state()), 7)]
    assert head + tail == whole
    assert any(p for _, p in whole)


# ---- finding 8: temporaries of interrupted checkpoint writes are removed -----------------


def test_stale_checkpoint_temporaries_are_removed(tmp_path):
    import os
    import subprocess
    import sys
    import time

    from ccurate.shardio import host_name
    from ccurate.train.checkpoint import save_checkpoint

    def save(step: int) -> Path:
        state = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}
        return save_checkpoint(tmp_path, step, {"w": torch.ones(2)}, {}, state, {}, keep=5)

    def tmp(name: str, age: float = 0.0) -> Path:
        d = tmp_path / name
        (d / "unet").mkdir(parents=True)
        (d / "unet" / "weights").write_bytes(b"x" * 1000)
        t = time.time() - age
        os.utime(d, (t, t))
        return d

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    host = host_name()
    save(1)
    killed = tmp(f".step-00000002.tmp-{host}-{dead_pid}-0123abcd")  # writer gone
    live = tmp(f".step-00000002.tmp-{host}-{os.getppid()}-0123abcd")  # a live writer's
    legacy_old = tmp(f".step-00000002.tmp-{dead_pid}-0123abcd", age=3600)  # before step 1
    legacy_new = tmp(f".step-00000009.tmp-{dead_pid}-4567abcd", age=-60)  # after it
    far_old = tmp(".step-00000002.tmp-elsewhere-12-89abcdef", age=3600)  # another machine's
    far_new = tmp(".step-00000009.tmp-elsewhere-12-89abcdef", age=-60)
    save(3)  # recovery runs before every save
    assert not killed.exists() and not legacy_old.exists() and not far_old.exists()
    assert live.exists() and legacy_new.exists() and far_new.exists()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000001", "step-00000003"]
    # a save's own temporary carries host and pid: a save killed midway is recognised
    import ccurate.train.checkpoint as ckpt

    written: list[str] = []

    def spy(tensors, path, *a, **kw):
        written.append(path)
        return real(tensors, path, *a, **kw)

    real, ckpt.save_file = ckpt.save_file, spy
    try:
        save(4)
    finally:
        ckpt.save_file = real
    assert written and all(f".tmp-{host}-{os.getpid()}-" in p for p in written)


def test_resume_latest_removes_a_killed_writers_temporary(tmp_path):
    import subprocess
    import sys

    from ccurate.shardio import host_name
    from ccurate.train.checkpoint import find_checkpoint

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    root = tmp_path / "checkpoints"
    stale = root / f".step-00000004.tmp-{host_name()}-{int(dead.stdout)}-0123abcd" / "unet"
    stale.mkdir(parents=True)
    assert find_checkpoint(tmp_path, "latest") is None
    assert not any(root.iterdir())
