"""Dedup: hashes, exact near search, grouping, the global plan, the stage via the executor."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ccurate.executor import LocalExecutor, tasks_for
from ccurate.filters.dedup import (
    DECISIONS_FILE,
    REASONS,
    DedupConfig,
    DedupStage,
    keep_rank,
    license_rank,
)
from ccurate.filters.hamming import leader_groups, near_pairs
from ccurate.filters.hashing import (
    compute_hashes,
    dhash,
    hamming,
    hex_to_u64,
    image_hashes,
    phash,
    u64_to_hex,
)
from ccurate.record import Sample, make_key
from ccurate.shardio import ShardWriter, iter_samples, read_dropped, read_index
from ccurate.weights import WeightsNotFoundError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# --------------------------------------------------------------------------- helpers


def photo(seed: int, w: int = 256, h: int = 192) -> Image.Image:
    """A smooth, noisy colour field: distinct seeds give pHashes >= 16 bits apart."""
    rng = np.random.default_rng(seed)
    grid = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8))
    a = np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC), np.float64)
    a = a + rng.normal(0, 4, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def encode(im: Image.Image, fmt: str = "PNG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.save(buf, fmt, quality=quality)
    else:
        im.save(buf, fmt)
    return buf.getvalue()


def sample(name: str, data: bytes, license: str = "cc-by-4.0", hashes: bool = True) -> Sample:
    url = f"http://img.test/{name}"
    s = Sample(
        key=make_key(url),
        url=url,
        image=data,
        mime="image/jpeg" if data[:2] == b"\xff\xd8" else "image/png",
        license=license,
    )
    if not hashes and not data.startswith((b"\xff\xd8", b"\x89PNG\r", b"II*")):
        return s  # undecodable on purpose
    im = Image.open(io.BytesIO(data))
    s.width, s.height = im.width, im.height
    if hashes:
        s.sha256 = hashlib.sha256(data).hexdigest()
        s.pixel_sha256, s.phash, s.dhash = image_hashes(im)
    return s


def write_shard(prefix: Path, samples: list[Sample]) -> str:
    w = ShardWriter(prefix)
    for s in samples:
        w.write(s)
    w.commit({})
    return str(prefix)


def plan(
    tmp: Path, shards: list[list[Sample]], **cfg: object
) -> tuple[DedupStage, dict[str, dict]]:
    prefixes = [write_shard(tmp / "in" / f"shard-{i:05d}", s) for i, s in enumerate(shards)]
    stage = DedupStage(DedupConfig(**cfg))  # type: ignore[arg-type]
    stage.prepare(prefixes, str(tmp / "scratch"))
    assert stage.decisions_path is not None
    rows = pq.read_table(stage.decisions_path).to_pylist()
    return stage, {r["key"]: r for r in rows}


def jpeg_copy(im: Image.Image, scale: float = 0.5, q: int = 70) -> bytes:
    small = im.resize((int(im.width * scale), int(im.height * scale)), Image.Resampling.BICUBIC)
    return encode(small, "JPEG", q)


# --------------------------------------------------------------------------- hashing


def grace_hopper() -> Image.Image | None:
    import matplotlib

    p = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return Image.open(p).convert("RGB") if p.exists() else None


def test_phash_dhash_agree_with_imagehash_on_real_photo() -> None:
    import imagehash

    real = grace_hopper()
    images = [photo(s, 640, 480) for s in range(6)] + ([real] if real else [])
    for im in images:
        assert hamming(phash(im), str(imagehash.phash(im))) <= 2
        assert hamming(dhash(im), str(imagehash.dhash(im))) <= 4
        assert len(phash(im)) == 16 and len(dhash(im)) == 16
    if real is not None:  # the real photo: resized + recompressed copy stays close
        copy = Image.open(io.BytesIO(jpeg_copy(real, 0.5, 40)))
        assert hamming(phash(real), phash(copy)) <= 4


def test_compute_hashes_pixels_vs_bytes() -> None:
    im = photo(1)
    png, tiff = encode(im, "PNG"), encode(im, "TIFF")
    assert hashlib.sha256(png).digest() != hashlib.sha256(tiff).digest()
    a = compute_hashes(Image.open(io.BytesIO(png)))
    b = compute_hashes(Image.open(io.BytesIO(tiff)))
    assert a == b  # same pixels, same hashes
    other = np.asarray(im).copy()
    other[0, 0, 0] ^= 1
    c = compute_hashes(Image.fromarray(other))
    assert c[0] != a[0] and c[1] == a[1]  # one pixel: new pixel hash, same perceptual hash
    assert compute_hashes(im.convert("RGBA"))[0] == a[0]


def test_hamming_and_hex_codes() -> None:
    assert hamming("0000000000000000", "ffffffffffffffff") == 64
    assert hamming("8000000000000001", "0000000000000000") == 2
    codes, ok = hex_to_u64(
        ["ffffffffffffffff", None, "xyz", "00000000000000FF", "0123456789abcdef"]
    )
    assert ok.tolist() == [True, False, False, True, True]
    assert [u64_to_hex(c) for c in codes[[0, 3, 4]]] == [
        "ffffffffffffffff",
        "00000000000000ff",
        "0123456789abcdef",
    ]
    sliced = pa.chunked_array([pa.array(["aa" * 8, "bb" * 8, "cc" * 8]).slice(1)])
    assert [u64_to_hex(c) for c in hex_to_u64(sliced)[0]] == ["bb" * 8, "cc" * 8]


# --------------------------------------------------------------------------- search and grouping


def _brute(q: np.ndarray, x: np.ndarray, r: int, self_join: bool) -> set[tuple[int, int, int]]:
    import faiss

    idx = faiss.IndexBinaryFlat(64)
    idx.add(x.view(np.uint8).reshape(-1, 8))
    lims, dist, ids = idx.range_search(q.view(np.uint8).reshape(-1, 8), r + 1)  # strict <
    out = set()
    for i in range(len(q)):
        for j, d in zip(ids[lims[i] : lims[i + 1]], dist[lims[i] : lims[i + 1]], strict=True):
            if not self_join or j > i:
                out.add((i, int(j), int(d)))
    return out


@pytest.mark.parametrize("radius", [0, 2, 4, 5, 8, 11])
def test_near_pairs_exact_against_faiss_bruteforce(radius: int) -> None:
    rng = np.random.default_rng(radius)
    x = rng.integers(0, 2**64 - 1, 2000, dtype=np.uint64, endpoint=True)
    for _ in range(400):  # planted neighbours at 0..12 bits
        a, b = rng.integers(0, len(x), 2)
        v = x[a]
        for bit in rng.choice(64, rng.integers(0, 13), replace=False):
            v ^= np.uint64(1) << np.uint64(bit)
        x[b] = v
    i, j, d = near_pairs(x, radius, threads=2)
    assert set(zip(i.tolist(), j.tolist(), d.tolist(), strict=True)) == _brute(x, x, radius, True)
    q = x[:300]
    i, j, d = near_pairs(q, radius, index=x[100:])
    assert set(zip(i.tolist(), j.tolist(), d.tolist(), strict=True)) == _brute(
        q, x[100:], radius, False
    )


def test_near_pairs_small_tables_and_second_code() -> None:
    rng = np.random.default_rng(5)
    x = rng.integers(0, 2**64 - 1, 2000, dtype=np.uint64, endpoint=True)
    y = rng.integers(0, 2**64 - 1, 2000, dtype=np.uint64, endpoint=True)
    for _ in range(600):  # planted neighbours at 0..12 bits, their second codes 0..12 too
        a, b = rng.integers(0, len(x), 2)
        for codes in (x, y):
            v = codes[a]
            for bit in rng.choice(64, rng.integers(0, 13), replace=False):
                v ^= np.uint64(1) << np.uint64(bit)
            codes[b] = v
    exact = _brute(x, x, 12, True)
    i, j, d = near_pairs(x, 12, table_radius=4)
    small = set(zip(i.tolist(), j.tolist(), d.tolist(), strict=True))
    # tables sized for radius 4: every pair within 4, some (not all) of those up to 12
    assert _brute(x, x, 4, True) < small < exact
    assert any(t[2] > 4 for t in small)
    # a second code must be close too: the exact result filtered, same pairs
    i, j, d = near_pairs(x, 12, also=(y, y, 6))
    got = set(zip(i.tolist(), j.tolist(), d.tolist(), strict=True))
    want = {t for t in exact if bin(int(y[t[0]]) ^ int(y[t[1]])).count("1") <= 6}
    assert got == want and 0 < len(want) < len(exact)
    q = x[:300]
    i, j, d = near_pairs(q, 10, index=x[100:], also=(y[:300], y[100:], 8))
    assert set(zip(i.tolist(), j.tolist(), d.tolist(), strict=True)) == {
        t for t in _brute(q, x[100:], 10, False)
        if bin(int(y[t[0]]) ^ int(y[100 + t[1]])).count("1") <= 8
    }  # fmt: skip


def test_leader_groups_do_not_chain() -> None:
    # 0~1 (2 bits), 1~2 (2 bits), 0 !~ 2 (4 bits) at radius 2; 3~4 a plain pair
    far = 0xFFFF << 40
    codes = np.array([0b0000, 0b0011, 0b1111, far, far | 1], dtype=np.uint64)
    i, j, d = near_pairs(codes, 2)
    lead, dist = leader_groups(len(codes), i, j, d, np.arange(len(codes)))
    assert lead.tolist() == [0, 0, 2, 3, 3]
    assert dist.tolist() == [0, 2, 0, 0, 1]
    # a better-ranked middle takes both ends
    lead, _ = leader_groups(len(codes), i, j, d, np.array([1, 0, 2, 4, 3]))
    assert lead.tolist() == [1, 1, 1, 4, 4]


def test_license_rank_and_keep_rank() -> None:
    order = [
        "cc0-1.0",
        "CC-BY-4.0",
        "cc-by-sa-4.0",
        "by-nd",
        "cc_by_nc_2.0",
        "CC BY-NC-SA 3.0",
        "cc-by-nc-nd-4.0",
        None,
    ]
    ranks = [license_rank(x) for x in order]
    assert ranks == sorted(ranks) and ranks[0] == 0 and ranks[-1] == 9
    assert license_rank("pdm-1.0") == 0 and license_rank("all-rights-reserved") == 9
    # the licence filter's SPDX-style ids
    spdx = [
        "CC-PDM-1.0",
        "LicenseRef-Public-Domain",
        "LicenseRef-CC-BY-2.0-DE",
        "CC-SA-1.0",
        "CC-BY-ND-3.0-DE",
        "LicenseRef-CC-BY-NC-SA-2.0-FR",
        "LicenseRef-All-Rights-Reserved",
    ]
    assert [license_rank(x) for x in spdx] == [0, 0, 1, 2, 3, 5, 9]
    lic, px = np.array([1, 0, 1]), np.array([10, 5, 20])
    sh, row = np.zeros(3, np.int64), np.arange(3)
    assert np.argsort(keep_rank(lic, px, sh, row, "best_license")).tolist() == [1, 2, 0]
    assert np.argsort(keep_rank(lic, px, sh, row, "highest_resolution")).tolist() == [2, 0, 1]
    assert np.argsort(keep_rank(lic, px, sh, row, "earliest")).tolist() == [0, 1, 2]


def test_config_rejects_unknown_and_bad_values() -> None:
    with pytest.raises(ValueError):
        DedupConfig(radius=-1)
    with pytest.raises(ValueError):
        DedupConfig(hash="md5")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DedupConfig(nope=1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="needs hash = 'phash'"):
        DedupConfig(hash="dhash", verify="dhash")
    with pytest.raises(ValueError):
        DedupConfig(verify="sift")  # type: ignore[arg-type]
    assert set(REASONS) == {
        "duplicate_exact",
        "duplicate_near",
        "duplicate_semantic",
        "contaminated",
    }


# --------------------------------------------------------------------------- the plan


def test_plan_exact_near_distinct_and_counts(tmp_path: Path) -> None:
    a, b, c = photo(10), photo(11), photo(12)
    a_png = encode(a)
    s_a = sample("a.png", a_png)
    s_a_bytes = sample("a-again.png", a_png)  # same bytes, other URL
    s_a_tiff = sample("a.tiff", encode(a, "TIFF"))  # same pixels, other bytes
    s_a_small = sample("a-small.jpg", jpeg_copy(a))  # resized + JPEG q70
    s_b = sample("b.png", encode(b))
    s_b_small = sample("b-small.jpg", jpeg_copy(b, 0.6, 50))
    s_c = sample("c.png", encode(c))
    _, d = plan(tmp_path, [[s_a, s_b, s_a_small], [s_a_bytes, s_c, s_a_tiff, s_b_small]])

    assert d[s_a.key]["action"] == "keep" and d[s_a.key]["group_size"] == 4
    for dup, why in (
        (s_a_bytes, "duplicate_exact"),
        (s_a_tiff, "duplicate_exact"),
        (s_a_small, "duplicate_near"),
    ):
        assert d[dup.key]["action"] == "drop"
        assert d[dup.key]["reason"] == why
        assert d[dup.key]["duplicate_of"] == s_a.key
    assert d[s_a_bytes.key]["hamming"] == 0
    assert 0 <= d[s_a_small.key]["hamming"] <= DedupConfig().radius
    assert d[s_b.key]["group_size"] == 2 and d[s_b_small.key]["duplicate_of"] == s_b.key
    assert s_c.key not in d  # distinct and nothing computed: not even listed
    summary = json.loads((tmp_path / "scratch" / "dedup_summary.json").read_text())
    assert summary["drops"]["duplicate_exact"] == 2 and summary["drops"]["duplicate_near"] == 2
    assert summary["kept"] == 3


def test_keep_policy_best_license_and_highest_resolution(tmp_path: Path) -> None:
    a = photo(20, 512, 384)
    big = sample("big.png", encode(a), license="cc-by-nc-4.0")
    small_cc0 = sample("small.jpg", jpeg_copy(a, 0.5), license="cc0-1.0")
    mid_by = sample("mid.jpg", jpeg_copy(a, 0.75, 85), license="CC-BY-4.0")
    shards = [[big, mid_by], [small_cc0]]
    _, d = plan(tmp_path / "lic", shards)
    assert d[small_cc0.key]["action"] == "keep" and d[small_cc0.key]["group_size"] == 3
    assert {d[big.key]["duplicate_of"], d[mid_by.key]["duplicate_of"]} == {small_cc0.key}
    _, d = plan(tmp_path / "res", shards, keep="highest_resolution")
    assert d[big.key]["action"] == "keep"
    assert d[small_cc0.key]["duplicate_of"] == big.key
    _, d = plan(tmp_path / "early", [[mid_by, big], [small_cc0]], keep="earliest")
    assert d[mid_by.key]["action"] == "keep"


def test_pixels_are_the_published_size_not_the_upscaled_copy(tmp_path: Path) -> None:
    """Ingest brings small images up to `image_size`; a crop, smaller, is scaled up more and
    stored a few pixels larger than the photo it was cut from. The keep rule took the larger
    of stored and original size, so the demo published re-posted crops (credited to the
    re-poster) and dropped their originals."""
    a = photo(21, 376, 250)
    crop = a.crop((4, 3, 372, 247))  # 368 x 244, a 2 % crop
    up_a = a.resize((385, 256), Image.Resampling.BICUBIC)  # both at a 256-px short side
    up_crop = crop.resize((386, 256), Image.Resampling.BICUBIC)
    orig = sample("orig.jpg", encode(up_a, "JPEG"))
    copy = sample("copy.jpg", encode(up_crop, "JPEG"))
    orig.original_width, orig.original_height = 376, 250
    copy.original_width, copy.original_height = 368, 244
    assert copy.width * copy.height > orig.width * orig.height  # stored: the crop is larger
    for keep in ("best_license", "highest_resolution"):
        _, d = plan(tmp_path / keep, [[copy, orig]], keep=keep)
        assert d[orig.key]["action"] == "keep", keep
        assert d[copy.key]["duplicate_of"] == orig.key, keep
    unrecorded = sample("plain.jpg", encode(up_crop, "JPEG"))  # no original size: stored size
    _, d = plan(tmp_path / "plain", [[orig, unrecorded]], keep="highest_resolution")
    assert d[unrecorded.key]["action"] == "keep"  # 386 x 256 stored > 376 x 250 published


def test_decontamination_and_previous_runs(tmp_path: Path) -> None:
    ev, prev, fresh = photo(30), photo(31), photo(32)
    eval_dir = tmp_path / "evalset"
    eval_dir.mkdir()
    pq.write_table(  # an evaluation set index: only pHashes and keys
        pa.table({"key": ["eval-0001"], "phash": [phash(ev)]}), eval_dir / "eval.parquet"
    )
    (eval_dir / "loose.jpg").write_bytes(encode(photo(33), "JPEG"))  # plain image files work too
    prev_data = encode(prev)
    prev_shard = write_shard(tmp_path / "release1" / "shard-00000", [sample("p.png", prev_data)])
    s_ev = sample("ev.jpg", jpeg_copy(ev, 0.5, 60))
    s_loose = sample("loose-copy.png", encode(photo(33)))
    s_prev = sample("again.png", prev_data)
    s_fresh = sample("fresh.png", encode(fresh))
    _, d = plan(
        tmp_path,
        [[s_ev, s_prev, s_fresh, s_loose]],
        against=[str(eval_dir)],
        previous=[str(Path(prev_shard).parent)],
    )
    assert d[s_ev.key]["reason"] == "contaminated" and d[s_ev.key]["duplicate_of"] == "eval-0001"
    assert d[s_loose.key]["reason"] == "contaminated"
    assert d[s_loose.key]["duplicate_of"].endswith("loose.jpg")
    assert d[s_prev.key]["reason"] == "duplicate_exact"
    assert d[s_prev.key]["duplicate_of"] == sample("p.png", prev_data).key
    assert s_fresh.key not in d
    with pytest.raises(FileNotFoundError):
        plan(tmp_path / "x", [[s_fresh]], against=[str(tmp_path / "missing")])


def test_a_reference_row_without_a_key_is_named_by_file_and_row(tmp_path: Path) -> None:
    """An evaluation index with hashes only (no key column, or a null key): the dropped
    sample must still say which reference row it matched."""
    a, b = photo(40), photo(41)
    ev = tmp_path / "ev"
    ev.mkdir()
    pq.write_table(pa.table({"phash": [phash(photo(42)), phash(a)]}), ev / "hashes.parquet")
    pq.write_table(pa.table({"key": pa.array([None], pa.string()), "phash": [phash(b)]}),
                   ev / "keys.parquet")  # fmt: skip
    s_a, s_b = sample("a.jpg", jpeg_copy(a, 0.5, 60)), sample("b.jpg", jpeg_copy(b, 0.5, 60))
    _, d = plan(tmp_path / "p", [[s_a, s_b]], against=[str(ev)])
    assert d[s_a.key]["reason"] == "contaminated"
    assert d[s_a.key]["duplicate_of"] == f"{ev / 'hashes.parquet'}#row=1"
    assert d[s_b.key]["duplicate_of"] == f"{ev / 'keys.parquet'}#row=0"


def test_prepare_is_idempotent_and_order_free(tmp_path: Path) -> None:
    imgs = [photo(40 + i) for i in range(4)]
    shards = [
        [sample(f"o{i}.png", encode(im)) for i, im in enumerate(imgs)],
        [sample(f"c{i}.jpg", jpeg_copy(im, 0.5 + 0.1 * i)) for i, im in enumerate(imgs)],
        [sample(f"x{i}.png", encode(im)) for i, im in enumerate(imgs[:2])],
    ]
    prefixes = [write_shard(tmp_path / "in" / f"shard-{i:05d}", s) for i, s in enumerate(shards)]
    stage = DedupStage(DedupConfig())
    stage.prepare(prefixes, str(tmp_path / "s1"))
    first = pq.read_table(stage.decisions_path)
    stage.prepare(prefixes, str(tmp_path / "s1"))  # reuse (fingerprint)
    stage2 = DedupStage(DedupConfig())
    stage2.prepare(prefixes[::-1], str(tmp_path / "s2"))  # recomputed, other input order
    second = pq.read_table(stage2.decisions_path)
    assert first.num_rows == 10  # 4 keepers + 6 drops
    assert first.equals(second)
    (tmp_path / "s1" / DECISIONS_FILE).unlink()
    stage.prepare(prefixes, str(tmp_path / "s1"))
    assert pq.read_table(stage.decisions_path).equals(first)


def cropped(im: Image.Image) -> bytes:
    """A re-post: 6 % off the left, 4 % off top and bottom, JPEG q85."""
    w, h = im.size
    return encode(im.crop((int(0.06 * w), int(0.04 * h), w, int(0.96 * h))), "JPEG", 85)


def test_image_hashes_match_the_single_hashes() -> None:
    im = photo(71).convert("RGBA")
    got = image_hashes(im)
    assert got == (compute_hashes(im)[0], phash(im), dhash(im.convert("RGB")))


def test_verified_wide_radius_catches_crop_and_rejects_phash_collision(tmp_path: Path) -> None:
    a, b = photo(72), photo(172)
    s_a = sample("a.png", encode(a))
    s_crop = sample("a-crop.jpg", cropped(a))
    s_b = sample("b.png", encode(b))
    ph_d = hamming(s_a.phash or "", s_crop.phash or "")
    assert 4 < ph_d <= 12 and ph_d + hamming(s_a.dhash or "", s_crop.dhash or "") <= 24
    # b's pHash collides with a's (2 bits away) but its dHash does not
    s_b.phash = f"{int(s_a.phash or '', 16) ^ 0b11:016x}"
    assert hamming(s_a.dhash or "", s_b.dhash or "") > 22
    shards = [[s_a, s_crop, s_b]]

    plain = {"radius": 4, "verify": "none", "search": "exact"}
    _, d = plan(tmp_path / "old", shards, **plain)  # no verification: the crop stays
    assert d[s_b.key]["duplicate_of"] == s_a.key  # and the colliding pHash merges
    assert s_crop.key not in d

    _, d = plan(tmp_path / "wide", shards, radius=12, verify="dhash")
    assert d[s_crop.key]["action"] == "drop" and d[s_crop.key]["reason"] == "duplicate_near"
    assert d[s_crop.key]["duplicate_of"] == s_a.key and d[s_crop.key]["hamming"] == ph_d
    assert s_b.key not in d  # kept, in no group
    assert d[s_a.key]["group_size"] == 2

    # a tight verify_sum rejects the crop too
    _, d = plan(tmp_path / "tight", shards, radius=12, verify="dhash", verify_sum=ph_d)
    assert s_crop.key not in d and s_b.key not in d


def test_tables_search_meets_a_far_phash_through_the_dhash(tmp_path: Path) -> None:
    s_a = sample("a.png", encode(photo(72)))
    pa_, da = int(s_a.phash or "", 16), int(s_a.dhash or "", 16)
    spread = sum(1 << b for b in (0, 7, 13, 19, 26, 32, 39, 45, 52, 58))  # 2+ bits a chunk
    s_c = sample("c.jpg", encode(photo(73)))  # stands for a crop of a: hashes set below
    s_c.phash, s_c.dhash = f"{pa_ ^ spread:016x}", f"{da ^ 0b11:016x}"  # 10 + 2 bits
    s_x = sample("x.png", encode(photo(74)))  # same dHash, pHash 30 bits away: not a copy
    s_x.phash, s_x.dhash = f"{pa_ ^ ((1 << 30) - 1):016x}", f"{da:016x}"
    s_f = sample("f.jpg", encode(photo(75)))  # 10 + 14 bits: within p12+dh24, in no table
    s_f.phash = f"{pa_ ^ (spread << 1):016x}"
    far_d = sum(1 << b for b in (1, 6, 11, 16, 21, 26, 31, 36, 41, 46, 51, 56, 61, 63))
    s_f.dhash = f"{da ^ far_d:016x}"
    shards = [[s_a, s_c, s_x, s_f]]
    wide = {"radius": 12, "verify": "dhash"}

    _, d = plan(tmp_path / "tables", shards, search="tables", **wide)
    assert d[s_c.key]["reason"] == "duplicate_near" and d[s_c.key]["duplicate_of"] == s_a.key
    assert d[s_c.key]["hamming"] == 10
    assert s_x.key not in d  # met through the dHash table, refused by the pHash radius
    assert s_f.key not in d  # approximate: no table holds this pair

    _, d = plan(tmp_path / "exact", shards, search="exact", **wide)  # finds both
    assert d[s_c.key]["duplicate_of"] == s_a.key and d[s_f.key]["duplicate_of"] == s_a.key
    assert s_x.key not in d

    with pytest.raises(ValueError, match="needs verify"):
        DedupConfig(radius=12, verify="none", search="tables")
    plain = DedupConfig(verify="none")  # switching verification off brings the plain search
    assert (plain.radius, plain.search) == (4, "exact")
    # defaults: the verified wide search over tables; a dHash run alone keeps the plain one
    assert (DedupConfig().radius, DedupConfig().verify, DedupConfig().search) == (
        12, "dhash", "tables",
    )  # fmt: skip
    d_cfg = DedupConfig(hash="dhash")
    assert (d_cfg.radius, d_cfg.verify, d_cfg.search) == (4, "none", "exact")
    assert DedupConfig(hash="dhash", radius=6).radius == 6


def test_verify_computes_missing_dhash_and_falls_back_without_image(tmp_path: Path) -> None:
    a = photo(72)
    s_a = sample("a.png", encode(a))
    s_crop = sample("a-crop.jpg", cropped(a))
    s_crop.dhash = None  # an old shard: pHash stored, dHash not -> computed from the bytes
    # no image to hash: a pHash 2 bits from a's is accepted (<= 4), one 6 bits away is not
    s_near = sample("near.bin", b"not an image", hashes=False)
    s_near.phash = f"{int(s_a.phash or '', 16) ^ 0b11:016x}"
    s_far = sample("far.bin", b"not an image either", hashes=False)
    s_far.phash = f"{int(s_a.phash or '', 16) ^ 0b111111:016x}"
    _, d = plan(tmp_path, [[s_a, s_crop, s_near, s_far]], radius=12, verify="dhash")
    assert d[s_crop.key]["dhash"] == dhash(Image.open(io.BytesIO(cropped(a))).convert("RGB"))
    assert d[s_crop.key]["duplicate_of"] == s_a.key
    assert d[s_near.key]["duplicate_of"] == s_a.key and d[s_near.key]["hamming"] == 2
    assert d[s_far.key]["action"] == "keep"
    summary = json.loads((tmp_path / "scratch" / "dedup_summary.json").read_text())
    assert summary["undecodable"] == 2


@pytest.mark.parametrize("search", ["exact", "tables"])
def test_verify_applies_to_reference_sets(tmp_path: Path, search: str) -> None:
    ev = photo(72)
    ev_dir = tmp_path / "evalset"
    ev_dir.mkdir()
    (ev_dir / "ev.png").write_bytes(encode(ev))
    s_crop = sample("crop.jpg", cropped(ev))
    s_other = sample("other.png", encode(photo(172)))
    s_other.phash = phash(ev)  # colliding pHash, different picture
    cfg = {"radius": 12, "verify": "dhash", "against": [str(ev_dir)], "search": search}
    _, d = plan(tmp_path / "v", [[s_crop, s_other]], **cfg)
    assert d[s_crop.key]["reason"] == "contaminated"
    assert d[s_crop.key]["duplicate_of"] == str(ev_dir / "ev.png")
    assert s_other.key not in d


def test_missing_hashes_are_computed_from_images(tmp_path: Path) -> None:
    a = photo(50)
    s1 = sample("a.png", encode(a), hashes=False)
    s2 = sample("a.jpg", jpeg_copy(a), hashes=False)
    s3 = sample("broken.png", b"\x89PNG not really", hashes=False)
    _, d = plan(tmp_path, [[s1, s2, s3]])
    assert d[s2.key]["reason"] == "duplicate_near" and d[s2.key]["duplicate_of"] == s1.key
    assert d[s1.key]["phash"] == phash(a)
    assert d[s3.key]["sha256"] == hashlib.sha256(b"\x89PNG not really").hexdigest()
    assert d[s3.key]["phash"] is None and d[s3.key]["action"] == "keep"
    summary = json.loads((tmp_path / "scratch" / "dedup_summary.json").read_text())
    assert summary["undecodable"] == 1 and summary["hashes_computed"] == 3


def test_stage_through_local_executor(tmp_path: Path) -> None:
    a, b = photo(60), photo(61)
    s_a = sample("a.png", encode(a))
    s_a2 = sample("a2.png", encode(a))
    s_a3 = sample("a3.jpg", jpeg_copy(a), hashes=False)
    s_b = sample("b.png", encode(b))
    prefixes = [
        write_shard(tmp_path / "in" / "shard-00000", [s_a, s_b]),
        write_shard(tmp_path / "in" / "shard-00001", [s_a2, s_a3]),
    ]
    stage = DedupStage(DedupConfig())
    with pytest.raises(RuntimeError, match="prepare"):
        stage.setup()
    tasks = tasks_for(prefixes, tmp_path / "out")  # the executor runs prepare itself
    stats = LocalExecutor(workers=1, progress=False).map(stage, tasks)
    assert stats.n_in == 4 and stats.n_kept == 2
    assert dict(stats.drops) == {"duplicate_exact": 1, "duplicate_near": 1}
    kept = {s.key: s for t in tasks for batch in iter_samples(t.dst) for s in batch}
    assert set(kept) == {s_a.key, s_b.key}
    assert kept[s_a.key].duplicate_count == 3 and kept[s_b.key].duplicate_count == 1
    assert kept[s_a.key].decisions[-1].filter == "dedup" and kept[s_a.key].decisions[-1].keep
    assert kept[s_a.key].image == s_a.image
    dropped = {r["key"]: r for t in tasks for r in read_dropped(t.dst).to_pylist()}
    assert dropped[s_a2.key]["duplicate_of"] == s_a.key
    assert dropped[s_a2.key]["drop_reason"] == "duplicate_exact"
    assert dropped[s_a3.key]["drop_reason"] == "duplicate_near"
    assert dropped[s_a3.key]["dropped_by"] == "dedup"
    assert dropped[s_a3.key]["phash"] is not None  # filled from the plan
    assert 0 <= dict(dropped[s_a3.key]["scores"])["dedup.hamming"] <= DedupConfig().radius
    assert read_index(tasks[0].dst).num_rows == 2
    # rerun: every shard is done, nothing recomputed
    again = LocalExecutor(workers=1, progress=False).map(stage, tasks)
    assert again.skipped_shards == 2 and again.n_dropped == 2


def test_repeated_key_follows_first_copy(tmp_path: Path) -> None:
    a = photo(75)
    first = sample("a.png", encode(a))
    again = sample("a.png", encode(a))  # same URL ingested into another shard
    other = sample("a-copy.png", encode(a), license="cc0-1.0")
    _, d = plan(tmp_path, [[first], [again, other]])
    assert set(d) == {first.key, other.key}
    assert d[first.key]["duplicate_of"] == other.key  # one decision per key, never self
    summary = json.loads((tmp_path / "scratch" / "dedup_summary.json").read_text())
    # both rows of the key are dropped by the stage, and counted so
    assert summary["repeated_keys"] == 1 and summary["drops"]["duplicate_exact"] == 2


def test_empty_input_plans_nothing(tmp_path: Path) -> None:
    ev = tmp_path / "ev.parquet"
    pq.write_table(pa.table({"key": ["e"], "phash": ["0" * 16]}), ev)
    stage, d = plan(tmp_path, [[]], against=[str(ev)], previous=[str(ev)])
    assert d == {}
    stage.setup()
    assert stage.process([]) == []


def test_disabled_stage_passes_through(tmp_path: Path) -> None:
    s = sample("a.png", encode(photo(70)))
    stage = DedupStage(DedupConfig(enabled=False))
    stage.prepare([write_shard(tmp_path / "shard-00000", [s])], str(tmp_path / "scratch"))
    assert stage.decisions_path is None
    stage.setup()
    out = stage.process([s])
    assert out[0].kept and out[0].decisions == []


# --------------------------------------------------------------------------- semantic


def test_semantic_groups_on_synthetic_embeddings() -> None:
    from ccurate.filters.semantic import semantic_groups

    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 32)).astype(np.float32)
    dups = base[:20] + rng.normal(scale=0.05, size=(20, 32)).astype(np.float32)  # cos ~ 0.999
    far = base[20:30] + rng.normal(scale=1.0, size=(10, 32)).astype(np.float32)  # cos ~ 0.7
    emb = np.concatenate([base, dups, far])
    groups = semantic_groups(emb, n_clusters=8, eps=0.02)
    pairs = {(g[0], m) for g in groups for m in g[1:]}
    assert pairs == {(i, 200 + i) for i in range(20)}
    assert groups == semantic_groups(emb, n_clusters=8, eps=0.02)  # deterministic
    # no chaining: b is close to a and c, but a and c are not close
    a = np.array([1.0, 0.0])
    c = np.array([np.cos(0.5), np.sin(0.5)])
    b = np.array([np.cos(0.25), np.sin(0.25)])
    assert semantic_groups(np.stack([a, b, c]), 1, eps=1 - np.cos(0.3)) == [[0, 1]]


def _tiny_clip(tmp: Path) -> tuple[str, str]:
    import open_clip
    import torch

    cfg = tmp / "ccurate-tiny-clip.json"
    cfg.write_text(
        json.dumps(
            {
                "embed_dim": 16,
                "vision_cfg": {
                    "image_size": 32,
                    "layers": 1,
                    "width": 32,
                    "head_width": 16,
                    "patch_size": 8,
                },
                "text_cfg": {
                    "context_length": 8,
                    "vocab_size": 64,
                    "width": 16,
                    "heads": 2,
                    "layers": 1,
                },
            }
        )
    )
    open_clip.add_model_config(str(cfg))
    torch.manual_seed(0)
    model = open_clip.create_model("ccurate-tiny-clip", pretrained=None)
    weights = tmp / "tiny.pt"
    torch.save(model.state_dict(), weights)
    return str(cfg), str(weights)


def test_semantic_stage_with_tiny_clip(tmp_path: Path) -> None:
    cfg_path, weights = _tiny_clip(tmp_path)
    a = photo(80)
    s1 = sample("a.png", encode(a), license="cc-by-sa-4.0")
    s2 = sample("a.tiff", encode(a, "TIFF"), license="cc0-1.0")  # same pixels: cosine 1
    s3 = sample("b.png", encode(photo(81)))
    common = dict(
        exact=False,
        near=False,
        semantic=True,
        semantic_model="ccurate-tiny-clip",
        semantic_model_config=cfg_path,
        semantic_eps=1e-5,
    )
    _, d = plan(tmp_path, [[s1, s2, s3]], semantic_weights=weights, **common)
    assert d[s1.key]["reason"] == "duplicate_semantic" and d[s1.key]["duplicate_of"] == s2.key
    assert d[s1.key]["cosine"] >= 1 - 1e-5 and d[s2.key]["group_size"] == 2
    assert s3.key not in d
    with pytest.raises(ValueError, match="semantic_weights"):
        plan(tmp_path / "noweights", [[s1]], **common)
    # a missing checkpoint names the config key and the path it expected
    with pytest.raises(WeightsNotFoundError, match=r"dedup\.semantic_weights = .*nope\.pt"):
        plan(tmp_path / "missing", [[s1]], semantic_weights=str(tmp_path / "nope.pt"), **common)


# --------------------------------------------------------------------------- edge cases


def test_exact_copies_follow_their_keeper_when_it_is_a_near_duplicate(tmp_path: Path) -> None:
    """B is A's exact copy; A is a near copy of the better-licensed D: B must name D (a kept
    sample), with the looser link (near) as its reason, and D's group counts all three."""
    base = photo(90)
    d_png = sample("d.png", encode(base), license="cc0-1.0")
    a_bytes = jpeg_copy(base)
    a = sample("a.jpg", a_bytes)
    b = sample("b.jpg", a_bytes)  # same bytes, another URL
    _, dec = plan(tmp_path, [[a, b, d_png]])
    assert dec[d_png.key]["action"] == "keep" and dec[d_png.key]["group_size"] == 3
    for dup in (a, b):
        assert dec[dup.key]["duplicate_of"] == d_png.key
        assert dec[dup.key]["reason"] == "duplicate_near"
    assert dec[b.key]["hamming"] == dec[a.key]["hamming"] == hamming(a.phash, d_png.phash)


