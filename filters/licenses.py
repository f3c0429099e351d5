"""Licence evidence -> one normalised licence: SPDX id, family, version, port, permissions.

The worst bug this project can have is a wrong "commercial OK", so a string
becomes a licence only when it *is* one of the forms below; everything else is
unknown (None), and a string naming two different licences is a conflict.

Recognised forms (all table-driven, see the tables below):

- creativecommons.org URLs: http/https, with or without `www`, scheme-less or
  protocol-relative, trailing slash or not, `deed`, `deed.xx`, `legalcode`,
  `legalcode.xx`, `legalcode.txt`, `rdf`, a query or fragment; ports such as
  `/licenses/by-sa/3.0/de/`; CC0 (`/publicdomain/zero/1.0/`), the Public Domain
  Mark (`/publicdomain/mark/1.0/`), the retired PDDC (`/licenses/publicdomain/`);
  the licence buttons on i.creativecommons.org / licensebuttons.net. The host
  must be exactly creativecommons.org (or www.), and the version/port/file part
  must be a real one: `creativecommons.org.evil.com`, `/about/`, `/by/9.9/`,
  `/by/4.0/de/` (4.0 has no ports) are unknown. The path is percent-decoded
  (`/licenses/by%2Dnc/4.0/` is BY-NC). An unknown URL on a CC host still
  names its family (`/licenses/by-nc/...` -> BY-NC), which, like a name without
  version, must agree with any licence found beside it; an unknown licence code
  (`sampling+`, `devnations`, a typo) agrees with none.
- Flickr API licence ids as `flickr:N` (0-10).
- Wikimedia Commons `License` / `LicenseShortName` / `UsageTerms` values
  (`cc-by-sa-3.0-de`, `CC BY-SA 4.0`, `cc-zero`, `pd`, `Public domain`,
  `cc-by-sa-3.0,2.5,2.0,1.0` -> the highest version, `NonFree` -> ARR).
- Names, in free text too: "Attribution-NonCommercial-ShareAlike 2.0",
  "CC BY-NC 4.0", "Creative Commons Attribution 4.0 International", German,
  Spanish and French element names, SPDX ids (`CC-BY-SA-3.0-DE`, `CC0-1.0`,
  `LicenseRef-...`). A name needs a version (attribution must link the exact
  licence); only CC0 and the Public Domain Mark, which have one version, may
  omit it. Abbreviated names ("BY-SA 4.0") need a "CC"/"Creative Commons"
  prefix; the long form may start with "Attribution". Elements after the version
  ("CC BY 4.0 NC", "cc-by-4.0-nc") make the name unreadable, never plain BY, and a
  name within five words after a negation ("not", "isn't") is no evidence for it.
  A CC URL inside text reads as its licence's name for the words after it
  ("…/by/4.0/ NC" is "CC BY 4.0 NC"), and "by" before more elements continues a name
  ("CC BY 4.0 by-nc" is unreadable).
  Words withholding a use the licence grants ("CC BY-SA 4.0 but not for commercial
  use", "personal use only", "may not be modified", "derivative works prohibited",
  "reproduction prohibited", "redistribution prohibited", "do not repost", "no adaptations",
  "not for profit", "for editorial use", "not without permission", "used with permission",
  "not for AI training", and their German, French, Spanish, Italian, Portuguese and Dutch
  forms) make a conflict with every licence granting that use at the same evidence level,
  whichever item names it. Unicode format characters (zero-width space, soft hyphen, word
  joiner) are dropped before reading, and a word mixing Latin with Cyrillic or Greek letters
  ("cоmmercial") makes the evidence unreadable.
  Commercial use fails closed: a commerce word (commercial, kommerziell, gewerblich,
  comercial, коммерческий, 商用, 商业, ...) followed by a use word ("use", "rights",
  "purposes", "Nutzung", "uso", ...), a colon or a "no" ("Commercial: no", "Commercial -
  No"), or after a use word ("uso comercial no permitido", "toute utilisation commerciale")
  or a negation or exclusion ("except", "keine", "sans"), or glued to other letters
  ("NotForCommercialUse"), or any CJK one or one of a language whose wording is not read
  here (kommerciel, kommersiell, komercyjny, komerční, ticari, εμπορικ, 상업, 영리, מסחרי,
  تجاري, व्यावसायिक, ...), withholds it, unless it is part of a phrase granting it ("free for
  commercial use", "commercial and non-commercial use", "even commercially", "sogar
  kommerziell", "y compris commerciale", "可商用", ...: `_GRANTS_COMMERCIAL`; overlapping ones
  read as one) that is not negated and whose own clause (to . ; !) holds no word taking it
  back or making it conditional ("Personal and commercial use is prohibited", "Commercial
  use allowed? No", "... only for members", "... after purchasing a license", "... if you
  pay": `_GRANT_UNDONE`), in which case the grant itself withholds; a commerce word
  describing a thing ("Commercial Street") withholds nothing. A licence
  stated for a page's text ("Text is available under ...", "All text CC BY 4.0")
  is none for its images: unknown, and a conflict with any other item beside it; so is a
  rights notice for the pictures ("Story CC BY 4.0. Photo © Reuters", "CC BY 4.0. Images
  © their respective owners", "© Getty Images") unless its own clause (up to . ; ! ? |)
  goes on to name the licence and no other subject: "Photo © Jane Doe, CC BY 4.0" is the
  licensor's notice, "Photo © Jane Doe. CC BY 4.0" fails closed (`_MEDIA_NOTICE`).
  `MIXED_RIGHTS` (ingest's mark for a container of several images whose text has a
  licence and a notice apart from it, see `notice_apart`) is unreadable.
  Evidence longer than `MAX_EVIDENCE` characters (a page dump, not a licence) is unknown.
- Rights reserved: "All rights reserved" and its translations, "royalty
  free", "rights managed", "editorial use only" are explicit ARR. A bare
  copyright notice ("©", "(c)", "Copyright 2020 X") is ARR with
  `notice_only=True`: a CC licence in the same evidence wins over it (a CC
  work still carries its author's copyright notice; not a notice for the pictures
  apart from the licence, above), and a CC mention we
  cannot read (e.g. a name without version) turns it into unknown, not ARR.

Ids: the SPDX id where the SPDX licence list has one (checked against the list:
all generic CC BY* versions, CC-SA-1.0, CC0-1.0, CC-PDM-1.0, CC-PDDC and the few
ports SPDX lists, e.g. CC-BY-3.0-DE, CC-BY-SA-2.0-UK, CC-BY-2.5-AU, CC-BY-3.0-US,
CC-BY-SA-3.0-IGO). Rule for the rest: `LicenseRef-` + the id SPDX would use,
e.g. `LicenseRef-CC-BY-SA-2.5-ES`, `LicenseRef-CC-NC-1.0`. Non-CC statements:
`LicenseRef-All-Rights-Reserved`, `LicenseRef-Public-Domain`,
`LicenseRef-US-Government-Work`, `LicenseRef-Flickr-No-Known-Copyright-Restrictions`.
Note: recent SPDX lists have `CC-PDM-1.0`; `LicenseRef-PDM-1.0` is read as an alias.
Every id we emit normalises back to the same `LicenseInfo`.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote, urlsplit

REASONS: dict[str, str] = {
    "license_unknown": "no licence evidence, or none we can read as a licence",
    "license_conflict": "the evidence names two different licences",
    "license_not_allowed": "a known licence the policy excludes (all rights reserved, "
    "NC under `commercial`, ND unless allowed, non-CC public-domain claims unless allowed)",
    "attribution_incomplete": "a licence requiring attribution without author, source page "
    "or licence URL",
}


@dataclass(frozen=True)
class LicenseInfo:
    """One normalised licence and what it allows or requires.

    `open` is True for a CC licence or public-domain tool/statement; `notice_only`
    marks ARR read from a bare copyright notice (weaker than "All rights reserved").
    """

    spdx: str
    family: str
    version: str | None
    port: str | None
    url: str | None
    commercial: bool
    derivatives: bool
    attribution: bool
    share_alike: bool
    open: bool
    name: str
    notice_only: bool = False


# --------------------------------------------------------------------------
# Creative Commons licence families (by their elements)
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Family:
    family: str  # "CC-BY-NC-SA"
    code: str  # URL path code "by-nc-sa"
    legacy: bool  # the 1.0-only licences without BY (and their odd URL codes)


_FAMILIES: dict[frozenset[str], _Family] = {
    frozenset({"BY"}): _Family("CC-BY", "by", False),
    frozenset({"BY", "SA"}): _Family("CC-BY-SA", "by-sa", False),
    frozenset({"BY", "ND"}): _Family("CC-BY-ND", "by-nd", False),
    frozenset({"BY", "NC"}): _Family("CC-BY-NC", "by-nc", False),
    frozenset({"BY", "NC", "SA"}): _Family("CC-BY-NC-SA", "by-nc-sa", False),
    frozenset({"BY", "NC", "ND"}): _Family("CC-BY-NC-ND", "by-nc-nd", False),
    # version 1.0 only: licences without attribution
    frozenset({"SA"}): _Family("CC-SA", "sa", True),
    frozenset({"NC"}): _Family("CC-NC", "nc", True),
    frozenset({"ND"}): _Family("CC-ND", "nd", True),
    frozenset({"NC", "SA"}): _Family("CC-NC-SA", "nc-sa", True),
    frozenset({"NC", "ND"}): _Family("CC-NC-ND", "nd-nc", True),
}
_URL_CODES: dict[str, frozenset[str]] = {f.code: k for k, f in _FAMILIES.items()}
_URL_CODES["by-nd-nc"] = frozenset({"BY", "NC", "ND"})  # the 1.0 spelling

_VERSIONS = ("1.0", "2.0", "2.1", "2.5", "3.0", "4.0")

# Jurisdiction ports CC published (path segment after the version).
# fmt: off
_PORTS = frozenset([
    "ar", "at", "au", "az", "be", "bg", "br", "ca", "ch", "cl", "cn", "co", "cr", "cz", "de",
    "dk", "ec", "ee", "eg", "es", "fi", "fr", "ge", "gr", "gt", "hk", "hr", "hu", "ie", "igo",
    "il", "in", "it", "jo", "jp", "kr", "lu", "mk", "mt", "mx", "my", "nl", "no", "nz", "pe",
    "ph", "pl", "pr", "pt", "ro", "rs", "scotland", "se", "si", "sg", "sk", "th", "tw", "ug",
    "uk", "us", "ve", "vn", "za",
])
# Ported CC licences that have an SPDX id (SPDX licence list 3.26); others get LicenseRef-.
_SPDX_PORTED = frozenset([
    "CC-BY-2.5-AU", "CC-BY-3.0-AT", "CC-BY-3.0-AU", "CC-BY-3.0-DE", "CC-BY-3.0-IGO",
    "CC-BY-3.0-NL", "CC-BY-3.0-US", "CC-BY-NC-3.0-DE", "CC-BY-NC-ND-3.0-DE", "CC-BY-NC-ND-3.0-IGO",
    "CC-BY-NC-SA-2.0-DE", "CC-BY-NC-SA-2.0-FR", "CC-BY-NC-SA-2.0-UK", "CC-BY-NC-SA-3.0-DE",
    "CC-BY-NC-SA-3.0-IGO", "CC-BY-ND-3.0-DE", "CC-BY-SA-2.0-UK", "CC-BY-SA-2.1-JP",
    "CC-BY-SA-3.0-AT", "CC-BY-SA-3.0-DE", "CC-BY-SA-3.0-IGO",
])
# fmt: on

_CC = "https://creativecommons.org"
# The hint of a licence mention that agrees with no licence: a CC URL with a code we do
# not know, "CC BY 4.0 NC", a negated name ("not CC BY 4.0"). Alone it is unknown.
UNREADABLE = "CC-UNREADABLE"


def cc_license(
    elements: Iterable[str], version: str, port: str | None = None
) -> LicenseInfo | None:
    """The CC licence with these elements (BY, NC, SA, ND), version and port, if it exists."""
    elems = frozenset(elements)
    fam = _FAMILIES.get(elems)
    port = port.lower() if port else None
    if fam is None or version not in _VERSIONS or (port is not None and port not in _PORTS):
        return None
    if fam.legacy and version != "1.0":
        return None
    if version == "4.0" and port is not None:  # 4.0 is international only
        return None
    if version == "2.1" and port is None:  # 2.1 exists only as ports
        return None
    base = f"{fam.family}-{version}" + (f"-{port.upper()}" if port else "")
    if port is None and (not fam.legacy or fam.family == "CC-SA"):
        spdx = base
    else:
        spdx = base if base in _SPDX_PORTED else f"LicenseRef-{base}"
    code = "by-nd-nc" if fam.family == "CC-BY-NC-ND" and version == "1.0" else fam.code
    label = fam.family.removeprefix("CC-")
    return LicenseInfo(
        spdx=spdx,
        family=fam.family,
        version=version,
        port=port,
        url=f"{_CC}/licenses/{code}/{version}/" + (f"{port}/" if port else ""),
        commercial="NC" not in elems,
        derivatives="ND" not in elems,
        attribution="BY" in elems,
        share_alike="SA" in elems,
        open=True,
        name=f"CC {label} {version}" + (f" {port.upper()}" if port else ""),
    )


Perms = tuple[bool, bool, bool, bool]  # commercial, derivatives, attribution, open
_FREE: Perms = (True, True, False, True)
_NONE: Perms = (False, False, False, False)


def _fixed(
    spdx: str,
    family: str,
    name: str,
    perms: Perms,
    url: str | None = None,
    version: str | None = None,
) -> LicenseInfo:
    commercial, derivatives, attribution, open_ = perms
    return LicenseInfo(
        spdx, family, version, None, url, commercial, derivatives, attribution, False, open_, name
    )


# fmt: off
# CC public-domain tools
CC0 = _fixed("CC0-1.0", "CC0", "CC0 1.0", _FREE, f"{_CC}/publicdomain/zero/1.0/", "1.0")
PDM = _fixed("CC-PDM-1.0", "PDM", "Public Domain Mark 1.0", _FREE, f"{_CC}/publicdomain/mark/1.0/",
             "1.0")
PDDC = _fixed("CC-PDDC", "PDDC", "Public Domain Dedication and Certification", _FREE,
              f"{_CC}/licenses/publicdomain/")
# Non-CC statements; permissions we cannot vouch for are read conservatively (False).
ARR = _fixed("LicenseRef-All-Rights-Reserved", "ARR", "All rights reserved", _NONE)
NOTICE = replace(ARR, notice_only=True)
PD = _fixed("LicenseRef-Public-Domain", "PD", "Public domain", _FREE)
US_GOV = _fixed("LicenseRef-US-Government-Work", "US-GOV", "United States Government Work", _FREE)
NKCR = _fixed("LicenseRef-Flickr-No-Known-Copyright-Restrictions", "NKCR",
              "No known copyright restrictions", (False, False, True, False))
# fmt: on


def _cc_or_fail(elements: Iterable[str], version: str) -> LicenseInfo:
    info = cc_license(elements, version)
    if info is None:  # pragma: no cover - guards the static table below
        raise ValueError(f"bad licence table entry {elements} {version}")
    return info


# flickr.photos.licenses.getInfo ids (../shared/fixtures/real/README.md)
FLICKR: dict[int, LicenseInfo] = {
    0: ARR,
    1: _cc_or_fail({"BY", "NC", "SA"}, "2.0"),
    2: _cc_or_fail({"BY", "NC"}, "2.0"),
    3: _cc_or_fail({"BY", "NC", "ND"}, "2.0"),
    4: _cc_or_fail({"BY"}, "2.0"),
    5: _cc_or_fail({"BY", "SA"}, "2.0"),
    6: _cc_or_fail({"BY", "ND"}, "2.0"),
    7: NKCR,
    8: US_GOV,
    9: CC0,
    10: PDM,
}

# --------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------
_CC_HOSTS = frozenset({"creativecommons.org", "www.creativecommons.org"})
_BUTTON_HOSTS = frozenset({"i.creativecommons.org", "licensebuttons.net"})
_TAIL = re.compile(r"(?:deed|legalcode)(?:\.[a-z]{2,3}(?:[_-][a-z0-9]{2,8})*)?|legalcode\.txt|rdf")
_BUTTON = re.compile(r"\d{1,3}x\d{1,3}\.png")
_URL_LIKE = re.compile(r"(?:[a-z][a-z0-9+.-]*:)?//|(?:[\w-]+\.)+[a-z]{2,}(?::\d+)?/", re.I)
# A URL inside text must start the text or follow a space, bracket or quote: not
# `evil.com/?u=https://creativecommons.org/...` nor `evil.com/creativecommons.org/...`.
_URL_IN_TEXT = re.compile(
    r"(?<![^\s(\[<\"'>])(?:(?:https?:)?//|(?:www\.)?creativecommons\.org/)[^\s<>\"'`]*", re.I
)


def _tail_ok(rest: Sequence[str], pattern: re.Pattern[str] = _TAIL) -> bool:
    return not rest or (len(rest) == 1 and pattern.fullmatch(rest[0]) is not None)


def _cc_path(segs: list[str], button: bool = False) -> LicenseInfo | None:
    """`licenses/<code>/<version>/[<port>/][deed...]`, `publicdomain/(zero|mark)/1.0/`."""
    tail = _BUTTON if button else _TAIL
    kind, rest = (segs[0], segs[1:]) if segs else ("", [])
    if kind in (("p",) if button else ("publicdomain",)):
        if rest[:2] == ["zero", "1.0"] and _tail_ok(rest[2:], tail):
            return CC0
        if rest[:2] == ["mark", "1.0"] and _tail_ok(rest[2:], tail):
            return PDM
        return None
    if kind != ("l" if button else "licenses"):
        return None
    if not button and rest[:1] == ["publicdomain"] and _tail_ok(rest[1:]):
        return PDDC
    if len(rest) < 2 or rest[0] not in _URL_CODES:
        return None
    elems, version, rest = _URL_CODES[rest[0]], rest[1], rest[2:]
    port = None
    if rest and rest[0] in _PORTS:
        port, rest = rest[0], rest[1:]
    if not _tail_ok(rest, tail):
        return None
    return cc_license(elems, version, port)


def _cc_segments(url: str) -> tuple[bool, list[str]] | None:
    """(licence-button host?, lower-cased path segments) of an http(s) URL on
    creativecommons.org or a licence-button host, else None (other hosts, userinfo, junk)."""
    s = url.strip().strip("<>\"'")
    if s.startswith("//"):
        s = "https:" + s
    elif "://" not in s:
        s = "https://" + s
    try:
        parts = urlsplit(s)
        host = (parts.hostname or "").rstrip(".")
        has_userinfo = parts.username is not None or parts.password is not None
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or has_userinfo:
        return None
    # percent-decoded like a browser shows it: `/licenses/by%2Dnc/4.0/` is BY-NC
    segs = [p for p in unquote(parts.path).lower().split("/") if p]
    if host in _CC_HOSTS:
        return False, segs
    if host in _BUTTON_HOSTS:
        return True, segs
    return None


def parse_url(url: str) -> LicenseInfo | None:
    """The licence a creativecommons.org URL (or licence button) names, else None."""
    cc = _cc_segments(url)
    return None if cc is None else _cc_path(cc[1], button=cc[0])


def _url_hint(url: str) -> str | None:
    """What a CC licence URL we cannot read (no version, a version or port that does not
    exist: `/licenses/by-nc/`, `/licenses/by-nc/4.0/de/`) still says: its family, or
    `UNREADABLE` for a licence code we do not know (`sampling+`, `devnations`, `nc-by`,
    a typo). Like a name without version it must agree with the licence found (`resolve`),
    so "CC BY 4.0" next to a broken BY-NC link is a conflict, not BY; an unknown code
    agrees with nothing (it may name a non-free or NC licence)."""
    cc = _cc_segments(url)
    if cc is None or len(cc[1]) < 2:
        return None
    button, (kind, code, *_) = cc
    if kind == ("l" if button else "licenses"):
        if code == "publicdomain":
            return "PDDC"
        elems = _URL_CODES.get(code)
        return _FAMILIES[elems].family if elems is not None else UNREADABLE
    if kind == ("p" if button else "publicdomain"):
        return {"zero": "CC0", "mark": "PDM"}.get(code, UNREADABLE)
    return None


# --------------------------------------------------------------------------
# Names: a small grammar over word tokens
# --------------------------------------------------------------------------
Phrase = tuple[str, ...]

# fmt: off
_ELEMENT_NAMES: dict[str, list[str]] = {  # English, German, Spanish, French
    "BY": ["by", "attribution", "namensnennung", "reconocimiento", "atribución", "atribucion",
           "paternité", "paternite"],
    "NC": ["nc", "noncommercial", "non commercial", "nichtkommerziell", "nicht kommerziell",
           "nocomercial", "no comercial", "pas d utilisation commerciale"],
    "SA": ["sa", "sharealike", "share alike", "weitergabe unter gleichen bedingungen",
           "compartirigual", "compartir igual", "partage dans les mêmes conditions",
           "partage des conditions initiales à l identique"],
    "ND": ["nd", "noderivs", "noderivatives", "no derivatives", "no derivs", "no derivative works",
           "keine bearbeitung", "keine bearbeitungen", "sinobraderivada", "sin obra derivada",
           "sinderivadas", "sin derivadas", "pas de modification"],
}
# fmt: on
_ELEMENTS: dict[Phrase, str] = {
    tuple(name.split()): element for element, names in _ELEMENT_NAMES.items() for name in names
}
# An unprefixed name must start with a long attribution word ("Attribution-ShareAlike 4.0").
_LONG_BY = frozenset(p[0] for p, e in _ELEMENTS.items() if e == "BY" and p != ("by",))
_BEFORE_VERSION = frozenset({"license", "licence", "lizenz", "licencia", "public", "version", "v"})
_TRAILING = frozenset(
    {
        "license",
        "licence",
        "lizenz",
        "licencia",
        "public",
        "deed",
        "legal",
        "code",
        "legalcode",
        "migrated",
        "unported",
        "generic",
        "international",
        "universal",
    }
)
# "CC0 1.0 Universal Public Domain Dedication": the words after a tool's name.
_TOOL_TRAILING = _TRAILING | {"public", "domain", "dedication", "waiver"}
# fmt: off
_PORT_WORDS: dict[str, str | None] = {
    "unported": None, "generic": None, "international": None, "universal": None,
    "germany": "de", "deutschland": "de", "austria": "at", "österreich": "at",
    "switzerland": "ch", "schweiz": "ch", "netherlands": "nl", "nederland": "nl",
    "united states": "us", "england and wales": "uk", "england wales": "uk",
    "scotland": "scotland", "france": "fr", "spain": "es", "españa": "es", "italy": "it",
    "italia": "it", "japan": "jp", "australia": "au", "igo": "igo", "canada": "ca",
    "brazil": "br", "brasil": "br", "poland": "pl", "polska": "pl", "portugal": "pt",
    "belgium": "be", "ireland": "ie", "new zealand": "nz", "argentina": "ar", "chile": "cl",
    "mexico": "mx", "méxico": "mx", "china mainland": "cn", "taiwan": "tw", "hong kong": "hk",
    "south korea": "kr", "korea": "kr", "singapore": "sg", "india": "in", "israel": "il",
    "greece": "gr", "sweden": "se", "norway": "no", "denmark": "dk", "finland": "fi",
    "czech republic": "cz", "hungary": "hu", "croatia": "hr", "serbia": "rs",
    "slovenia": "si", "romania": "ro", "south africa": "za", "philippines": "ph",
}
# fmt: on
_PORT_NAMES: dict[Phrase, str | None] = {tuple(k.split()): v for k, v in _PORT_WORDS.items()}
_VERSION = re.compile(r"\d(?:\.\d)?")

# Fixed phrases (longest tried first at each position).
_PHRASES: dict[Phrase, LicenseInfo | None] = {
    ("no", "known", "copyright", "restrictions"): NKCR,
    ("united", "states", "government", "work"): US_GOV,
    ("us", "government", "work"): US_GOV,
    ("u", "s", "government", "work"): US_GOV,
    ("public", "domain", "dedication", "and", "certification"): PDDC,
    ("public", "domain"): PD,
    # neutral: CC slogans and non-CC "free" claims are no licence by themselves
    ("some", "rights", "reserved"): None,
    ("no", "rights", "reserved"): None,
    ("copyrighted", "free", "use"): None,
    ("copyright", "free"): None,
}
_HINT_PHRASES = frozenset({("some", "rights", "reserved"), ("no", "rights", "reserved")})

_TOKEN = re.compile(r"\d+(?:\.\d+)*|[^\W\d_]+")
_TAGS = re.compile(r"<[^>]{0,2000}>")

# Rights reserved, on lower-cased text. Explicit ARR vs a bare copyright notice.
_ARR_TEXT = re.compile(
    r"all\s+rights\s+reserved|alle\s+rechte\s+vorbehalten|tous\s+droits\s+r[ée]serv[ée]s"
    r"|todos\s+los\s+derechos\s+reservados|tutti\s+i\s+diritti\s+riservati"
    r"|todos\s+os\s+direitos\s+reservados|alle\s+rechten\s+voorbehouden"
    r"|все\s+права\s+защищены|版权所有|版權所有|無断転載"
    r"|\broyalty[\s-]+free\b|\brights[\s-]+managed\b|\beditorial\s+use\s+only\b"
)
_NOTICE_TEXT = re.compile(r"©|\(c\)|\bcopyright\b|\bcopr\.")
_NEUTRAL_TEXT = re.compile(
    r"no\s+known\s+copyright\s+restrictions|copyrighted\s+free\s+use|copyright\s+free"
)
_URL_WORD = re.compile(r"//|\b(?:[\w-]+\.)+[a-z]{2,}(?::\d+)?/", re.I)
_URL_WORDS = re.compile(r"\S+")
MAX_EVIDENCE = 10_000  # characters: a longer "licence" is a page dump, read as unknown


def _drop_url_word(m: re.Match[str]) -> str:
    """A whitespace-separated word that is (or holds) a URL becomes a space: one search per
    word, never a pattern spanning a run of them (quadratic at worst, not cubic)."""
    word = m.group(0)
    return " " if len(word) > 2000 or _URL_WORD.search(word) else word


_SPACE = re.compile(r"\s")
_FLICKR = re.compile(r"flickr\s*:\s*(\d{1,3})", re.I)
_WIKI_PD = re.compile(r"pd(?:[-_ ](?!mark\b)[\w.-]+)?", re.I)
_NONFREE = re.compile(r"non[-_ ]?free", re.I)
# A use restriction stated in words beside a licence ("CC BY-SA 4.0 but not for commercial
# use", "personal use only", "Nachdruck verboten"): the licensor's words and the licence
# disagree, so no licence at that evidence level is read as granting what the words withhold
# (`withholds`, `resolve`). On lower-cased text, hyphens, slashes and underscores as spaces.
_NEG = r"(?:(?:do|does|may|must|can|shall|should) not|cannot|can't|don't|not to)"
_NO_COMMERCIAL_TEXT = re.compile(
    r"\bnon ?commercial|\bnot (?:\w+ ){0,3}for (?:\w+ ){0,3}commercial\b|\bno commercial\b"
    r"|\bnot for (?:re)?sale\b"
    rf"|\b{_NEG} (?:be )?(?:used|use|sold|sell|resold|resell)\b (?:\w+ ){{0,3}}commercial"
    rf"|\b{_NEG} (?:be )?(?:sold|sell|resold|resell)\b"
    r"|\bcommercial (?:use|usage|purposes?|reuse|exploitation)(?: of (?:\w+ ){0,2}\w+)?:? "
    r"(?:is |are )?"
    r"(?:strictly )?(?:not (?:allowed|permitted)|prohibited|forbidden|excluded|requires)"
    r"|\b(?:prohibited|forbidden|not (?:allowed|permitted)) for commercial"
    r"|\bcontact (?:\w+ ){0,2}for commercial"
    r"|\b(?:personal|private|non ?profit|not for profit|educational|research|academic|internal"
    r"|press|editorial|strictly personal) (?:use|purposes?)? ?only\b"
    r"|\bfor (?:strictly )?(?:personal|private) use\b|\bstrictly (?:personal|private)\b"
    r"|\bonly for (?:personal|private|non ?profit|educational|research|academic)\b"
    r"|\bfor (?:educational|research|academic) purposes only\b|\beditorial only\b"
    # profit; uses narrower than the licence's ("For editorial use", "Free for educational
    # use") stated beside it: which one the licensor meant is not said, fail closed
    r"|\bfor (?:non ?)?profit\b|\b(?:non ?profit|not for profit) (?:use|purposes?)\b"
    r"|\bfor (?:\w+ )?(?:editorial|educational) (?:use|purposes?)\b"
    r"|\bnicht ?kommerziell|\bkeine kommerzielle"
    r"|\bkommerzielle nutzung (?:\w+ )?(?:untersagt|verboten)"
    r"|\bnicht für kommerzielle|\bnur für (?:den )?(?:private|persönliche)"
    r"|\bpas d.(?:utilisation|usage) commercial|\b(?:utilisation|usage) commerciale? interdite?"
    r"|\busage personnel uniquement|\bnon commerciale?\b"
    r"|\buso no comercial|\bno comercial\b|\bsin fines comerciales|\buso comercial prohibido"
    r"|\bprohibido (?:su |el )?uso comercial|\buso exclusivamente personal"
    r"|\bvietato l.uso commerciale|\bsolo per uso personale"
    r"|\bnão comercial|\bsem fins comerciais|\bproibido (?:o )?uso comercial"
    r"|\bapenas para uso pessoal"
    r"|\bniet (?:voor )?commercie|\bgeen commercieel|\balleen voor persoonlijk"
    # selling; personal or private use in other languages and word orders
    r"|\b(?:selling|sale|sales|resale|reselling)(?: of (?:\w+ ){0,2}\w+)? (?:is |are )?"
    r"(?:strictly )?(?:prohibited|forbidden|not (?:allowed|permitted))"
    r"|\b(?:personal|private) use\b"
    r"|\b(?:uso|usage|utilisation|utilizzo|gebrauch|nutzung|verwendung|gebruik) (?:\w+ )?"
    r"(?:personal|personale|personnel|privé|privée|privado|privato|pessoal|privat|persönlich)"
    r"|\b(?:private?[nr]?|persönliche?[nr]?|privé|privée|personnel|persoonlijk) ?"
    r"(?:gebrauch|nutzung|verwendung|usage|utilisation|gebruik)\b"
    r"|个人(?:使用|用途)|個人(?:利用|使用|用途)|\bтолько для личного|\bличного использования"
)
_NO_DERIVATIVES_TEXT = re.compile(
    r"\bno ?derivatives?\b|\bno derivative works?\b|\bnon derivative\b"
    r"|\bno (?:modifications?|alterations?|edits?|changes?)\b"
    r"(?! (?:were|was|have been|has been|made))"
    rf"|\b{_NEG} (?:be )?(?:modif|alter|edit|remix|adapt|crop|chang)"
    r"|\b(?:modifications?|alterations?|changes?|editing) (?:are |is )?(?:not (?:allowed|permitted)"
    r"|prohibited|forbidden)"
    r"|\bkeine bearbeitung"
    r"|\b(?:bearbeitung|veränderungen?) (?:ist |sind )?nicht (?:erlaubt|gestattet)"
    r"|\bpas de modification|\bne pas modifier|\bsin modificaciones|\bnon modificare"
    r"|\bderivatives?(?: works?)? (?:are |is )?(?:strictly )?(?:not (?:allowed|permitted)"
    r"|prohibited|forbidden)"
    r"|\b(?:modifications?|alterations?|bearbeitungen|veränderungen|modificaciones"
    r"|modifiche|modificações) (?:\w+ )?(?:untersagt|verboten|interdites?|prohibidas?"
    r"|vietate?|proibidas?)"
    r"|\bno se permiten (?:modificaciones|obras derivadas)"
    r"|\bno (?:adaptations?|remix\w*)\b|\badaptations? (?:are |is )?(?:strictly )?"
    r"(?:not (?:allowed|permitted)|prohibited|forbidden)"
    r"|\b(?:unmodified|unaltered|unedited) (?:use )?only\b"
    r"|\buse (?:\w+ )?(?:unmodified|unaltered|unedited) only\b"
    r"|\bonly (?:in |as )?(?:unmodified|unaltered|unedited)\b"
    r"|\b(?:bearbeitung|veränderung)\w* (?:\w+ )?(?:untersagt|verboten)"
    r"|\bkeine (?:bearbeitung|veränderung)"
)
_NO_USE_TEXT = re.compile(
    r"\breproduction (?:is )?(?:strictly )?(?:prohibited|forbidden|not (?:allowed|permitted))"
    rf"|\b{_NEG} (?:be )?(?:reproduc|redistribut|republish|cop(?:y|ied)\b|share\b|shared\b|reuse)"
    r"|\b(?:not|no|never|prohibited|forbidden)\b[^.;]{0,60}\bwithout (?:\w+ ){0,3}(?:permission"
    r"|consent|authori[sz]ation)"
    r"|(?<!\bno )(?<!\bwithout )\b(?:permission|consent) (?:is )?required\b"
    r"|\bonly with (?:\w+ ){0,3}(?:permission|consent)"
    r"|\b(?:ask|request|obtain|seek) (?:for )?(?:\w+ )?permission\b|\bunauthori[sz]ed use"
    r"|\brequires (?:\w+ ){0,2}(?:permission|consent)\b"
    r"|\bno (?:reproduction|redistribution|reuse)\b|\bnot for (?:redistribution|reproduction)\b"
    r"|\bnur mit (?:\w+ )?genehmigung|\bgenehmigung (?:ist )?erforderlich"
    r"|\bnachdruck (?:\w+ )?verboten|\bvervielfältigung (?:\w+ )?verboten"
    r"|\b(?:toute )?reproduction interdite|\bprohibida (?:la )?reproducci|\briproduzione vietata"
    r"|\breprodução proibida|\bverveelvoudiging (?:\w+ )?verboden"
    # shown by someone's leave ("used with permission", "use by permission only"): not a
    # licence to anyone else
    r"|\b(?:by|with) (?:\w+ ){0,3}(?:permission|consent)\b|\bmit (?:\w+ )?genehmigung"
    r"|\bavec (?:l.|la )?(?:aimable )?(?:autorisation|permission)|\bcon (?:el )?permiso\b"
    r"|\bcon (?:il )?permesso\b|\bcom (?:a )?(?:permissão|autorização)|\bmet (?:\w+ )?toestemming"
    # redistribution, reposting, any use ("Redistribution prohibited", "Do not repost",
    # "Use of this image is prohibited", "Not for reuse", "Ask before using")
    r"|\b(?:re ?)?(?:distribution|use|posting|publication|uploading)(?: of (?:\w+ ){0,2}\w+)?"
    r" (?:is |are )?(?:strictly )?(?:prohibited|forbidden|not (?:allowed|permitted))"
    rf"|\b{_NEG} (?:be )?(?:re ?)?(?:distribut|post|upload)"
    rf"|\b{_NEG} (?:re ?)?use(?: (?:it|them|this|these|this \w+|these \w+))? ?(?:[.;!?]|$)"
    r"|\bno (?:re ?)?(?:posting|uploading|distribution|use)\b|\bnot (?:\w+ )?for (?:re ?)?use\b"
    r"|\b(?:ask|check|contact(?: \w+){0,2}) before (?:using|use|reuse|reusing)\b"
    r"|\blicen[cs]ed exclusively\b|\bexclusive(?:ly)? licen[cs]"
    r"|\bweitergabe (?:\w+ )?(?:verboten|untersagt|nicht gestattet)"
    # machine learning: an opt-out the licence does not make, fail closed
    r"|\b(?:ai|machine learning|ml) training\b|\bnot? (?:\w+ ){0,3}(?:machine learning|ai\b)"
    r"|\b(?:text and )?data mining (?:is )?(?:prohibited|forbidden|not)"
)
# A licence stated for the text alone ("Text is available under the Creative Commons
# Attribution-ShareAlike License 4.0", "All text CC BY 4.0", "Text licence: CC BY 4.0",
# "CC BY 4.0 (excluding images)"): MediaWiki and news-site footers, where each image has its
# own licence. Not "Photos and text licensed under ..." (media words joined to it).
_TEXT_SCOPE = re.compile(
    r"\b(?:article |written |all |the |our |page |textual )?(?:text|texts|wording|prose|"
    r"textual content|written content|page content|text content)"
    r"(?: (?:of|on|in) (?:this|the|our|these|all) \w+(?: \w+)?)?"
    r"(?: (?:is|are|ist))?"
    r"(?: (?:available|licensed|released|published|distributed|provided|shared|offered|verfügbar))?"
    r" ?:? (?:under|unter|cc\b|creative commons|\(?cc[ -]by)"
    r"|\btext licen[cs]e\b|\blicen[cs]e (?:for|of) (?:the )?text\b|\btext(?:s)? only\b"
    r"|\bapplies to (?:the )?text\b"
    r"|\b(?:excluding|except(?: for)?|with the exception of|other than|not including) "
    r"(?:the |all )?"
    r"(?:images|photos|photographs|pictures|illustrations|media)\b"
    r"|\b(?:le |el |o |il |der |de |les |los |i |os )?(?:texte|texto|testo|tekst|textes|textos"
    r"|testi|texte) (?:est |está |ye |è |ist |is |sont |están |sono |estão )?"
    r"(?:disponible|disponível|disponibile|beschikbaar|disponibles|disponíveis|disponibili"
    r"|sous licence|unter|bajo|sob|sotto)"
    r"|\btextinhalte\b"
)
_MEDIA = (
    r"(?:images?|photos?|photographs?|pictures?|media|illustrations?|graphics?|figures?|bilder"
    r"|fotos?|imágenes|immagini|imagens|afbeeldingen)"
)
_MEDIA_AND = re.compile(
    rf"(?:^|[.;:!?(] |\b(?:all|both|our|the|his|her|their|my) ){_MEDIA}"
    r"(?: as well as| and| &|,| \+| und| et| y| e| en) (?:the |all |our )?$"
)
_CLAUSE_EXCLUSION = re.compile(r"\b(?:except|excluding|exception|apart|other than)\b")

# Commercial use, failing closed: a commerce word in a use context ("except commercial use",
# "commercial rights reserved", "Commercial: no", "keine gewerbliche Nutzung", "禁止商用")
# withholds commercial use unless it is part of a licence name or of a phrase granting it
# (`_GRANTS_COMMERCIAL`). A commerce word describing a thing ("Commercial Street", "a
# commercial airliner") is no use context: followed by no use word, after no negation.
_COMMERCE = re.compile(
    r"commercia\w*|commerci[eë]\w*|comercia\w*|kommerz\w*|gewerb\w*|коммерч\w*"
    # group 1: CJK, and languages whose word order and grants are not read here: any such
    # word withholds (Danish, Swedish, Norwegian, Polish, Czech, Slovak, Turkish, Greek,
    # Finnish, Hungarian, Indonesian, Vietnamese, Korean, Hebrew, Arabic, Hindi)
    r"|(商用|商业|商業|営利|营利|營利|kommerci|kommersi|komercyj|komerčn|komerc|ticari"
    r"|εμπορικ|kaupalli|kereskedelmi|komersial|thương mại|상업|영리|מסחרי|تجاري|व्यावसायिक)"
)
# fmt: off
_USE_WORDS = frozenset({
    "use", "uses", "used", "user", "users", "using", "usage", "usages", "reuse", "purpose",
    "purposes", "right", "rights", "sale", "sales", "resale", "selling", "request", "requests",
    "inquiries", "enquiries", "contact", "project", "projects", "application", "applications",
    "permission", "exploitation", "distribution", "redistribution", "licence", "license",
    "licences", "licenses", "licensing", "fins", "fines", "fini", "fin", "scopi", "scopo", "uso",
    "usos", "usi", "droits", "anfrage", "anfragen", "einsatz", "doeleinden", "doeleinde",
})
_USE_PREFIXES = (
    "gebrauch", "nutzung", "nutzer", "zweck", "verwend", "verwert", "lizenz", "rechte",
    "utilis", "exploit", "distribu", "licen", "permis", "finalidad", "finalidade", "utiliz",
    "derech", "direit", "diritt", "gebruik", "rechten", "propósito", "использ", "лиценз", "цел",
    "прав",
)
_NEGATIONS = frozenset({
    "not", "no", "non", "never", "t", "cannot", "nicht", "kein", "keine", "keinen", "keiner",
    "keinerlei", "pas", "nem", "niet", "geen", "nie", "не", "без", "except", "excepting",
    "excluding", "excluded", "exclude", "sans", "sin", "senza", "sem", "zonder", "ohne",
    "without", "ausgenommen", "außer", "ausser", "sauf", "salvo", "tranne", "exceto", "nu",
    "ne", "ej", "ikke", "icke", "ei", "nej", "niente",
})
# fmt: on
# a use word right before a commerce word (Romance order: "uso comercial no permitido",
# "toute utilisation commerciale est interdite"), searched in the 40 characters before it
_USE_BEFORE = re.compile(
    r"\b(?:use|uso|usos|usage|utilisation|utilizzo|utilização|utilizacion|utilización"
    r"|gebruik|nutzung|uz|exploitation)(?: (?:de|d|of|a|in|per|for|para|pour))? $"
)
# fmt: off
# a commerce word answered "no" ("Commercial - No", "Commercial: nein", "Commercial ✗")
_ANSWERED_NO = re.compile(r"\s*:?\s*(?:(?:no|nein|non|não|nee|niet|nej|nie)\b|[✗✘❌×])")
# fmt: on
_CJK_NEGATION = frozenset("不非禁没沒無无")
_COMMERCE_WORD = r"(?:commercia|commerci[eë]|comercia|kommerz|gewerb)\w*"
_GRANT = (
    r"(?:allowed|permitted|ok|okay|fine|welcome|free|authori[sz]ed|granted|included"
    r"|yes|erlaubt|gestattet|zulässig|frei|autorisée?|permise?|libre|permitido"
    r"|autorizado|consentito|permesso|ammesso|toegestaan|разрешено|допускается)"
)
# Phrases granting commercial use (or naming both uses), masked before the check above.
_GRANTS_COMMERCIAL = re.compile(
    rf"\b(?:both |sowohl )?(?:non ?|nicht ?|no |não |niet )?{_COMMERCE_WORD}(?: use| usage)?"
    rf" (?:and|or|&|et|ou|und|oder|als auch|y|o|e|en|of) (?:non ?|nicht ?|no |não |niet ?)?"
    rf"(?:{_COMMERCE_WORD}|personal|private|privaten?|persönlichen?|editorial|educational)"
    r"|\b(?:personal|private|privaten?|persönlichen?|editorial|educational|privé|personnel)"
    rf" (?:and|or|&|et|ou|und|oder) {_COMMERCE_WORD}"
    r"|\b(?:free|ok|okay|allowed|permitted|suitable|fine|safe|approved|cleared) (?:to use )?"
    rf"(?:for|in) (?:any |all |both )?{_COMMERCE_WORD}"
    rf"|\b(?:{_COMMERCE_WORD}|коммерч\w*)(?: (?:use|uses|usage|reuse|purposes?|nutzung"
    rf"|verwendung|gebrauch|utilisation|usage|uso|utilizzo|gebruik|использование))?"
    r"(?: of (?:this|the|these|my|our) (?:image|photo|picture|photograph|work|file)s?)?"
    rf" ?:? (?:is |are |ist |est |es |é |è |также )?(?:ebenfalls |also |auch |hereby )?"
    rf"(?:ausdrücklich |expressly )?{_GRANT}\b"
    r"|\b(?:you |anyone )?(?:can|may) (?:freely |also )?use (?:it|them|this|these|this (?:image"
    r"|photo|picture|work)|these (?:images|photos|pictures)) (?:freely |also |even )?"
    rf"(?:commercially|(?:for|in) {_COMMERCE_WORD})"
    r"|\bfree to use (?:it|them|this|these) (?:freely |also |even )?commercially"
    r"|\b(?:se permite|está permitido|é permitido|è consentito|est autorisée?)"
    rf"(?: (?:el|su|o|l|la|il|le))? ?(?:uso|usage|utilisation|utilizzo) {_COMMERCE_WORD}"
    r"|\b(?:can|may|could) (?:also |freely |even )?be used (?:also |freely |even )?"
    rf"(?:commercially|for {_COMMERCE_WORD})"
    rf"|\b(?:including|incl|even|also|allows?|allowing|permits?|permitting|sogar|auch"
    rf"|einschließlich|inklusive|erlaubt|gestattet|y compris|incluso"
    rf"|anche|inclusive|incluindo|mesmo que|inclusief|даже|включая|в том числе) (?:for |für "
    rf"|pour |para |per |voor |в |для |à des fins |a fini |con fines |para fins )?"
    rf"(?:{_COMMERCE_WORD}|коммерч\w*)"
    r"|可商用|允许商用|允許商用|可以商用|商用可|商用利用可|商業利用可|商用ok|商用無料|免费商用"
    r"|商用免费|可用于商业|可用於商業|営利目的も含め|甚至商业|甚至商業|允许商业使用|允許商業使用"
    r"|商业用途允许|商業用途允許|商業利用ok|영리목적으로도|영리 목적으로도"
)
# A rights notice whose subject is the media ("Photo © Reuters", "Images © their respective
# owners", "© Getty Images", "images are copyright of their creators") says the pictures are
# not under a licence stated for something else beside it. It is the licensor's own notice on
# a CC photo only when its clause (up to . ; ! ? |) goes on to name the licence and names no
# other subject: "Photo © Jane Doe, CC BY 4.0", "Photo: © Jane Doe / CC BY-SA 4.0".
_MARK = (
    r"(?:©|(?<![\d)])(?<![\d)] )\(c\)|\bcopyright(?:ed)?\b|\bcopr\.|\ball rights reserved\b"
    r"|\balle rechte vorbehalten\b|\btous droits réservés\b|\btodos los derechos reservados\b)"
)
_MEDIA_SUBJECT = rf"(?:{_MEDIA}|photography|pics?|bild|photographies|fotografie|fotografías?)"
_MEDIA_NOUN = (
    r"(?:images?|photos?|photographs?|pictures?|fotos?|bilder|bild|illustrations?|imágenes"
    r"|immagini|imagens|afbeeldingen|photographies|fotografie|fotografías?)"
)
_MEDIA_NOTICE = re.compile(
    rf"\b{_MEDIA_SUBJECT}\b[^.;!?|©]{{0,30}}?{_MARK}"
    rf"|{_MARK} ?:?(?: (?:of|for|on|in|to|für|auf|de|des|du|di|sur|van|op))?"
    rf"(?: (?:the|all|these|this|our|its|their|die|der|les|la|le|los|las|gli|os|as))?"
    rf"(?: \w+){{0,2}}? {_MEDIA_NOUN}\b"
    rf"|{_MARK}[^.;!?|()©]{{1,40}}\( ?{_MEDIA_SUBJECT} ?\)"
)
_ANY_NOTICE = re.compile(_MARK)
_CLAUSE_END = re.compile(r"[.;!?|](?: |$)")
# fmt: off
_OTHER_SUBJECTS = frozenset({
    "text", "texts", "story", "stories", "article", "articles", "words", "wording", "content",
    "contents", "post", "posts", "blog", "site", "website", "page", "rest", "else", "other",
    "others", "everything", "video", "videos", "audio", "music", "logo", "logos", "except",
    "unless", "excluding", "but", "whereas", "however", "texte", "texto", "testo", "tekst",
    "artikel", "inhalt", "inhalte",
})
# fmt: on


def _notice_apart(text: str, notices: re.Pattern[str]) -> bool:
    """Whether a `notices` match in `text` (normalised as in `read`) stands apart from every
    licence: its clause, from the notice on, names no licence, or names another subject
    after the notice ("Photo © Reuters, story CC BY 4.0")."""
    for m in notices.finditer(text):
        end = _CLAUSE_END.search(text, m.end(), m.start() + 300)
        stop = end.start() if end else m.start() + 300
        if not _OTHER_SUBJECTS.isdisjoint(_TOKEN.findall(text[m.end() : stop])):
            return True
        found, hints = _walk(_TOKEN.findall(text[m.start() : stop]))
        if not (hints or any(x.open for x in found)):
            return True
    return False


WITHHELD = "WITHHOLDS-"  # hint prefix: a use the evidence's words withhold (see `resolve`)
# each use that words can withhold: its pattern, and the permission of a licence granting it
_WITHHELD_USES = {
    "commercial": (_NO_COMMERCIAL_TEXT, "commercial"),
    "derivatives": (_NO_DERIVATIVES_TEXT, "derivatives"),
    "use": (_NO_USE_TEXT, "open"),
}


@dataclass
class _Match:
    end: int
    info: LicenseInfo | None
    # a CC mention we could not read as a licence: its family ("CC-BY-NC") when the
    # elements are known, else "CC"; see `resolve`
    hint: str | None = None


def _phrase_at(tokens: Sequence[str], i: int, table: Iterable[Phrase]) -> Phrase | None:
    best: Phrase | None = None
    for p in table:
        if tuple(tokens[i : i + len(p)]) == p and (best is None or len(p) > len(best)):
            best = p
    return best


def _skip(tokens: Sequence[str], j: int, words: frozenset[str]) -> int:
    while j < len(tokens) and tokens[j] in words:
        j += 1
    return j


def _versions(tokens: Sequence[str], j: int) -> tuple[list[str], int]:
    out: list[str] = []
    while j < len(tokens) and _VERSION.fullmatch(tokens[j]):
        out.append(tokens[j] if "." in tokens[j] else tokens[j] + ".0")
        j += 1
    return out, j


def _match_tool(tokens: Sequence[str], i: int, j: int, prefixed: bool) -> _Match | None:
    """CC0, the Public Domain Mark and PDDC by name (they have a single version)."""
    n = len(tokens)
    tool: LicenseInfo | None = None
    k = j
    if j < n and (tokens[j] == "cczero" or (prefixed and tokens[j] in ("0", "zero"))):
        tool, k = CC0, j + 1
    elif prefixed and j < n and tokens[j] == "pddc":
        tool, k = PDDC, j + 1
    else:
        p = _phrase_at(tokens, j, [("pdm",), ("pd", "mark"), ("public", "domain", "mark")])
        if p is not None:
            tool, k = PDM, j + len(p)
            explicit = prefixed or p == ("public", "domain", "mark")
            vers, _ = _versions(tokens, k)
            if not explicit and not vers:
                return None
    if tool is None:
        return None
    vers, k = _versions(tokens, _skip(tokens, k, _BEFORE_VERSION))
    if any(v != tool.version for v in vers):
        return _Match(i + 1, None, hint=tool.family)
    return _Match(_skip(tokens, k, _TOOL_TRAILING), tool)


def _match_cc(tokens: Sequence[str], i: int) -> _Match | None:
    """A CC licence name starting at token i."""
    n = len(tokens)
    j, prefixed = i, False
    if tokens[i : i + 2] == ["creative", "commons"]:
        j, prefixed = i + 2, True
    elif tokens[i] == "cc":
        j, prefixed = i + 1, True
    tool = _match_tool(tokens, i, j, prefixed)
    if tool is not None:
        return tool
    if not prefixed and tokens[i] not in _LONG_BY:
        return None
    elems: list[str] = []
    while j < n and (p := _phrase_at(tokens, j, _ELEMENTS)) is not None:
        elems.append(_ELEMENTS[p])
        j += len(p)
    if not elems:
        return None
    j = _skip(tokens, j, _BEFORE_VERSION)
    vers, j = _versions(tokens, j)
    fam = _FAMILIES.get(frozenset(elems)) if len(set(elems)) == len(elems) else None
    hint = fam.family if fam else "CC"
    if not vers or fam is None:  # "CC BY-NC" (no version), "CC BY BY 4.0"
        return _Match(i + 1, None, hint=hint if prefixed else None)
    port: str | None = None
    if j < n:
        pn = _phrase_at(tokens, j, _PORT_NAMES)
        if pn is not None:
            port, j = _PORT_NAMES[pn], j + len(pn)
        elif tokens[j] in _PORTS and (
            j + 1 == n or tokens[j + 1] in _TRAILING or _phrase_at(tokens, j + 1, _PORT_NAMES)
        ):  # "CC BY 3.0 DE", "CC BY-SA 2.0 UK: England & Wales"; not "CC BY 4.0 in 2019"
            port, j = tokens[j], j + 1
    j = _skip(tokens, j, _TRAILING)
    # "CC BY 4.0 NC", "cc-by-4.0-nc", "CC BY 3.0 DE/NC": elements after the version still
    # belong to the name; reading it as "CC BY 4.0" would drop a restriction. Not "by":
    # "CC BY 4.0 by Jane Doe".
    k, extra = j, list[str]()
    while k < n:
        if (p := _phrase_at(tokens, k, _ELEMENTS)) is not None and _ELEMENTS[p] != "BY":
            extra.append(_ELEMENTS[p])  # before ports: "no derivatives" is not Norway
            k += len(p)
        elif tokens[k] in _TRAILING or tokens[k] in _PORTS:
            k += 1
        elif tokens[k] == "by" and (p := _phrase_at(tokens, k + 1, _ELEMENTS)) is not None:
            k += 1  # "CC BY 4.0 by-nc": a second name's elements; "by" alone ends the name
        else:
            break
    if set(extra) - set(elems):
        more = _FAMILIES.get(frozenset(elems + extra))
        return _Match(k, None, hint=more.family if more else UNREADABLE)
    found = [x for v in vers if (x := cc_license(elems, v, port)) is not None]
    if not found:  # "CC BY 9.9", "CC BY 4.0 DE"
        return _Match(j, None, hint=hint)
    return _Match(j, max(found, key=_rank))


def _match_phrase(tokens: Sequence[str], i: int) -> _Match | None:
    p = _phrase_at(tokens, i, _PHRASES)
    if p is None:
        return None
    return _Match(i + len(p), _PHRASES[p], hint="CC" if p in _HINT_PHRASES else None)


# Words a match can start with (a fast pre-check; the matchers decide).
_STARTS = frozenset(
    {"creative", "cc", "cczero", "pdm", "pd", "public"} | _LONG_BY | {p[0] for p in _PHRASES}
)


# "not (in the) public domain", "is not licensed under CC BY": a licence named within a few
# words after a negation is no evidence for it.
_NEGATION = frozenset({"not", "never", "nicht", "isn", "aren", "wasn"})


def _walk(tokens: Sequence[str]) -> tuple[list[LicenseInfo], set[str]]:
    found: list[LicenseInfo] = []
    hints: set[str] = set()
    i = 0
    while i < len(tokens):
        if tokens[i] not in _STARTS:
            i += 1
            continue
        m = _match_cc(tokens, i) or _match_phrase(tokens, i)
        if m is None:
            i += 1
            continue
        if m.info is not None and _NEGATION.intersection(tokens[max(0, i - 5) : i]):
            m = _Match(m.end, None, hint=UNREADABLE)
        if m.hint:
            hints.add(m.hint)
        if m.info is not None:
            found.append(m.info)
        i = max(m.end, i + 1)
    return found, hints


# --------------------------------------------------------------------------
# Putting it together
# --------------------------------------------------------------------------
_PD_TOOLS = frozenset({"CC0", "PDM", "PDDC"})


def _rank(info: LicenseInfo) -> tuple[tuple[int, ...], bool]:
    """Among one family, prefer the highest version, then the more specific (ported) one."""
    version = tuple(int(x) for x in (info.version or "0").split("."))
    return version, info.port is not None


def resolve(
    infos: Iterable[LicenseInfo], hints: Iterable[str] = ()
) -> tuple[LicenseInfo | None, str | None]:
    """One licence from everything read at one evidence level, or (None, drop reason).

    A bare copyright notice yields to any other licence, a generic "public
    domain" to a CC public-domain tool (CC0, PDM, PDDC); otherwise two different
    families are a conflict (even two permissive ones: we cannot tell which the
    author meant). Within one family the highest version, then a port, wins.
    `hints` are CC mentions we could not read as a licence: a family ("CC BY-NC"
    without version) must agree with the licence found, `UNREADABLE` agrees with
    none, and any hint keeps a bare notice from being read as "all rights
    reserved" (it is then unknown). `WITHHELD` hints (uses withheld in words) make a
    conflict with every licence granting that use, from any item at the level.
    """
    infos, hints = list(infos), set(hints)
    withheld = {h for h in hints if h.startswith(WITHHELD)}
    hints -= withheld
    strong = [x for x in infos if not x.notice_only]
    if any(x.family in _PD_TOOLS for x in strong):  # "Public Domain (CC0)"
        strong = [x for x in strong if x.family != "PD"]
    if strong:
        families = {x.family for x in strong} | (hints - {"CC"})
        if len(families) > 1 or any(_grants(x, h) for x in strong for h in withheld):
            return None, "license_conflict"
        return max(strong, key=_rank), None
    if infos and not hints:
        return NOTICE, None
    return None, "license_unknown"


def _drop_format(s: str) -> str:
    """`s` without Unicode format characters (zero-width space and joiners, soft hyphen,
    word joiner, BOM, bidi marks): invisible, they would split the words the rules read."""
    return "".join(c for c in s if unicodedata.category(c) != "Cf") if _MAY_FORMAT.search(s) else s


_MAY_FORMAT = re.compile(r"[^\x00-\x7f]")


def _clean(evidence: str) -> str:
    s = _drop_format(unicodedata.normalize("NFKC", html.unescape(evidence or "")))
    s = re.sub(r"[\u2010-\u2015\u2212]", "-", s)
    return s.strip().strip("\"'")


# What ingest records for a container holding several images whose text has a licence and
# a rights notice standing apart from it (`notice_apart`): which image each one concerns is
# unknown, so no licence at the container's level is any one image's.
MIXED_RIGHTS = "ccurate:mixed-rights"


_AFTER_VERSION = re.compile(r"\d\.\d[\s(\[<\"'>:,]*$")


def _url_as_name(m: re.Match[str]) -> str:
    """A CC URL in text becomes its licence's name, so the words after it are read as after
    a name ("…/by/4.0/ NC" is "CC BY 4.0 NC"); right after a name's version ("CC BY 4.0
    <URL> NC"), other URLs, become a space. The sentence punctuation after the URL stays."""
    url = m.group(0).rstrip(".,;:!?)]}")
    info = parse_url(url)
    after_name = _AFTER_VERSION.search(m.string[max(0, m.start() - 20) : m.start()])
    name = info.name if info is not None and after_name is None else ""
    return f" {name} {m.group(0)[len(url) :]} "


