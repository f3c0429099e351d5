"""MDS export edge cases: png/webp images, the byte layout StreamingDataset reads, shard size
limits, empty and unknown splits, overwrite, and what our reader refuses."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from ccurate.shards.config import ShardsConfig
from ccurate.shards.mds import MDSWriter, export_mds, read_mds
from ccurate.shards.read import iter_tar, release_shards
from ccurate.shards.release import write_release
from ccurate.shards.synth import make_inputs

RUN_INFO = {"date": "2025-06-01"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[str]]:
    root = tmp_path_factory.mktemp("mds")
    kept, dropped = make_inputs(root / "in", n_shards=1, per_shard=10, dropped_per_shard=2)
    return root, kept, dropped


def _release(inputs: tuple[Path, list[str], list[str]], fmt: str) -> Path:
    root, kept, dropped = inputs
    out = root / f"rel-{fmt}"
    if (out / "v1").exists():
        return out / "v1"
    cfg = ShardsConfig(image_format=fmt, samples_per_shard=4)  # type: ignore[arg-type]
    return write_release(kept, dropped, out, cfg, name="v1", run_info=RUN_INFO)


def _manifest(release: Path, split: str) -> list[dict]:
    rows = pq.read_table(release / "manifest.parquet").to_pylist()
    return [r for r in rows if r["split"] == split]


def _layout(split_dir: Path) -> list[list[bytes]]:
    """Each shard's samples cut out by the MDS joint-shard layout, read independently of
    `read_mds`: uint32 n, uint32 offsets[n+1] (absolute), the writer config as sorted json,
    the samples; a sample is the uint32 sizes of its variable columns, then the columns."""
    index = json.loads((split_dir / "index.json").read_text())
    assert index["version"] == 2
    shards = []
    for info in index["shards"]:
        raw = (split_dir / info["raw_data"]["basename"]).read_bytes()
        assert len(raw) == info["raw_data"]["bytes"]
        n = struct.unpack_from("<I", raw)[0]
        assert n == info["samples"]
        offsets = struct.unpack_from(f"<{n + 1}I", raw, 4)
        config = {k: info[k] for k in info if k not in ("samples", "raw_data", "zip_data")}
        config_bytes = json.dumps(config, sort_keys=True).encode()
        start = 4 + 4 * (n + 1)
        assert raw[start : start + len(config_bytes)] == config_bytes
        assert offsets[0] == start + len(config_bytes) and offsets[-1] == len(raw)
        samples = []
        for i in range(n):
            data = raw[offsets[i] : offsets[i + 1]]
            variable = [s is None for s in info["column_sizes"]]
            sizes = list(struct.unpack_from(f"<{sum(variable)}I", data))
            pos = 4 * len(sizes)
            cols = []
            for fixed in info["column_sizes"]:
                ln = fixed if fixed is not None else sizes.pop(0)
                cols.append(data[pos : pos + ln])
                pos += ln
            assert pos == len(data)
            samples.append(cols)
        shards.append(samples)
    return shards


@pytest.mark.parametrize("fmt, encoding, pil", [("png", "png", "PNG"), ("webp", "bytes", "WEBP")])
def test_png_and_webp_releases_export(
    inputs: tuple[Path, list[str], list[str]], tmp_path: Path, fmt: str, encoding: str, pil: str
) -> None:
    """MDS has no webp encoding: webp goes out as raw `bytes`, png as `png`; the image
    bytes are the release's own, untouched."""
    release = _release(inputs, fmt)
    done = export_mds(release, tmp_path / "mds", size_limit=4_000)
    assert set(done) == {"commercial", "noncommercial"}
    d = done["commercial"]
    info = json.loads((d / "index.json").read_text())["shards"][0]
    names = info["column_names"]
    assert info["column_encodings"][names.index("image")] == encoding
    tar_images = {
        key: fields[fmt]
        for tar in release_shards(release, "commercial")
        for key, fields in iter_tar(tar)
    }
    raw_samples = [s for shard in _layout(d) for s in shard]
    rows = list(read_mds(d))
    man = _manifest(release, "commercial")
    assert len(raw_samples) == len(rows) == len(man) > 0
    for raw, row, m in zip(raw_samples, rows, man, strict=True):
        assert raw[names.index("key")].decode() == row["key"] == m["key"]
        assert raw[names.index("image")] == tar_images[row["key"]]
        width = struct.unpack("<i", raw[names.index("width")])[0]
        assert width == row["width"] == m["width"]
        image = row["image"] if fmt == "png" else Image.open(io.BytesIO(row["image"]))
        assert image.format == pil and image.size == (m["width"], m["height"])


