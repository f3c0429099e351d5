"""The licence filter: evidence levels, conflicts, policy, attribution, release split."""

from __future__ import annotations

import json
import re

import pytest
from fastwarc.warc import ArchiveIterator, WarcRecordType
from pydantic import ValidationError

from ccurate.filters.license_filter import LicenseConfig, LicenseFilter, release_split
from ccurate.record import LicenseEvidence, Sample, make_key, samples_to_table, table_to_samples
from ccurate.stage import FilterStage

BY_SA = "https://creativecommons.org/licenses/by-sa/4.0/"
BY = "https://creativecommons.org/licenses/by/4.0/"
BY_NC = "https://creativecommons.org/licenses/by-nc/4.0/"
BY_ND = "https://creativecommons.org/licenses/by-nd/4.0/"
CC0 = "https://creativecommons.org/publicdomain/zero/1.0/"


def ev(scope: str, value: str, kind: str = "rel_license") -> LicenseEvidence:
    return LicenseEvidence(scope, kind, value)


def make(
    *evidence: LicenseEvidence,
    page: str | None = "https://blog.example.com/post/1",
    author: str | None = "Jane Doe",
    source: str | None = None,
) -> Sample:
    url = "https://img.example.com/a.jpg"
    return Sample(
        key=make_key(url, page),
        url=url,
        page_url=page,
        author=author,
        source_url=source,
        license_evidence=list(evidence),
    )


def run(sample: Sample, **cfg) -> Sample:
    sample.record(LicenseFilter(LicenseConfig(**cfg)).decide(sample))
    return sample