def _normalised(s: str) -> tuple[str, str]:
    """The words of cleaned evidence as the text rules read them, and the same without
    neutral phrases ("copyright free"): URLs as licence names, tags dropped, lower-cased,
    hyphens, underscores and slashes as spaces, whitespace collapsed."""
    text = _URL_WORDS.sub(_drop_url_word, _TAGS.sub(" ", _URL_IN_TEXT.sub(_url_as_name, s)))
    text = re.sub(r"\s+", " ", re.sub(r"[-_/]+", " ", text.lower()))
    return text, re.sub(r"\s+", " ", _NEUTRAL_TEXT.sub(" ", text))


def notice_apart(evidence: str) -> bool:
    """Whether `evidence` has a rights notice (©, "copyright", "all rights reserved") that
    stands apart from any licence in it (see `_MEDIA_NOTICE`), e.g. "Left: Jane Doe, CC BY
    4.0. Right: © Reuters" but not "© Jane Doe, CC BY 4.0"."""
    s = _clean(evidence)
    return len(s) <= MAX_EVIDENCE and _notice_apart(_normalised(s)[1], _ANY_NOTICE)


def read(evidence: str) -> tuple[list[LicenseInfo], set[str]]:
    """Everything one string says: the licences named in it, and unreadable CC mentions.

    `resolve` turns this into one licence; the filter resolves the readings of
    all items at one evidence level together.
    """
    s = _clean(evidence)
    if not s:
        return [], set()
    if len(s) > MAX_EVIDENCE or s.lower() == MIXED_RIGHTS:
        return [], {UNREADABLE}
    if m := _FLICKR.fullmatch(s):
        info = FLICKR.get(int(m.group(1)))
        return ([info] if info else []), set()
    if _NONFREE.fullmatch(s):
        return [ARR], set()
    if _WIKI_PD.fullmatch(s):
        return [PD], set()
    urls = [s] if _URL_LIKE.match(s) and not _SPACE.search(s) else None
    found: list[LicenseInfo] = []
    url_hints: set[str] = set()
    for url in urls or (m.group(0).rstrip(".,;:!?)]}") for m in _URL_IN_TEXT.finditer(s)):
        info = parse_url(url)
        if info is not None:
            found.append(info)
        elif hint := _url_hint(url):
            url_hints.add(hint)
    if urls:
        return found, url_hints
    # names are read from the words around URLs, never from a URL's path or query (a CC
    # URL reads as its licence's name, for the words after it)
    text, rest = _normalised(s)
    named, hints = _walk(_TOKEN.findall(text))
    hints |= url_hints
    found += named
    # a licence for the text alone, or a rights notice for the pictures apart from the
    # licence, says nothing of the image's licence: no licence, and against any other item
    # at this level
    if _text_only(rest) or _notice_apart(rest, _MEDIA_NOTICE):
        found = [x for x in found if not x.open]
        hints.add(UNREADABLE)
    hints |= _withholds(rest)  # against every licence at this level granting that use
    if _MIXED_SCRIPT.search(text):  # "cоmmercial" with a Cyrillic о: unreadable
        hints.add(UNREADABLE)
    if _ARR_TEXT.search(rest):
        found.append(ARR)
    elif _NOTICE_TEXT.search(rest):
        found.append(NOTICE)
    return found, hints


