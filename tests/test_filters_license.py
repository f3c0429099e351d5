"""Licence normalisation: real-world strings -> one id, tricky non-matches, SPDX ids, explain."""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccurate.filters.licenses import (
    FLICKR,
    REASONS,
    LicenseInfo,
    all_licenses,
    analyse,
    explain,
    normalize,
    parse_url,
)

# The Creative Commons ids of the SPDX licence list (3.26), copied from the list itself.
SPDX_CC_IDS = set(
    [
        "CC-BY-1.0",
        "CC-BY-2.0",
        "CC-BY-2.5",
        "CC-BY-2.5-AU",
        "CC-BY-3.0",
        "CC-BY-3.0-AT",
        "CC-BY-3.0-AU",
        "CC-BY-3.0-DE",
        "CC-BY-3.0-IGO",
        "CC-BY-3.0-NL",
        "CC-BY-3.0-US",
        "CC-BY-4.0",
        "CC-BY-NC-1.0",
        "CC-BY-NC-2.0",
        "CC-BY-NC-2.5",
        "CC-BY-NC-3.0",
        "CC-BY-NC-3.0-DE",
        "CC-BY-NC-4.0",
        "CC-BY-NC-ND-1.0",
        "CC-BY-NC-ND-2.0",
        "CC-BY-NC-ND-2.5",
        "CC-BY-NC-ND-3.0",
        "CC-BY-NC-ND-3.0-DE",
        "CC-BY-NC-ND-3.0-IGO",
        "CC-BY-NC-ND-4.0",
        "CC-BY-NC-SA-1.0",
        "CC-BY-NC-SA-2.0",
        "CC-BY-NC-SA-2.0-DE",
        "CC-BY-NC-SA-2.0-FR",
        "CC-BY-NC-SA-2.0-UK",
        "CC-BY-NC-SA-2.5",
        "CC-BY-NC-SA-3.0",
        "CC-BY-NC-SA-3.0-DE",
        "CC-BY-NC-SA-3.0-IGO",
        "CC-BY-NC-SA-4.0",
        "CC-BY-ND-1.0",
        "CC-BY-ND-2.0",
        "CC-BY-ND-2.5",
        "CC-BY-ND-3.0",
        "CC-BY-ND-3.0-DE",
        "CC-BY-ND-4.0",
        "CC-BY-SA-1.0",
        "CC-BY-SA-2.0",
        "CC-BY-SA-2.0-UK",
        "CC-BY-SA-2.1-JP",
        "CC-BY-SA-2.5",
        "CC-BY-SA-3.0",
        "CC-BY-SA-3.0-AT",
        "CC-BY-SA-3.0-DE",
        "CC-BY-SA-3.0-IGO",
        "CC-BY-SA-4.0",
        "CC-PDDC",
        "CC-PDM-1.0",
        "CC-SA-1.0",
        "CC0-1.0",
    ]
)

ARR = "LicenseRef-All-Rights-Reserved"

