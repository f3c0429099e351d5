"""Licence evidence from structured metadata: Flickr licence ids, Wikimedia Commons extmetadata.

Structured metadata is the best evidence there is (the host states the file's
licence), so it is recorded with scope "metadata". As everywhere in ingest,
values are raw: `flickr:4`, `cc-by-sa-4.0`, the LicenseUrl as given. Mapping
them to licence ids is the licence filter's job.
"""

from __future__ import annotations

import re
from typing import Any

from selectolax.lexbor import LexborHTMLParser

from ccurate.ingest.html import clean_text
from ccurate.record import LicenseEvidence

# The Flickr API's `license` ids (flickr.photos.licenses.getInfo). For reading
# reports; the licence filter owns the mapping to normalised ids.
FLICKR_LICENSE_NAMES: dict[int, str] = {
    0: "All Rights Reserved",
    1: "CC BY-NC-SA 2.0",
    2: "CC BY-NC 2.0",
    3: "CC BY-NC-ND 2.0",
    4: "CC BY 2.0",
    5: "CC BY-SA 2.0",
    6: "CC BY-ND 2.0",
    7: "No known copyright restrictions (Flickr Commons)",
    8: "United States Government Work",
    9: "CC0 1.0",
    10: "Public Domain Mark 1.0",
}

# extmetadata fields that carry the licence, in the order they are recorded:
# the URL is the most precise, the template code next; the human-readable names
# are recorded only when neither of the first two is present.
_WIKI_PRIMARY = ("LicenseUrl", "License")
_WIKI_FALLBACK = ("LicenseShortName", "UsageTerms")


# "4.0" / "9.00": a whole number as a float column prints it; "4.5", "4.0e1" stay refused
_WHOLE_FLOAT = re.compile(r"([0-9]+)\.0+")


def flickr_evidence(license_id: int | float | str) -> LicenseEvidence:
    """`LicenseEvidence("metadata", "flickr", "flickr:N")` for a Flickr API licence id.

    Raises ValueError for anything that is not a non-negative integer id, so a
    wrong column (a licence *name*, a URL) is caught where it is read. A whole
    float (4.0: an integer column with gaps, as pandas stores it) is that integer, and
    so is its text "4.0" (what `to_csv` writes for that column, so every CSV cell of it);
    only ASCII digits count (`str.isdigit` also takes "٤" and superscripts). The range of
    ids is the licence filter's to judge (Flickr has added ids before).
    """
    if isinstance(license_id, bool):
        raise ValueError(f"Flickr licence id must be an integer, got {license_id!r}")
    if isinstance(license_id, float) and license_id.is_integer():
        license_id = int(license_id)
    raw = str(license_id).strip()
    whole = _WHOLE_FLOAT.fullmatch(raw)
    if whole:
        raw = whole.group(1)
    if not (raw.isascii() and raw.isdigit()):
        raise ValueError(
            f"Flickr licence id must be a non-negative integer (API field `license`), "
            f"got {license_id!r}"
        )
    return LicenseEvidence("metadata", "flickr", f"flickr:{int(raw)}")


# tags that break a line when rendered: a space goes before each, so "a<br>b" reads "a b";
# inline tags (<a>, <span>, <b>) join their text as a browser does ("Photo by <a>X</a>.")
_BREAK_TAG = re.compile(
    r"(<(?:br|hr|/?(?:p|div|li|ul|ol|dl|dt|dd|tr|td|th|table|h[1-6]|blockquote))\b)", re.I
)


def strip_html(value: str | None) -> str | None:
    """Text of an HTML fragment (Commons' Artist is a link), entities decoded, spaces collapsed."""
    if value is None:
        return None
    if "<" not in value and "&" not in value:
        return clean_text(value) or None
    tree = LexborHTMLParser(_BREAK_TAG.sub(r" \1", value))
    body = tree.body
    text = body.text(deep=True) if body is not None else value
    return clean_text(text) or None


def _field(ext: dict[str, Any], name: str) -> str | None:
    """An extmetadata value: `{"value": ...}` as the API sends it, or a bare string."""
    item = ext.get(name)
    if isinstance(item, dict):
        item = item.get("value")
    if isinstance(item, dict):
        # iiextmetadatamultilang: {"en": ..., "de": ..., "_type": "lang"}; English, else the first
        langs = {k: v for k, v in item.items() if not str(k).startswith("_")}
        item = langs.get("en", next(iter(langs.values()), None))
    if item is None:
        return None
    text = str(item).strip()
    return text or None


def wikimedia_evidence(extmetadata: dict[str, Any]) -> tuple[list[LicenseEvidence], dict[str, Any]]:
    """Evidence and attribution from a Commons `imageinfo[].extmetadata` dict.

    Evidence (scope "metadata", kind "wikimedia"): LicenseUrl, then License
    (the template code, e.g. `cc-by-sa-4.0`, `pd`, `cc0`); LicenseShortName or
    UsageTerms only when both are absent. A `NonFree` flag (fair-use files on
    local wikis) is recorded as the value `NonFree`, so the filter can refuse it.

    Attribution (HTML stripped): author (Artist), title (ObjectName, else
    ImageDescription), attribution (the credit line Commons asks for),
    attribution_required (bool or None), credit, license_name, usage_terms,
    restrictions, copyrighted.
    """
    if not isinstance(extmetadata, dict):
        raise ValueError(f"extmetadata must be a dict, got {type(extmetadata).__name__}")
    info = extmetadata.get("imageinfo")
    if isinstance(info, list) and info and isinstance(info[0], dict):
        extmetadata = info[0]  # the API's `{"imageinfo": [item]}` answer, kept whole in a column
    ext = extmetadata.get("extmetadata", extmetadata)  # tolerate the enclosing imageinfo item
    if not isinstance(ext, dict):
        ext = {}  # `"extmetadata": null` (a catalog row without it): no evidence, no crash
    evidence: list[LicenseEvidence] = []
    for name in _WIKI_PRIMARY:
        v = _field(ext, name)
        if v:
            evidence.append(LicenseEvidence("metadata", "wikimedia", v))
    if not evidence:
        for name in _WIKI_FALLBACK:
            v = strip_html(_field(ext, name))
            if v:
                evidence.append(LicenseEvidence("metadata", "wikimedia", v))
                break
    nonfree = (_field(ext, "NonFree") or "").lower()
    if nonfree in ("true", "1", "yes"):
        evidence.append(LicenseEvidence("metadata", "wikimedia", "NonFree"))

    def flag(name: str) -> bool | None:
        return {"true": True, "false": False}.get((_field(ext, name) or "").lower())

    attribution: dict[str, Any] = {
        "author": strip_html(_field(ext, "Artist")),
        "title": strip_html(_field(ext, "ObjectName"))
        or strip_html(_field(ext, "ImageDescription")),
        "attribution": strip_html(_field(ext, "Attribution")),
        "attribution_required": flag("AttributionRequired"),
        "credit": strip_html(_field(ext, "Credit")),
        "license_name": strip_html(_field(ext, "LicenseShortName")),
        "usage_terms": strip_html(_field(ext, "UsageTerms")),
        "restrictions": strip_html(_field(ext, "Restrictions")),
        "copyrighted": flag("Copyrighted"),
    }
    return evidence, attribution