def _text_only(text: str) -> bool:
    """Whether `text` (whitespace collapsed) scopes its licence to the text of a page, not
    its images."""
    for m in _TEXT_SCOPE.finditer(text):
        before = text[max(0, m.start() - 40) : m.start()]
        joined = _MEDIA_AND.search(before) and not _CLAUSE_EXCLUSION.search(before)
        if not joined:
            return True
    return False


_WORD = re.compile(r"\w+")
_MIXED_SCRIPT = re.compile(r"[a-z][\u0370-\u03ff\u0400-\u04ff]|[\u0370-\u03ff\u0400-\u04ff][a-z]")


def _negated(text: str, start: int) -> bool:
    """Whether a negation or exclusion is among the three words before `start`."""
    before = text[max(0, start - 40) : start]
    if before.rstrip()[-1:] in _CJK_NEGATION:
        return True
    return not _NEGATIONS.isdisjoint(_WORD.findall(before)[-3:])


# Words after a grant, in its clause, that take it back or make it conditional ("Personal and
# commercial use is prohibited", "Commercial use allowed? No", "Free for commercial use after
# purchasing a license"): such a grant is not masked, so its commerce word withholds.
_GRANT_UNDONE = re.compile(
    r"\b(?:no|not|nein|non|nicht|nie|never|nobody|none|nothing|kein\w*|prohibited|forbidden|banned|excluded"
    r"|restricted|verboten|untersagt|interdit\w*|vietat\w*|prohibid\w*|proibid\w*"
    r"|only|solely|exclusively|nur|seulement|uniquement|solo|sólo|apenas|alleen|if|when"
    r"|after|before|once|upon|unless|requires?|required|requiring|needs?"
    r"|needed|fee|fees|paid|pay|paying|payment|purchas\w*|buy\w*|bought|price|cost|charge"
    r"|royalt\w*|subscri\w*|members?|registered|contact|ask|permission|consent|approval"
    r"|written|agreement|except|excluding|but|gegen|gebühr\w*|kostenpflichtig|payant\w*"
    r"|pago|pagamento|pagando|sauf|salvo|tranne|exceto|не|нет|только|лишь|нельзя|запрещ\w*"
    r"|если|после|платн\w*|кроме)\b"
    r"|\b(?:a|an|paid|separate|extended|commercial|own) licen[cs]e\b|[?✗✘❌]"
    r"|[不非禁没沒無无需仅僅只除但]|불|금지|않|없|유료|허가|조건|만"
)
_GRANT_CLAUSE_END = re.compile(r"[.;!。；！]")
# ... or, before it in its clause, that limit who or when ("Only members may use it for
# commercial purposes", "If you pay, commercial use is allowed")
_GRANT_LIMITED = re.compile(
    r"\b(?:only|solely|exclusively|nur|seulement|solo|sólo|if|once|after|unless|members?"
    r"|subscribers?|customers?|clients?|nobody|no one|none|nur|только|лишь|если)\b"
)
# ... but not these, which say the grant needs nothing ("even for commercial purposes, all
# without asking permission", "no attribution required")
_GRANT_NEUTRAL = re.compile(
    r"\b(?:without|no need to) (?:\w+ ){0,2}(?:permission|consent|attribution|credit)"
    r"|\bno (?:attribution|credit|sign up|registration|login)(?: is)?(?: required| needed)?"
)