URLS = [
    ("https://creativecommons.org/licenses/by/4.0/", "CC-BY-4.0"),
    ("http://creativecommons.org/licenses/by/4.0", "CC-BY-4.0"),
    ("https://www.creativecommons.org/licenses/by-sa/4.0/deed.en", "CC-BY-SA-4.0"),
    ("http://creativecommons.org/licenses/by-sa/2.5/deed.en_US", "CC-BY-SA-2.5"),
    ("https://creativecommons.org/licenses/by-sa/4.0/deed.zh-hans", "CC-BY-SA-4.0"),
    ("https://creativecommons.org/licenses/by-nc-sa/2.0/legalcode", "CC-BY-NC-SA-2.0"),
    ("https://creativecommons.org/licenses/by/4.0/legalcode.de", "CC-BY-4.0"),
    ("https://creativecommons.org/licenses/by-nd/4.0/legalcode.txt", "CC-BY-ND-4.0"),
    ("https://creativecommons.org/licenses/by/2.0/rdf", "CC-BY-2.0"),
    ("https://creativecommons.org/licenses/by-sa/3.0/de/", "CC-BY-SA-3.0-DE"),
    ("http://creativecommons.org/licenses/by-sa/3.0/de/deed.de", "CC-BY-SA-3.0-DE"),
    ("https://creativecommons.org/licenses/by/2.0/de/", "LicenseRef-CC-BY-2.0-DE"),
    ("https://creativecommons.org/licenses/by-sa/2.0/uk/", "CC-BY-SA-2.0-UK"),
    (
        "https://creativecommons.org/licenses/by-sa/2.5/scotland/",
        "LicenseRef-CC-BY-SA-2.5-SCOTLAND",
    ),
    ("https://creativecommons.org/licenses/by/2.5/au/", "CC-BY-2.5-AU"),
    ("https://creativecommons.org/licenses/by/3.0/us/", "CC-BY-3.0-US"),
    ("https://creativecommons.org/licenses/by/3.0/igo/", "CC-BY-3.0-IGO"),
    ("https://creativecommons.org/licenses/by-sa/2.1/jp/", "CC-BY-SA-2.1-JP"),
    ("https://creativecommons.org/licenses/by-sa/2.5/es/deed.es", "LicenseRef-CC-BY-SA-2.5-ES"),
    ("https://creativecommons.org/licenses/by-nc-nd/3.0/de/", "CC-BY-NC-ND-3.0-DE"),
    ("https://creativecommons.org/licenses/by-nd-nc/1.0/", "CC-BY-NC-ND-1.0"),
    ("https://creativecommons.org/licenses/sa/1.0/", "CC-SA-1.0"),
    ("https://creativecommons.org/licenses/nc/1.0/", "LicenseRef-CC-NC-1.0"),
    ("//creativecommons.org/licenses/by/3.0/", "CC-BY-3.0"),
    ("creativecommons.org/licenses/by-nc/3.0/", "CC-BY-NC-3.0"),
    ("www.creativecommons.org/licenses/by-nc/2.5", "CC-BY-NC-2.5"),
    ("HTTPS://CreativeCommons.org/licenses/by/4.0/", "CC-BY-4.0"),
    ("https://creativecommons.org/licenses/by/4.0/?ref=chooser-v1", "CC-BY-4.0"),
    ("https://creativecommons.org/licenses/by/4.0/#", "CC-BY-4.0"),
    ("  <https://creativecommons.org/licenses/by/4.0/>  ", "CC-BY-4.0"),
    ("https://creativecommons.org/publicdomain/zero/1.0/", "CC0-1.0"),
    ("http://creativecommons.org/publicdomain/zero/1.0/legalcode", "CC0-1.0"),
    ("https://creativecommons.org/publicdomain/mark/1.0/deed.de", "CC-PDM-1.0"),
    ("https://creativecommons.org/licenses/publicdomain/", "CC-PDDC"),
    ("https://i.creativecommons.org/l/by-sa/4.0/88x31.png", "CC-BY-SA-4.0"),
    ("https://licensebuttons.net/l/by-nc/3.0/de/80x15.png", "CC-BY-NC-3.0-DE"),
    ("https://licensebuttons.net/p/zero/1.0/88x31.png", "CC0-1.0"),
    # the Wikipedia fixture's page licence link
    ("https://creativecommons.org/licenses/by-sa/4.0/deed.an", "CC-BY-SA-4.0"),
]

URL_NON_MATCHES = [
    "https://example.com/by-sa/photo.jpg",
    "https://example.com/licenses/by/4.0/",
    "https://creativecommons.org/about/",
    "https://creativecommons.org/",
    "https://creativecommons.org/licenses/",
    "https://creativecommons.org/licenses/by/",
    "https://creativecommons.org/choose/",
    "https://creativecommons.org.evil.com/licenses/by/4.0/",
    "https://evilcreativecommons.org/licenses/by/4.0/",
    "https://evil.com/creativecommons.org/licenses/by/4.0/",
    "https://evil.com/?u=https://creativecommons.org/licenses/by/4.0/",
    "https://creativecommons.org@evil.com/licenses/by/4.0/",
    "ftp://creativecommons.org/licenses/by/4.0/",
    "creativecommons.org/licenses/by/9.9/",
    "https://creativecommons.org/licenses/by/4.0/de/",  # 4.0 has no ports
    "https://creativecommons.org/licenses/by/2.1/",  # 2.1 exists only as ports
    "https://creativecommons.org/licenses/by-sa/3.0/xx/",
    "https://creativecommons.org/licenses/sa/2.0/",  # no-BY licences are 1.0 only
    "https://creativecommons.org/licenses/by-nc-sa-nd/4.0/",
    "https://creativecommons.org/licenses/sampling+/1.0/",
    "https://creativecommons.org/licenses/by/4.0/evil.html",
    "https://creativecommons.org/publicdomain/zero/2.0/",
    "https://creativecommons.org/publicdomain/",
    "https://www.flickr.com/photos/someone/123456",
    "https://[creativecommons.org/licenses/by/4.0/",  # urlsplit raises: no URL at all
    "//[::1/licenses/by/4.0/",
    "https://creativecommons.org/licenses/by-nc/",  # a family without version
    "https://i.creativecommons.org/l/by-sa/9.9/88x31.png",
]

