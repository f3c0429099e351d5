"""The trainer's shard stream: determinism, resume, rank balance, captions, buckets."""

from __future__ import annotations

import io
import itertools
import json
import math
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ccurate.tario import TarWriter
from ccurate.train.decode import (
    Decoder,
    load_npy,
    npy_view,
    parse_record,
    pick_caption,
    unit_hash,
)
from ccurate.train.loader import BatchRing, RingRef, ShardDataset, TrainLoader
from ccurate.train.models import ByteTokenizer
from ccurate.train.stream import (
    DataError,
    MemberReader,
    StreamSpec,
    count_samples,
    find_shards,
    iter_tar,
    make_buckets,
    nearest_bucket,
)
from ccurate.train.synthetic import write_image_release, write_latent_release

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _loader(
    shards,
    batch=3,
    rank=0,
    world=1,
    workers=0,
    state=None,
    buckets=None,
    policy="synthetic",
    buffer=16,
    seed=7,
):
    spec = StreamSpec(tuple(shards), seed=seed, shuffle_shards=True, shuffle_buffer=buffer)
    dec = Decoder("image", 16, 16, policy, 0.5, seed, ByteTokenizer(24))
    ds = ShardDataset(spec, dec, batch, rank, world, workers, buckets, 1)
    total = sum(count_samples(s) for s in shards)
    return TrainLoader(ds, max(1, total // (batch * world)), state=state)


def _take(loader, n):
    out = []
    for _ in range(n):
        b = next(loader)
        loader.mark(b)
        out.append(b)
    return out


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("release")
    keys = write_image_release(root, [5, 9, 2, 7], resolution=16, bad_keys=["00100003"])
    return root, keys


def test_find_shards_sorted_and_ignores_hidden(tmp_path):
    write_image_release(tmp_path / "b", [1])
    write_image_release(tmp_path / "a", [1])
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "x.tar").write_bytes(b"")
    (tmp_path / "a" / ".shard-1.tar").write_bytes(b"")
    found = find_shards(tmp_path)
    assert [Path(p).parent.name for p in found] == ["a", "b"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.tar shards"):
        find_shards(tmp_path / "empty")
    with pytest.raises(DataError, match="no such shard"):
        find_shards(tmp_path / "missing.tar")


def test_a_stray_tar_beside_a_release_is_not_trained_on(tmp_path):
    """A release is what its SHA256SUMS lists: a copied or injected tar in a split folder
    is no part of it (`ccurate.shards.release.verify` reports it; the trainer skips it)."""
    import hashlib

    root = tmp_path / "rel"
    write_image_release(root / "commercial", [3])
    (root / "_SUCCESS").write_text("{}")
    tar = next((root / "commercial").glob("*.tar"))
    digest = hashlib.sha256(tar.read_bytes()).hexdigest()
    (root / "SHA256SUMS").write_text(f"{digest}  commercial/{tar.name}\n")
    (root / "commercial" / "stray-00000.tar").write_bytes(tar.read_bytes())
    assert find_shards(root) == [str(tar)]
    (root / "SHA256SUMS").unlink()  # no list: every tar of the split, as before
    assert len(find_shards(root)) == 2


def test_stream_is_deterministic_and_covers_each_epoch(release):
    root, keys = release
    shards = find_shards(root)
    n = len(keys) - 1  # batch 1: the bad sample's batch has nothing to train, it is skipped

    def seen(seed: int) -> list[str]:  # keys trained, and skipped where they were skipped
        return [
            k
            for b in _take(_loader(shards, batch=1, seed=seed), n)
            for k in b["skipped"] + b["keys"]
        ]

    a, b = seen(7), seen(7)
    assert a == b
    assert sorted(a) == sorted(keys)  # one data epoch = every sample once
    c = seen(8)
    assert c != a and sorted(c) == sorted(keys)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_neither_repeats_nor_skips(release, workers):
    root, _ = release
    shards = find_shards(root)
    n, k = 11, 4  # crosses data-epoch boundaries (23 samples, batch 3)
    full = [b["keys"] for b in _take(_loader(shards, workers=workers), n)]
    first = _loader(shards, workers=workers)
    part = [b["keys"] for b in _take(first, k)]
    state = json.loads(json.dumps(first.state()))  # what a checkpoint stores
    first.close()
    rest = [b["keys"] for b in _take(_loader(shards, workers=workers, state=state), n - k)]
    assert part + rest == full


def test_resume_skips_without_reading_members(release, monkeypatch):
    root, _ = release
    shards = find_shards(root)
    first = _loader(shards)
    _take(first, 6)
    state = first.state()
    reads = Counter()
    real = MemberReader.read

    def counting(self, m):
        reads[m.size > 0] += 1
        return real(self, m)

    monkeypatch.setattr(MemberReader, "read", counting)
    _take(_loader(shards, state=state), 2)
    # only the 2 x 3 samples handed out are read (json + txt + image each)
    assert sum(reads.values()) == 2 * 3 * 3


def test_bucketed_resume_and_shapes(release):
    root, _ = release
    shards = find_shards(root)
    buckets = make_buckets(16, 4, 2.0)
    full = _take(_loader(shards, batch=2, buckets=buckets), 8)
    for b in full:
        h, w = b["pixels"].shape[-2:]
        assert (h, w) in buckets and b["pixels"].shape[0] == 2
    assert len({tuple(b["pixels"].shape[-2:]) for b in full}) > 1  # several aspect buckets
    first = _loader(shards, batch=2, buckets=buckets)
    _take(first, 3)
    rest = _take(_loader(shards, batch=2, buckets=buckets, state=first.state()), 5)
    assert [b["keys"] for b in rest] == [b["keys"] for b in full[3:]]


def test_every_rank_gets_the_same_number_of_batches(tmp_path):
    keys = write_image_release(tmp_path, [1, 13, 2, 6, 1], resolution=16)  # very uneven
    shards = find_shards(tmp_path)
    world, batch = 2, 2
    loaders = [_loader(shards, batch=batch, rank=r, world=world, buffer=4) for r in range(world)]
    assert loaders[0].epoch_batches == len(keys) // (batch * world) == loaders[1].epoch_batches
    seen: list[list[str]] = [[], []]
    for _epoch in range(3):
        counts = []
        for r, ld in enumerate(loaders):
            got = list(ld.epoch())
            counts.append(len(got))
            seen[r].extend(k for b in got for k in b["keys"])
        assert counts == [loaders[0].epoch_batches] * world
    # within one data epoch the ranks read disjoint shards
    assert not set(seen[0][:4]) & set(seen[1][:4])
    assert set(seen[0]) | set(seen[1]) <= set(keys)


def test_fewer_shards_than_slots_split_by_sample(tmp_path):
    keys = write_image_release(tmp_path, [10], resolution=16)
    shards = find_shards(tmp_path)
    got = [
        [
            k
            for b in _take(_loader(shards, batch=1, rank=r, world=2, workers=0), 5)
            for k in b["keys"]
        ]
        for r in range(2)
    ]
    assert not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == sorted(keys)


def test_parse_record_reads_what_json_dumps_writes_and_refuses_the_rest():
    rec = {"caption": "a dog \u00e9", "alt_text": "x", "scores": {"blur": float("nan")}}
    got = parse_record(json.dumps(rec).encode())  # NaN: orjson refuses, json reads it
    assert got["caption"] == "a dog \u00e9" and math.isnan(got["scores"]["blur"])
    assert parse_record(json.dumps({"caption": "c", "n": 1}).encode()) == {"caption": "c", "n": 1}
    assert parse_record(b"[1, 2]") == {}  # not a record
    assert parse_record(b'{"caption": "trunc') == {}
    assert parse_record(b'{"caption": "\xff\xfe"}') == {}  # not UTF-8
    # past orjson's 1,024 levels the standard parser raised RecursionError out of the batch
    assert parse_record(b'{"a": ' * 5_000 + b"1" + b"}" * 5_000) == {}


@pytest.mark.parametrize("value", [5, ["a"], {"t": "x"}, True, None])
def test_a_caption_that_is_no_string_costs_the_caption_not_the_batch(value: object):
    """A hand-edited shard's `"caption": 5` raised AttributeError out of the loader, and a
    resumed run met the same sample again."""
    rec = {"caption": value, "alt_text": value}
    assert pick_caption(rec, "from txt", "synthetic") == ("from txt", "txt")
    assert pick_caption(rec, None, "alt_text") == ("", "empty")
    assert pick_caption({"caption": value, "alt_text": " alt "}, None, "synthetic") == (
        "alt",
        "alt_text",
    )


def test_pick_caption_policies():
    rec = {"caption": "a dog on grass", "alt_text": "IMG_0001 dog"}
    assert pick_caption(rec, "txt", "synthetic") == ("a dog on grass", "synthetic")
    assert pick_caption(rec, "txt", "alt_text") == ("IMG_0001 dog", "alt_text")
    assert pick_caption({"caption": ""}, "from txt", "synthetic") == ("from txt", "txt")
    assert pick_caption({"caption": "c"}, None, "alt_text") == ("c", "synthetic")
    assert pick_caption({}, None, "mix") == ("", "empty")
    draws = [unit_hash(0, 0, f"k{i}", "caption") for i in range(4000)]
    sources = Counter(pick_caption(rec, None, "mix", 0.3, u)[1] for u in draws)
    assert 0.25 < sources["synthetic"] / 4000 < 0.35


@pytest.mark.parametrize(
    "policy,prefix", [("synthetic", "a synthetic caption"), ("alt_text", "alt text")]
)
def test_caption_source_and_bad_images(release, policy, prefix):
    root, keys = release
    shards = find_shards(root)
    batches = _take(_loader(shards, batch=1, policy=policy), len(keys))
    caps = [b["captions"][0] for b in batches]
    assert all(c.startswith(prefix) for c in caps)
    tok = ByteTokenizer(24)
    assert torch.equal(batches[0]["input_ids"], tok(caps[:1]))
    # batch 1: the bad sample's batch has no stand-in, so it is skipped (and counted)
    assert not any(b["bad"] for b in batches)
    assert [k for b in batches for k in b["skipped"]] == ["00100003"]
    assert all(
        b["pixels"].shape == (1, 3, 16, 16) and b["pixels"].dtype == torch.uint8 for b in batches
    )


def test_buckets_geometry():
    buckets = make_buckets(512, 64, 2.0)
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in buckets)
    assert all(0.75 * 512**2 <= h * w <= 512**2 for h, w in buckets)
    assert (512, 512) in buckets
    h, w = nearest_bucket(1920, 1080, buckets)
    assert w > h
    h, w = nearest_bucket(600, 1200, buckets)
    assert h > w


def test_pickled_npy_member_is_refused(tmp_path):
    arr = np.array([{"evil": 1}], dtype=object)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    with pytest.raises(DataError, match="refused"):
        load_npy(buf.getvalue(), "k")
    path = tmp_path / "x.tar"
    with TarWriter(path) as tf:
        tf.add("k.latent.npy", buf.getvalue())
        tf.add("k.emb.npy", buf.getvalue())
    dec = Decoder("latent", 8, 8)
    raw = next(iter_tar(str(path)))
    with pytest.raises(DataError, match="refused"):
        dec.decode([raw], 0, MemberReader())


def test_one_bad_latent_sample_is_counted_not_fatal(tmp_path):
    """As in pixel mode: a pickled or missing member marks that sample bad, its row takes
    a good sample's arrays, and the batch goes on."""
    good = io.BytesIO()
    np.save(good, np.ones((4, 2, 2), np.float16))
    emb = io.BytesIO()
    np.save(emb, np.ones((3, 8), np.float16))
    evil = io.BytesIO()
    np.save(evil, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    path = tmp_path / "l.tar"
    with TarWriter(path) as tf:
        tf.add("a.latent.npy", good.getvalue())
        tf.add("a.emb.npy", emb.getvalue())
        tf.add("b.latent.npy", evil.getvalue())
        tf.add("b.emb.npy", emb.getvalue())
        tf.add("c.latent.npy", good.getvalue())  # no text embedding
    group = list(iter_tar(str(path)))
    out = Decoder("latent", 8, 8).decode(group, 0, MemberReader())
    assert out["bad"] == ["b", "c"] and out["keys"] == ["a", "b", "c"]
    assert tuple(out["latents"].shape) == (3, 4, 2, 2) and tuple(out["emb"].shape) == (3, 3, 8)


def test_tar_grouping_with_directories(tmp_path):
    path = tmp_path / "d.tar"
    with TarWriter(path) as tf:
        for key in ("x/a1", "x/a2"):
            tf.add(f"{key}.txt", b"t")
            tf.add(f"{key}.json", b"{}")
    got = list(iter_tar(str(path)))
    assert [(r.key, sorted(r.members)) for r in got] == [
        ("a1", ["json", "txt"]),
        ("a2", ["json", "txt"]),
    ]
    lazy = next(itertools.islice(iter_tar(str(path)), 1))
    assert lazy.members["txt"].data is None  # local shards: nothing read yet
    reader = MemberReader()
    assert reader.read(lazy.members["json"]) == b"{}"  # by offset from the header scan
    reader.close()
    streamed = list(iter_tar(f"pipe:cat {path}"))  # not a local path: read eagerly
    assert [(r.key, {k: m.data for k, m in r.members.items()}) for r in streamed] == [
        ("a1", {"txt": b"t", "json": b"{}"}),
        ("a2", {"txt": b"t", "json": b"{}"}),
    ]


@pytest.mark.parametrize(
    "size,mode,fmt",
    [
        ((1024, 768), "RGB", "JPEG"),  # DCT-scaled decode (1/2), then area resize
        ((200, 300), "RGB", "JPEG"),  # upscale
        ((320, 256), "RGBA", "PNG"),
        ((300, 300), "P", "PNG"),
        ((333, 250), "L", "JPEG"),  # grey JPEG: simplejpeg converts to RGB
        ((400, 300), "CMYK", "JPEG"),  # simplejpeg and OpenCV refuse it: PIL fallback
    ],
)
def test_fast_decode_matches_the_pil_path(size, mode, fmt):
    import io

    from PIL import Image

    from ccurate.train.decode import decode_resize_crop, resize_crop

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    data = buf.getvalue()
    fast = decode_resize_crop(data, 256, 256)
    with Image.open(io.BytesIO(data)) as im:
        ref = resize_crop(im, 256, 256)
    assert fast.shape == ref.shape == (256, 256, 3) and fast.dtype == np.uint8
    assert np.abs(fast.astype(int) - ref.astype(int)).mean() < 3.0


def test_fast_decode_refuses_garbage_with_a_data_error():
    from ccurate.train.decode import decode_resize_crop

    with pytest.raises(DataError):
        decode_resize_crop(b"not an image at all", 64, 64)


def test_random_flip_mirrors_about_half_and_is_fixed_by_seed_epoch_key(tmp_path):
    """Flipped rows equal the unflipped decode mirrored; the same ones on a rerun (resume)."""
    root = tmp_path / "r"
    write_image_release(root, [40], resolution=16)
    raws = list(iter_tar(find_shards(root)[0]))
    reader = MemberReader()
    plain = Decoder("image", 16, 16, seed=3).decode(raws, 0, reader)["pixels"]
    flip = Decoder("image", 16, 16, seed=3, random_flip=True)
    a = flip.decode(raws, 0, reader)["pixels"]
    b = flip.decode(raws, 0, reader)["pixels"]
    other_epoch = flip.decode(raws, 1, reader)["pixels"]
    reader.close()
    assert torch.equal(a, b)
    mirrored = [i for i in range(len(raws)) if torch.equal(a[i], plain[i].flip(-1))]
    same = [i for i in range(len(raws)) if torch.equal(a[i], plain[i])]
    assert sorted(mirrored + same) == list(range(len(raws)))  # every row one or the other
    assert 10 <= len(mirrored) <= 30
    assert not torch.equal(a, other_epoch)  # a new draw per data epoch


def test_batch_ring_reuses_a_buffer_only_once_its_batch_is_released():
    released = torch.zeros(1, dtype=torch.int64)
    ring = BatchRing(released, worker=0, depth=2)
    a, b = ring.buffer(96), ring.buffer(96)
    assert a.data_ptr() != b.data_ptr() and a.numel() == 96
    got: list[torch.Tensor] = []
    waiter = threading.Thread(target=lambda: got.append(ring.buffer(96)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not got  # batch 0 not released: its buffer is not handed out
    released[0] = 1
    waiter.join(5)
    assert got and got[0].data_ptr() == a.data_ptr()  # batch 2 reuses batch 0's buffer
    released[0] = 2
    smaller = ring.buffer(48)  # a smaller bucket fits in batch 1's buffer
    assert smaller.data_ptr() == b.data_ptr() and smaller.numel() == 48
    released[0] = 3
    bigger = ring.buffer(192)  # a bigger one gets a new buffer
    assert bigger.data_ptr() != a.data_ptr() and bigger.numel() == 192
    released.fill_(BatchRing.CLOSED)  # what TrainLoader.close() sets: nobody waits
    flat = ring.buffer(96)
    batch = {"pixels": flat[:48].view(1, 4, 4, 3), "other": torch.zeros(3), "keys": ["k"]}
    ring.tag(batch)
    assert batch["ring"] == [0, 5, ["pixels"]]  # the entries that live in the ring


def test_batch_ring_sends_a_buffer_once_then_references_into_it():
    released = torch.zeros(1, dtype=torch.int64)
    ring = BatchRing(released, worker=0, depth=1, by_reference=True)
    flat = ring.buffer(64)
    first = {"a": flat[:8].view(torch.float16).view(2, 2), "b": flat[8:40].view(4, 8), "n": 1}
    ring.tag(first)
    assert isinstance(first["a"], torch.Tensor)  # first use: the storage itself goes
    released[0] = 1
    flat = ring.buffer(64)
    flat[:8].view(torch.float16).copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    flat[8:40] = torch.arange(32, dtype=torch.uint8)
    second = {"a": flat[:8].view(torch.float16).view(2, 2), "b": flat[8:40].view(4, 8).t()}
    ring.tag(second)
    ref_a, ref_b = second["a"], second["b"]
    assert isinstance(ref_a, RingRef) and isinstance(ref_b, RingRef)
    storage = first["a"].untyped_storage()  # what the trainer mapped with the first batch
    assert torch.equal(ref_a.view_of(storage), torch.tensor([[1.0, 2.0], [3.0, 4.0]]).half())
    assert torch.equal(ref_b.view_of(storage), torch.arange(32, dtype=torch.uint8).view(4, 8).t())
    released[0] = 2
    big = ring.buffer(128)  # a bigger bucket: a new buffer, whose storage is sent again
    third = {"a": big[:8]}
    ring.tag(third)
    assert isinstance(third["a"], torch.Tensor) and third["a"].data_ptr() == big.data_ptr()
    assert second["ring"] == [0, 1, ["a", "b"]] and third["ring"] == [0, 2, ["a"]]


@pytest.mark.parametrize("mode", ["image", "latent"])
def test_loader_batches_stay_intact_while_workers_reuse_their_buffers(release, tmp_path, mode):
    """Workers refill a few shared buffers in turn; every array handed out is a copy, so
    batches kept by the trainer equal those of a loader that allocates afresh."""
    if mode == "image":
        shards = find_shards(release[0])
    else:
        shards = write_latent_release(tmp_path, 21, 3, (2, 2), 3, 8, "tiny", 16)
    n = 24  # 12 per worker, 4 times the ring's depth (prefetch_factor 1 + 2)
    arrays = ["pixels"] if mode == "image" else ["latents", "emb"]

    def loader(reuse_buffers=True):
        spec = StreamSpec(tuple(shards), seed=7, shuffle_shards=True, shuffle_buffer=16)
        dec = Decoder(mode, 16, 16, random_flip=mode == "image")
        ds = ShardDataset(spec, dec, 3, num_workers=2)
        return TrainLoader(ds, 100, prefetch_factor=1, reuse_buffers=reuse_buffers)

    reused = loader()
    kept = _take(reused, n)
    mapped = {s.data_ptr() for s in reused._mapped.values()}
    by_reference = reused.by_reference
    reused.close()
    assert len(mapped) == 2 * 3  # 2 workers x depth 3 buffers served all 24 batches
    # a buffer's storage was sent once; its later batches came as references to it
    assert by_reference == n - 2 * 3
    for name in arrays:  # the handed-out copies
        assert len({b[name].data_ptr() for b in kept}) == n
    fresh_loader = loader(reuse_buffers=False)  # a new shared segment per batch
    fresh = _take(fresh_loader, n)
    assert not fresh_loader._mapped  # nothing came from a ring
    for a, b in zip(kept, fresh, strict=True):
        assert a["keys"] == b["keys"]
        for name in arrays:
            assert torch.equal(a[name], b[name])
            assert a[name].stride() == b[name].stride()  # channels-last pixels kept


def test_npy_view_reads_without_copying_and_refuses_pickles():
    arr = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    for a in (arr, np.asfortranarray(arr)):
        buf = io.BytesIO()
        np.save(buf, a)
        data = buf.getvalue()
        view = npy_view(data, "k")
        assert np.array_equal(view, arr) and not view.flags.writeable  # a view of `data`
    with pytest.raises(DataError, match="refused"):
        npy_view(data[:-5], "k")  # truncated
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="refused"):
        npy_view(buf.getvalue(), "k")


def test_loader_without_copy_out_hands_out_ring_buffers_valid_until_the_next(release):
    """`copy_out=False` (the trainer's setting) saves the copy out of the workers' ring:
    each batch, cloned at once by the consumer, equals the copy-out loader's, and the
    buffers in use are the ring's own."""
    shards = find_shards(release[0])

    def loader(copy_out: bool) -> TrainLoader:
        spec = StreamSpec(tuple(shards), seed=7, shuffle_shards=True, shuffle_buffer=16)
        ds = ShardDataset(spec, Decoder("image", 16, 16, random_flip=True), 3, num_workers=2)
        return TrainLoader(ds, 100, prefetch_factor=1, copy_out=copy_out)

    inplace = loader(copy_out=False)
    got, ptrs = [], set()
    for _ in range(24):  # 4 times the ring's depth per worker: slots are reused
        b = next(inplace)
        ptrs.add(b["pixels"].untyped_storage().data_ptr())
        got.append((b["keys"], b["pixels"].clone()))
        inplace.mark(b)
    inplace.close()
    assert len(ptrs) == 2 * 3  # the 6 ring buffers themselves, no copies
    copied = loader(copy_out=True)
    for keys, pixels in got:
        b = next(copied)
        copied.mark(b)
        assert b["keys"] == keys and torch.equal(b["pixels"], pixels)
    copied.close()


def test_fast_jpeg_decode_is_close_to_the_accurate_one_and_reuses_its_buffer():
    from PIL import Image

    from ccurate.train.decode import DecodeBuffer, decode_resize_crop

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((320, 256), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    accurate = decode_resize_crop(data, 256, 256)
    scratch = DecodeBuffer()
    fast = decode_resize_crop(data, 256, 256, fast=True, buffer=scratch)
    assert fast.shape == accurate.shape == (256, 256, 3)
    mse = np.mean((fast.astype(float) - accurate.astype(float)) ** 2)
    assert mse > 0 and 10 * np.log10(255**2 / mse) > 38  # not identical, visually the same
    again = decode_resize_crop(data, 256, 256, fast=True, buffer=scratch)
    assert np.shares_memory(fast, again)  # decoded into the same buffer, no new array


def test_a_jpeg_already_at_the_training_size_is_decoded_straight_into_its_batch_slot():
    from PIL import Image

    from ccurate.train.decode import DecodeBuffer, decode_resize_crop

    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)

    def jpeg(w: int, h: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC).save(buf, "JPEG")
        return buf.getvalue()

    exact, wide = jpeg(64, 48), jpeg(80, 48)
    slots = np.zeros((2, 48, 64, 3), np.uint8)
    first, second = slots[0], slots[1]
    got = decode_resize_crop(exact, 48, 64, buffer=DecodeBuffer(), out=second)
    assert got is second  # no copy: the slot holds the pixels
    assert np.array_equal(second, decode_resize_crop(exact, 48, 64)) and not first.any()
    # a size that needs a crop: decoded elsewhere, the slot is left for the caller to fill
    cropped = decode_resize_crop(wide, 48, 64, buffer=DecodeBuffer(), out=first)
    assert cropped is not first and not first.any()
    assert np.array_equal(cropped, decode_resize_crop(wide, 48, 64))
    # a strided slot cannot take the decoder's rows: the result comes back as an array
    strided = np.zeros((48, 128, 3), np.uint8)[:, ::2]
    assert decode_resize_crop(exact, 48, 64, out=strided) is not strided
    for wrong in (np.zeros((64, 48, 3), np.uint8), np.zeros((48, 64, 3), np.float32),
                  np.zeros((48, 64, 4), np.uint8)):  # fmt: skip
        got = decode_resize_crop(exact, 48, 64, out=wrong)
        assert got is not wrong and got.shape == (48, 64, 3) and got.dtype == np.uint8
