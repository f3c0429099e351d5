"""Dedup review: malformed stored hashes and reference matches of exact copies."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ccurate.filters.dedup import DedupConfig, DedupStage
from ccurate.filters.hashing import hex_to_u64, image_hashes
from ccurate.record import Sample, make_key
from ccurate.shardio import ShardWriter
from tests.test_filters_dedup import photo

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def encode(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def sample(name: str, data: bytes, license: str = "cc-by-4.0") -> Sample:
    url = f"http://img.test/{name}"
    s = Sample(key=make_key(url), url=url, image=data, mime="image/png", license=license)
    im = Image.open(io.BytesIO(data))
    s.width, s.height = im.width, im.height
    s.sha256 = hashlib.sha256(data).hexdigest()
    s.pixel_sha256, s.phash, s.dhash = image_hashes(im)
    return s


def plan(tmp: Path, shards: list[list[Sample]], **cfg: object) -> tuple[DedupStage, dict]:
    prefixes = []
    for i, samples in enumerate(shards):
        w = ShardWriter(tmp / "in" / f"shard-{i:05d}")
        for s in samples:
            w.write(s)
        w.commit({})
        prefixes.append(str(tmp / "in" / f"shard-{i:05d}"))
    stage = DedupStage(DedupConfig(**cfg))  # type: ignore[arg-type]
    stage.prepare(prefixes, str(tmp / "scratch"))
    assert stage.decisions_path is not None
    return stage, {r["key"]: r for r in pq.read_table(stage.decisions_path).to_pylist()}


def test_empty_or_malformed_stored_hashes_are_recomputed(tmp_path: Path) -> None:
    """A stored "" or non-hex hash used to count as present: never recomputed, the row
    fell out of exact and near dedup and an identical copy was kept twice."""
    data = encode(photo(1, 128, 96))
    good = sample("good.png", data, license="cc0-1.0")
    bad = sample("bad.png", data)
    bad.sha256, bad.pixel_sha256, bad.phash, bad.dhash = "", "not-a-sha", "zz" * 8, ""
    other = sample("other.png", encode(photo(2, 128, 96)))
    stage, d = plan(tmp_path, [[good, other], [bad]])
    assert d[bad.key]["action"] == "drop" and d[bad.key]["reason"] == "duplicate_exact"
    assert d[bad.key]["duplicate_of"] == good.key and d[good.key]["group_size"] == 2
    assert d[bad.key]["phash"] == good.phash and d[bad.key]["sha256"] == good.sha256
    # the stage hands the recomputed hashes to the sample instead of its malformed ones
    stage.setup()
    (out,) = stage.process([bad])
    assert out.phash == good.phash and out.sha256 == good.sha256 and out.dhash == good.dhash
    assert hex_to_u64([out.phash])[1].all()


def test_reference_match_holds_for_exact_copies(tmp_path: Path) -> None:
    """An evaluation set listing only file SHA-256s meets the PNG; its TIFF re-encode
    (same pixels) used to survive, since matched rows leave before exact grouping."""
    im = photo(3, 128, 96)
    png = sample("eval-copy.png", encode(im))
    tiff = sample("eval-copy.tiff", encode(im, "TIFF"))
    fresh = sample("fresh.png", encode(photo(4, 128, 96)))
    ref = tmp_path / "eval.parquet"
    pq.write_table(pa.table({"key": ["eval/0"], "sha256": [png.sha256]}), ref)
    _, d = plan(tmp_path, [[png, fresh], [tiff]], against=[str(ref)])
    for s in (png, tiff):
        assert d[s.key]["action"] == "drop" and d[s.key]["reason"] == "contaminated"
        assert d[s.key]["duplicate_of"] == "eval/0"
    assert fresh.key not in d or d[fresh.key]["action"] == "keep"
    # an earlier release: the copy is an exact duplicate of the earlier key, not kept anew
    prev = tmp_path / "prev.parquet"
    pq.write_table(pa.table({"key": ["rel1/7"], "sha256": [png.sha256]}), prev)
    _, d = plan(tmp_path / "p", [[png, fresh], [tiff]], previous=[str(prev)])
    for s in (png, tiff):
        assert d[s.key]["reason"] == "duplicate_exact" and d[s.key]["duplicate_of"] == "rel1/7"


def test_new_semantic_weights_under_the_same_path_make_a_new_plan(tmp_path: Path) -> None:
    """The plan fingerprint covered the config strings only: replacing the CLIP weights
    file (same path) reused the old semantic plan on a rerun."""
    from ccurate.filters.dedup import _fingerprint

    shard = tmp_path / "part-00000"
    shard.with_suffix(".parquet").write_bytes(b"x")
    weights = tmp_path / "clip.safetensors"
    weights.write_bytes(b"old weights")
    cfg = DedupConfig(semantic=True, semantic_weights=str(weights))
    before = _fingerprint([str(shard)], cfg)
    assert _fingerprint([str(shard)], cfg) == before  # stable when nothing changed
    weights.write_bytes(b"new weights, longer")
    os.utime(weights, ns=(1, 1))
    assert _fingerprint([str(shard)], cfg) != before
    off = DedupConfig(semantic=False, semantic_weights=str(weights))
    assert _fingerprint([str(shard)], off) == _fingerprint([str(shard)], off)
