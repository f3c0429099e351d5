"""Licence families, licence names and links, and CC attribution lines.

CC BY terms (4.0 §3(a)) ask for the creator, a copyright/licence notice with a
link to the licence, the source, and an indication of modifications. Each
published sample gets one such line (TASL: title, author, source, licence, plus the
licensor's requested credit when the source gives one), in its json record, the manifest
and the release's ATTRIBUTION file.

The split of a licence into release families belongs to the licence filter
(`ccurate.filters.license_filter.release_split`), and so do short licence names and
deed URLs (`ccurate.filters.licenses.normalize`): one policy, never a local twin
that could drift into calling a licence commercial.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Any

from ccurate.filters.licenses import normalize


@lru_cache(maxsize=4096)
def _info(license_id: str) -> Any:
    """The licence filter's `LicenseInfo` (name, url) of an id, None when unknown."""
    try:
        return normalize(license_id)
    except Exception:  # a parser bug must not stop a release; we fall back to our names
        return None


SPLIT_SOURCE = "ccurate.filters.license_filter.release_split"  # named in the release stats

_VERSION_SUFFIX = {"1.0": "Generic", "2.0": "Generic", "2.5": "Generic", "3.0": "Unported"}
_ELEMENT_NAMES = {
    "BY": "Attribution",
    "NC": "NonCommercial",
    "SA": "ShareAlike",
    "ND": "NoDerivatives",
}


# a CC licence id: elements, version, port
_CC_ID = re.compile(r"CC-(BY(?:-NC)?(?:-SA|-ND)?)-(\d\.\d)(?:-([A-Z]+))?")
_PDM_IDS = frozenset({"PDM-1.0", "CC-PDM-1.0"})


def _bare(license_id: str) -> str:
    """The id upper-cased without a `LicenseRef-` prefix: what the CC patterns match."""
    return license_id.strip().upper().removeprefix("LICENSEREF-")


def license_name(license_id: str) -> str:
    """Readable licence name, e.g. `CC-BY-SA-4.0` -> "CC BY-SA 4.0 (Creative Commons ...)"."""
    lid = license_id.strip()
    up = _bare(lid)
    if up.startswith("CC0"):
        return "CC0 1.0 Universal (Public Domain Dedication)"
    if up in _PDM_IDS:
        return "Public Domain Mark 1.0"
    m = _CC_ID.fullmatch(up)
    if not m:
        info = _info(lid)
        return str(info.name) if info is not None and info.name else lid
    elements, version, port = m.group(1), m.group(2), m.group(3)
    long = "-".join(_ELEMENT_NAMES[e] for e in elements.split("-"))
    if elements.endswith("ND") and version != "4.0":
        long = long.replace("NoDerivatives", "NoDerivs")
    suffix = port or ("International" if version == "4.0" else _VERSION_SUFFIX.get(version, ""))
    short = f"CC {elements} {version}" + (f" {port}" if port else "")
    return f"{short} (Creative Commons {long} {version} {suffix})".replace(" )", ")")


def license_link(license_id: str, recorded_url: str | None = None) -> str | None:
    """Canonical deed URL for a licence id; the recorded URL when the id has no known deed."""
    info = _info(license_id)
    return str(info.url) if info is not None and info.url else recorded_url


def modifications(
    rec: dict[str, Any], reencoded_as: str | None, faces_blurred: float = 0.0
) -> list[str]:
    """What we changed relative to the source image (CC BY asks to indicate it); faces
    blurred by the safety filter (`safety.faces_blurred`) are a change of the work too."""
    mods: list[str] = []
    ow, oh = rec.get("original_width"), rec.get("original_height")
    w, h = rec.get("width"), rec.get("height")
    if ow and oh and w and h and (ow, oh) != (w, h):
        mods.append("resized")
    if faces_blurred > 0:
        mods.append("faces blurred")
    if reencoded_as:
        mods.append(f"converted to {reencoded_as.upper()}")
    return mods


# line breaks and other control characters (C0, DEL, C1, the Unicode line/paragraph separators)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# bidi embeddings, overrides and isolates: an unclosed one reorders the rest of the line
_BIDI_CONTROL = re.compile(r"[\u202a-\u202e\u2066-\u2069]")
_FSI, _PDI = "\u2068", "\u2069"


def one_line(value: Any) -> str:
    """Metadata as one line of plain text, safe inside a credit line.

    A newline in an author or title would split an ATTRIBUTION entry and could forge a
    licence heading or another entry; an unclosed bidi override (U+202E) would display the
    licence and its link reversed. Whitespace runs become one space, bidi controls are
    removed, and text with right-to-left letters is wrapped in a first-strong isolate
    (U+2068 .. U+2069) so it keeps its own direction without reordering the rest.
    """
    text = " ".join(_BIDI_CONTROL.sub("", _CONTROL.sub(" ", str(value or ""))).split())
    if any(unicodedata.bidirectional(ch) in ("R", "AL") for ch in text):
        return f"{_FSI}{text}{_PDI}"
    return text


def attribution_line(rec: dict[str, Any], mods: list[str]) -> str:
    """One TASL credit line: "Title" by Author, credit: ..., source URL, image URL (when the
    source is its page), licence name (link), modified: ...

    The image URL is the "URI or hyperlink to the Licensed Material" of CC BY 4.0
    §3(a)(1)(A)(v): without it, the images of one page shared one line and no entry told
    which image it credits.

    `credit` (when the record has one) is the attribution the licensor asked for, verbatim:
    CC BY 4.0 §3(a)(1)(A)(i) asks to credit the creator in any reasonable manner requested,
    so the line carries the request itself next to the author, never a paraphrase of it.
    """
    title = one_line(rec.get("title"))
    author = one_line(rec.get("author"))
    credit = one_line(rec.get("credit"))
    source = one_line(rec.get("source_url") or rec.get("page_url") or rec.get("url"))
    lid = rec.get("license") or "unknown licence"
    link = license_link(lid, rec.get("license_url"))
    parts = [f'"{title}"' if title else "Untitled"]
    parts.append(f"by {author}" if author else "by unknown author")
    if credit:
        parts.append(f"credit: {credit}")
    parts.append(f"source: {source}")
    image = one_line(rec.get("url"))
    if image and image != source:
        parts.append(f"image: {image}")
    lic = one_line(license_name(lid))
    parts.append(f"licence: {lic} <{link}>" if link else f"licence: {lic}")
    parts.append(f"modified: {', '.join(mods)}" if mods else "not modified")
    return " — ".join(parts)
