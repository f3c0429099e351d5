"""`ccurate lookup`: a rights holder finds their image in a release, also from a resized copy."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from ccurate.demo.corpus import landscape
from ccurate.lookup import ReleaseLookupError, lookup, resolve_release
from ccurate.record import Sample, make_key
from ccurate.shardio import ShardWriter
from ccurate.shards.config import ShardsConfig
from ccurate.shards.release import write_release
from ccurate.takedown import hash_image_bytes


def _jpeg(img: Image.Image, q: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=q)
    return buf.getvalue()


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A 6-sample release whose images are stored resized (as ingest stores them)."""
    root = tmp_path_factory.mktemp("lookup")
    originals: dict[str, Path] = {}
    w = ShardWriter(root / "work" / "part-00000")
    for i in range(6):
        img = landscape(100 + i, 480, 360)
        fetched = _jpeg(img)  # what the site served
        stored = img.resize((160, 120), Image.Resampling.LANCZOS)  # what ingest kept
        f = root / f"original-{i}.jpg"
        f.write_bytes(fetched)
        url = f"https://photos.example.org/{i}.jpg"
        originals[url] = f
        h = hash_image_bytes(_jpeg(stored))
        w.write(
            Sample(
                key=make_key(url, "https://photos.example.org/gallery"),
                url=url,
                page_url="https://photos.example.org/gallery",
                alt_text=f"photo {i}",
                license="CC-BY-4.0",
                license_url="https://creativecommons.org/licenses/by/4.0/",
                author=f"Author {i}",
                title=f"Photo {i}",
                source_url="https://photos.example.org/g",
                image=_jpeg(stored),
                mime="image/jpeg",
                width=160,
                height=120,
                original_width=480,
                original_height=360,
                sha256=hash_image_bytes(fetched).sha256,
                pixel_sha256=h.pixel_sha256,
                phash=h.phash,
            )
        )
    w.commit({"stage": "caption"})
    rel = write_release(
        [str(root / "work" / "part-00000")], [], root / "releases", ShardsConfig(), name="v1"
    )
    return rel, originals


def test_finds_an_image_by_a_resized_copy(
    release: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    rel, originals = release
    url, f = list(originals.items())[2]
    copy = tmp_path / "copy.png"
    Image.open(f).resize((300, 225), Image.Resampling.BILINEAR).save(copy)
    stranger = tmp_path / "stranger.jpg"
    stranger.write_bytes(_jpeg(landscape(999, 480, 360)))
    res_copy, res_orig, res_stranger = lookup([copy, f, stranger], rel, radius=8)
    assert [m.url for m in res_copy.matches] == [url]
    m = res_copy.matches[0]
    assert m.match == "phash" and m.distance <= 8
    assert m.license == "CC-BY-4.0" and "Author 2" in (m.attribution or "")
    assert m.splits == ["commercial"] and m.shards[0].startswith("commercial/")
    # the very file the site served matches exactly, by its SHA-256
    assert [(x.url, x.match, x.distance) for x in res_orig.matches] == [(url, "sha256", 0)]
    assert res_stranger.matches == []


def test_cli_json_lines_and_release_folder(
    release: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    from ccurate.cli import app

    rel, originals = release
    url, f = next(iter(originals.items()))
    assert resolve_release(rel.parent) == rel
    res = CliRunner().invoke(app, ["lookup", str(f), "--release", str(rel.parent), "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert len(rows) == 1 and rows[0]["found"] and rows[0]["url"] == url
    assert rows[0]["key"] == make_key(url, "https://photos.example.org/gallery")
    assert rows[0]["release"] == "v1" and rows[0]["license"] == "CC-BY-4.0"
    res = CliRunner().invoke(app, ["lookup", str(f), "--release", str(tmp_path)])
    assert res.exit_code == 2 and "no release" in res.output
    res = CliRunner().invoke(app, ["lookup", str(f)])
    assert res.exit_code == 2


def test_cli_table_names_the_match_and_the_stranger(
    release: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    """Without --json: a table per found image (key, how, licence, attribution), one line
    for an image the release does not hold."""
    from ccurate.cli import app

    rel, originals = release
    url, f = list(originals.items())[4]
    stranger = tmp_path / "stranger.jpg"
    stranger.write_bytes(_jpeg(landscape(998, 480, 360)))
    res = CliRunner().invoke(
        app, ["lookup", str(f), str(stranger), "--release", str(rel)], env={"COLUMNS": "250"}
    )
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert f"{f}: 1 match(es) in" in text and url in text
    assert make_key(url, "https://photos.example.org/gallery") in text
    assert "sha256" in text and "CC-BY-4.0" in text and "Author 4" in text
    assert f"{stranger}: not in release" in text and "(radius 8)" in text


def test_radius_zero_only_finds_exact_copies(
    release: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    rel, originals = release
    f = list(originals.values())[4]
    copy = tmp_path / "crop.jpg"
    im = Image.open(f)
    im.crop((12, 9, im.width - 12, im.height - 9)).save(copy, quality=60)
    (near,) = lookup([copy], rel, radius=10)
    (none,) = lookup([copy], rel, radius=0)
    assert near.matches and near.matches[0].distance > 0
    assert none.matches == []
    with pytest.raises(ReleaseLookupError):
        lookup([tmp_path / "missing.jpg"], rel)


def test_cli_answers_the_readable_images_and_exits_2_for_an_unreadable_one(
    release: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    """One unreadable file among the queries used to abort the whole lookup, so the
    rights holder learnt nothing about the images that were fine."""
    from ccurate.cli import app

    rel, originals = release
    url, f = next(iter(originals.items()))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    res = CliRunner().invoke(app, ["lookup", str(broken), str(f), "--release", str(rel), "--json"])
    assert res.exit_code == 2, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["query"] for r in rows] == [str(broken), str(f)]
    assert rows[0]["found"] is None and rows[0]["error"]
    assert rows[1]["found"] and rows[1]["url"] == url
    res = CliRunner().invoke(app, ["lookup", str(broken), str(f), "--release", str(rel)])
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "error" in text and f"{f}: 1 match(es) in" in text