def test_no_input_shards_plan_nothing(tmp_path: Path) -> None:
    stage = DedupStage(DedupConfig())
    stage.prepare([], str(tmp_path / "scratch"))
    assert stage.decisions_path is not None
    assert pq.read_table(stage.decisions_path).num_rows == 0
    summary = json.loads((tmp_path / "scratch" / "dedup_summary.json").read_text())
    assert summary["rows"] == 0 and summary["kept"] == 0


def test_index_without_size_columns_ranks_by_licence(tmp_path: Path) -> None:
    """An index written by another tool (hashes, no sizes, no tar): sizes count as 0."""
    im = photo(91)
    sha = hashlib.sha256(b"x").hexdigest()
    pix, ph, dh = image_hashes(im)
    prefix = tmp_path / "in" / "shard-00000"
    prefix.parent.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "key": ["nc", "cc0"],
                "sha256": [sha, sha],
                "pixel_sha256": [pix, pix],
                "phash": [ph, ph],
                "dhash": [dh, dh],
                "license": ["CC-BY-NC-4.0", "CC0-1.0"],
            }
        ),
        f"{prefix}.parquet",
    )
    stage = DedupStage(DedupConfig())
    stage.prepare([str(prefix)], str(tmp_path / "scratch"))
    assert stage.decisions_path is not None
    rows = {r["key"]: r for r in pq.read_table(stage.decisions_path).to_pylist()}
    assert rows["cc0"]["action"] == "keep" and rows["cc0"]["group_size"] == 2
    assert rows["nc"]["reason"] == "duplicate_exact" and rows["nc"]["duplicate_of"] == "cc0"


