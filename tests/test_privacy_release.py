"""The release says what was done to an image and ships only what was judged: blurred faces
are a recorded modification (json, index, ATTRIBUTION) and counted on the card, a file of
several frames is published as its first frame, merged duplicates are not all called
exact, and the manifest and shard index carry the dHash (older releases read it as null)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ccurate.pixels import ORIENTATION_TAG
from ccurate.record import Decision, Sample, make_key
from ccurate.shardio import ShardWriter
from ccurate.shards.catalog import Catalog
from ccurate.shards.config import ShardsConfig
from ccurate.shards.manifest import prepare_image
from ccurate.shards.read import iter_tar, release_shards
from ccurate.shards.release import write_release


def _gradient(w: int, h: int, colour: tuple[int, int, int]) -> Image.Image:
    ramp = np.linspace(0.4, 1.0, w)[None, :, None]
    return Image.fromarray(np.broadcast_to(ramp * np.array(colour), (h, w, 3)).astype(np.uint8))


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    _gradient(64, 48, colour).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _sample(i: int, blurred: float | None, dhash: str | None, duplicates: int = 1) -> Sample:
    url = f"https://img.example.org/{i}.jpg"
    data = _jpeg((40 + 60 * i, 120, 200))
    s = Sample(
        key=make_key(url),
        url=url,
        page_url=f"https://www.example.org/p/{i}",
        author=f"Author {i}",
        title=f"Picture {i}",
        license="CC-BY-4.0",
        license_url="https://creativecommons.org/licenses/by/4.0/",
        license_rule="rel_license@image",
        image=data,
        mime="image/jpeg",
        width=64,
        height=48,
        original_width=64,
        original_height=48,
        sha256=hashlib.sha256(data).hexdigest(),
        phash=f"{i:016x}",
        dhash=dhash,
        duplicate_count=duplicates,
        alt_text=f"picture {i}",
    )
    scores = {"nsfw": 0.01, "person": 0.6}
    if blurred is not None:
        scores |= {"faces": blurred, "faces_blurred": blurred}
    s.record(Decision("safety", True, None, scores))
    return s


def _release(tmp: Path, name: str, samples: list[Sample], safety: dict[str, object]) -> Path:
    w = ShardWriter(tmp / f"in-{name}")
    for s in samples:
        w.write(s)
    w.commit({})
    info = {"date": "2026-01-01", "filters": {"safety": safety}}
    return write_release(
        [str(tmp / f"in-{name}")], [], tmp / "out", ShardsConfig(), name=name, run_info=info
    )


def _records(rel: Path) -> dict[str, dict[str, object]]:
    return {k: json.loads(m["json"]) for t in release_shards(rel) for k, m in iter_tar(t)}


@pytest.fixture(scope="module")
def blurred_release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Sample]]:
    samples = [
        _sample(0, blurred=2.0, dhash="0f0f0f0f0f0f0f0f"),
        _sample(1, blurred=0.0, dhash=None, duplicates=3),
    ]
    tmp = tmp_path_factory.mktemp("rel")
    return _release(tmp, "blur", samples, {"enabled": True, "blur_faces": True}), samples


def test_blurred_faces_are_a_recorded_modification(
    blurred_release: tuple[Path, list[Sample]],
) -> None:
    """CC BY asks that changes be indicated: a blurred image says so in its record, its
    credit line, the shard index and ATTRIBUTION; an unblurred one stays unmodified."""
    rel, (blurred, plain) = blurred_release
    recs = _records(rel)
    assert recs[blurred.key]["modifications"] == "faces blurred"
    assert recs[blurred.key]["modified"] is True
    assert str(recs[blurred.key]["attribution"]).endswith("modified: faces blurred")
    assert recs[plain.key]["modifications"] == "" and recs[plain.key]["modified"] is False
    index = pq.read_table(rel / "commercial" / "commercial-000000.parquet").to_pylist()
    assert {r["key"]: r["modified"] for r in index} == {
        blurred.key: "faces blurred",
        plain.key: None,
    }
    credits = (rel / "ATTRIBUTION").read_text(encoding="utf-8")
    line = next(x for x in credits.splitlines() if x.startswith(f"- {blurred.key}:"))
    assert line.endswith("modified: faces blurred")


def test_card_says_blurring_is_on_and_how_many_were_blurred(
    blurred_release: tuple[Path, list[Sample]], tmp_path: Path
) -> None:
    rel, _ = blurred_release
    card = (rel / "README.md").read_text(encoding="utf-8")
    assert "1 had faces blurred" in card  # the modifications sentence
    assert "Face blurring: on" in card and "1 of the 2 published images had faces blurred" in card
    assert "unblurred original" in card  # url/page_url point at the source
    assert json.loads((rel / "release.json").read_text())["faces_blurred"] == 1
    off = _release(tmp_path, "off", [_sample(5, None, None)], {"blur_faces": False})
    assert "Face blurring: off" in (off / "README.md").read_text(encoding="utf-8")


def test_card_does_not_call_every_merged_duplicate_exact(
    blurred_release: tuple[Path, list[Sample]],
) -> None:
    """`duplicate_count` counts exact, near and semantic copies together."""
    card = (blurred_release[0] / "README.md").read_text(encoding="utf-8")
    assert "Exact duplicates merged" not in card
    line = next(x for x in card.splitlines() if x.startswith("Duplicates merged"))
    assert "exact, near and semantic" in line and line.endswith(": 2.")


def test_manifest_index_and_record_carry_the_dhash(
    blurred_release: tuple[Path, list[Sample]],
) -> None:
    """A release serves as a near-duplicate reference with the dHash check."""
    rel, samples = blurred_release
    want = {s.key: s.dhash for s in samples}
    manifest = pq.read_table(rel / "manifest.parquet", columns=["key", "dhash"]).to_pylist()
    assert {r["key"]: r["dhash"] for r in manifest} == want
    index = pq.read_table(rel / "commercial" / "commercial-000000.parquet").to_pylist()
    assert {r["key"]: r["dhash"] for r in index} == want
    assert {k: r["dhash"] for k, r in _records(rel).items()} == {
        k: v or "" for k, v in want.items()
    }


def test_catalog_reads_releases_made_before_the_dhash_column(tmp_path: Path) -> None:
    old = _release(tmp_path, "old", [_sample(7, None, "00ff00ff00ff00ff")], {})
    new = _release(tmp_path, "new", [_sample(8, None, "ff00ff00ff00ff00")], {})
    table = pq.read_table(old / "manifest.parquet")
    pq.write_table(table.drop_columns(["dhash"]), old / "manifest.parquet")  # as before
    with Catalog(tmp_path / "cat") as cat:
        cat.record_release(old)
        cat.record_release(new)
        rows = cat.query("SELECT release, dhash FROM manifests ORDER BY release").to_pylist()
    assert rows == [
        {"release": "new", "dhash": "ff00ff00ff00ff00"},
        {"release": "old", "dhash": None},
    ]


def _two_frames(fmt: str, exif: bytes = b"") -> bytes:
    buf = io.BytesIO()
    first, second = _gradient(96, 64, (30, 90, 230)), _gradient(96, 64, (230, 30, 30))
    kw: dict[str, object] = {"duration": 200} if fmt != "MPO" else {}
    if exif:
        kw["exif"] = exif
    first.save(buf, fmt, save_all=True, append_images=[second], **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "mime", "release_fmt"),
    [("MPO", "image/jpeg", "jpg"), ("WEBP", "image/webp", "webp"), ("PNG", "image/png", "png")],
)
def test_prepare_image_copies_only_single_frame_files(
    fmt: str, mime: str, release_fmt: str
) -> None:
    """Stored bytes of the release's type are copied untouched only when they hold one
    frame: later frames of an MPO (Pillow's format for a multi-picture JPEG), an animated
    WebP or PNG were never judged by a filter."""
    data = _two_frames(fmt)
    out, reencoded, size = prepare_image(data, mime, ShardsConfig(image_format=release_fmt))
    assert reencoded == release_fmt and size == (96, 64)
    with Image.open(io.BytesIO(out)) as im:
        assert getattr(im, "n_frames", 1) == 1
        blue = np.asarray(im.convert("RGB"), np.float64).mean(axis=(0, 1))
    assert blue[2] > 2 * blue[0]  # the first (blue) frame, not the red one
    single = _jpeg((200, 100, 50))
    assert prepare_image(single, "image/jpeg", ShardsConfig()) == (single, None, None)


def test_a_reencoded_file_is_written_upright() -> None:
    """An MPO stored sideways (Orientation 6) loses its EXIF when re-encoded, so its
    pixels are turned as viewers show them, as the record's width and height say."""
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    data = _two_frames("MPO", exif.tobytes())
    out, _, size = prepare_image(data, "image/jpeg", ShardsConfig())
    with Image.open(io.BytesIO(out)) as im:
        assert im.size == size == (64, 96)
        assert im.getexif().get(ORIENTATION_TAG, 1) == 1


def test_card_states_the_dedup_references_and_the_safety_rejudging(tmp_path: Path) -> None:
    """What the decontamination promise rests on (reference rows read and usable, what was
    not read), and what a rebuild's second safety judgement did, are on the card."""
    w = ShardWriter(tmp_path / "in")
    w.write(_sample(7, blurred=1.0, dhash=None))
    w.commit({})
    info = {
        "date": "2026-01-01",
        "filters": {"safety": {"enabled": True, "blur_faces": True}},
        "dedup_references": {
            "against": {"rows": 12, "usable": 10, "unread": {"undecodable_images": 2}},
            "previous": {"rows": 5, "usable": 5, "unread": {}},
        },
        "rebuild": {
            "settings": {
                "released_under_earlier_settings": 3,
                "safety_judged_again": {"judged": 3, "faces_blurred": 1, "dropped": {"nsfw": 1}},
            }
        },
    }
    rel = write_release(
        [str(tmp_path / "in")], [], tmp_path / "out", ShardsConfig(), name="r", run_info=info
    )
    card = (rel / "README.md").read_text(encoding="utf-8")
    assert (
        "Decontamination (`[dedup] against`): 10 usable of 12 reference rows; "
        'not read: {"undecodable_images": 2}.' in card
    )
    assert "Earlier releases (`[dedup] previous`): 5 usable of 5 reference rows." in card
    assert "the licence policy below was applied to them again, and the safety filter" in card
    assert (
        "3 released samples judged again by the safety filter; faces blurred in 1, "
        "withdrawn 1 (nsfw: 1)." in card
    )
