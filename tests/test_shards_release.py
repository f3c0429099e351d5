"""Release writer: layout, determinism, splits, attribution, card numbers, atomic publishing."""

from __future__ import annotations

import hashlib
import html
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from ccurate.filters.license_filter import release_split
from ccurate.record import Decision, LicenseEvidence, Sample, make_key
from ccurate.shardio import ShardWriter
from ccurate.shards.attribution import license_link, license_name
from ccurate.shards.config import ShardsConfig
from ccurate.shards.read import iter_tar, read_at, release_shards
from ccurate.shards.release import (
    PAUSE_ENV,
    SUCCESS,
    bucket_for,
    is_release,
    next_version,
    verify,
    write_release,
)
from ccurate.shards.synth import make_inputs, synth_image
from tests.conftest import REAL

RUN_INFO = {
    "date": "2025-06-01",
    "run_id": "test-run",
    "filters": {"quality": {"min_clip": 0.2, "min_side": 32}, "license": {"policy": "commercial"}},
    "caption": {"model": "tiny-blip2-test", "max_new_tokens": 20},
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[str]]:
    return make_inputs(tmp_path_factory.mktemp("in"), n_shards=2, per_shard=14)


@pytest.fixture(scope="module")
def release(inputs, tmp_path_factory) -> Path:
    cfg = ShardsConfig(samples_per_shard=5)
    return write_release(
        inputs[0], inputs[1], tmp_path_factory.mktemp("out"), cfg, name="r1", run_info=RUN_INFO
    )


def _records(release: Path) -> list[tuple[str, dict[str, bytes]]]:
    return [s for t in release_shards(release) for s in iter_tar(t)]


