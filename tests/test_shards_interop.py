"""Other tools read our releases: webdataset, HF datasets, DuckDB, img2dataset-style, MDS."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import duckdb
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ccurate.shards.config import ShardsConfig
from ccurate.shards.mds import export_mds, read_mds
from ccurate.shards.read import hf_features, iter_tar, release_shards
from ccurate.shards.release import write_release
from ccurate.shards.synth import make_inputs

IMG2DATASET_COLUMNS = [
    "key",
    "url",
    "caption",
    "width",
    "height",
    "original_width",
    "original_height",
    "status",
    "error_message",
    "sha256",
    "exif",
]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("interop")
    kept, dropped = make_inputs(root / "in", n_shards=2, per_shard=12)
    return write_release(
        kept,
        dropped,
        root / "out",
        ShardsConfig(samples_per_shard=5),
        name="v1",
        run_info={"date": "2025-06-01"},
    )


def _manifest(release: Path, split: str) -> list[dict]:
    return [
        r for r in pq.read_table(release / "manifest.parquet").to_pylist() if r["split"] == split
    ]


def test_webdataset_reads_shards(release: Path) -> None:
    import webdataset as wds

    urls = [str(p) for p in release_shards(release, "commercial")]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil")
    seen = []
    for s in ds:
        assert isinstance(s["jpg"], Image.Image) and s["jpg"].size[0] > 0
        assert isinstance(s["txt"], str) and isinstance(s["json"], dict)
        assert s["json"]["key"] == s["__key__"]
        assert s["txt"] == s["json"]["text"]
        seen.append(s["__key__"])
    assert seen == [r["key"] for r in _manifest(release, "commercial")]


def test_hf_datasets_loads_shards(release: Path, tmp_path: Path) -> None:
    import datasets

    urls = [str(p) for p in release_shards(release, "noncommercial")]
    ds = datasets.load_dataset(
        "webdataset", data_files={"train": urls}, split="train", cache_dir=str(tmp_path / "hf")
    )
    man = _manifest(release, "noncommercial")
    assert len(ds) == len(man)
    assert isinstance(ds.features["jpg"], datasets.Image)
    row = ds[len(ds) - 1]  # a late row: the schema inferred from the first rows must hold
    assert row["__key__"] == man[-1]["key"]
    assert isinstance(row["jpg"], Image.Image)
    assert row["json"]["license"] == man[-1]["license"]
    assert row["txt"] == row["json"]["text"]
    assert [r["__key__"] for r in ds] == [r["key"] for r in man]


@pytest.mark.parametrize("caption_source", ["synthetic", "both"])
def test_hf_datasets_loads_the_release_folder_by_its_card(
    release: Path, tmp_path: Path, caption_source: str
) -> None:
    """`load_dataset(<release dir>)` reads the card's YAML header: a split per licence
    family and the declared features, which are exactly what `datasets` infers from the
    shards of a clean release (so the declaration and build_record stay in step)."""
    import datasets

    if caption_source == "both":  # samples also carry {key}.alt.txt
        kept, dropped = make_inputs(tmp_path / "in", n_shards=1, per_shard=12)
        cfg = ShardsConfig(samples_per_shard=5, caption_source="both")
        release = write_release(kept, dropped, tmp_path / "out", cfg, name="v2")
    ds = datasets.load_dataset(str(release), cache_dir=str(tmp_path / "hf"))
    assert set(ds) == {"commercial", "noncommercial"}
    for split in ds:
        assert [r["__key__"] for r in ds[split]] == [r["key"] for r in _manifest(release, split)]
    urls = [str(p) for p in release_shards(release, "commercial")]
    inferred = datasets.load_dataset(
        "webdataset", data_files={"train": urls}, split="train", cache_dir=str(tmp_path / "hf2")
    ).features
    assert ds["commercial"].features == inferred
    first = json.loads(next(iter_tar(urls[0]))[1]["json"])
    assert list(ds["commercial"].features["json"]) == list(first)  # build_record's order


def test_hf_datasets_loads_a_score_the_first_samples_lack(tmp_path: Path) -> None:
    """`datasets` guesses the schema from a split's first 5 samples: a score that is null
    in all of them (the licence filter's attribution scores on CC0 works, say) and set
    later failed the whole load ('Couldn't cast double to null'). The card declares it."""
    import datasets

    from ccurate.record import Sample, make_key
    from ccurate.shardio import ShardWriter

    w = ShardWriter(tmp_path / "in" / "part-00000")
    for i in range(8):
        url = f"https://pics.example.org/{i}.jpg"
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (30 * i, 90, 160)).save(buf, "JPEG")
        w.write(
            Sample(
                key=make_key(url), url=url, image=buf.getvalue(), mime="image/jpeg", width=64,
                height=48, license="CC0-1.0" if i < 6 else "CC-BY-4.0", author=f"A{i}",
                scores={"quality.blur": 10.0 + i, **({"license.complete": 1.0} if i >= 6 else {})},
            )
        )  # fmt: skip
    w.commit({"stage": "caption"})
    rel = write_release(
        [str(tmp_path / "in" / "part-00000")], [], tmp_path / "out", ShardsConfig(), name="v1"
    )
    ds = datasets.load_dataset(str(rel), split="commercial", cache_dir=str(tmp_path / "hf"))
    got = {r["__key__"]: r["json"]["scores"]["license.complete"] for r in ds}
    assert sorted(got.values(), key=lambda v: v is None) == [1.0, 1.0] + [None] * 6
    # the data_files form guesses the schema from the first 5 samples unless given the
    # declared features: `hf_features(release)`, or the call the card shows (release.json)
    urls = [str(p) for p in release_shards(rel, "commercial")]
    features = hf_features(rel)
    assert features == datasets.Features._from_yaml_list(
        json.loads((rel / "release.json").read_text())["features"]
    )
    by_files = datasets.load_dataset(
        "webdataset",
        data_files={"train": urls},
        features=features,
        split="train",
        cache_dir=str(tmp_path / "hf2"),
    )
    assert {r["__key__"]: r["json"]["scores"]["license.complete"] for r in by_files} == got
    assert by_files.features == ds.features
    card = (rel / "README.md").read_text()
    assert 'features=features, split="train")' in card
    assert '_from_yaml_list(json.load(open("release.json"))["features"])' in card


def test_duckdb_reads_every_parquet(release: Path) -> None:
    files = sorted(release.rglob("*.parquet"))
    assert {f.name for f in files} >= {"manifest.parquet", "excluded.parquet"}
    con = duckdb.connect()
    for f in files:
        n = con.execute(f"SELECT count(*) FROM read_parquet('{f}')").fetchone()
        assert n is not None and n[0] == pq.read_metadata(f).num_rows
    idx = con.execute(
        f"SELECT count(*), count(DISTINCT key) FROM read_parquet('{release}/*/*-*.parquet')"
    ).fetchone()
    man = pq.read_metadata(release / "manifest.parquet").num_rows
    assert idx == (man, man)


def test_img2dataset_style_index(release: Path) -> None:
    for tar in release_shards(release):
        t = pq.read_table(tar.with_suffix(".parquet"))
        assert t.column_names[: len(IMG2DATASET_COLUMNS)] == IMG2DATASET_COLUMNS
        keys = [k for k, _ in iter_tar(tar)]
        assert t["key"].to_pylist() == keys
        assert set(t["status"].to_pylist()) == {"success"}
        stats = json.loads(Path(str(tar.with_suffix("")) + ".stats.json").read_text())
        assert stats["count"] == stats["successes"] == len(keys)
        assert stats["status_dict"] == {"success": len(keys)}
        for (_key, fields), row in zip(iter_tar(tar), t.to_pylist(), strict=True):
            im = Image.open(io.BytesIO(fields["jpg"]))
            assert (row["width"], row["height"]) == im.size
            assert row["caption"] == fields["txt"].decode()


def test_mds_export_roundtrip(release: Path, tmp_path: Path) -> None:
    out = export_mds(release, tmp_path / "mds", size_limit=8_000)
    assert set(out) == {"commercial", "noncommercial"}
    for split, d in out.items():
        index = json.loads((d / "index.json").read_text())
        assert index["version"] == 2 and len(index["shards"]) > 1  # size limit splits shards
        for info in index["shards"]:
            raw = (d / info["raw_data"]["basename"]).stat().st_size
            assert raw == info["raw_data"]["bytes"]
            assert info["column_names"] == sorted(info["column_names"])
        rows = list(read_mds(d))
        man = _manifest(release, split)
        assert [r["key"] for r in rows] == [m["key"] for m in man]
        for r, m in zip(rows, man, strict=True):
            assert r["image"].size == (m["width"], m["height"])
            assert r["json"]["license"] == r["license"] == m["license"]
    with pytest.raises(FileExistsError):
        export_mds(release, tmp_path / "mds")


def test_mds_with_real_package_if_installed(release: Path, tmp_path: Path) -> None:
    streaming = pytest.importorskip("streaming")
    out = export_mds(release, tmp_path / "mds", splits=["commercial"])
    ds = streaming.LocalDataset(local=str(tmp_path / "mds"), split="commercial")
    man = _manifest(release, "commercial")
    assert len(ds) == len(man) and ds[0]["key"] == man[0]["key"]
    assert out["commercial"].exists()


def test_fast_expander_matches_webdataset(release: Path) -> None:
    import webdataset as wds

    from ccurate.shards.read import tar_samples

    urls = [str(p) for p in release_shards(release)]
    stock = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    ours = list(wds.DataPipeline(wds.SimpleShardList(urls), tar_samples))
    assert len(ours) == len(stock) > 0
    assert ours == stock


def _odd_tar(path: Path, duplicate: bool = False) -> None:
    """Members webdataset has rules for: metadata, hidden and dot-less names, upper-case and
    multi-dot fields, directory prefixes."""
    from ccurate.tario import TarWriter

    with TarWriter(path) as tf:
        tf.add("__index__", b"meta")
        tf.add("a1.JPG", b"j1")
        tf.add("a1.alt.TXT", b"t1")
        tf.add("README", b"no field")
        tf.add("d/.hidden.txt", b"h")
        tf.add("d/a2.json", b"{}")
        tf.add("d/a2.txt", b"t2")
        if duplicate:
            tf.add("d/a2.TXT", b"t3")
        tf.add("__b__.txt", b"dunder key")
        tf.add("a3.txt", b"t4")


def test_all_readers_group_members_like_webdataset(tmp_path: Path) -> None:
    import webdataset as wds

    from ccurate.shards.read import tar_samples
    from ccurate.train.stream import DataError
    from ccurate.train.stream import iter_tar as train_iter_tar

    path = tmp_path / "odd.tar"
    _odd_tar(path)
    urls = [str(path)]
    stock = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    ours = list(wds.DataPipeline(wds.SimpleShardList(urls), tar_samples))
    # README (no field) and __index__ (metadata) skipped; a hidden name in a folder and a
    # __b__ key are samples to webdataset, so to us
    assert [s["__key__"] for s in stock] == ["a1", "d/", "d/a2", "__b__", "a3"]
    assert stock[0] == {"__key__": "a1", "__url__": urls[0], "__local_path__": urls[0],
                        "jpg": b"j1", "alt.txt": b"t1"}  # fmt: skip
    assert ours == stock
    fields = [{k: v for k, v in s.items() if not k.startswith("__")} for s in stock]
    assert list(iter_tar(path)) == [(s["__key__"], f) for s, f in zip(stock, fields, strict=True)]
    assert [(r.key, sorted(r.members)) for r in train_iter_tar(str(path))] == [
        ("a1", ["alt.txt", "jpg"]),
        ("", ["hidden.txt"]),
        ("a2", ["json", "txt"]),
        ("__b__", ["txt"]),
        ("a3", ["txt"]),
    ]
    bad = tmp_path / "dup.tar"
    _odd_tar(bad, duplicate=True)
    with pytest.raises(ValueError, match="duplicate"):
        list(wds.WebDataset([str(bad)], shardshuffle=False, empty_check=False))
    with pytest.raises(ValueError, match=r"duplicate member d/a2\.TXT"):
        list(iter_tar(bad))
    with pytest.raises(DataError, match="duplicate member"):
        list(train_iter_tar(str(bad)))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_iter_members_reads_tar_formats(tmp_path: Path, fmt: int) -> None:
    from ccurate.tario import iter_members, iter_spans

    path = tmp_path / "x.tar"
    names = ["a.txt", "dir/b.jpg", "d" * 60 + "/" + "e" * 60 + ".json"]
    if fmt != tarfile.USTAR_FORMAT:
        names += ["x" * 150 + ".txt", "ünïcode-ключ.txt"]
    with tarfile.open(path, "w", format=fmt) as tf:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for i, n in enumerate(names):
            data = bytes([i]) * (i * 700 + 1)
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        want = [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]  # type: ignore[union-attr]
    assert list(iter_members(path)) == want
    with tarfile.open(path) as tf:
        spans = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    assert list(iter_spans(path)) == spans
    raw = bytearray(path.read_bytes())
    raw[600] ^= 0xFF  # inside the second header
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        list(iter_members(bad))