# (evidence, config, expected drop reason or None, expected license, expected rule)
CASES = [
    # image-level evidence, every image scope
    ([ev("image", BY_SA)], {}, None, "CC-BY-SA-4.0", "commercial:CC-BY-SA-4.0@image"),
    ([ev("container", BY, "cc_link")], {}, None, "CC-BY-4.0", "commercial:CC-BY-4.0@container"),
    (
        [ev("metadata", "flickr:5", "flickr")],
        {},
        None,
        "CC-BY-SA-2.0",
        "commercial:CC-BY-SA-2.0@metadata",
    ),
    ([ev("metadata", "4", "flickr")], {}, None, "CC-BY-2.0", "commercial:CC-BY-2.0@metadata"),
    (
        [ev("input", "cc-by-sa-3.0-de", "column")],
        {},
        None,
        "CC-BY-SA-3.0-DE",
        "commercial:CC-BY-SA-3.0-DE@input",
    ),
    ([ev("image", CC0)], {}, None, "CC0-1.0", "commercial:CC0-1.0@image"),
    # page level: counted by default and recorded, or refused
    (
        [ev("page", BY_SA, "link_rel_license")],
        {},
        None,
        "CC-BY-SA-4.0",
        "commercial:CC-BY-SA-4.0@page",
    ),
    (
        [ev("page", BY_SA, "link_rel_license")],
        {"evidence_levels": ["image"]},
        "license_unknown",
        None,
        None,
    ),
    ([ev("footer", BY_SA, "text")], {"evidence_levels": ["image"]}, "license_unknown", None, None),
    # the most specific level with evidence decides
    ([ev("page", BY_NC), ev("image", BY)], {}, None, "CC-BY-4.0", "commercial:CC-BY-4.0@image"),
    ([ev("page", BY), ev("image", "https://example.com/terms")], {}, "license_unknown", None, None),
    (
        [ev("page", BY), ev("image", "© Jane Doe 2020", "text")],
        {},
        "license_not_allowed",
        "LicenseRef-All-Rights-Reserved",
        None,
    ),
    # a notice yields to a licence at the same level; unreadable items are ignored
    (
        [ev("image", "© Jane Doe 2020", "text"), ev("container", BY, "cc_link")],
        {},
        None,
        "CC-BY-4.0",
        "commercial:CC-BY-4.0@container",
    ),
    (
        [ev("image", BY), ev("container", "Photo: Jane", "text")],
        {},
        None,
        "CC-BY-4.0",
        "commercial:CC-BY-4.0@image",
    ),
    (
        [ev("image", BY), ev("image", "CC BY 4.0", "text"), ev("metadata", "cc-by-4.0", "x")],
        {},
        None,
        "CC-BY-4.0",
        "commercial:CC-BY-4.0@image",
    ),
    # a CC name without version must agree with the licence it comes with
    (
        [
            ev("page", "Licencia Creative Commons Atribución/Compartir-Igual", "text"),
            ev("page", BY_SA, "cc_link"),
        ],
        {},
        None,
        "CC-BY-SA-4.0",
        "commercial:CC-BY-SA-4.0@page",
    ),
    (
        [ev("image", "© Jane Doe, CC BY-NC", "text"), ev("container", BY, "cc_link")],
        {},
        "license_conflict",
        None,
        None,
    ),
    # conflicts
    ([ev("image", BY), ev("container", BY_NC, "cc_link")], {}, "license_conflict", None, None),
    (
        [ev("image", BY), ev("container", "All rights reserved", "text")],
        {},
        "license_conflict",
        None,
        None,
    ),
    ([ev("image", "CC BY 4.0 / CC BY-NC 4.0", "text")], {}, "license_conflict", None, None),
    (
        [ev("image", CC0), ev("image", "https://creativecommons.org/publicdomain/mark/1.0/")],
        {},
        "license_conflict",
        None,
        None,
    ),
    # policy
    ([ev("image", BY_NC)], {}, "license_not_allowed", "CC-BY-NC-4.0", None),
    (
        [ev("image", BY_NC)],
        {"policy": "noncommercial"},
        None,
        "CC-BY-NC-4.0",
        "noncommercial:CC-BY-NC-4.0@image",
    ),
    ([ev("image", BY_ND)], {}, "license_not_allowed", "CC-BY-ND-4.0", None),
    (
        [ev("image", BY_ND)],
        {"allow_nd": True},
        None,
        "CC-BY-ND-4.0",
        "commercial:CC-BY-ND-4.0@image",
    ),
    (
        [ev("image", "flickr:3")],
        {"policy": "noncommercial"},
        "license_not_allowed",
        "CC-BY-NC-ND-2.0",
        None,
    ),
    (
        [ev("image", "flickr:3")],
        {"policy": "noncommercial", "allow_nd": True},
        None,
        "CC-BY-NC-ND-2.0",
        "noncommercial:CC-BY-NC-ND-2.0@image",
    ),
    (
        [ev("image", "All rights reserved", "text")],
        {"policy": "noncommercial", "allow_nd": True},
        "license_not_allowed",
        "LicenseRef-All-Rights-Reserved",
        None,
    ),
    (
        [ev("metadata", "pd", "wikimedia")],
        {},
        "license_not_allowed",
        "LicenseRef-Public-Domain",
        None,
    ),
    (
        [ev("metadata", "pd", "wikimedia")],
        {"allow_families": ["PD"]},
        None,
        "LicenseRef-Public-Domain",
        "commercial:LicenseRef-Public-Domain@metadata",
    ),
    (
        [ev("metadata", "NonFree", "wikimedia")],
        {"policy": "noncommercial"},
        "license_not_allowed",
        "LicenseRef-All-Rights-Reserved",
        None,
    ),
    # a broken BY-NC link beside "CC BY 4.0" at one level: a conflict, never BY
    (
        [
            ev("page", "https://creativecommons.org/licenses/by-nc/"),
            ev("page", "CC BY 4.0", "text"),
        ],
        {},
        "license_conflict",
        None,
        None,
    ),
    # an image-level link that is no URL at all decides (unknown), not the page's BY
    (
        [ev("image", "http://[creativecommons.org/licenses/by/4.0/"), ev("page", BY)],
        {},
        "license_unknown",
        None,
        None,
    ),
    ([], {}, "license_unknown", None, None),
]


@pytest.mark.parametrize(("evidence", "cfg", "reason", "license", "rule"), CASES)
def test_decide(evidence, cfg, reason, license, rule) -> None:
    s = run(make(*evidence), **cfg)
    assert s.drop_reason == reason
    assert s.kept == (reason is None)
    assert s.license == license
    assert s.license_rule == rule
    assert s.scores["license.n_evidence"] == len(evidence)
    if license and license.startswith("CC-BY"):
        assert s.license_url and s.license_url.startswith("https://creativecommons.org/licenses/")