FLICKR_IDS = [
    ("flickr:0", ARR),
    ("flickr:1", "CC-BY-NC-SA-2.0"),
    ("flickr:2", "CC-BY-NC-2.0"),
    ("flickr:3", "CC-BY-NC-ND-2.0"),
    ("flickr:4", "CC-BY-2.0"),
    ("flickr:5", "CC-BY-SA-2.0"),
    ("flickr:6", "CC-BY-ND-2.0"),
    ("flickr:7", "LicenseRef-Flickr-No-Known-Copyright-Restrictions"),
    ("flickr:8", "LicenseRef-US-Government-Work"),
    ("flickr:9", "CC0-1.0"),
    ("flickr:10", "CC-PDM-1.0"),
    ("FLICKR: 5", "CC-BY-SA-2.0"),
    ("flickr:11", None),
    ("flickr:-1", None),
    ("flickr:four", None),
]

WIKIMEDIA = [
    ("cc-by-sa-4.0", "CC-BY-SA-4.0"),
    ("CC BY-SA 4.0", "CC-BY-SA-4.0"),
    ("cc-by-sa-3.0-de", "CC-BY-SA-3.0-DE"),
    ("CC BY-SA 3.0 de", "CC-BY-SA-3.0-DE"),
    ("cc-by-3.0-de", "CC-BY-3.0-DE"),
    ("cc-by-2.0", "CC-BY-2.0"),
    ("CC BY 2.5 dk", "LicenseRef-CC-BY-2.5-DK"),
    ("cc-by-sa-2.5-it", "LicenseRef-CC-BY-SA-2.5-IT"),
    ("CC BY-SA 3.0 igo", "CC-BY-SA-3.0-IGO"),
    ("cc-by-sa-3.0-migrated", "CC-BY-SA-3.0"),
    ("cc-by-sa-3.0,2.5,2.0,1.0", "CC-BY-SA-3.0"),
    ("cc-zero", "CC0-1.0"),
    ("cc0", "CC0-1.0"),
    ("CC0", "CC0-1.0"),
    ("pd", "LicenseRef-Public-Domain"),
    ("Public domain", "LicenseRef-Public-Domain"),
    ("PD-old-100", "LicenseRef-Public-Domain"),
    ("NonFree", ARR),
    ("Attribution", None),  # Commons' non-CC "Attribution" licence template
    ("GFDL", None),
    ("Copyrighted free use", None),
    ("cc-by-sa-all", None),
]