def test_process_applies_an_older_plan_and_passes_earlier_drops(tmp_path: Path) -> None:
    """A plan written before dHash was stored still applies; process sets itself up;
    samples already dropped by an earlier filter are left untouched."""
    path = tmp_path / DECISIONS_FILE
    pq.write_table(
        pa.table(
            {
                "key": ["sem", "head"],
                "action": ["drop", "keep"],
                "reason": ["duplicate_semantic", None],
                "duplicate_of": ["head", None],
                "group_size": pa.array([0, 2], pa.int32()),
                "hamming": pa.array([None, None], pa.int16()),
                "cosine": pa.array([0.97, None], pa.float32()),
                "sha256": pa.array([None, None], pa.string()),
                "pixel_sha256": pa.array([None, None], pa.string()),
                "phash": ["00ff00ff00ff00ff", None],
            }
        ),
        path,
    )
    stage = DedupStage(DedupConfig())
    stage.decisions_path = str(path)
    sem, head, other = (Sample(key=k, url=f"http://x.test/{k}") for k in ("sem", "head", "new"))
    earlier = Sample(key="sem", url="http://x.test/again")
    earlier.drop("blurry", "quality")
    out = stage.process([sem, head, other, earlier])  # no setup() call first
    assert out == [sem, head, other, earlier]
    assert sem.drop_reason == "duplicate_semantic" and sem.duplicate_of == "head"
    assert sem.scores["dedup.cosine"] == pytest.approx(0.97) and "dedup.hamming" not in sem.scores
    assert sem.phash == "00ff00ff00ff00ff" and sem.dhash is None
    assert head.kept and head.duplicate_count == 2 and other.duplicate_count == 1
    assert earlier.drop_reason == "blurry" and earlier.decisions == []


