"""Release writer edge cases: one writer per folder, release names, split policies, the byte
limit on shard files, damaged and incomplete inputs, reproducible dates, the manifest written
in batches, `verify`, and reading a release that is not whole."""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import random
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from ccurate.filters.license_filter import release_split
from ccurate.record import Decision, Sample, make_key
from ccurate.shardio import ShardWriter
from ccurate.shards import release as release_mod
from ccurate.shards.card import _human_bytes
from ccurate.shards.config import ShardsConfig
from ccurate.shards.read import iter_tar, read_at, release_shards
from ccurate.shards.release import LOCK, SUMS, is_release, verify, write_release
from ccurate.shards.synth import make_inputs, synth_image

RUN_INFO = {"date": "2025-06-01", "run_id": "edge-test"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[str]]:
    return make_inputs(tmp_path_factory.mktemp("in"), n_shards=2, per_shard=14)


def _licences(prefixes: list[str]) -> list[str]:
    return [lid for p in prefixes for lid in pq.read_table(f"{p}.parquet")["license"].to_pylist()]


def _manifest(rel: Path) -> list[dict]:
    return pq.read_table(rel / "manifest.parquet").to_pylist()


def _excluded(rel: Path) -> list[dict]:
    return pq.read_table(rel / "excluded.parquet").to_pylist()


# --------------------------------------------------------------------------- publishing


