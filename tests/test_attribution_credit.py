"""The licensor's requested attribution (`Sample.credit`) and linked "by" credits in HTML.

CC BY 4.0 §3(a)(1)(A)(i) asks to credit the creator "in any reasonable manner requested by
the Licensor"; Wikimedia Commons states that request in extmetadata `Attribution`. It must
reach the record, the published json, index and manifest, and the
ATTRIBUTION line; shards written before the field existed must still read.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from ccurate.filters.license_filter import LicenseConfig, LicenseFilter
from ccurate.ingest.html import extract_images
from ccurate.ingest.sources import UrlListSource, iter_source
from ccurate.record import METADATA_SCHEMA, SCHEMA, Sample, samples_to_table, table_to_samples
from ccurate.shardio import ShardWriter, iter_samples
from ccurate.shards.attribution import attribution_line
from ccurate.shards.config import ShardsConfig
from ccurate.shards.manifest import _JSON_TYPES
from ccurate.shards.read import iter_tar, release_shards
from ccurate.shards.release import write_release
from ccurate.shards.synth import synth_image
from tests.test_shards_release import RUN_INFO


def _commons_item(real_fixtures: Path) -> dict[str, Any]:
    info = json.loads((real_fixtures / "wikimedia_commons_imageinfo.json").read_text())
    item: dict[str, Any] = info["imageinfo"][0]
    return item


def _commons_samples(tmp: Path, exts: list[dict[str, Any]], page: str) -> list[Sample]:
    """Rows of a Commons list (url, page, extmetadata, and an input column named `credit`)
    through the source reader and the licence filter, as the pipeline reads them."""
    jsonl = tmp / "commons.jsonl"
    rows = [
        {"url": f"https://upload.test/{i}.jpg", "page": page, "ext": ext, "credit": "input col"}
        for i, ext in enumerate(exts)
    ]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = UrlListSource(path=str(jsonl), page_url_col="page", extmetadata_col="ext")
    out = list(iter_source(src))
    lf = LicenseFilter(LicenseConfig())
    for s in out:
        assert lf.decide(s).keep and s.license == "CC-BY-SA-4.0"
    return out


# --------------------------------------------------------------------------- record
def test_credit_is_a_record_column_and_old_shards_read_none(tmp_path: Path) -> None:
    assert SCHEMA.field("credit").type == METADATA_SCHEMA.field("credit").type
    s = Sample(key="k1", url="https://a.test/1.jpg", author="Ann", credit="Photo by Ann")
    table = samples_to_table([s])
    assert table.column("credit").to_pylist() == ["Photo by Ann"]
    (back,) = table_to_samples(table)
    assert back.credit == "Photo by Ann" and "credit" not in back.extra

    # a shard written before the column existed: no `credit` column at all
    w = ShardWriter(tmp_path / "old-00000")
    w.write(Sample(key="k2", url="https://a.test/2.jpg", author="Bo"))
    w.commit({"stage": "old", "in": 1, "kept": 1, "dropped": 0})
    path = tmp_path / "old-00000.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["credit"]), path)
    (old,) = [x for batch in iter_samples(tmp_path / "old-00000") for x in batch]
    assert old.author == "Bo" and old.credit is None and "credit" not in old.extra


# --------------------------------------------------------------------------- ingest
def test_commons_attribution_request_becomes_sample_credit(
    tmp_path: Path, real_fixtures: Path
) -> None:
    item = _commons_item(real_fixtures)
    ext = item["extmetadata"]
    no_attr = {k: v for k, v in ext.items() if k != "Attribution"}
    linked = copy.deepcopy(no_attr)
    linked["Attribution"] = {"value": '<a href="https://flickr.test/p/1">Jane Roe</a><br>/ Flickr'}
    a, b, c = _commons_samples(tmp_path, [ext, no_attr, linked], item["descriptionurl"])
    assert a.credit == "Photo by PtrQs" and a.author == "PtrQs"  # Attribution, HTML stripped
    # Commons' `Credit` is the file's source ("Own work"), not a request for credit
    assert ext["Credit"]["value"] and b.credit is None
    assert c.credit == "Jane Roe / Flickr"
    # an input column named like the field is carried, never taken for the record's own
    assert a.extra["input_credit"] == "input col"


def test_attribution_line_carries_credit_on_one_line() -> None:
    rec = {
        "title": "Lone tree",
        "author": "PtrQs",
        "credit": "Photo by\nPtrQs\u202e",
        "source_url": "https://commons.test/f",
        "license": "CC-BY-SA-4.0",
    }
    line = attribution_line(rec, [])
    assert '"Lone tree" — by PtrQs — credit: Photo by PtrQs — source: ' in line
    assert "\n" not in line and "\u202e" not in line
    assert "credit" not in attribution_line({**rec, "credit": None}, [])
    assert "credit" not in attribution_line({**rec, "credit": " \n "}, [])


# --------------------------------------------------------------------------- release
def test_release_publishes_credit_in_json_index_manifest_and_attribution(
    tmp_path: Path, real_fixtures: Path
) -> None:
    item = _commons_item(real_fixtures)
    (s,) = _commons_samples(tmp_path, [item["extmetadata"]], item["descriptionurl"])
    data = synth_image(random.Random(1), 64, 36)
    s.image, s.mime, s.width, s.height = data, "image/jpeg", 64, 36
    s.sha256 = hashlib.sha256(data).hexdigest()
    w = ShardWriter(tmp_path / "in-00000")
    w.write(s)
    w.commit({"stage": "caption", "in": 1, "kept": 1, "dropped": 0})
    # and one record from a shard written before the column existed
    old = Sample(key="0" * 16, url="https://old.test/1.jpg", author="Old", title="Old one")
    old.license, old.license_url = "CC-BY-4.0", "https://creativecommons.org/licenses/by/4.0/"
    old.image, old.mime, old.width, old.height = data, "image/jpeg", 64, 36
    w = ShardWriter(tmp_path / "old-00000")
    w.write(old)
    w.commit({"stage": "caption", "in": 1, "kept": 1, "dropped": 0})
    path = tmp_path / "old-00000.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["credit"]), path)

    inputs = [str(tmp_path / "in-00000"), str(tmp_path / "old-00000")]
    rel = write_release(inputs, [], tmp_path / "out", ShardsConfig(), name="c", run_info=RUN_INFO)

    recs = {
        json.loads(m["json"])["key"]: json.loads(m["json"])
        for t in release_shards(rel)
        for _, m in iter_tar(t)
    }
    new_rec, old_rec = recs[s.key], recs[old.key]
    assert new_rec["credit"] == "Photo by PtrQs" and old_rec["credit"] == ""
    assert "— by PtrQs — credit: Photo by PtrQs — source: " in new_rec["attribution"]
    assert "credit:" not in old_rec["attribution"]
    assert list(new_rec) == [n for n, _ in _JSON_TYPES]  # type-stable, as the features say

    lines = (rel / "ATTRIBUTION").read_text().splitlines()
    assert f"- {s.key}: {new_rec['attribution']}" in lines

    man = pq.read_table(rel / "manifest.parquet").to_pylist()
    assert {r["key"]: r["credit"] for r in man} == {s.key: "Photo by PtrQs", old.key: None}
    index = [
        r for t in release_shards(rel) for r in pq.read_table(t.with_suffix(".parquet")).to_pylist()
    ]
    assert {r["key"]: r["credit"] for r in index} == {s.key: "Photo by PtrQs", old.key: None}

    meta = json.loads((rel / "release.json").read_text())
    (js,) = [f for f in meta["features"] if f["name"] == "json"]
    assert {"name": "credit", "dtype": "string"} in js["struct"]


# --------------------------------------------------------------------------- html "by <a>"
def _fig(caption: str) -> str:
    return f'<figure><img src="a.jpg" alt="x"><figcaption>{caption}</figcaption></figure>'


A = '<a href="https://people.test/jane">{}</a>'
CREDITS: list[tuple[str, str, str | None]] = [
    # positives: the link after a credit's "by" names the author
    ("plain by", _fig("by " + A.format("Jane")), "Jane"),
    ("caption, by", _fig("Sunset over the lake, by " + A.format("Jane Doe")), "Jane Doe"),
    ("title by", _fig("Lake at dawn by " + A.format("Jane Doe") + "."), "Jane Doe"),
    (
        "unsplash",
        _fig(
            "Photo by " + A.format("Jane Doe") + ' on <a href="https://unsplash.com/">Unsplash</a>'
        ),
        "Jane Doe",
    ),
    (
        "pixabay",
        _fig("Image by " + A.format("jdoe42") + ' from <a href="https://pixabay.com/">Pixabay</a>'),
        "jdoe42",
    ),
    (
        "openverse / CC chooser TASL",
        _fig(
            '"<a href="https://flickr.test/p/1">Lone tree</a>" by '
            + A.format("PtrQs")
            + ' is licensed under <a href="https://creativecommons.org/licenses/by/2.0/">'
            "CC BY 2.0</a>"
        ),
        "PtrQs",
    ),
    ("nested markup", _fig("Sunset, <em>by <a href='/u/j'>Jane <b>Doe</b></a></em>"), "Jane Doe"),
    ("by:", _fig("Photo by: " + A.format("Ana Ruiz")), "Ana Ruiz"),
    ("photographed by", _fig("Photographed by " + A.format("Ana Ruiz")), "Ana Ruiz"),
    (
        "wp caption",
        '<div class="wp-caption"><img src="a.jpg"><p class="wp-caption-text">Dawn by '
        + A.format("Jane Doe")
        + "</p></div>",
        "Jane Doe",
    ),
    (
        "figure without caption",
        '<figure><img src="a.jpg"><span>by ' + A.format("Jane Doe") + "</span></figure>",
        "Jane Doe",
    ),
    # negatives: "by" that is no credit, or a link that is no name
    ("powered by", _fig('Powered by <a href="https://wordpress.org/">WordPress</a>'), None),
    ("hosted by", _fig('Hosted by <a href="https://host.test/">HostCo</a>'), None),
    ("by in a URL", _fig('See https://example.com/by/<a href="https://x.test/">Foo</a>'), None),
    ("standby", _fig('Standby <a href="https://x.test/">Mode</a>'), None),
    ("CC BY", _fig('Licensed CC BY <a href="https://x.test/">Four</a>'), None),
    (
        "CC BY licence link",
        _fig('Used by <a href="https://creativecommons.org/licenses/by/4.0/">permission</a>'),
        None,
    ),
    ("designed by", _fig("Eiffel Tower, designed by " + A.format("Gustave Eiffel")), None),
    ("surrounded by", _fig("A lake surrounded by " + A.format("Hills")), None),
    ("walking by", _fig("Walking by " + A.format("The River")), None),
    ("statue by", _fig("Statue by " + A.format("Rodin")), None),
    ("link is a URL", _fig("by " + A.format("https://people.test/jane")), None),
    ("link says here", _fig("Credits by " + A.format("here")), None),
    ("link is a licence", _fig("Photo by " + A.format("CC BY-SA 4.0")), None),
    ("link is digits", _fig("Updated by " + A.format("2024")), None),
    (
        "figure with two images",
        '<figure><img src="a.jpg"><img src="b.jpg"><span>by '
        + A.format("Jane")
        + "</span></figure>",
        None,
    ),
]


@pytest.mark.parametrize(("html", "author"), [c[1:] for c in CREDITS], ids=[c[0] for c in CREDITS])
def test_linked_by_credit_names_the_author(html: str, author: str | None) -> None:
    page = extract_images(f"<html><body>{html}</body></html>", "https://site.test/post")
    assert page.images[0].author == author


def test_marked_author_and_text_credit_still_rank_first() -> None:
    """rel=author / ccREL beat the linked form; the text pattern still reads unlinked names."""
    marked = _fig('by <a href="/u/b">Bo</a>, <span rel="author">Ann Author</span>')
    text = _fig("Photo by Jane Doe, via Flickr")
    got = [
        extract_images(f"<body>{h}</body>", "https://site.test/p").images[0].author
        for h in (marked, text)
    ]
    assert got == ["Ann Author", "Jane Doe"]


@pytest.mark.parametrize(
    ("html", "author"),
    [
        # the story's writer is not the photographer: the explicit credit wins
        ('<figcaption>Text by <a href="/u/a">Ann Writer</a>. Photo: Jo Bloggs</figcaption>',
         "Jo Bloggs"),
        ('<figcaption>Styling by <a href="/u/s">Sam Stylist</a></figcaption>', None),
        # outside a caption only a bare "by" or a photo's credit counts
        ('<p>Story by <a href="/u/r">Rita Reporter</a></p>', None),
        ('<p>Sunset by <a href="/u/j">Jane Doe</a></p>', None),
        ('<p>Photo by <a href="/u/j">Jane Doe</a></p>', "Jane Doe"),
    ],
)  # fmt: skip
def test_editorial_credits_do_not_name_the_photographer(html: str, author: str | None) -> None:
    page = extract_images(
        f'<body><figure><img src="a.jpg">{html}</figure></body>', "https://s.test/p"
    )
    assert page.images[0].author == author