def test_describe_is_the_json_config() -> None:
    d = DedupStage(DedupConfig(radius=10, against=["/eval"])).describe()
    assert d["radius"] == 10 and d["against"] == ["/eval"] and d["verify"] == "dhash"
    assert json.loads(json.dumps(d)) == d


def test_reference_parquet_without_hash_columns_is_an_error(tmp_path: Path) -> None:
    from ccurate.filters.dedup_reference import load_reference

    bad = tmp_path / "ref.parquet"
    pq.write_table(pa.table({"key": ["a"], "caption": ["x"]}), bad)
    with pytest.raises(ValueError, match=r"ref\.parquet has none of the columns"):
        load_reference([str(bad)])
    keyless = tmp_path / "keyless.parquet"  # hashes only: rows named by file and row
    pq.write_table(pa.table({"phash": ["0" * 16, "f" * 16]}), keyless)
    ref = load_reference([str(keyless)])
    assert ref.keys.to_pylist() == [f"{keyless}#row=0", f"{keyless}#row=1"]
    assert ref.code_ok.all()


def test_empty_reference_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    """A reference set that gives no hash checked nothing, silently."""
    empty = tmp_path / "evalset"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    s = sample("a.png", encode(photo(92)))
    for ref in ({"against": [str(empty)]}, {"previous": [str(empty)]}):
        with pytest.raises(ValueError, match=f"{empty} gives no usable hash.*skipped_files 1"):
            plan(tmp_path, [[s]], **ref)


def test_near_matches_verify_none_ignores_the_dhash() -> None:
    from ccurate.filters.dedup_reference import near_matches

    codes = np.array([0, 0b111], np.uint64)  # 3 bits apart
    chk = np.array([0, np.iinfo(np.uint64).max], np.uint64)  # dHashes 64 bits apart
    ok = np.ones(2, bool)
    i, j, d = near_matches(codes, chk, ok, DedupConfig(verify="none"))
    assert (i.tolist(), j.tolist(), d.tolist()) == ([0], [1], [3])
    i, _, _ = near_matches(codes, chk, ok, DedupConfig(search="exact"))  # verified: rejected
    assert len(i) == 0