def test_layout(release: Path) -> None:
    assert is_release(release) and release.name == "r1"
    for f in (
        "manifest.parquet",
        "excluded.parquet",
        "ATTRIBUTION",
        "README.md",
        "SHA256SUMS",
        "release.json",
    ):
        assert (release / f).is_file(), f
    tars = release_shards(release)
    names = [t.relative_to(release).as_posix() for t in tars]
    assert names[:2] == ["commercial/commercial-000000.tar", "commercial/commercial-000001.tar"]
    assert all(re.fullmatch(r"(commercial|noncommercial)/\1-\d{6}\.tar", n) for n in names)
    for t in tars:
        base = t.with_suffix("")
        assert base.with_suffix(".parquet").is_file()
        stats = json.loads(Path(f"{base}.stats.json").read_text())
        samples = list(iter_tar(t))
        assert stats["samples"] == len(samples) <= 5
        for key, fields in samples:
            assert set(fields) == {"jpg", "txt", "json"}
            assert Image.open(io.BytesIO(fields["jpg"])).format == "JPEG"
            rec = json.loads(fields["json"])
            assert rec["key"] == key
            assert fields["txt"].decode() == rec["text"]
        with tarfile.open(t) as tf:
            assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tf)
    assert not list(release.parent.glob(".tmp-*"))
    assert verify(release) == []
    # sha256sum -c compatible
    r = subprocess.run(
        ["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=release, capture_output=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    listed = {ln.split("  ", 1)[1] for ln in (release / "SHA256SUMS").read_text().splitlines()}
    on_disk = {p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file()}
    assert on_disk - listed == {"SHA256SUMS", SUCCESS}


def test_manifest_offsets_and_records(release: Path, inputs) -> None:
    man = pq.read_table(release / "manifest.parquet").to_pylist()
    recs = {k: json.loads(f["json"]) for k, f in _records(release)}
    kept = [
        lid
        for p in inputs[0]
        for lid in pq.read_table(f"{p}.parquet").column("license").to_pylist()
    ]
    assert len(man) == len(recs) == sum(1 for lid in kept if release_split(lid)) < len(kept)
    for row in man:
        key, fields = read_at(release, row["shard"], row["offset"])
        assert key == row["key"]
        assert hashlib.sha256(fields["jpg"]).hexdigest() == row["image_sha256"]
        assert row["split"] == release_split(row["license"]) == recs[key]["license_family"]
    # record fields: the full record, type-stable
    kinds = {tuple(sorted((k, type(v).__name__) for k, v in r.items())) for r in recs.values()}
    assert len(kinds) == 1
    r0 = next(iter(recs.values()))
    assert set(r0["scores"]) == {"quality.clip", "quality.entropy"}
    for k in (
        "license_url",
        "license_evidence",
        "author",
        "title",
        "sha256",
        "phash",
        "duplicate_count",
        "caption_model",
        "alt_text",
        "original_width",
    ):
        assert k in r0


def test_splits(release: Path) -> None:
    man = pq.read_table(release / "manifest.parquet").to_pylist()
    by_split: dict[str, set[str]] = {}
    for row in man:
        by_split.setdefault(row["split"], set()).add(row["license"])
    assert by_split["commercial"] == {
        "CC-BY-4.0",
        "CC-BY-SA-4.0",
        "CC0-1.0",
        "LicenseRef-PDM-1.0",
        "CC-BY-ND-4.0",
    }
    assert by_split["noncommercial"] == {"CC-BY-NC-4.0", "CC-BY-NC-SA-2.0"}
    ex = pq.read_table(release / "excluded.parquet").to_pylist()
    assert {(e["license"], e["reason"]) for e in ex} == {
        ("LicenseRef-All-Rights-Reserved", "not_releasable")
    }


def test_superset_and_buckets(inputs, tmp_path: Path) -> None:
    cfg = ShardsConfig(noncommercial_includes_commercial=True, resolution_buckets=[40, 60])
    rel = write_release(inputs[0], inputs[1], tmp_path, cfg, name="b", run_info=RUN_INFO)
    man = pq.read_table(rel / "manifest.parquet").to_pylist()
    com = {r["key"] for r in man if r["split"] == "commercial"}
    nc = {r["key"] for r in man if r["split"] == "noncommercial"}
    assert com and com < nc
    for r in man:
        assert r["bucket"] == bucket_for(min(r["width"], r["height"]), [40, 60])
        assert r["shard"].startswith(f"{r['split']}/{r['bucket']}/{r['split']}-")
    assert bucket_for(300, [256, 512, 1024]) == "res-256"
    assert bucket_for(2000, [256, 512, 1024]) == "res-1024"
    assert bucket_for(100, [256, 512]) == "res-0"


def test_deterministic_bytes(inputs, release: Path, tmp_path: Path) -> None:
    cfg = ShardsConfig(samples_per_shard=5)
    again = write_release(inputs[0], inputs[1], tmp_path, cfg, name="r1", run_info=RUN_INFO)
    assert (again / "SHA256SUMS").read_bytes() == (release / "SHA256SUMS").read_bytes()
    assert (again / SUCCESS).read_bytes() == (release / SUCCESS).read_bytes()


def test_idempotent_and_versions(inputs, tmp_path: Path) -> None:
    cfg = ShardsConfig()
    assert next_version(tmp_path) == "v1"
    v1 = write_release(inputs[0], inputs[1], tmp_path, cfg, run_info=RUN_INFO)
    assert v1.name == "v1" and next_version(tmp_path) == "v2"
    before = (v1 / "SHA256SUMS").stat().st_mtime_ns
    assert write_release(inputs[0], inputs[1], tmp_path, cfg, name="v1") == v1  # same inputs
    assert (v1 / "SHA256SUMS").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match=r"'v1' exists .* other inputs"):
        write_release(inputs[0][:1], [], tmp_path, cfg, name="v1")  # a release is immutable
    assert (v1 / "SHA256SUMS").stat().st_mtime_ns == before
    assert write_release(inputs[0], inputs[1], tmp_path, cfg).name == "v2"
    (tmp_path / "v9").mkdir()  # not a release: never taken as one
    with pytest.raises(FileExistsError):
        write_release(inputs[0], inputs[1], tmp_path, cfg, name="v9")


def test_shard_size_in_bytes(inputs, tmp_path: Path) -> None:
    cfg = ShardsConfig(shard_max_bytes=12_000)
    rel = write_release(inputs[0], inputs[1], tmp_path, cfg, name="b", run_info=RUN_INFO)
    tars = release_shards(rel)
    assert len(tars) > 2
    for t in tars:
        assert t.stat().st_size <= 12_000 + 10240  # tarfile pads the end to a 10 KiB record
        with tarfile.open(t) as tf:
            end = max(m.offset_data + m.size for m in tf)
        assert end <= 12_000


def test_caption_policy_and_reencode(inputs, tmp_path: Path) -> None:
    syn = write_release(
        inputs[0], inputs[1], tmp_path / "a", ShardsConfig(), name="s", run_info=RUN_INFO
    )
    recs = [json.loads(f["json"]) for _, f in _records(syn)]
    src = Counter(r["caption_source"] for r in recs)
    assert src["alt_text_fallback"] > 0 and src["synthetic"] > 0
    for r in recs:
        if r["caption_source"] == "alt_text_fallback":
            assert r["caption"] == "" and r["text"] == r["alt_text"]
    assert sum(1 for r in recs if "converted to JPG" in r["modifications"]) > 0
    # copied untouched when the stored type is the configured one
    originals = {}
    for p in inputs[0]:
        with tarfile.open(f"{p}.tar") as tf:
            for m in tf:
                if m.name.endswith(".jpg"):
                    originals[m.name[:-4]] = tf.extractfile(m).read()  # type: ignore[union-attr]
    for key, f in _records(syn):
        if key in originals:
            assert f["jpg"] == originals[key]

    both = write_release(
        inputs[0],
        inputs[1],
        tmp_path / "b",
        ShardsConfig(caption_source="both", image_format="png"),
        name="s",
    )
    for _, f in _records(both):
        assert set(f) == {"png", "txt", "alt.txt", "json"}
        assert Image.open(io.BytesIO(f["png"])).format == "PNG"
        assert f["alt.txt"].decode() == json.loads(f["json"])["alt_text"]
    alt = write_release(
        inputs[0], inputs[1], tmp_path / "c", ShardsConfig(caption_source="alt_text"), name="s"
    )
    for _, f in _records(alt):
        rec = json.loads(f["json"])
        assert rec["caption_source"] in {"alt_text", "synthetic_fallback", "none"}
        if rec["caption_source"] == "none":  # neither text: published with "", counted
            assert rec["alt_text"] == rec["caption"] == ""
        assert f["txt"].decode() == (rec["alt_text"] or rec["caption"])


def _wikimedia_sample(tmp: Path) -> tuple[list[str], Sample]:
    """A real Commons CC BY-SA 4.0 answer turned into a record, as ingest would do."""
    info = json.loads((REAL / "wikimedia_commons_imageinfo.json").read_text())
    ii = info["imageinfo"][0]
    meta = {k: v["value"] for k, v in ii["extmetadata"].items()}
    author = html.unescape(re.sub(r"<[^>]+>", "", meta["Artist"])).strip()
    lid = "CC-" + meta["License"].upper().removeprefix("CC-")
    data = synth_image(__import__("random").Random(1), 64, 36)
    s = Sample(
        key=make_key(ii["url"], ii["descriptionurl"]),
        url=ii["url"],
        page_url=ii["descriptionurl"],
        alt_text=meta["ImageDescription"],
        license=lid,
        license_url=meta["LicenseUrl"],
        license_rule="wikimedia@metadata",
        license_evidence=[LicenseEvidence("metadata", "wikimedia", meta["License"])],
        author=author,
        title=meta["ObjectName"],
        source_url=ii["descriptionurl"],
        image=data,
        mime="image/jpeg",
        width=64,
        height=36,
        original_width=ii["width"],
        original_height=ii["height"],
        sha256=hashlib.sha256(data).hexdigest(),
        caption="a lone tree on a cliff by the sea",
        caption_model="tiny-blip2-test",
    )
    s.record(Decision("license", True))
    w = ShardWriter(tmp / "wm-00000")
    w.write(s)
    w.commit({"stage": "caption", "in": 1, "kept": 1, "dropped": 0})
    return [str(tmp / "wm-00000")], s


@pytest.mark.skipif(not REAL.exists(), reason="shared/fixtures/real not present")
def test_attribution_real_cc_by_sample(tmp_path: Path) -> None:
    prefixes, s = _wikimedia_sample(tmp_path)
    rel = write_release(
        prefixes, [], tmp_path / "out", ShardsConfig(), name="wm", run_info=RUN_INFO
    )
    text = (rel / "ATTRIBUTION").read_text()
    assert s.license == "CC-BY-SA-4.0" and s.author == "PtrQs"
    assert "## CC BY-SA 4.0 (Creative Commons Attribution-ShareAlike 4.0 International)" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("- "))
    assert '"20120925 PlozevetBretagne LoneTree DSC07971 PtrQs"' in line
    assert "by PtrQs" in line
    assert f"source: {s.source_url}" in line
    assert "<https://creativecommons.org/licenses/by-sa/4.0/>" in line
    assert line.endswith("modified: resized")
    rec = json.loads(next(iter(_records(rel)))[1]["json"])
    assert line == f"- {rec['key']}: {rec['attribution']}"
    assert f"image: {s.url}" in line  # the licensed material's own URI, CC BY 4.0 3(a)(1)(A)(v)
    assert rec["modified"] is True and rec["license_family"] == "commercial"