def test_a_second_writer_is_refused_while_the_lock_is_held(inputs, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another writer (flock: per open file, even in-process)
    try:
        with pytest.raises(RuntimeError, match="another release writer is running"):
            write_release(inputs[0], inputs[1], out, ShardsConfig(), name="r", run_info=RUN_INFO)
        assert [p.name for p in out.iterdir()] == [LOCK]  # no release, no temporary
    finally:
        os.close(fd)
    rel = write_release(inputs[0], inputs[1], out, ShardsConfig(), name="r", run_info=RUN_INFO)
    assert is_release(rel) and verify(rel) == []


@pytest.mark.parametrize("name", ["a/b", "../up", ".hidden", ".."])
def test_release_names_that_escape_or_hide_are_refused(inputs, tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="bad release name"):
        write_release(inputs[0], inputs[1], tmp_path / "out", ShardsConfig(), name=name)
    assert [p.name for p in (tmp_path / "out").iterdir()] == [LOCK]
    assert not (tmp_path / "up").exists()


def _truncate_inside_last_image(tar: Path) -> bytes:
    """Cut `tar` in the middle of its last image member; returns the original bytes."""
    raw = tar.read_bytes()
    with tarfile.open(tar) as tf:
        last = [m for m in tf if not m.name.endswith(".json")][-1]
    assert last.size > 100
    tar.write_bytes(raw[: last.offset_data + last.size // 2])
    return raw


def test_a_truncated_input_shard_fails_the_release_and_a_rerun_completes(tmp_path: Path) -> None:
    """A damaged input (its tar cut short after its marker was written: a partial copy, a full
    disk) must not be published with short images: the writer fails naming the file, leaves
    no release and no temporary, and builds it once the shard is whole again. Before the fix
    the scanner returned the cut member's first bytes as the whole member."""
    prefixes, dropped = make_inputs(tmp_path / "in", n_shards=1, per_shard=6)
    tar = Path(f"{prefixes[0]}.tar")
    whole = _truncate_inside_last_image(tar)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="truncated tar") as err:
        write_release(prefixes, dropped, out, ShardsConfig(), name="r", run_info=RUN_INFO)
    assert str(tar) in str(err.value)
    assert [p.name for p in out.iterdir()] == [LOCK]
    tar.write_bytes(whole)
    rel = write_release(prefixes, dropped, out, ShardsConfig(), name="r", run_info=RUN_INFO)
    assert is_release(rel) and verify(rel) == []
    assert len(_manifest(rel)) == sum(1 for lid in _licences(prefixes) if release_split(lid))


# --------------------------------------------------------------------------- shard limits


def _shard_sizes(rel: Path) -> list[tuple[int, int]]:
    """(samples, file bytes) per tar shard."""
    return [(len(list(iter_tar(t))), t.stat().st_size) for t in release_shards(rel)]


@pytest.mark.parametrize("limit", [26_000, 45_000])
def test_the_byte_limit_bounds_the_tar_file_users_see(inputs, tmp_path: Path, limit: int) -> None:
    """`shard_max_bytes` bounds the size of the shard file (what an object store or a hub
    limit counts), end-of-archive padding included. It was checked against the members
    only: a 26,000-byte limit gave 30,720-byte files, a 45,000-byte one 51,200."""
    rel = write_release(
        inputs[0], inputs[1], tmp_path, ShardsConfig(shard_max_bytes=limit), name="b"
    )
    sizes = _shard_sizes(rel)
    assert any(n > 1 for n, _ in sizes)  # the limit packs several samples per shard
    assert all(size <= limit for n, size in sizes if n > 1), sizes
    assert sum(n for n, _ in sizes) == len(_manifest(rel))
    # the limit is not met by closing shards early: more than two samples a shard
    per_split = Counter(r["split"] for r in _manifest(rel))
    assert len(sizes) < sum(per_split.values()) / 2


def test_a_sample_larger_than_the_byte_limit_gets_a_shard_of_its_own(
    inputs, tmp_path: Path
) -> None:
    rel = write_release(inputs[0], inputs[1], tmp_path, ShardsConfig(shard_max_bytes=1), name="b")
    sizes = _shard_sizes(rel)
    assert [n for n, _ in sizes] == [1] * len(_manifest(rel))
    # samples and bytes together: whichever limit comes first closes the shard
    both = write_release(
        inputs[0],
        inputs[1],
        tmp_path,
        ShardsConfig(samples_per_shard=2, shard_max_bytes=10**9),
        name="c",
    )
    per_split = Counter(r["split"] for r in _manifest(both))
    counts = Counter()
    for t in release_shards(both):
        counts[t.parent.name] += 1
        assert len(list(iter_tar(t))) <= 2
    assert counts == {s: math.ceil(n / 2) for s, n in per_split.items()}


# --------------------------------------------------------------------------- split policies


def test_only_configured_splits_are_published_and_the_rest_is_excluded_with_a_reason(
    inputs, tmp_path: Path
) -> None:
    families = Counter(release_split(lid) for lid in _licences(inputs[0]))
    rel = write_release(
        inputs[0], inputs[1], tmp_path, ShardsConfig(splits=["commercial"]), name="c"
    )
    assert {r["split"] for r in _manifest(rel)} == {"commercial"}
    assert len(_manifest(rel)) == families["commercial"]
    assert not (rel / "noncommercial").exists()
    ex = Counter((r["reason"], r["detail"]) for r in _excluded(rel))
    assert ex[("split_not_published", "noncommercial")] == families["noncommercial"] > 0
    assert "| `split_not_published` | " in (rel / "README.md").read_text()
    summary = json.loads((rel / "release.json").read_text())
    assert summary["excluded"]["split_not_published"] == families["noncommercial"]


def test_superset_into_the_noncommercial_split_alone(inputs, tmp_path: Path) -> None:
    """CommonCatalog's superset without a commercial split: every releasable work lands in
    `noncommercial` once; none is excluded for its split."""
    cfg = ShardsConfig(splits=["noncommercial"], noncommercial_includes_commercial=True)
    rel = write_release(inputs[0], inputs[1], tmp_path, cfg, name="nc")
    man = _manifest(rel)
    releasable = [lid for lid in _licences(inputs[0]) if release_split(lid)]
    assert {r["split"] for r in man} == {"noncommercial"}
    assert len(man) == len({r["key"] for r in man}) == len(releasable)
    assert Counter(r["license_family"] for r in man) == Counter(map(release_split, releasable))
    assert {r["reason"] for r in _excluded(rel)} == {"not_releasable"}


# --------------------------------------------------------------------------- odd inputs


def _jpeg(w: int, h: int, seed: int = 1) -> bytes:
    return synth_image(random.Random(seed), w, h)


def _write_shard(prefix: Path, samples: list[Sample]) -> list[str]:
    w = ShardWriter(prefix)
    for s in samples:
        w.write(s)
    w.commit({"stage": "caption", "in": len(samples), "kept": len(samples), "dropped": 0})
    return [str(prefix)]


def _sample(n: int, **kw) -> Sample:
    url = f"https://x.example/{n}.jpg"
    s = Sample(key=make_key(url), url=url, license="CC-BY-4.0", alt_text=f"a photo {n}", **kw)
    s.record(Decision("license", True))
    return s


def test_missing_images_sizes_and_non_finite_scores(tmp_path: Path) -> None:
    no_image = _sample(0)  # a record without image bytes (e.g. a planned row)
    no_size = _sample(1, image=_jpeg(40, 30), mime="image/jpeg")  # size taken by decoding
    garbage = _sample(2, image=b"\xff\xd8 not really a jpeg", mime="image/jpeg")
    scored = _sample(3, image=_jpeg(24, 20, 3), mime="image/jpeg", width=24, height=20)
    scored.record(Decision("quality", True, None, {"clip": math.nan, "entropy": math.inf}))
    no_size.record(Decision("quality", True, None, {"clip": 0.3}))
    no_size.extra = {"source_id": "row-17", "meta": {"site": "x", "rank": 2}}
    prefixes = _write_shard(tmp_path / "in-00000", [no_image, no_size, garbage, scored])
    cfg = ShardsConfig(resolution_buckets=[25])
    rel = write_release(prefixes, [], tmp_path / "out", cfg, name="x", run_info=RUN_INFO)

    ex = {r["key"]: r for r in _excluded(rel)}
    assert ex[no_image.key]["reason"] == "image_missing"
    assert ex[garbage.key]["reason"] == "image_error" and ex[garbage.key]["detail"]
    # Pillow's message named the buffer's memory address: excluded.parquet changed every run
    assert "0x" not in ex[garbage.key]["detail"], ex[garbage.key]["detail"]
    man = {r["key"]: r for r in _manifest(rel)}
    assert set(man) == {no_size.key, scored.key}
    assert (man[no_size.key]["width"], man[no_size.key]["height"]) == (40, 30)
    assert man[no_size.key]["bucket"] == "res-25" and man[scored.key]["bucket"] == "res-0"

    def strict(text: bytes) -> dict:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a json record"))

    recs = {k: strict(f["json"]) for t in release_shards(rel) for k, f in iter_tar(t)}
    assert recs[scored.key]["scores"] == {"quality.clip": None, "quality.entropy": None}
    assert recs[no_size.key]["scores"] == {"quality.clip": 0.3, "quality.entropy": None}
    # unknown input columns: present in every record, one JSON type (string)
    assert recs[no_size.key]["extra"] == {
        "meta": '{"rank": 2, "site": "x"}',
        "source_id": "row-17",
    }
    assert recs[scored.key]["extra"] == {"meta": "", "source_id": ""}
    card = (rel / "README.md").read_text()
    assert "| `image_missing` | 1 |" in card and "| `image_error` | 1 |" in card


# --------------------------------------------------------------------------- run_info


def test_release_date_from_run_info_or_source_date_epoch(
    inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(86_400 * 365))
    a = write_release(inputs[0][:1], [], tmp_path / "a", ShardsConfig(), name="d")
    b = write_release(inputs[0][:1], [], tmp_path / "b", ShardsConfig(), name="d")
    assert json.loads((a / "release.json").read_text())["date"] == "1971-01-01"
    assert "- Release date: 1971-01-01" in (a / "README.md").read_text()
    assert (a / SUMS).read_bytes() == (b / SUMS).read_bytes()
    c = write_release(
        inputs[0][:1],
        [],
        tmp_path / "c",
        ShardsConfig(),
        name="d",
        run_info={"finished_at": "2024-03-05T10:11:12+00:00"},
    )
    assert json.loads((c / "release.json").read_text())["date"] == "2024-03-05"


def test_stage_stats_given_as_a_list_drop_their_timings(inputs, tmp_path: Path) -> None:
    def info(seconds: float) -> dict:
        stage = {"stage": "filter", "in": 5, "kept": 4, "dropped": 1, "seconds": seconds}
        return {"date": "2025-06-01", "stages": [stage, {"stage": "caption", "elapsed": seconds}]}

    a = write_release(inputs[0], [], tmp_path / "a", ShardsConfig(), name="s", run_info=info(1))
    b = write_release(inputs[0], [], tmp_path / "b", ShardsConfig(), name="s", run_info=info(7))
    assert (a / SUMS).read_bytes() == (b / SUMS).read_bytes()
    assert "| filter | 5 | 4 | 1 |" in (a / "README.md").read_text()
    stages = json.loads((a / "release.json").read_text())["stages"]
    assert stages == [{"stage": "filter", "in": 5, "kept": 4, "dropped": 1}, {"stage": "caption"}]


def test_manifest_written_in_batches_has_every_row_once(
    inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = write_release(inputs[0], inputs[1], tmp_path / "a", ShardsConfig(), name="m")
    monkeypatch.setattr(release_mod, "_MANIFEST_BATCH", 4)
    many = write_release(inputs[0], inputs[1], tmp_path / "b", ShardsConfig(), name="m")
    assert pq.ParquetFile(many / "manifest.parquet").num_row_groups > 2
    assert _manifest(many) == _manifest(one)
    assert len({r["key"] for r in _manifest(many)}) == len(_manifest(many))


# --------------------------------------------------------------------------- reading back


def test_verify_names_changed_and_missing_files(inputs, tmp_path: Path) -> None:
    rel = write_release(inputs[0], inputs[1], tmp_path / "out", ShardsConfig(), name="v")
    assert verify(rel) == []
    with open(rel / "ATTRIBUTION", "a") as fh:
        fh.write("- a credit nobody published\n")
    stats = next(rel.glob("*/*.stats.json"))
    stats.unlink()
    assert sorted(verify(rel)) == sorted(["ATTRIBUTION", stats.relative_to(rel).as_posix()])


def test_a_half_release_and_a_bad_offset_are_errors(inputs, tmp_path: Path) -> None:
    rel = write_release(inputs[0], inputs[1], tmp_path / "out", ShardsConfig(), name="h")
    half = tmp_path / "half"
    shutil.copytree(rel, half)
    (half / "_SUCCESS").unlink()
    with pytest.raises(ValueError, match="not a complete release"):
        release_shards(half)
    shard = release_shards(rel)[0]
    with tarfile.open(shard) as tf:
        end = max(m.offset_data + m.size for m in tf)
    end += -end % 512  # the first of the two zero blocks
    name = shard.relative_to(rel).as_posix()
    with pytest.raises(ValueError, match=f"no tar member at offset {end}"):
        read_at(rel, name, end)
    key, fields = read_at(rel, name, 0)
    assert Image.open(io.BytesIO(fields["jpg"])).size[0] > 0 and key == _manifest(rel)[0]["key"]


# --------------------------------------------------------------------------- settings, card


@pytest.mark.parametrize("buckets", [[0, 256], [-1], [512, 256], [256, 256]])
def test_resolution_buckets_must_be_positive_and_strictly_increasing(buckets: list[int]) -> None:
    with pytest.raises(ValidationError, match="resolution_buckets"):
        ShardsConfig(resolution_buckets=buckets)
    assert ShardsConfig(resolution_buckets=[256, 512]).resolution_buckets == [256, 512]


def test_card_sizes_in_binary_units() -> None:
    assert _human_bytes(0) == "0 B"
    assert _human_bytes(1023) == "1023 B"
    assert _human_bytes(1024) == "1.0 KiB"
    assert _human_bytes(5 * 1024**2 + 512 * 1024) == "5.5 MiB"
    assert _human_bytes(3 * 1024**3) == "3.0 GiB"
    assert _human_bytes(2 * 1024**4) == "2.0 TiB"
    assert _human_bytes(4096 * 1024**4) == "4096.0 TiB"


def test_a_killed_build_of_another_name_is_cleaned_by_the_next_writer(
    inputs, tmp_path: Path
) -> None:
    """A scheduled rebuild names each generation anew: the temporary folder of a generation
    killed mid-build (a whole release's bytes) must not stay on disk forever."""
    out = tmp_path / "out"
    killed = out / ".tmp-gen-0004-4242"
    (killed / ".work" / "attribution").mkdir(parents=True)
    (killed / "commercial-000000.tar").write_bytes(b"\0" * 4096)
    empty = out / ".tmp-gen-0003-77"  # killed before its first folder
    empty.mkdir()
    other_tool = out / ".tmp-commercial-99"  # an MDS export's temporary: not ours
    other_tool.mkdir()
    (other_tool / "shard.00000.mds").write_bytes(b"half")
    rel = write_release(inputs[0], inputs[1], out, ShardsConfig(), name="gen-0005",
                        run_info=RUN_INFO)  # fmt: skip
    assert is_release(rel)
    assert not killed.exists() and not empty.exists()
    assert other_tool.exists()