# Flickr ids under both policies (ND excluded): what a release may contain.
FLICKR = {
    0: (False, False),
    1: (False, True),
    2: (False, True),
    3: (False, False),
    4: (True, True),
    5: (True, True),
    6: (False, False),
    7: (False, False),
    8: (False, False),
    9: (True, True),
    10: (True, True),
}


@pytest.mark.parametrize(("n", "kept"), FLICKR.items())
def test_flickr_ids_under_each_policy(n: int, kept: tuple[bool, bool]) -> None:
    for policy, expected in zip(("commercial", "noncommercial"), kept, strict=True):
        s = run(make(ev("metadata", f"flickr:{n}", "flickr")), policy=policy)
        assert s.kept == expected, (n, policy, s.drop_reason)
        if not expected:
            assert s.drop_reason == "license_not_allowed"


def test_unknown_scope_counts_as_page_level() -> None:
    s = run(make(ev("sidebar", BY)))
    # recorded as @page, as the docs say: the release's image-only count looks for it
    assert s.license_rule == "commercial:CC-BY-4.0@page" and s.scores["license.page_level"] == 1
    s = run(make(ev("sidebar", BY)), evidence_levels=["image"])
    assert s.drop_reason == "license_unknown"


# -- the Wikipedia case: the page licence is not the images' licence ---------------
def test_wikipedia_page_licence_does_not_cover_its_images(real_fixtures) -> None:
    path = real_fixtures / "cc-main-2024-22-wikipedia-escopete.warc.gz"
    with path.open("rb") as f:
        rec = next(iter(ArchiveIterator(f, record_types=WarcRecordType.response)))
        page = rec.headers.get("WARC-Target-URI")
        html = rec.reader.read().decode("utf-8", "replace")
    (href,) = re.findall(r'<link rel="license" href="([^"]+)"', html)
    img = re.search(r'<img[^>]+src="([^"]+)"', html)
    assert img
    s = Sample(
        key="k",
        url="https:" + img.group(1) if img.group(1).startswith("//") else img.group(1),
        page_url=page,
        license_evidence=[ev("page", href, "link_rel_license")],
    )
    assert run(s).drop_reason == "license_unknown"
    # the same page licence on an ordinary blog counts, recorded as page-level
    s2 = run(make(ev("page", href, "link_rel_license")))
    assert s2.kept and s2.license_rule == "commercial:CC-BY-SA-4.0@page"
    # and the image's own (Commons) evidence on Wikipedia does count
    s3 = Sample(
        key="k3",
        url="https://upload.wikimedia.org/x.jpg",
        page_url=page,
        author="PtrQs",
        license_evidence=[ev("page", href), ev("metadata", "cc-by-sa-4.0", "wikimedia")],
    )
    assert run(s3).license_rule == "commercial:CC-BY-SA-4.0@metadata"


def test_wikimedia_fixture_sample(real_fixtures) -> None:
    data = json.loads((real_fixtures / "wikimedia_commons_imageinfo.json").read_text())
    info = data["imageinfo"][0]
    ext = info["extmetadata"]
    s = Sample(
        key="w",
        url=info["url"],
        source_url=info["descriptionurl"],
        author=re.sub(r"<[^>]+>", "", ext["Artist"]["value"]),
        license_evidence=[
            ev("metadata", ext[k]["value"], "wikimedia")
            for k in ("LicenseUrl", "License", "LicenseShortName", "UsageTerms")
        ],
    )
    run(s)
    assert s.kept and s.license == "CC-BY-SA-4.0" and s.author == "PtrQs"
    assert s.license_url == "https://creativecommons.org/licenses/by-sa/4.0/"
    assert s.license_rule == "commercial:CC-BY-SA-4.0@metadata"
    assert s.scores["license.n_read"] == 4 and s.scores["license.author_fallback"] == 0


# -- attribution --------------------------------------------------------------
def test_author_fallback_names_the_site() -> None:
    s = run(make(ev("image", BY), author=None, page="https://www.example.org/gallery/7"))
    assert s.kept and s.author == "Unknown author via example.org"
    assert s.scores["license.author_fallback"] == 1
    assert s.scores["license.attribution_complete"] == 1
    # the source page, when ingest has one, is the site credited
    s = run(make(ev("image", BY), author="  ", source="https://commons.wikimedia.org/wiki/File:x"))
    assert s.author == "Unknown author via commons.wikimedia.org"