def test_attribution_synthetic_groups(release: Path) -> None:
    text = (release / "ATTRIBUTION").read_text()
    heads = [ln for ln in text.splitlines() if ln.startswith("## ")]
    man = pq.read_table(release / "manifest.parquet").to_pylist()
    lic = Counter(r["license"] for r in man)
    assert heads == [f"## {license_name(k)}" for k in sorted(lic)]
    entries = [ln for ln in text.splitlines() if ln.startswith("- ")]
    assert sorted(entries) == sorted(f"- {r['key']}: {r['attribution']}" for r in man)
    assert len(set(entries)) == len(entries)  # one line per image, each telling which
    by = [ln for ln in entries if "CC BY 4.0" in ln]
    assert len(by) == lic["CC-BY-4.0"]
    assert all(str(license_link("CC-BY-4.0")) in ln for ln in by)
    assert any("by unknown author" in ln for ln in entries)  # missing author is said, not blank
    assert license_name("CC-BY-NC-ND-3.0") == (
        "CC BY-NC-ND 3.0 (Creative Commons Attribution-NonCommercial-NoDerivs 3.0 Unported)"
    )


def test_card_numbers_equal_data(release: Path, inputs) -> None:
    card = (release / "README.md").read_text()
    summary = json.loads((release / "release.json").read_text())
    man = pq.read_table(release / "manifest.parquet").to_pylist()
    recs = [json.loads(f["json"]) for _, f in _records(release)]

    def row(*cells: object) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    for lid, n in Counter(r["license"] for r in man).items():
        assert row(lid, license_name(lid), n, f"{100 * n / len(man):.1f}%") in card
    shards = Counter(Path(r["shard"]).as_posix() for r in man)
    for split, n in Counter(r["split"] for r in man).items():
        n_shards = len({s for s in shards if s.startswith(split + "/")})
        assert row(split, n, n_shards) in card
    drops: Counter[str] = Counter()
    for p in inputs[1]:
        drops.update(pq.read_table(p, columns=["drop_reason"]).column(0).to_pylist())
    assert summary["drops"]["by_reason"] == dict(drops)
    for reason, n in drops.items():
        assert row(f"`{reason}`", n) in card
    page = sum(1 for r in recs if r["license_rule"].endswith("@page"))
    assert page > 0
    assert f"{page} of {len(man)} published samples ({100 * page / len(man):.1f}%)" in card
    src = Counter(r["caption_source"] for r in recs)
    for k, n in src.items():
        assert row(k, n, f"{100 * n / len(man):.1f}%") in card
    assert "| `tiny-blip2-test` |" in card
    assert '"min_clip": 0.2' in card and "2025-06-01" in card
    assert row("`not_releasable`", len(pq.read_table(release / "excluded.parquet"))) in card
    assert "None" not in card and "nan" not in card.lower().split()
    assert not re.search(r"\{\s*\}|\{[a-z_]+\}(?!\.)", card.replace("{key}", ""))