def test_size_limit_bounds_every_shard(
    inputs: tuple[Path, list[str], list[str]], tmp_path: Path
) -> None:
    """A shard stays within size_limit unless one sample alone is bigger; then that sample
    gets a shard of its own, and none is lost."""
    release = _release(inputs, "png")
    want = [m["key"] for m in _manifest(release, "commercial")]
    sizes = []
    for limit in (1, 20_000, 1 << 26):
        d = export_mds(release, tmp_path / str(limit), splits=["commercial"], size_limit=limit)
        d = d["commercial"]
        shards = json.loads((d / "index.json").read_text())["shards"]
        for info in shards:
            assert info["size_limit"] == limit
            assert info["raw_data"]["bytes"] <= limit or info["samples"] == 1
        assert [r["key"] for r in read_mds(d)] == want
        sizes.append(len(shards))
    assert sizes[0] == len(want) and sizes[0] > sizes[1] > sizes[2] == 1


def test_empty_unknown_and_default_splits(
    inputs: tuple[Path, list[str], list[str]], tmp_path: Path
) -> None:
    root, _, dropped = inputs
    empty = write_release(
        [], dropped, root / "rel-empty", ShardsConfig(), name="v1", run_info=RUN_INFO
    )
    # nothing published: nothing to export by default
    assert export_mds(empty, tmp_path / "a") == {}
    # a published split with no rows, asked for: a valid, empty dataset
    done = export_mds(empty, tmp_path / "b", splits=["noncommercial"])
    index = json.loads((done["noncommercial"] / "index.json").read_text())
    assert index == {"shards": [], "version": 2}
    assert list(read_mds(done["noncommercial"])) == []
    # a split the release does not have is an error, not an empty dataset
    with pytest.raises(ValueError, match=r"no split 'comercial' \(splits: \['commercial'"):
        export_mds(_release(inputs, "png"), tmp_path / "c", splits=["comercial"])
    assert not (tmp_path / "c" / "comercial").exists()
    with pytest.raises(ValueError, match="not a complete release"):
        export_mds(root / "in", tmp_path / "d")


def test_overwrite_replaces_and_clears_a_stale_temp_dir(
    inputs: tuple[Path, list[str], list[str]], tmp_path: Path
) -> None:
    release = _release(inputs, "png")
    out = tmp_path / "mds"
    export_mds(release, out, splits=["commercial"])
    (out / "commercial" / "junk").write_text("left from before")
    stale = out / f".tmp-commercial-{os.getpid()}"  # a crashed export of this process id
    stale.mkdir()
    (stale / "shard.00000.mds").write_bytes(b"half")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_mds(release, out, splits=["commercial"])
    done = export_mds(release, out, splits=["commercial"], overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["commercial"]
    assert not (done["commercial"] / "junk").exists()
    assert len(list(read_mds(done["commercial"]))) == len(_manifest(release, "commercial"))


def test_writer_encodings_and_reader_refusals(tmp_path: Path) -> None:
    cols = {"big": "int64", "blob": "bytes", "meta": "json", "name": "str"}
    w = MDSWriter(tmp_path, cols, size_limit=0)  # 0: no limit, one shard
    w.write({"big": -(2**40), "blob": b"\x00\xff", "meta": {"a": [1, 2]}, "name": "ünï"})
    w.write({"big": 7, "blob": b"", "meta": b'{"b": null}', "name": ""})
    with pytest.raises(TypeError, match="bytes column needs bytes"):
        w.write({"big": 1, "blob": "text", "meta": {}, "name": "x"})
    w.finish()
    assert list(read_mds(tmp_path)) == [
        {"big": -(2**40), "blob": b"\x00\xff", "meta": {"a": [1, 2]}, "name": "ünï"},
        {"big": 7, "blob": b"", "meta": {"b": None}, "name": ""},
    ]
    assert [len(s) for s in _layout(tmp_path)] == [2]
    with pytest.raises(ValueError, match="unsupported encoding float32"):
        MDSWriter(tmp_path / "f", {"x": "float32"}).write({"x": 1.5})

    index_path = tmp_path / "index.json"
    good = json.loads(index_path.read_text())

    def refused(message: str, version: int = 2, **shard: object) -> None:
        doc = dict(good, version=version, shards=[dict(good["shards"][0], **shard)])
        index_path.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=message):
            list(read_mds(tmp_path))

    refused("unsupported MDS index version 1", version=1)
    refused("only uncompressed", compression="zstd:7")
    refused("2 samples, index says 3", samples=3)
    refused("unsupported encoding pkl", column_encodings=["int64", "pkl", "json", "str"])