NAMES = [
    ("Attribution-NonCommercial-ShareAlike 2.0", "CC-BY-NC-SA-2.0"),
    ("Attribution-ShareAlike 4.0 International", "CC-BY-SA-4.0"),
    ("Attribution-NoDerivatives 4.0 International", "CC-BY-ND-4.0"),
    ("Attribution-NonCommercial-NoDerivs 3.0 Unported", "CC-BY-NC-ND-3.0"),
    ("Attribution-No Derivative Works 2.5 Generic", "CC-BY-ND-2.5"),
    ("Attribution 4.0 International", "CC-BY-4.0"),
    ("CC BY-NC 4.0", "CC-BY-NC-4.0"),
    ("CC-BY 4.0", "CC-BY-4.0"),
    ("cc by 4.0", "CC-BY-4.0"),
    ("CC BY 4", "CC-BY-4.0"),
    ("CC BY-NC-SA 4.0", "CC-BY-NC-SA-4.0"),
    ("Creative Commons Attribution 4.0 International", "CC-BY-4.0"),
    ("Creative Commons Attribution 4.0 International Public License", "CC-BY-4.0"),
    ("Creative Commons Attribution-ShareAlike 3.0 Unported License", "CC-BY-SA-3.0"),
    ("Creative Commons Attribution-Share Alike 4.0", "CC-BY-SA-4.0"),
    (
        "Creative Commons Attribution-Noncommercial-Share Alike 3.0 United States License",
        "LicenseRef-CC-BY-NC-SA-3.0-US",
    ),
    ("Creative Commons Attribution 3.0 United States", "CC-BY-3.0-US"),
    ("Creative Commons Attribution-ShareAlike 2.0 England & Wales", "CC-BY-SA-2.0-UK"),
    ("CC BY-SA 2.0 UK: England & Wales", "CC-BY-SA-2.0-UK"),
    ("Creative Commons Attribution 2.5 Australia", "CC-BY-2.5-AU"),
    ("Creative Commons Attribution 3.0 IGO", "CC-BY-3.0-IGO"),
    ("Creative Commons — Attribution-ShareAlike 4.0 International — CC BY-SA 4.0", "CC-BY-SA-4.0"),
    ("Namensnennung - Weitergabe unter gleichen Bedingungen 3.0 Deutschland", "CC-BY-SA-3.0-DE"),
    ("Reconocimiento-CompartirIgual 3.0 España", "LicenseRef-CC-BY-SA-3.0-ES"),
    (
        "Paternité - Pas d'Utilisation Commerciale - Partage des Conditions Initiales à "
        "l'Identique 2.0 France",
        "CC-BY-NC-SA-2.0-FR",
    ),
    ("Creative Commons Zero v1.0 Universal", "CC0-1.0"),
    ("CC0 1.0 Universal (CC0 1.0) Public Domain Dedication", "CC0-1.0"),
    ("Public Domain (CC0)", "CC0-1.0"),
    ("Public Domain Mark 1.0", "CC-PDM-1.0"),
    ("CC PDM 1.0", "CC-PDM-1.0"),
    ("Public Domain Dedication and Certification", "CC-PDDC"),
    ("No known copyright restrictions", "LicenseRef-Flickr-No-Known-Copyright-Restrictions"),
    ("United States Government Work", "LicenseRef-US-Government-Work"),
    ("U.S. Government Work", "LicenseRef-US-Government-Work"),
    # SPDX and LicenseRef ids read back
    ("CC-BY-SA-3.0-DE", "CC-BY-SA-3.0-DE"),
    ("CC0-1.0", "CC0-1.0"),
    ("CC-PDM-1.0", "CC-PDM-1.0"),
    ("LicenseRef-PDM-1.0", "CC-PDM-1.0"),
    ("LicenseRef-CC-BY-SA-2.0-FR", "LicenseRef-CC-BY-SA-2.0-FR"),
    ("CC-SA-1.0", "CC-SA-1.0"),
    ("CC-PDDC", "CC-PDDC"),
    ("LicenseRef-All-Rights-Reserved", ARR),
]

TEXTS = [
    (
        "This work is licensed under a Creative Commons Attribution 4.0 International License.",
        "CC-BY-4.0",
    ),
    (
        "This work is licensed under a Creative Commons Attribution-NonCommercial-NoDerivatives "
        "4.0 International License. To view a copy of this license, visit "
        "http://creativecommons.org/licenses/by-nc-nd/4.0/",
        "CC-BY-NC-ND-4.0",
    ),
    (  # a licence for the page's text (Wikipedia's footer) is none for its images
        "Text is available under the Creative Commons Attribution-ShareAlike License 4.0; "
        "additional terms may apply.",
        None,
    ),
    ("Photo by Jane Doe, licensed under CC BY-SA 2.0 via Flickr", "CC-BY-SA-2.0"),
    ("The Kaaba at al-Haram Mosque, 2008 (photo: Al Jazeera English, CC: BY 2.0)", "CC-BY-2.0"),
    ('licensed <a href="https://creativecommons.org/licenses/by/4.0/">here</a>', "CC-BY-4.0"),
    ("CC BY-SA 3.0 (https://creativecommons.org/licenses/by-sa/3.0/de/)", "CC-BY-SA-3.0-DE"),
    ("CC BY-SA 3.0 and CC BY-SA 4.0", "CC-BY-SA-4.0"),
    ("CC BY 4.0 in 2019", "CC-BY-4.0"),
    ("Creative Commons BY-SA: https://creativecommons.org/licenses/by-sa/4.0/", "CC-BY-SA-4.0"),
    ("© Jane Doe, CC BY-SA 4.0", "CC-BY-SA-4.0"),  # a CC work keeps its copyright notice
    ("Photo © Jane Doe / https://creativecommons.org/licenses/by/2.0/", "CC-BY-2.0"),
    # real page/alt texts (../shared/fixtures/real)
    (
        "O texto ye disponible baixo a Licencia Creative Commons Atribución/Compartir-Igual; "
        "podrían aplicar-se clausulas adicionals.",
        None,
    ),
    ("Copyright 2017-2023 http://www.041696.com  All Rights Reserved.", ARR),
    ("Copyright © 2012-2019 All Rights Reserved.", ARR),
    ("&copy; 2020 Hovenier nodig? 0900 Hovenier voor tuinontwerp", ARR),
    ("版权所有&copy;上海聚一行工艺礼品有限公司", ARR),
    ("Rooster Royalty Free Stock Photos", ARR),
    ("All rights reserved", ARR),
    ("Alle Rechte vorbehalten", ARR),
    ("Editorial use only", ARR),
    ("(c) 2019 Project Tomorrow", ARR),
    ("The Manhattan Transfer at Trondheim Jazz Festival 2010. © Per Ole Hagen", ARR),
    # a CC mention we cannot read never turns a notice into "all rights reserved"
    ("© Jane Doe, CC BY-NC", None),
    ("© Jane Doe. Some rights reserved.", None),
    ("Some rights reserved", None),
]