def _mask_grants(text: str) -> tuple[str, list[tuple[int, int]]]:
    """`text` with each phrase granting commercial use blanked out, same length: not negated,
    and nothing in the rest of its clause taking it back; and the spans of the grants that
    are negated or taken back ("You can use it commercially? No"), which withhold it.
    Overlapping grants ("free for commercial and personal use") are masked as one."""
    out, last = [], 0
    undone: list[tuple[int, int]] = []
    pos = 0
    while m := _GRANTS_COMMERCIAL.search(text, pos):
        start, end = m.start(), m.end()
        # a longer grant starting inside this one ("commercial and personal") joins it
        k = start + 1
        while k < end:
            if (n := _GRANTS_COMMERCIAL.match(text, k)) and n.end() > end:
                end = n.end()
            k = text.find(" ", k, end) + 1 or end
        pos = max(end, start + 1)
        stop = _GRANT_CLAUSE_END.search(text, end, end + 120)
        rest = text[end : stop.start() if stop else end + 120]
        # and its clause before it ("Only members may use it for commercial purposes")
        before = _GRANT_CLAUSE_END.split(text[max(0, start - 60) : start])[-1]
        if (
            not _negated(text, start)
            and not _GRANT_UNDONE.search(_GRANT_NEUTRAL.sub(" ", rest))
            and not _GRANT_LIMITED.search(before)
        ):
            out += [text[last:start], " " * (end - start)]
            last = end
        else:
            undone.append((start, end))
    return "".join(out) + text[last:], undone