def _kill_script(inputs: tuple[list[str], list[str]], out: Path) -> str:
    return (
        "from ccurate.shards.release import write_release\n"
        "from ccurate.shards.config import ShardsConfig\n"
        f"write_release({inputs[0]!r}, {inputs[1]!r}, {str(out)!r}, "
        f"ShardsConfig(samples_per_shard=5), name='r1', run_info={RUN_INFO!r})\n"
    )


def test_killed_writer_leaves_no_release_and_rerun_completes(
    inputs, release: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, **{PAUSE_ENV: "60"})
    proc = subprocess.Popen([sys.executable, "-c", _kill_script(inputs, out)], env=env)
    try:
        deadline = time.time() + 60
        while not list(out.glob(".tmp-r1-*/*/*.stats.json")):
            assert proc.poll() is None, "writer exited before the first shard"
            assert time.time() < deadline, "writer never closed a shard"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "r1").exists()
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []
    assert list(out.glob(".tmp-r1-*"))  # the half release exists only under its temp name
    assert next_version(out) == "v1"

    done = write_release(
        inputs[0], inputs[1], out, ShardsConfig(samples_per_shard=5), name="r1", run_info=RUN_INFO
    )
    assert is_release(done) and not list(out.glob(".tmp-*"))
    assert (done / "SHA256SUMS").read_bytes() == (release / "SHA256SUMS").read_bytes()