NON_MATCHES = [
    "",
    "   ",
    "by",
    "Photo by John",
    "by-sa",
    "BY-SA 4.0",
    "CC",
    "CC BY",
    "cc: editor@example.com",
    "Creative Commons",
    "Creative Commons License",
    "CC BY 9.9",
    "CC BY 4.0 DE",
    "CC BY-SA-ND 4.0",
    "CC BY BY 4.0",
    "MIT",
    "GPL-3.0",
    "CC0 2.0",
    "see evil.com/?x=cc-by-4.0 please",
    "Photo: https://example.com/by-sa/cc-by-4.0.jpg",
    "copyright-free images",
    "PDM",  # the Public Domain Mark needs a version, a CC prefix or its full name
    "pd mark",
]

CONFLICTS = [
    "CC BY-NC (https://creativecommons.org/licenses/by/4.0/)",  # a versionless name disagrees
    "CC BY 4.0 / CC BY-NC 4.0",
    "All rights reserved. Licensed under CC BY 4.0",
    "CC0 or CC BY 4.0",
    "Public domain; CC BY-SA 3.0",
    "https://creativecommons.org/licenses/by/4.0/ https://creativecommons.org/licenses/by-nc/4.0/",
    # a CC URL we cannot read still names its family, which must agree (like "CC BY-NC")
    "CC BY 4.0 https://creativecommons.org/licenses/by-nc/4.0/de/",  # 4.0 has no ports
    "CC BY 4.0 (https://creativecommons.org/licenses/by-nc/)",
    "Licensed CC BY 4.0; see creativecommons.org/licenses/by-nc-nd/2.1/",
    'CC BY-SA 4.0 <img src="https://i.creativecommons.org/l/by-nc-sa/9.9/88x31.png">',
    "CC0 1.0 https://creativecommons.org/licenses/by/",
    "CC BY 4.0 https://creativecommons.org/licenses/publicdomain/x/",  # PDDC, broken
]


def _id(evidence: str) -> str | None:
    info = normalize(evidence)
    return info.spdx if info else None


@pytest.mark.parametrize(("evidence", "expected"), URLS + FLICKR_IDS + WIKIMEDIA + NAMES + TEXTS)
def test_normalize_real_world_strings(evidence: str, expected: str | None) -> None:
    assert _id(evidence) == expected


@pytest.mark.parametrize("evidence", URL_NON_MATCHES + NON_MATCHES)
def test_non_matches_are_unknown(evidence: str) -> None:
    assert normalize(evidence) is None
    assert analyse(evidence) == (None, "license_unknown")


@pytest.mark.parametrize("evidence", CONFLICTS)
def test_contradictory_evidence_is_a_conflict(evidence: str) -> None:
    assert analyse(evidence) == (None, "license_conflict")