def _commerce_spans(text: str) -> list[tuple[int, int]]:
    """Commerce words in a use context (see `_COMMERCE`) in masked text."""
    spans = []
    for m in _COMMERCE.finditer(text):
        after = text[m.end() : m.end() + 60]
        if (
            m.group(1)
            or after.lstrip()[:1] == ":"
            or _ANSWERED_NO.match(after)
            or _USE_BEFORE.search(text, max(0, m.start() - 40), m.start())
            or text[m.start() - 1 : m.start()].isalpha()  # glued: "notforcommercialuse"
            or any(w in _USE_WORDS or w.startswith(_USE_PREFIXES) for w in _WORD.findall(after)[:3])
            or _negated(text, m.start())
        ):
            spans.append(m.span())
    return spans


def _withheld_spans(text: str) -> dict[str, list[tuple[int, int]]]:
    """Where `text` (lower-cased, hyphens as spaces) withholds each use in words."""
    masked, undone = _mask_grants(text)
    out = {use: [m.span() for m in rx.finditer(masked)] for use, (rx, _) in _WITHHELD_USES.items()}
    out["commercial"] += _commerce_spans(masked) + undone
    return out


def _withholds(text: str) -> set[str]:
    """`WITHHELD` hints for the uses `text` (whitespace collapsed) withholds in words:
    commercial use, derivatives, any use (reproduction, redistribution, use without
    permission)."""
    return {WITHHELD + use for use, spans in _withheld_spans(text).items() if spans}