@pytest.mark.parametrize(
    ("author", "page", "source", "cfg", "reason", "complete"),
    [
        (
            None,
            "https://example.org/p",
            None,
            {"author_fallback": "none"},
            "attribution_incomplete",
            0,
        ),
        ("Jane", None, None, {}, "attribution_incomplete", 0),  # no source page
        (None, None, None, {}, "attribution_incomplete", 0),  # no page: no site to fall back on
        ("Jane", None, "https://example.org/p", {}, None, 1),
        (
            None,
            "https://example.org/p",
            None,
            {"author_fallback": "none", "strict_attribution": False},
            None,
            0,
        ),
        ("Jane", None, None, {"strict_attribution": False}, None, 0),
    ],
)
def test_attribution_requirements(author, page, source, cfg, reason, complete) -> None:
    s = run(make(ev("image", BY_SA), author=author, page=page, source=source), **cfg)
    assert s.drop_reason == reason
    assert s.scores["license.attribution_complete"] == complete


def test_licences_without_attribution_need_none() -> None:
    s = run(make(ev("image", CC0), author=None, page=None))
    assert s.kept and s.author is None  # no fallback author invented for CC0
    assert s.scores["license.attribution_complete"] == 1  # nothing to credit: complete
    assert s.scores["license.author_fallback"] == 0


# -- wiring ---------------------------------------------------------------------
def test_filter_stage_keeps_every_sample_and_counts_reasons() -> None:
    batch = [
        make(ev("image", BY)),
        make(ev("image", BY_NC)),
        make(ev("image", BY), ev("container", BY_NC)),
        make(),
    ]
    for i, s in enumerate(batch):
        s.key = f"k{i}"
    stage = FilterStage([LicenseFilter(LicenseConfig())])
    out = stage.process(batch)
    assert [s.drop_reason for s in out] == [
        None,
        "license_not_allowed",
        "license_conflict",
        "license_unknown",
    ]
    assert all(s.dropped_by in (None, "license") for s in out)
    back = table_to_samples(samples_to_table(out))
    assert back[0].license_rule == "commercial:CC-BY-4.0@image"
    assert back[0].license_url == BY and back[1].license == "CC-BY-NC-4.0"
    assert stage.describe()["license"]["policy"] == "commercial"


@pytest.mark.parametrize("author", ["Jane Doe", None])
def test_rerun_is_idempotent(author: str | None) -> None:
    s = make(ev("image", BY), author=author)
    f = LicenseFilter(LicenseConfig())
    d1 = f.decide(s)
    first = (s.license, s.license_url, s.license_rule, s.author)
    d2 = f.decide(s)
    assert d1 == d2 and (s.license, s.license_url, s.license_rule, s.author) == first


@pytest.mark.parametrize(
    "bad",
    [
        {"evidence_levels": ["page"]},  # the image's own licence always counts
        {"allow_families": ["ARR"]},  # never admitted
        {"allow_families": ["NKCR"]},
        {"policy": "anything"},
        {"alow_nd": True},  # typo: unknown keys are errors
    ],
)
def test_config_is_validated(bad: dict) -> None:
    with pytest.raises(ValidationError):
        LicenseConfig.model_validate(bad)


def test_config_defaults_are_the_safe_documented_ones() -> None:
    cfg = LicenseConfig()
    assert (cfg.policy, cfg.allow_nd, cfg.allow_families) == ("commercial", False, [])
    assert cfg.evidence_levels == ["image", "page"] and "wikipedia.org" in cfg.page_text_only_hosts
    assert (cfg.strict_attribution, cfg.author_fallback) == (True, "site")
    levels = LicenseConfig(evidence_levels=["image", "page", "image"]).evidence_levels
    assert levels == ["image", "page"]