def test_licence_fields() -> None:
    de = normalize("cc-by-sa-3.0-de")
    assert de == LicenseInfo(
        spdx="CC-BY-SA-3.0-DE",
        family="CC-BY-SA",
        version="3.0",
        port="de",
        url="https://creativecommons.org/licenses/by-sa/3.0/de/",
        commercial=True,
        derivatives=True,
        attribution=True,
        share_alike=True,
        open=True,
        name="CC BY-SA 3.0 DE",
    )
    nc_nd = normalize("flickr:3")
    assert nc_nd is not None
    assert (nc_nd.commercial, nc_nd.derivatives, nc_nd.attribution, nc_nd.share_alike) == (
        False,
        False,
        True,
        False,
    )
    assert nc_nd.url == "https://creativecommons.org/licenses/by-nc-nd/2.0/"
    cc0 = normalize("https://creativecommons.org/publicdomain/zero/1.0/legalcode")
    assert cc0 is not None and cc0.family == "CC0" and not cc0.attribution and cc0.open
    arr = normalize("All rights reserved")
    assert arr is not None and arr.family == "ARR" and not arr.open and not arr.commercial
    assert not arr.notice_only
    notice = normalize("© 2020 Jane Doe")
    assert notice is not None and notice.spdx == arr.spdx and notice.notice_only
    # the old BY-NC-ND 1.0 deed lives at by-nd-nc
    assert parse_url("https://creativecommons.org/licenses/by-nc-nd/1.0/") == normalize(
        "CC-BY-NC-ND-1.0"
    )
    assert _id("CC-BY-NC-ND-1.0") and normalize("CC-BY-NC-ND-1.0").url.endswith("/by-nd-nc/1.0/")  # type: ignore[union-attr]


def test_every_emitted_id_is_spdx_or_licenseref_and_round_trips() -> None:
    infos = all_licenses()
    ids = [i.spdx for i in infos]
    assert len(ids) == len(set(ids)), "two licences share an id"
    for info in infos:
        assert info.spdx in SPDX_CC_IDS or info.spdx.startswith("LicenseRef-"), info.spdx
        # a LicenseRef- is used only where SPDX has no id
        if info.spdx.startswith("LicenseRef-"):
            assert info.spdx.removeprefix("LicenseRef-") not in SPDX_CC_IDS, info.spdx
        forms = [info.spdx, info.name] + ([info.url] if info.url else [])
        for form in forms:
            assert normalize(form) == info, form
        if info.url:
            assert info.url.startswith("https://creativecommons.org/") and info.url.endswith("/")
    # and every SPDX CC id is reachable
    assert set(ids) >= SPDX_CC_IDS


def test_flickr_table_matches_the_fixture_readme(real_fixtures) -> None:
    text = (real_fixtures / "README.md").read_text()
    table = text[text.index("Flickr licence ids") :]
    for n, info in FLICKR.items():
        m = re.search(rf"(?<!\d){n} ([^·\n]+?)\s*(?:·|\n|$)", table)
        assert m, n
        label = m.group(1).strip().rstrip(".")
        if info.family.startswith("CC-BY"):
            assert label == f"{info.family.removeprefix('CC-')} {info.version}", (n, label)
    assert FLICKR[9].spdx == "CC0-1.0" and FLICKR[10].spdx == "CC-PDM-1.0"


def test_wikimedia_fixture_fields_agree(real_fixtures) -> None:
    data = json.loads((real_fixtures / "wikimedia_commons_imageinfo.json").read_text())
    ext = data["imageinfo"][0]["extmetadata"]
    values = [ext[k]["value"] for k in ("License", "LicenseShortName", "LicenseUrl", "UsageTerms")]
    assert {_id(v) for v in values} == {"CC-BY-SA-4.0"}
    # the Artist field is HTML with a link to the user page: no licence in it
    assert normalize(ext["Artist"]["value"]) is None


def test_laion_alt_texts_and_urls_give_no_false_licence(real_fixtures) -> None:
    """10,000 real alt texts and URLs: an open licence only where the text names CC."""
    rows = pq.read_table(real_fixtures / "laion_sample_10000.parquet").to_pylist()
    opened = []
    for r in rows:
        assert normalize(r["URL"] or "") is None, r["URL"]
        info = normalize(r["TEXT"] or "")
        if info is not None and info.open:
            opened.append(r["TEXT"])
    assert opened, "the sample has one real CC credit line"
    for text in opened:
        assert re.search(r"\bcc\b|creative\s*commons", text, re.I), text