def test_unfinished_input_is_an_error(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path / "x-00000")
    w.abort()
    (tmp_path / "x-00000.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="unfinished"):
        write_release([str(tmp_path / "x-00000")], [], tmp_path / "o", ShardsConfig(), name="x")
    assert not (tmp_path / "o" / "x").exists()


def test_pipeline_run_info_shape_and_timings_do_not_change_bytes(inputs, tmp_path: Path) -> None:
    """The pipeline passes {"config": ..., "stages": {step: stats + timings}}."""

    def info(seconds: float) -> dict:
        return {
            "date": "2025-06-01",
            "config": {"filters": {"quality": {"min_side": 64}}, "dedup": {"enabled": True}},
            "stages": {
                "filter": {
                    "stage": "filter",
                    "in": 50,
                    "kept": 40,
                    "dropped": 10,
                    "seconds": seconds,
                    "wall_seconds": seconds * 2,
                },
            },
        }

    cfg = ShardsConfig()
    a = write_release(inputs[0], inputs[1], tmp_path / "a", cfg, name="p", run_info=info(1.5))
    b = write_release(inputs[0], inputs[1], tmp_path / "b", cfg, name="p", run_info=info(9.25))
    assert (a / "SHA256SUMS").read_bytes() == (b / "SHA256SUMS").read_bytes()
    card = (a / "README.md").read_text()
    assert "| filter | 50 | 40 | 10 |" in card
    assert '"min_side": 64' in card and "Deduplication settings" in card
    assert "1.5" not in (a / "release.json").read_text()


def test_bad_inputs_are_excluded_with_a_reason(tmp_path: Path) -> None:
    import random as _random

    good = synth_image(_random.Random(3), 40, 30)
    rows = []
    for k, (mime, data) in enumerate([("image/png", b"not an image"), ("image/jpeg", good)]):
        url = f"https://x.example/{k}.img"
        s = Sample(
            key=make_key(url),
            url=url,
            license="CC0-1.0",
            image=data,
            mime=mime,
            width=40,
            height=30,
            alt_text="a",
        )
        rows.append(s)
    prefixes = []
    for n in range(2):  # the good sample appears in both shards: a duplicate key
        w = ShardWriter(tmp_path / f"in-{n:05d}")
        for s in rows if n == 0 else rows[1:]:
            w.write(s)
        w.commit({})
        prefixes.append(str(tmp_path / f"in-{n:05d}"))
    rel = write_release(prefixes, [], tmp_path / "out", ShardsConfig(), name="x", run_info=RUN_INFO)
    ex = {r["reason"]: r for r in pq.read_table(rel / "excluded.parquet").to_pylist()}
    assert set(ex) == {"image_error", "duplicate_key"}
    assert ex["image_error"]["key"] == rows[0].key
    assert pq.read_metadata(rel / "manifest.parquet").num_rows == 1


def _encoded(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp"])
def test_prepare_image_transcodes_and_flattens_alpha_on_white(fmt: str) -> None:
    """Stored bytes of another type are re-encoded to the release's format: JPEG has no
    alpha, so transparency becomes white (not black); PNG and WebP keep it; palette and
    16-bit greys become 8-bit RGB(A) the readers expect. Bytes of the configured type are
    copied untouched."""
    from ccurate.shards.manifest import prepare_image

    cfg = ShardsConfig(image_format=fmt)
    rgba = Image.new("RGBA", (40, 30), (200, 20, 20, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 30))  # left half fully transparent
    src_fmt = "webp" if fmt == "png" else "png"
    data, re_as, size = prepare_image(
        _encoded(rgba, src_fmt.upper(), lossless=True), f"image/{src_fmt}", cfg
    )
    assert re_as == fmt and size == (40, 30)
    out = Image.open(io.BytesIO(data))
    assert out.format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    px = out.convert("RGBA").getpixel((5, 15))
    if fmt == "jpg":
        assert out.mode == "RGB" and min(px[:3]) >= 245  # white, not black
    else:
        assert px[3] == 0  # transparency kept
    right = out.convert("RGB").getpixel((35, 15))
    assert right[0] > 180 and right[1] < 60  # the opaque half keeps its colour
    pal = Image.new("P", (8, 8))
    pal.putpalette([0, 0, 255] * 256)
    for img, mime in ((pal, "image/gif"), (Image.new("I;16", (8, 8), 40000), "image/tiff")):
        data, _, _ = prepare_image(_encoded(img, mime.split("/")[1].upper()), mime, cfg)
        assert Image.open(io.BytesIO(data)).mode in ("RGB", "RGBA", "L")
    same = _encoded(rgba.convert("RGB"), {"jpg": "JPEG"}.get(fmt, fmt.upper()))
    ext_mime = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}[fmt]
    assert prepare_image(same, ext_mime, cfg) == (same, None, None)