def test_text_only_hosts_are_compared_in_canonical_form() -> None:
    """A configured 'Wikipedia.org.' matched no page host (page hosts are lower-cased, their
    trailing dot dropped): the site's text licence became its images'."""
    cfg = LicenseConfig(page_text_only_hosts=["Wikipedia.org.", "wiki.example"])
    assert cfg.page_text_only_hosts == ["wikipedia.org", "wiki.example"]
    again = LicenseConfig(
        page_text_only_hosts=["WIKIPEDIA.org", "wikipedia.org.", "www.wikipedia.org"]
    )
    assert again.page_text_only_hosts == ["wikipedia.org"]
    ev = [
        LicenseEvidence("page", "link_rel_license", "https://creativecommons.org/licenses/by/4.0/")
    ]
    page = "https://en.wikipedia.org/wiki/X"
    s = Sample(key="k", url="https://u.test/a.jpg", page_url=page, source_url=page, author="A")
    s.license_evidence = ev
    assert LicenseFilter(cfg).decide(s).reason == "license_unknown"
    # 'www.' too: the page's host is compared without it, so a listed www. host matched nothing
    www = LicenseConfig(page_text_only_hosts=["www.example.org"])
    page = "https://www.example.org/wiki/X"
    s = Sample(key="k", url="https://www.example.org/a.jpg", page_url=page, source_url=page)
    s.author, s.license_evidence = "A", list(ev)
    assert LicenseFilter(www).decide(s).reason == "license_unknown"
    for bad in ("wiki%2Eexample", "not a host", ""):
        with pytest.raises(ValidationError, match="not a host name"):
            LicenseConfig(page_text_only_hosts=[bad])


@pytest.mark.parametrize(
    ("license_id", "split"),
    [
        ("CC0-1.0", "commercial"),
        ("CC-PDM-1.0", "commercial"),
        ("CC-BY-4.0", "commercial"),
        ("CC-BY-SA-3.0-DE", "commercial"),
        ("LicenseRef-CC-BY-SA-2.5-ES", "commercial"),
        ("CC-BY-ND-4.0", "commercial"),
        ("CC-BY-NC-4.0", "noncommercial"),
        ("CC-BY-NC-SA-2.0", "noncommercial"),
        ("CC-BY-NC-ND-4.0", "noncommercial"),
        ("LicenseRef-All-Rights-Reserved", None),
        ("LicenseRef-Flickr-No-Known-Copyright-Restrictions", None),
        ("nonsense", None),
        ("", None),
    ],
)
def test_release_split(license_id: str, split: str | None) -> None:
    assert release_split(license_id) == split


@pytest.mark.parametrize(
    "page", ["https://[en.wikipedia.org/wiki/Escopete", "file:///crawl.warc.gz#offset=0"]
)
def test_page_licence_needs_a_page_with_a_host(page: str) -> None:
    """An unparsable page URL may be a Wikimedia page: its page licence must not count."""
    s = run(make(ev("page", BY), page=page))
    assert s.drop_reason == "license_unknown" and s.license is None
    assert run(make(ev("image", BY), page=page)).license == "CC-BY-4.0"  # image-level: fine
    assert run(make(ev("page", BY), page=None)).license == "CC-BY-4.0"  # no page URL at all


@pytest.mark.parametrize(
    "page",
    [
        "https://en.wikipedia.org./wiki/Escopete",  # a trailing dot: the same host to DNS
        "https://EN.Wikipedia.ORG../wiki/Escopete",
        "https://en.wikipedia.org%2E/wiki/X",  # an escape: not a host we can check, fail closed
        "https://en%2Ewikipedia.org/wiki/X",
        "https://en．wikipedia．org/wiki/X",  # full-width dots: IDNA maps them to `.`
        "https://user@en.wikipedia.org.:443/wiki/X",
    ],
)
def test_text_only_hosts_hold_however_the_host_is_spelled(page: str) -> None:
    s = run(make(ev("page", BY_SA, "link_rel_license"), page=page))
    assert s.drop_reason == "license_unknown" and s.license_rule is None


def test_a_trailing_dot_host_is_credited_without_it() -> None:
    s = run(make(ev("page", BY), author=None, page="https://www.Blog.example.org./p/1"))
    assert s.kept and s.license_rule == "commercial:CC-BY-4.0@page"
    assert s.author == "Unknown author via blog.example.org"