# -- property tests ------------------------------------------------------------
_SEGMENT = st.sampled_from(
    [
        "licenses",
        "publicdomain",
        "zero",
        "mark",
        "by",
        "by-sa",
        "by-nc",
        "by-nd-nc",
        "sa",
        "nc-sa",
        "1.0",
        "2.0",
        "2.1",
        "2.5",
        "3.0",
        "4.0",
        "9.9",
        "de",
        "uk",
        "igo",
        "xx",
        "deed.en",
        "legalcode",
        "about",
        "photo.jpg",
        "l",
        "p",
        "88x31.png",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    host=st.sampled_from(
        [
            "example.com",
            "creativecommons.org.evil.com",
            "evil.org",
            "creativecommons.net",
            "flickr.com",
            "commons.wikimedia.org",
        ]
    ),
    segs=st.lists(_SEGMENT, max_size=6),
)
def test_other_hosts_never_name_a_licence(host: str, segs: list[str]) -> None:
    assert normalize(f"https://{host}/" + "/".join(segs)) is None


@settings(max_examples=400, deadline=None)
@given(
    host=st.sampled_from(
        [
            "creativecommons.org",
            "www.creativecommons.org",
            "i.creativecommons.org",
            "licensebuttons.net",
        ]
    ),
    segs=st.lists(_SEGMENT, max_size=6),
)
def test_cc_urls_name_only_what_their_path_says(host: str, segs: list[str]) -> None:
    url = f"https://{host}/" + "/".join(segs)
    info = normalize(url)
    if info is None or info.url is None:
        return
    # the canonical path (code, version, port) is the start of the given path
    canon = [p for p in urlsplit(info.url).path.split("/") if p][1:]
    given_path = segs[1:]
    if info.family == "CC-BY-NC-ND":  # "by-nc-nd/1.0" is read as the 1.0 "by-nd-nc"
        given_path = ["by-nd-nc" if s == "by-nc-nd" else s for s in given_path]
    assert given_path[: len(canon)] == canon, (url, info.spdx)


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=st.sampled_from(list("abdefghijklmopqrsuvwxyz0123456789 .-/:©")), max_size=60)
)
def test_random_text_is_never_a_cc_licence(text: str) -> None:
    """No c/n/t: no "cc", "creative commons", "attribution", "namensnennung" - no CC licence
    (only the "pdm 1.0" / Commons "pd-..." forms can still be read)."""
    info = normalize(text)
    assert info is None or not info.open or info.family in ("PD", "PDM")


# -- explain ------------------------------------------------------------------
EXPLAIN = [
    ("cc-by-sa-3.0-de", "CC-BY-SA-3.0-DE", None, True, True, True),
    ("https://creativecommons.org/publicdomain/zero/1.0/", "CC0-1.0", None, True, True, False),
    ("CC BY 4.0", "CC-BY-4.0", None, True, True, True),
    (
        "Attribution-NonCommercial-ShareAlike 2.0",
        "CC-BY-NC-SA-2.0",
        "license_not_allowed",
        False,
        True,
        True,
    ),
    ("CC BY-ND 4.0", "CC-BY-ND-4.0", "license_not_allowed", True, False, True),
    ("flickr:10", "CC-PDM-1.0", None, True, True, False),
    (
        "flickr:7",
        "LicenseRef-Flickr-No-Known-Copyright-Restrictions",
        "license_not_allowed",
        False,
        False,
        True,
    ),
    ("flickr:8", "LicenseRef-US-Government-Work", "license_not_allowed", True, True, False),
    ("Public domain", "LicenseRef-Public-Domain", "license_not_allowed", True, True, False),
    ("All rights reserved", ARR, "license_not_allowed", False, False, False),
    ("https://creativecommons.org/about/", None, "license_unknown", None, None, None),
    ("CC BY 4.0 / CC BY-NC 4.0", None, "license_conflict", None, None, None),
]


@pytest.mark.parametrize(("evidence", "lic", "reason", "com", "der", "att"), EXPLAIN)
def test_explain(evidence: str, lic, reason, com, der, att) -> None:
    out = explain(evidence)
    assert list(out) == [
        "evidence",
        "license",
        "reason",
        "commercial",
        "derivatives",
        "attribution",
    ]
    assert out == {
        "evidence": evidence,
        "license": lic,
        "reason": reason,
        "commercial": com,
        "derivatives": der,
        "attribution": att,
    }
    assert reason is None or reason in REASONS