_ONE_TO_ONE = str.maketrans({c: " " for c in "-_/\u2010\u2011\u2012\u2013\u2014\u2015\u2212"})


def restriction_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every phrase in `text` withholding a use (the words `read` turns into
    `WITHHELD` hints), on `text`'s own offsets: for ingest, to keep such words in the
    snippet it records."""
    if len(text) > MAX_EVIDENCE:
        text = text[:MAX_EVIDENCE]
    # read as `read` does (NFKC, format characters dropped, lower case), keeping where each
    # character read came from; most alt texts are ASCII: one character read per character
    where: Sequence[int] = range(len(text) + 1)
    if text.isascii():
        low = text.lower()
    else:
        chars: list[str] = []
        at: list[int] = []
        for i, c in enumerate(text):
            if c > "\x7f":
                if unicodedata.category(c) == "Cf":
                    continue
                n = unicodedata.normalize("NFKC", c)
                c = n if len(n) == 1 else c
            chars.append(c if len(c.lower()) != 1 else c.lower())
            at.append(i)
        where, low = [*at, len(text)], "".join(chars)
    spans = (
        span for spans in _withheld_spans(low.translate(_ONE_TO_ONE)).values() for span in spans
    )
    return sorted((where[a], where[b - 1] + 1) for a, b in spans if b > a)


def _grants(info: LicenseInfo, hint: str) -> bool:
    """Whether `info` grants the use a `WITHHELD` hint withholds."""
    return bool(getattr(info, _WITHHELD_USES[hint[len(WITHHELD) :]][1]))


def analyse(evidence: str) -> tuple[LicenseInfo | None, str | None]:
    """(licence, None), or (None, "license_unknown" | "license_conflict") for one string."""
    return resolve(*read(evidence))


def normalize(evidence: str) -> LicenseInfo | None:
    """The one licence this evidence names, or None when unknown or contradictory."""
    return analyse(evidence)[0]


def explain(evidence: str) -> dict[str, Any]:
    """What `ccurate licenses explain` prints: id, permissions, reason under the default policy."""
    from ccurate.filters.license_filter import LicenseConfig, policy_reason

    info, problem = analyse(evidence)
    reason = problem if info is None else policy_reason(info, LicenseConfig.model_validate({}))
    return {
        "evidence": evidence,
        "license": info.spdx if info else None,
        "reason": reason,
        "commercial": info.commercial if info else None,
        "derivatives": info.derivatives if info else None,
        "attribution": info.attribution if info else None,
    }


def all_licenses() -> list[LicenseInfo]:
    """Every licence this module can emit (for tests and documentation)."""
    out: list[LicenseInfo] = [CC0, PDM, PDDC, ARR, PD, US_GOV, NKCR]
    for elems in _FAMILIES:
        for v in _VERSIONS:
            for port in (None, *sorted(_PORTS)):
                info = cc_license(elems, v, port)
                if info is not None:
                    out.append(info)
    return out
