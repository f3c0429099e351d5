"""Images, alt text, licence evidence and opt-outs from one HTML page.

Why this module exists: a web page is the only place that says *which* licence
applies to *which* image. We record every piece of evidence raw and with its
scope (image < container < page), most specific first, and leave
normalisation and policy to the licence filter. A page licence (e.g.
Wikipedia's CC BY-SA for its text) is page-scoped evidence, never the image's
own licence.

Parser: selectolax's lexbor backend (measured in `bench/html_parsers.py`).
`extract_images` never raises: a page that cannot be parsed comes back with
no images and `error` set, so callers record a `page_error` and go on.

Attribution decisions (documented here because the shard writer relies on them):
- `Sample.author` comes only from markup tied to the image: ccREL
  `cc:attributionName`, `rel="author"` / `dc:creator` / `itemprop=author` in
  its container, or a figcaption credit line ("Photo by X", "Credit: X", or "by" right
  before a link: "Sunset, by <a>Jane Doe</a>", Flickr/Unsplash/Pixabay style; the link's
  text is the name). A container without a caption is searched for the linked form only,
  and only when it holds one image. A figcaption that is only a person's name ("Kofi
  Mensah", `_person_name`) is the author when nothing else names one, and never the title.
- `<meta name="author">` names the page's author, not the photographer, so it
  goes to `sample.extra["page_author"]`, never to `Sample.author`; so does, without one,
  a `cc:attributionName` no image container owns (the CC licence chooser's "by Jane Doe").
- Creative Commons licence badges (`_Page.is_badge`) are emitted like any image (the size
  filters drop icons) but take no container's licence, author or title.
- `Sample.title`: img `title`, else ccREL `dct:title` / figcaption of its
  container (without its licence links' words), else the page `<title>`.
"""

from __future__ import annotations

import codecs
import contextvars
import math
import re
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit, urlunsplit

from resiliparse.parse.encoding import bytes_to_str, detect_encoding, map_encoding_to_html5
from selectolax.lexbor import LexborHTMLParser, LexborNode

from ccurate.filters.licenses import MIXED_RIGHTS, notice_apart, restriction_spans
from ccurate.record import LicenseEvidence, Sample, make_key

REASONS: dict[str, str] = {
    "optout_meta_robots": "page has <meta name=robots|<ua>> with noai/noimageai",
    "optout_tdmrep": "page reserves TDM rights (<meta name=tdm-reservation content=1>)",
}

EVIDENCE_KINDS: dict[str, str] = {
    "rel_license": "<a|area rel=license href> (XHTML/HTML5 licence link)",
    "link_rel_license": "<link rel=license href> in the document head",
    "cc_link": "a link to creativecommons.org/licenses|publicdomain without rel=license",
    "ccrel": "ccREL/RDFa licence (rel|property cc:license/dct:license) tied to the image or its "
    "about= block",
    "schema_license": "schema.org microdata itemprop=license (e.g. Google's ImageObject licence)",
    "meta_license": "<meta name=license|dcterms.license|dc.rights-like content> in the head",
    "text": "a textual rights mark (All rights reserved, ©, Copyright 2020) or words withholding "
    "a use (not for commercial use) near the image or in the footer, with context; a "
    "container's caption whole when it has a licence link, a mark or such words; "
    "`ccurate:mixed-rights` for a container of several images whose licence and rights notice "
    "stand apart, or whose words give parts of the caption to some images (left/right/...)",
}

# keys of `PageExtract.skipped`
SKIPS: dict[str, str] = {
    "empty_src": "<img> with no usable src/srcset/lazy-load attribute",
    "data_uri": "<img> whose only candidates are data: URIs",
    "bad_url": "<img> URL that is not http(s) after resolution, or over MAX_URL_LEN",
    "duplicate_in_page": "the same image URL again on the same page (the first one is kept)",
}

LAZY_SRC_ATTRS = ("data-src", "data-lazy-src", "data-original")
SRCSET_ATTRS = ("srcset", "data-srcset", "data-lazy-srcset")
MAX_URL_LEN = 8192
MAX_TEXT = 2000  # alt/title/author longer than this are cut (giant attributes on junk pages)
MAX_SNIPPET = 200  # one rights mark or restriction with its context
MAX_CAPTION = 1000  # a caption recorded whole; also the most a snippet of several marks keeps
# characters of page text the licence reader may scan per page (~3 us each): a real page
# of thousands of captioned images scans well under 1M; a hostile one (a chain of nested
# figures, each reading the text of all inside it) would scan without end: its page fails
PAGE_TEXT_BUDGET = 2_000_000
_SCAN_LEFT: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "ccurate_html_scan_left", default=None
)


class PageTooHeavy(Exception):
    """More licence-relevant text than `PAGE_TEXT_BUDGET`: the page is an error, not read."""


def _spend(n: int) -> None:
    left = _SCAN_LEFT.get()
    if left is not None:
        left[0] -= n
        if left[0] < 0:
            raise PageTooHeavy(f"over {PAGE_TEXT_BUDGET:,} characters of text to read")


MAX_CONTAINER_DEPTH = 8
# distinct licence values kept per container and per page: each one is copied into every
# sample of the page, so a page of N images and N licence links would cost N x N
MAX_EVIDENCE = 100
# a nested footer's text as its enclosing footer reads it: head and tail, enough for every
# snippet window that crosses into it (a footer whose own text has a mark never gets there)
_FOOTER_KEEP = 1000
# footer matches nested deeper than this below another are not read as footers (a site's
# footer nests a few; 4,000 nested `<div class=footer>` would be read 4,000 times)
_FOOTER_NESTING = 8
# elements that do not break a word: their text joins the text around them as written
# ("Photo by <span>Li Wei</span>, ..." reads "Photo by Li Wei, ..."); any other element,
# <br> and <img> included, separates words as a browser lays them out
_INLINE = frozenset({
    "a", "abbr", "acronym", "b", "bdi", "bdo", "big", "cite", "code", "data", "del", "dfn", "em",
    "font", "i", "ins", "kbd", "label", "mark", "nobr", "q", "rp", "rt", "ruby", "s", "samp",
    "small", "span", "strike", "strong", "sub", "sup", "time", "tt", "u", "var", "wbr",
})  # fmt: skip
_CONTAINER_CLASSES = {"wp-caption", "thumbinner", "gallerybox", "gallery-item", "wp-block-image"}
_WS = re.compile(r"\s+")
_RIGHTS = re.compile(
    r"all\s+rights\s+reserved|alle\s+rechte\s+vorbehalten|tous\s+droits\s+r[ée]serv[ée]s"
    r"|todos\s+los\s+derechos\s+reservados|tutti\s+i\s+diritti\s+riservati"
    r"|todos\s+os\s+direitos\s+reservados|alle\s+rechten\s+voorbehouden"
    r"|все\s+права\s+защищены|版权所有|版權所有|無断転載|©|&copy;"
    r"|\(c\)\s*(?:19|20)\d\d|\bcopyright\s*(?:©|\(c\)|(?:19|20)\d\d)",
    re.IGNORECASE,
)
# A footer's licence statement without a rights mark ("Text is available under the Creative
# Commons Attribution-ShareAlike License"): its words say what the licence covers, which the
# licence link beside it does not.
_FOOTER_LICENCE = re.compile(r"creative\s+commons|\bcc[\s-]+(?:by|0|zero)\b", re.IGNORECASE)
_CREDIT = re.compile(
    r"(?:photo(?:graph)?|image|picture|foto|illustration|credit)s?\s*(?:credit)?\s*(?:by|:)\s*"
    r"([^|;\n(),]{1,120})",
    re.IGNORECASE,
)
# "by" right before a link (`Photo by <a>Jane</a>`): a word of its own (not "Standby", not
# "/by/" in a URL, not "CC-BY"); the word before it is checked by `_credit_by`
_BY_TAIL = re.compile(r"(?<![\w/.@#=&?%+-])by\s*:?\s*$", re.IGNORECASE)
_PREV_WORD = re.compile(r"([^\W\d_]+)[^\S\n]*$")
# "X by" phrases that do not name the image's creator: site software and hosts ("Powered by
# WordPress"), licences ("CC BY"), verbs that credit someone else ("built by", "owned by",
# any "-ed"/"-ing" word: "designed by <a>Gustave Eiffel</a>", "surrounded by <a>hills</a>")
# and works shown in the image that are not it ("Statue by <a>Rodin</a>", "Novel by ...")
_NOT_CREDIT_WORDS = frozenset({
    "powered", "hosted", "sponsored", "supported", "cc", "you", "us", "licensed", "licenced",
    "built", "led", "run", "held", "won", "bought", "sold", "brought", "caught", "sent", "found",
    "kept", "told", "taught", "owned", "written", "known", "seen", "given", "made", "done",
    "stolen", "statue", "sculpture", "monument", "building", "bridge", "tower", "church", "book",
    "novel", "poem", "song", "album", "film", "movie", "opera", "play", "game", "logo",
    # the people of a story who did not make its pictures ("Words by", "Styling by")
    "text", "words", "story", "article", "interview", "report", "reporting", "editing",
    "edit", "styling", "style", "makeup", "hair", "design", "recipe", "translation",
})  # fmt: skip
# words before "by" that say the credit is the image's
_PHOTO_WORDS = frozenset(
    ["photo", "photos", "photograph", "photography", "image", "images", "picture", "pic", "shot"]
)
# "-ed" / irregular verbs that do name the image's maker
_IMAGE_VERBS = frozenset(
    ["photographed", "painted", "illustrated", "captured", "sketched", "engraved", "rendered"]
)
# credit text that names nobody: a URL, a licence ("CC BY-SA 4.0"), "here", only digits
_NOT_A_NAME = re.compile(
    r"^(?:\S*://|www\.|cc\b|creative\s*commons|public\s+domain|licen[cs]e"
    r"|(?:click\s+)?here$|this(?:\s+link)?$|[\W\d_]*$)",
    re.IGNORECASE,
)
_CC_HOST = re.compile(r"^(?:[a-z0-9-]+\.)*creativecommons\.org$", re.IGNORECASE)
_CC_PATH = re.compile(r"^/(?:licenses|licences|publicdomain)/", re.IGNORECASE)
_OPTOUT_TOKENS = {"noai", "noimageai"}
_META_LICENSE_NAMES = {"license", "dcterms.license", "dc.license", "dct.license"}
_META_RIGHTS_NAMES = {"copyright", "rights", "dc.rights", "dcterms.rights", "dct.rights"}
_FOOTER_SEL = (
    "footer, [role=contentinfo], [id*=footer], [class*=footer], [id*=copyright], [class*=copyright]"
)


@dataclass
class PageExtract:
    """What one page yields: its images (kept; see `samples()`) plus page-level facts.

    `optout` is the page's opt-out reason or None (meta robots ranks before a TDM
    reservation); `optouts` every one the page declares, for a caller that honours
    only some. Images are returned kept so the caller decides (`samples()` applies
    the drop). `skipped` counts `<img>` elements that produced no sample, by the
    reasons in `SKIPS`. The items of `page_license_evidence` are shared by every
    image's `license_evidence` list (each image has its own list): edit a list, never
    an item in place.
    """

    images: list[Sample]
    optout: str | None = None
    optouts: set[str] = field(default_factory=set)
    page_license_evidence: list[LicenseEvidence] = field(default_factory=list)
    title: str | None = None
    n_img: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    error: str | None = None

    def repeat(self, first: Sample) -> None:
        """The same image URL again on the page: nothing of the repeat is merged into the
        first; the repeat is counted, and noted on the first."""
        self.skipped["duplicate_in_page"] += 1
        first.extra["repeats_in_page"] = int(first.extra.get("repeats_in_page", 0)) + 1

    def samples(self, by: str = "ingest") -> list[Sample]:
        """The images, each dropped with the page's opt-out reason when it has one."""
        if self.optout:
            for s in self.images:
                s.drop(self.optout, by)
        return self.images


# --------------------------------------------------------------------------- helpers
def clean_text(value: str | None, limit: int = MAX_TEXT) -> str | None:
    """Collapse whitespace; None stays None, an empty attribute stays ''."""
    if value is None:
        return None
    return _WS.sub(" ", value).strip()[:limit]


def norm_url(raw: str | None, base: str) -> str | None:
    """Absolute http(s) URL without fragment, or None. Never raises."""
    if not raw:
        return None
    raw = raw.strip().replace("\t", "").replace("\n", "").replace("\r", "")
    if not raw or len(raw) > MAX_URL_LEN:
        return None
    if "\\" in raw:  # browsers read "\" as "/" before the query in http(s) URLs (WHATWG)
        cut = min((i for i in (raw.find("?"), raw.find("#")) if i >= 0), default=len(raw))
        raw = raw[:cut].replace("\\", "/") + raw[cut:]
    try:
        absu = urljoin(base, raw) if base else raw
        parts = urlsplit(absu)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    if parts.fragment:
        absu = urlunsplit(parts._replace(fragment=""))
    return absu


def abs_or_raw(raw: str, base: str) -> str:
    """Evidence values: absolute when they resolve, else the raw string (faithful)."""
    return norm_url(raw, base) or raw.strip()


def parse_srcset(value: str | None) -> list[tuple[str, float, str]]:
    """`srcset` -> [(url, size, "w"|"x")], following the HTML spec's tokeniser.

    URLs may contain commas (CDN transforms like `c_fill,w_100`): a URL is a run
    of non-space characters and only trailing commas end it.
    """
    out: list[tuple[str, float, str]] = []
    if not value:
        return out
    s, i, n = value, 0, len(value)
    while i < n:
        while i < n and (s[i].isspace() or s[i] == ","):
            i += 1
        if i >= n:
            break
        j = i
        while j < n and not s[j].isspace():
            j += 1
        url = s[i:j]
        i = j
        desc = ""
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            depth = 0
            k = i
            while k < n and (s[k] != "," or depth > 0):
                if s[k] == "(":
                    depth += 1
                elif s[k] == ")":
                    depth = max(0, depth - 1)
                k += 1
            desc = s[i:k].strip()
            i = k + 1
        size, unit = 1.0, "x"
        for tok in desc.split():
            try:
                if tok[-1:] in ("w", "x", "W", "X"):
                    v = float(tok[:-1])
                    if math.isfinite(v) and v >= 0:  # 'nanw' / 'infw' / '-5w' would mis-rank
                        size, unit = v, tok[-1].lower()
            except ValueError:
                continue
        out.append((url, size, unit))
    return out


def _srcset_ranked(candidates: list[tuple[str, float, str]]) -> list[str]:
    """Largest first: width descriptors beat density ones when both are present."""
    usable = [c for c in candidates if not c[0].lower().startswith("data:")]
    w = [c for c in usable if c[2] == "w"]
    pool = w or usable
    ranked = sorted(enumerate(pool), key=lambda ic: (-ic[1][1], ic[0]))
    return [c[0] for _, c in ranked]


def _tokens(value: str | None) -> list[str]:
    return (value or "").lower().split()


def is_license_rel(value: str | None) -> bool:
    """`license`, `cc:license`, `dct:license`, ... in a rel/property list."""
    return any(t == "license" or t.endswith(":license") for t in _tokens(value))


def is_cc_url(url: str) -> bool:
    """A creativecommons.org licence or public-domain tool URL (deeds included)."""
    if "creativecommons" not in url.lower():
        return False
    try:
        p = urlsplit(url.strip())
    except ValueError:
        return False
    host = (p.hostname or "").lower()
    return bool(_CC_HOST.match(host)) and bool(_CC_PATH.match(p.path or ""))


def _window(text: str, a: int, b: int) -> tuple[int, int]:
    """A mark at text[a:b] with a little context, cut at spaces."""
    start, end = max(0, a - 60), min(len(text), b + 100)
    if start > 0:
        sp = text.find(" ", start)
        start = sp + 1 if 0 <= sp < a else start
    if end < len(text):
        sp = text.rfind(" ", b, end)
        end = sp if sp > b else end
    return start, min(end, start + MAX_SNIPPET)


def rights_snippet(text: str, pattern: re.Pattern[str] = _RIGHTS) -> str | None:
    """Every rights mark (`pattern`) and every phrase withholding a use ("not for commercial
    use", `licenses.restriction_spans`) with a little context, joined by " ... " (a clause
    break to the licence reader), at most `MAX_CAPTION` characters with the restrictions
    kept first; None when the text has neither."""
    _spend(min(len(text), 20_000))
    marks = [m.span() for m in pattern.finditer(text[:20_000])]
    spans = restriction_spans(text[:20_000]) + marks[:100]
    if not spans:
        return None
    chosen: list[tuple[int, int]] = []
    for a, b in spans:  # restrictions first: they must survive the bound
        start, end = _window(text, a, b)
        if any(s <= a and b <= e for s, e in chosen):
            continue
        if sum(e - s + 5 for s, e in chosen) + end - start > MAX_CAPTION:
            continue
        chosen.append((start, end))
    chosen.sort()
    merged: list[tuple[int, int]] = []
    for start, end in chosen:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return " ... ".join(text[s:e].strip() for s, e in merged)[:MAX_CAPTION] or None


_FOOTER_MARKS = re.compile(f"{_RIGHTS.pattern}|{_FOOTER_LICENCE.pattern}", re.IGNORECASE)


def _footer_snippet(text: str) -> str | None:
    return rights_snippet(text, _FOOTER_MARKS)


def _caption_text(node: LexborNode) -> str:
    """A caption's text as laid out (`_walk_text`: "com<span>mercial</span>" reads
    "commercial"), with the URL of each CC licence link before the link's text ("Photo ©
    Jane Doe, <a href=…/by/4.0/>licence</a>" reads "… https://…/by/4.0/ licence"): the
    licence reader tells a licensor's own notice ("Photo © X" with the licence in the same
    clause) from a notice apart from the licence by the words of one clause."""
    lead = {
        n.mem_id: f" {href.strip()} "
        for n in node.css("a, area")
        if is_cc_url(href := n.attributes.get("href") or "")
    }
    text = lead.get(node.mem_id, "") + _walk_text(node, lead=lead)  # `css` matches `node` too
    return _WS.sub(" ", text).strip()


def _walk_text(
    root: LexborNode,
    known: dict[int, str] | None = None,
    met: list[int] | None = None,
    lead: dict[int, str] | None = None,
) -> str:
    """The text under `root` as laid out: inline elements join their neighbours, others
    separate words. `known` maps nodes (`mem_id`) whose text is already read to that text,
    so nested footers are not read again; `met` collects those met; `lead` maps elements
    to words read before their text (a loop, not recursion: pages nest deeply)."""
    parts: list[str] = []
    stop = root.mem_id
    node: LexborNode | None = root.child
    while node is not None:
        tag = node.tag or ""
        descend = False
        if tag == "-text":
            parts.append(node.text_content or "")
        elif tag[:1] not in ("-", "_"):  # an element (comments and doctypes say nothing)
            sep = "" if tag in _INLINE else " "
            parts.append(sep)
            if lead is not None and node.mem_id in lead:
                parts.append(lead[node.mem_id])
            done = known.get(node.mem_id) if known is not None else None
            if done is not None:
                parts.append(done + sep)
                if met is not None:
                    met.append(node.mem_id)
            elif node.child is not None:
                descend = True
            else:
                parts.append(sep)
        if descend:
            node = node.child
            continue
        while node is not None:  # the next sibling, closing each element left on the way
            nxt = node.next
            if nxt is not None:
                node = nxt
                break
            node = node.parent
            if node is None or node.mem_id == stop:
                node = None
            elif (node.tag or "") not in _INLINE:
                parts.append(" ")
    return "".join(parts)


def _text(node: LexborNode) -> str:
    return _WS.sub(" ", _walk_text(node)).strip()


def _decode(html: bytes, encoding: str | None) -> str:
    """BOM, then the declared (HTTP) charset, then <meta charset>, then uchardet."""
    enc = None
    if html.startswith(codecs.BOM_UTF8):
        enc = "utf-8"
    elif html.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        enc = "utf-16"
    else:
        if encoding:
            # WHATWG label mapping (gb2312 -> gbk, latin1 -> cp1252); unknown labels -> None
            enc = map_encoding_to_html5(encoding.strip().strip("\"'"), fallback_utf8=False)
        if enc is None:
            enc = detect_encoding(html, from_html_meta=True) or "utf-8"
        if enc.startswith("utf-16") and b"\x00" not in html[:1024]:
            # markup in UTF-16 has a NUL in every ASCII character: a page whose header or
            # <meta> says UTF-16 but reads as ASCII is not UTF-16 (WHATWG: use UTF-8)
            enc = "utf-8"
    try:
        return bytes_to_str(html, enc)
    except (LookupError, UnicodeError, TypeError):
        return html.decode("utf-8", "replace")


def meta_optout(name: str, content: str, user_agent_token: str = "ccurate") -> str | None:
    """Opt-out reason carried by one `<meta name content>` pair, or None."""
    name = name.strip().lower()
    if name in ("robots", user_agent_token.strip().lower()):
        toks = {t.strip() for t in re.split(r"[,\s]+", content.lower())}
        if toks & _OPTOUT_TOKENS:
            return "optout_meta_robots"
    if name == "tdm-reservation" and content.strip() == "1":
        return "optout_tdmrep"
    return None


# --------------------------------------------------------------------------- extraction
_CONTAINER_TYPES = re.compile(
    r"stillimage|imageobject|photograph|visualartwork|mediaobject|cc:work|foaf:image", re.I
)
# `typeof` values that say the block's (new) subject is an image, not any work (`cc:Work`
# types a blog post as well as a photo)
_IMAGE_TYPES = re.compile(
    r"stillimage|imageobject|photograph|visualartwork|mediaobject|foaf:image", re.I
)
# hosts that serve Creative Commons licence badges (the chooser's icons, the 88x31 buttons)
_BADGE_HOSTS = re.compile(
    r"^(?:i|mirrors)\.creativecommons\.org$|^(?:[a-z0-9-]+\.)*licensebuttons\.net$", re.I
)
_AUTHOR_TOKENS = {"author", "creator", "dc:creator", "dct:creator", "dcterms:creator"}
_TITLE_TOKENS = {"dc:title", "dct:title", "dcterms:title"}


def _document_title(tree: LexborHTMLParser) -> LexborNode | None:
    """The first HTML `<title>`: an inline SVG icon's `<title>` is not the page's."""
    for node in tree.css("title"):
        cur = node.parent
        while cur is not None and cur.tag not in ("svg", "math"):
            cur = cur.parent
        if cur is None:
            return node
    return None


def _ancestors(node: LexborNode, depth: int = MAX_CONTAINER_DEPTH) -> list[LexborNode]:
    out: list[LexborNode] = []
    cur = node.parent
    while cur is not None and len(out) < depth and cur.tag not in ("body", "html", "-document"):
        out.append(cur)
        cur = cur.parent
    return out


class PageFacts:
    """Page-level facts both page readers gather (the HTML parser here, WAT metadata in
    `ingest.wat`): opt-outs, the page author, and page licence evidence without repeats."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.optout: str | None = None
        self.optouts: set[str] = set()
        self.page_author: str | None = None
        self.evidence: list[LicenseEvidence] = []
        self._seen: set[tuple[str, str]] = set()
        self._overflow = False  # more than MAX_EVIDENCE distinct values: MIXED_RIGHTS added

    def add(self, ev: LicenseEvidence) -> None:
        if not ev.value or (ev.kind, ev.value) in self._seen:
            return
        if len(self._seen) < MAX_EVIDENCE:
            self._seen.add((ev.kind, ev.value))
            self.evidence.append(ev)
        elif not self._overflow:  # what is left out may be the restriction: fail closed
            self._overflow = True
            self.evidence.append(LicenseEvidence(ev.scope, "text", MIXED_RIGHTS))

    def read_meta(self, name: str, content: str, ua_token: str) -> None:
        """One `<meta name content>`: an opt-out, the author, a licence or a rights notice."""
        name = name.strip().lower()
        reason = meta_optout(name, content, ua_token)
        if reason:
            self.optouts.add(reason)
        if reason and self.optout != "optout_meta_robots":
            self.optout = reason  # both drop; robots is the more explicit signal
        if name == "author" and content.strip() and self.page_author is None:
            self.page_author = clean_text(content)
        elif name in _META_LICENSE_NAMES and content.strip():
            self.add(LicenseEvidence("page", "meta_license", abs_or_raw(content, self.base)))
        elif name in _META_RIGHTS_NAMES and content.strip():
            self.add(LicenseEvidence("page", "text", clean_text(content, MAX_SNIPPET) or ""))


class _ImgIndex:
    """Where each image URL sits in the page, to answer "does this `about` block hold an
    image named X" by position (an `about` block around N images asked for each of them
    would cost N x N)."""

    def __init__(self, tree: LexborHTMLParser, base: str, page: _Page) -> None:
        self.pos: dict[int, int] = {}
        self.by_url: dict[str, list[int]] = {}
        self._end: dict[int, int] = {}
        # content images in page order: (position, URL); licence badges left out
        self.content: list[tuple[int, str]] = []
        root = tree.root
        nodes = root.traverse(include_text=True) if root is not None else iter(())
        for i, node in enumerate(nodes):
            self.pos[node.mem_id] = i
            if node.tag == "img":
                urls = [u for c in _image_candidates(node) if (u := norm_url(c, base))]
                for u in set(urls):
                    self.by_url.setdefault(u, []).append(i)
                if urls and not page.is_badge(node):
                    self.content.append((i, urls[0]))
        self._content_pos = [i for i, _ in self.content]
        self.size = len(self.pos)

    def end(self, node: LexborNode) -> int:
        """The position just past `node`'s subtree: its next sibling's, else its parent's end."""
        chain: list[int] = []
        cur: LexborNode | None = node
        end = self.size
        while cur is not None:
            hit = self._end.get(cur.mem_id)
            if hit is not None:
                end = hit
                break
            chain.append(cur.mem_id)
            nxt = cur.next
            if nxt is not None and nxt.mem_id in self.pos:
                end = self.pos[nxt.mem_id]
                break
            cur = cur.parent
        for mid in chain:
            self._end[mid] = end
        return end

    def holds(self, node: LexborNode, url: str) -> bool:
        """Whether an image with candidate `url` is inside `node`."""
        start = self.pos.get(node.mem_id)
        at = self.by_url.get(url)
        if start is None or not at:
            return False
        i = bisect_right(at, start)
        return i < len(at) and at[i] < self.end(node)

    def one_image(self, node: LexborNode) -> bool:
        """Whether `node` holds exactly one content image (one URL: a lazy-load `<img>`
        and its `<noscript>` copy are one image; licence badges do not count). A block
        of many `<img>` is answered after a few of them."""
        start = self.pos.get(node.mem_id)
        if start is None:
            return False
        end = self.end(node)
        i = bisect_right(self._content_pos, start)
        urls: set[str] = set()
        for pos, url in self.content[i : i + 64]:
            if pos >= end:
                return len(urls) == 1
            urls.add(url)
            if len(urls) > 1:
                return False
        if i + 64 < len(self.content) and self.content[i + 64][0] < end:
            return False  # over 64 images of one URL: a page-wide block
        return len(urls) == 1


class _Page(PageFacts):
    """One parsed page: page-level facts and who owns each licence node, computed once.

    A *container* is an element that ties markup to the images inside it: a
    `<figure>`, a WordPress/MediaWiki caption box, an RDFa block whose subject is
    an image inside it (`about`/`resource` naming it, or, without either, an image
    `typeof` such as StillImage around one image) or a schema.org
    ImageObject/Photograph `itemscope`. RDFa blocks whose subject is the document
    (`about=""`, `about` naming the page, or no `about` at all: `xmlns:cc` alone,
    `typeof="cc:Work"`, a block of several images) are deliberately not containers,
    nor are page-wide wrappers (an `itemscope` WebPage, Drupal's `about="/node/1"`):
    their licence links are page evidence, as RDFa says (a page licence recorded at
    image level would pass an image-level-only policy). A licence node belongs to its
    nearest container that a content image reaches (`MAX_CONTAINER_DEPTH` levels up
    from the image; licence badges reach none, `is_badge`); nodes with no owner are
    page evidence.
    """

    def __init__(self, tree: LexborHTMLParser, page_url: str, ua_token: str) -> None:
        self.tree = tree
        self.page_url = page_url
        base_node = tree.css_first("base[href]")
        base_href = base_node.attributes.get("href") if base_node is not None else None
        super().__init__((norm_url(base_href, page_url) or page_url) if base_href else page_url)
        title_node = _document_title(tree)
        self.title = (clean_text(title_node.text()) or None) if title_node is not None else None
        # what an RDFa `about` naming the document resolves to: the page, its <base>, its
        # canonical URL (`_doc_key`: scheme, fragment and a trailing slash aside)
        canon = tree.css_first("head link[rel=canonical][href]")
        docs = [page_url, self.base, canon.attributes.get("href") if canon is not None else None]
        self._documents = {_doc_key(u) for d in docs if (u := norm_url(d, self.base))}
        self._badge: dict[int, bool] = {}
        self._is_box: dict[int, bool] = {}
        self._boxes: dict[int, _Box] = {}
        self._near: dict[int, _Near] = {}
        self._imgs_at: _ImgIndex | None = None
        # containers some content <img> looks up to (`containers_of(img)`): only these may
        # own a licence node, else a node owned by a container no image reaches is lost; a
        # licence badge reaches none (the chooser's `<p>` around its licence link and icons
        # would own the site's licence, lost to the page's images)
        self._reached: set[int] = {
            box.mem_id
            for img in tree.css("img")
            if not self.is_badge(img)
            for box in self.containers_of(img)
        }
        # container mem_id -> marked nodes it owns (licence links, attribution, titles)
        self.owned: dict[int, list[LexborNode]] = {}
        self._read_meta(ua_token)
        self._read_marked_nodes()
        self._read_footer()

    # ---- containers
    def is_container(self, node: LexborNode) -> bool:
        mid = node.mem_id
        hit = self._is_box.get(mid)
        if hit is None:
            hit = self._container_test(node)
            self._is_box[mid] = hit
        return hit

    def is_badge(self, img: LexborNode) -> bool:
        """A licence badge, not content: an icon served by Creative Commons or
        licensebuttons.net, or an image inside a licence link (`<a rel=license><img
        88x31></a>`). It gets no container's licence or author (CC's icons are not the
        blogger's work under the blogger's licence) and makes no block a container."""
        hit = self._badge.get(img.mem_id)
        if hit is None:
            url = next((u for c in _image_candidates(img) if (u := norm_url(c, self.base))), "")
            hit = bool(url) and bool(_BADGE_HOSTS.match(urlsplit(url).hostname or ""))
            if not hit:
                for a in _ancestors(img):
                    if a.tag in ("a", "area"):
                        la = a.attributes
                        hit = is_license_rel(la.get("rel")) or is_cc_url(la.get("href") or "")
                        break
            self._badge[img.mem_id] = hit
        return hit

    def _index(self) -> _ImgIndex:
        if self._imgs_at is None:
            self._imgs_at = _ImgIndex(self.tree, self.base, self)
        return self._imgs_at

    def names_document(self, subject: str) -> bool:
        """Whether an RDFa subject (`about`/`resource`) is the document: "" or the page's
        URL (after resolution against the page/<base>; `#fragment`s of it included: in
        doubt, the page)."""
        target = norm_url(subject, self.base) if subject.strip() else self.base
        return target is not None and _doc_key(target) in self._documents

    def names_image_in(self, box: LexborNode, url: str) -> bool:
        """Whether an image with candidate `url` is inside `box` (its RDFa subject)."""
        return self._index().holds(box, url)

    def foreign_subject(self, node: LexborNode) -> bool:
        """Whether the nearest RDFa subject over `node` (itself included) is a ccREL block
        about a resource other than the document (a credit for another work): its licence
        is that work's, never page evidence. A bare `about` (Drupal's page-wide node
        wrappers) stays the page's."""
        for a in [node, *_ancestors(node, depth=64)]:
            attrs = a.attributes
            subject = _rdfa_subject(attrs)
            if subject is not None:
                return _ccrel_marked(attrs) and not self.names_document(subject)
        return False

    def _container_test(self, node: LexborNode) -> bool:
        """Whether `node` ties its markup to the images inside it (see the class docstring).
        RDFa decides first: a block whose subject is the document licenses the page,
        whatever its tag."""
        attrs = node.attributes
        subject = _rdfa_subject(attrs)
        if subject is not None and self.names_document(subject):
            return False
        if node.tag == "figure":
            return True
        if "itemscope" in attrs and _CONTAINER_TYPES.search(attrs.get("itemtype") or ""):
            return True
        if set((attrs.get("class") or "").lower().split()) & _CONTAINER_CLASSES:
            return True
        if subject is not None:
            # the block's subject is another resource: a container when it is an image inside
            # it, or when a ccREL block about it holds one image (an embed: Flickr's `<div
            # xmlns:cc about="flickr.com/photos/...">` around its thumbnail); a page-wide
            # wrapper (Drupal's `about="/node/1"`) is not
            target = norm_url(subject, self.base)
            if target is not None and self.names_image_in(node, target):
                return True
            return _ccrel_marked(attrs) and self._index().one_image(node)
        if _IMAGE_TYPES.search(attrs.get("typeof") or ""):
            # a new subject typed as an image (RDFa: a blank node): the one image inside;
            # around several it is not known to be any one of them
            return self._index().one_image(node)
        # `xmlns:cc` alone or `typeof="cc:Work"` without `about`: the subject is the
        # document (inherited), or a work that may be the whole post: page evidence
        return False

    def containers_of(self, node: LexborNode, depth: int = MAX_CONTAINER_DEPTH) -> list[LexborNode]:
        return [a for a in _ancestors(node, depth) if self.is_container(a)]

    def _owner(self, node: LexborNode) -> LexborNode | None:
        for box in self.containers_of(node, depth=64):
            if box.mem_id in self._reached:
                return box
        return None

    # ---- page-level facts
    def _read_meta(self, ua_token: str) -> None:
        for m in self.tree.css("meta[name]"):
            self.read_meta(
                m.attributes.get("name") or "", m.attributes.get("content") or "", ua_token
            )

    def _read_marked_nodes(self) -> None:
        # head links here; a body `<link>` is a marked node below (a figure may own it)
        for node in self.tree.css("head link[rel][href]"):
            if is_license_rel(node.attributes.get("rel")):
                href = node.attributes.get("href") or ""
                self.add(LicenseEvidence("page", "link_rel_license", abs_or_raw(href, self.base)))
        marked = (
            "body [rel], body [property], body [itemprop], "
            "body a[href*=creativecommons i], body area[href*=creativecommons i]"
        )
        for node in self.tree.css(marked):
            if node.tag == "img":
                continue  # an img's own attributes are read with the image
            kind = _marked_kind(node)
            if kind is None:
                continue
            owner = self._owner(node)
            if owner is not None:
                self.owned.setdefault(owner.mem_id, []).append(node)
            elif self.foreign_subject(node):
                continue  # about another resource no content image here reaches: not the page's
            elif kind in ("rel_license", "cc_link", "schema_license", "ccrel"):
                self.add(LicenseEvidence("page", kind, abs_or_raw(_attr_value(node), self.base)))
            elif (
                kind == "attribution"
                and self.page_author is None
                and "cc:attributionname" in _tokens(node.attributes.get("property"))
            ):
                # the page licence's attribution (the CC chooser's "by <a
                # property=cc:attributionName>Jane Doe</a>"): the page's author, after
                # <meta name=author>; never an image's `Sample.author`
                self.page_author = _node_text(node)

    def _read_footer(self) -> None:
        """The innermost footer matches that carry a rights mark: a match around another is
        a wrapper ("no-footer-widgets" around the whole page), whose first mark may be an
        image caption's "© photographer" rather than the site's footer. Read innermost
        first, each node's text once: an enclosing match reads a nested one's text from
        `texts`, cut to its head and tail (nested footers would cost depth x text); a
        match with more than `_FOOTER_NESTING` levels of matches inside is not read."""
        nodes = [n for n in self.tree.css(_FOOTER_SEL) if n.tag not in ("html", "body")]
        texts: dict[int, str] = {}
        levels: dict[int, int] = {}  # matches nested inside, counted in levels
        outer: set[int] = set()  # within 64 levels above a match with a mark
        found: list[str] = []
        for node in reversed(nodes):  # descendants before their ancestors
            met: list[int] = []
            raw = _walk_text(node, texts, met)
            keep = len(raw) <= 2 * _FOOTER_KEEP + 1
            texts[node.mem_id] = raw if keep else f"{raw[:_FOOTER_KEEP]} {raw[-_FOOTER_KEEP:]}"
            levels[node.mem_id] = level = max((levels[m] + 1 for m in met), default=0)
            if node.mem_id in outer:  # its text holds the nested match's mark
                outer.update(a.mem_id for a in _ancestors(node, 64))
                continue
            if level > _FOOTER_NESTING:
                continue
            snip = _footer_snippet(_WS.sub(" ", raw).strip())
            if snip:
                found.append(snip)
                outer.update(a.mem_id for a in _ancestors(node, 64))
        for snip in reversed(found):  # in page order
            self.add(LicenseEvidence("page", "text", snip))
        if not nodes:
            # no footer element at all: the end of the body is where sites put "©"
            body = self.tree.body
            if body is not None:
                snip = rights_snippet(_text(body)[-1500:])
                if snip:
                    self.add(LicenseEvidence("page", "text", snip))


def _ccrel_marked(attrs: dict[str, str | None]) -> bool:
    """A block that declares the ccREL vocabulary or a ccREL/image type."""
    return "xmlns:cc" in attrs or bool(_CONTAINER_TYPES.search(attrs.get("typeof") or ""))


def _rdfa_subject(attrs: dict[str, str | None]) -> str | None:
    """The subject an element sets in RDFa: `about`, else `resource` when the element has
    no `rel`/`rev`/`property` (with one, `resource` is the object); None when it sets none
    (its statements are about its parent's subject, at the top the document)."""
    about = attrs.get("about")
    if about is not None:
        return about
    if not {"rel", "rev", "property"} & set(attrs):
        return attrs.get("resource")
    return None


def _doc_key(url: str) -> tuple[str, str, str]:
    """A URL as compared with the page's: host, path without a trailing slash, query
    (http/https and the fragment aside)."""
    p = urlsplit(url)
    return (p.netloc.lower(), p.path.rstrip("/") or "/", p.query)


def _marked_kind(node: LexborNode) -> str | None:
    """What a node says, if anything we record: a licence form or an attribution role."""
    a = node.attributes
    rel, prop, item = a.get("rel"), a.get("property"), a.get("itemprop")
    if is_license_rel(rel) or is_license_rel(prop):
        return "ccrel" if ":" in f"{rel or ''} {prop or ''}" else "rel_license"
    if "license" in _tokens(item):
        return "schema_license"
    if node.tag in ("a", "area") and is_cc_url(a.get("href") or ""):
        return "cc_link"
    toks = set(_tokens(rel)) | set(_tokens(prop)) | set(_tokens(item))
    if "cc:attributionname" in toks or "cc:attributionurl" in toks:
        return "attribution"
    if toks & _AUTHOR_TOKENS:
        return "author"
    if toks & _TITLE_TOKENS:
        return "title"
    return None


def _image_candidates(img: LexborNode) -> list[str]:
    """Candidate URLs of one <img>, best first (largest srcset entry, lazy attrs, src)."""
    attrs = img.attributes
    cands: list[tuple[str, float, str]] = []
    for a in SRCSET_ATTRS:
        cands.extend(parse_srcset(attrs.get(a)))
    parent = img.parent
    if not cands and parent is not None and parent.tag == "picture":
        for source in parent.css("source"):
            for a in SRCSET_ATTRS:
                cands.extend(parse_srcset(source.attributes.get(a)))
    ranked = _srcset_ranked(cands)
    for a in (*LAZY_SRC_ATTRS, "src"):
        v = (attrs.get(a) or "").strip()
        if v:
            ranked.append(v)
    if not ranked and any(c[0].lower().startswith("data:") for c in cands):
        ranked.append("data:")
    return ranked


def _attr_value(node: LexborNode) -> str:
    a = node.attributes
    return a.get("href") or a.get("resource") or a.get("content") or a.get("src") or ""


def _alt(img: LexborNode) -> str | None:
    """The alt text; a bare `alt` attribute (decorative image) is '' not None."""
    attrs = img.attributes
    if "alt" not in attrs:
        return None
    return clean_text(attrs.get("alt") or "")


def _node_text(node: LexborNode) -> str | None:
    return clean_text(node.attributes.get("content") or _text(node)) or None


def _credit_by(before: str, photo_only: bool = False) -> bool:
    """Whether text ends in a credit's "by" (`Photo by `, `Sunset, by `, `"Title" by `) and
    not in one that names someone else (`Powered by `, `CC BY `, `designed by `, `Words by
    `); `photo_only`: a bare "by" or a photo's credit (`Photo by `, `photographed by `)."""
    m = _BY_TAIL.search(before)
    if m is None:
        return False
    w = _PREV_WORD.search(before[: m.start()])
    if w is None:
        return True
    word = w.group(1).lower()
    if word in _IMAGE_VERBS or word in _PHOTO_WORDS:
        return True
    if photo_only:
        return False
    return word not in _NOT_CREDIT_WORDS and not word.endswith(("ed", "ing"))


def _linked_credit(node: LexborNode, photo_only: bool = False) -> str | None:
    """The text of the first link that follows a credit's "by" in `node` (`Photo by <a>Jane
    Doe</a> on <a>Unsplash</a>` -> "Jane Doe"): the plain markup most sites use for a
    photographer, which the text pattern reads badly ("Jane Doe on Unsplash") or not at all
    ("Sunset, by Jane"). Licence links and link texts that are no name (a URL, "here", "CC
    BY 4.0") are passed over."""
    tail = ""  # the text before the current node (its end: all a "by" test reads)
    for n in node.traverse(include_text=True):
        if n.tag == "-text":
            tail = (tail + (n.text(deep=False) or ""))[-200:]
            continue
        if n.tag != "a":
            continue
        if not _credit_by(_WS.sub(" ", tail), photo_only) or is_cc_url(
            n.attributes.get("href") or ""
        ):
            continue
        name = _credit_name(_text(n))
        if name is not None:
            return name
    return None


def _credit_name(text: str) -> str | None:
    """A credit's name, or None for text that names nobody (see `_NOT_A_NAME`)."""
    name = clean_text(text) or ""
    return name if 0 < len(name) <= 120 and not _NOT_A_NAME.search(name) else None


_LICENCE_KINDS = ("rel_license", "ccrel", "schema_license", "cc_link")
# a bare-name caption ("Kofi Mensah"): 2-5 capitalised words, lower-case name particles
# between them; words that name places and things are not people ("Lake Geneva")
_NAME_WORD = re.compile(r"^(?:[^\W\d_]\.|[^\W\d_][^\W\d_'’.-]*(?:['’-][^\W\d_]+)*\.?)$")
_NAME_PARTICLES = frozenset({
    "de", "da", "di", "del", "della", "der", "den", "van", "von", "la", "le", "du", "dos", "das",
    "bin", "ibn", "al", "el", "y", "e", "ter", "ten",
})  # fmt: skip
_NOT_NAME_WORDS = frozenset({
    "lake", "mount", "mt", "river", "sea", "ocean", "bay", "beach", "island", "isle", "city",
    "town", "village", "street", "st", "road", "avenue", "park", "garden", "gardens", "bridge",
    "tower", "castle", "church", "cathedral", "temple", "palace", "museum", "hall", "house",
    "square", "station", "valley", "forest", "hill", "hills", "mountain", "mountains", "falls",
    "canyon", "harbor", "harbour", "port", "gate", "golden", "great", "new", "old", "north",
    "south", "east", "west", "upper", "lower", "national", "state", "royal", "saint", "fig",
    "figure", "photo", "image", "picture", "sunset", "sunrise", "the", "and", "of", "on", "in",
    "at", "for", "with", "from", "to", "my", "our", "your", "view", "views",
})  # fmt: skip


def _person_name(text: str) -> str | None:
    """`text` when it is only a person's name ("Kofi Mensah", "Jean-Luc van der Berg"):
    what `_credit_name` accepts and shaped like a name. A single word or a title ("Sunset",
    "Cat on a mat", "Figure 2", "Lake Geneva") is not taken: a wrong author is worse than
    none."""
    name = _credit_name(text)
    if name is None:
        return None
    words = name.split()
    if not 2 <= len(words) <= 5 or words[-1].lower() in _NAME_PARTICLES:
        return None
    for i, w in enumerate(words):
        if w.lower() in _NOT_NAME_WORDS or not _NAME_WORD.match(w):
            return None
        if not w[0].isupper() and (i == 0 or w.lower() not in _NAME_PARTICLES):
            return None
    return name


@dataclass
class _Box:
    """What a container's own marked nodes say, the same for every image in it."""

    licences: list[tuple[str, str]]  # (kind, value), in page order, at most MAX_EVIDENCE
    n_licence_nodes: int = 0
    author: str | None = None  # cc:attributionName / rel=author ...
    attribution_url: str | None = None
    title: str | None = None


@dataclass
class _Near:
    """A container's caption facts, read for the images it is the nearest container of."""

    credit: str | None  # the caption's credit line, or a linked one in a one-image box
    caption_name: str | None  # a caption that is only a name: the author, not the title
    caption_title: str | None
    evidence: list[tuple[str, str, str]]  # `_container_text`


def _box_facts(page: _Page, box: LexborNode) -> _Box:
    """`page.owned` nodes of `box` read once (a box holding N images is read once, not N
    times)."""
    hit = page._boxes.get(box.mem_id)
    if hit is not None:
        return hit
    base = page.base
    box_ccrel = "xmlns:cc" in box.attributes or "about" in box.attributes
    out = _Box([])
    seen: set[tuple[str, str]] = set()
    for node in page.owned.get(box.mem_id, []):
        kind = _marked_kind(node)
        na = node.attributes
        if kind in _LICENCE_KINDS:
            if kind == "rel_license" and box_ccrel:
                kind = "ccrel"
            out.n_licence_nodes += 1
            item = (kind, abs_or_raw(_attr_value(node), base))
            if item[1] and item not in seen:
                seen.add(item)
                if len(seen) <= MAX_EVIDENCE:
                    out.licences.append(item)
                elif len(seen) == MAX_EVIDENCE + 1:  # the rest may restrict: fail closed
                    out.licences.append(("text", MIXED_RIGHTS))
        elif kind == "attribution":
            toks = set(_tokens(na.get("property"))) | set(_tokens(na.get("rel")))
            if out.author is None and "cc:attributionname" in set(_tokens(na.get("property"))):
                out.author = _node_text(node)
            if "cc:attributionurl" in toks and out.attribution_url is None:
                href = na.get("href") or na.get("resource") or ""
                if href.strip():
                    out.attribution_url = abs_or_raw(href, base)
        elif kind == "author" and out.author is None:
            out.author = _node_text(node)
        elif kind == "title" and out.title is None:
            out.title = _node_text(node)
    page._boxes[box.mem_id] = out
    return out


def _near_facts(page: _Page, box: LexborNode) -> _Near:
    """The caption, credit and container text of `box`, read once per container."""
    hit = page._near.get(box.mem_id)
    if hit is not None:
        return hit
    caption_node = box.css_first("figcaption, .wp-caption-text, .thumbcaption")
    caption = _text(caption_node) if caption_node is not None else ""
    n_img = sum(1 for img in box.css("img") if not page.is_badge(img))  # badges are no images
    credit: str | None = None
    if caption_node is not None:
        credit = _linked_credit(caption_node)
    elif n_img == 1:
        # a container's text is not the image's caption: only a bare "by <a>X</a>"
        # or a photo's credit ("Photo by <a>X</a>") counts there
        credit = _linked_credit(box, photo_only=True)
    if credit is None and caption:
        m = _CREDIT.search(caption)
        if m:
            credit = _credit_name(m.group(1))
    name = _person_name(caption) if caption and caption_node is not None else None
    links = caption_node.css("a") if name is not None and caption_node is not None else []
    if links and (len(links) > 1 or _text(links[0]) != caption):
        name = None  # part of it a link ("Standby <a>Mode</a>"): words, not one name
    evidence: list[tuple[str, str, str]] = []
    has_licence = _box_facts(page, box).n_licence_nodes > 0
    _container_text(box, caption_node, caption, has_licence, n_img, evidence)
    near = _Near(
        credit=credit,
        caption_name=name,
        caption_title=_caption_title(caption_node) if caption_node is not None else None,
        evidence=evidence,
    )
    page._near[box.mem_id] = near
    return near


def _caption_title(caption_node: LexborNode) -> str | None:
    """A caption as a title, without its licence links' words ("Photo by Li Wei, <a
    rel=license>CC BY 4.0</a>" -> "Photo by Li Wei"): the licence is evidence, not the
    work's name."""
    links = {
        n.mem_id: ""
        for n in caption_node.css("a, area")
        if is_license_rel(n.attributes.get("rel")) or is_cc_url(n.attributes.get("href") or "")
    }
    text = _WS.sub(" ", _walk_text(caption_node, links)).strip()
    if links:
        text = _TITLE_TRIM.sub("", text)
    return clean_text(text) or None


_TITLE_TRIM = re.compile(r"(?:[\s,;:|/·•–—-]|\(\s*\))+$")


def _image_facts(
    img: LexborNode, url: str, raw_cands: list[str], page: _Page
) -> tuple[list[LicenseEvidence], str | None, str | None, dict[str, object]]:
    """Evidence tied to one image (image scope, then container), its author, title, extras.
    What a container says is read once per container (`_box_facts`, `_near_facts`)."""
    base = page.base
    ev: list[LicenseEvidence] = []
    seen: set[tuple[str, str, str]] = set()
    extra: dict[str, object] = {}

    def add(scope: str, kind: str, value: str) -> None:
        if value and (scope, kind, value) not in seen:
            seen.add((scope, kind, value))
            ev.append(LicenseEvidence(scope, kind, value))

    attrs = img.attributes
    # 1) the img element itself: RDFa/microdata licence on the img, rights marks in alt/title
    for a in ("rel", "property"):
        if is_license_rel(attrs.get(a)):
            val = attrs.get("resource") or attrs.get("href") or attrs.get("content") or ""
            add("image", "ccrel", abs_or_raw(val, base))
    if "license" in _tokens(attrs.get("itemprop")):
        add("image", "schema_license", abs_or_raw(attrs.get("content") or "", base))
    for a in ("title", "alt"):
        snip = rights_snippet(clean_text(attrs.get(a)) or "")
        if snip:  # a rights mark or words withholding a use ("Sunset. Not for resale")
            add("image", "text", snip)

    author: str | None = None
    title: str | None = clean_text(attrs.get("title")) or None
    # a licence badge takes nothing from its containers (their licence, author, caption)
    boxes = [] if page.is_badge(img) else page.containers_of(img)
    own = {url} | {u for c in raw_cands if (u := norm_url(c, base))}
    # 2) containers, nearest first: licence nodes each owns, then attribution
    licensed = False  # a container licence read so far (this box or one inside it)
    for depth, box in enumerate(boxes):
        about = _rdfa_subject(box.attributes)
        target = norm_url(about, base) if about is not None else None
        about_is_img = target is not None and target in own
        if target is not None and not about_is_img and page.names_image_in(box, target):
            continue  # the block is about another image inside it: its licence is that one's
        scope = "image" if about_is_img else "container"
        facts = _box_facts(page, box)
        for kind, value in facts.licences:
            add(scope, kind, value)
        if author is None:
            author = facts.author
        if facts.attribution_url is not None and "attribution_url" not in extra:
            extra["attribution_url"] = facts.attribution_url
        if title is None:
            title = facts.title
        licensed = licensed or bool(facts.licences)
        if depth == 0:
            near = _near_facts(page, box)
            if author is None:
                author = near.credit
            if author is None and near.caption_name is not None:
                author = near.caption_name
            for item in near.evidence:
                add(*item)
            if title is None and near.caption_name is None:  # a name is no title
                title = near.caption_title
        elif licensed:
            # an outer box around a licence read here (a gallery's caption "All photos CC
            # BY 4.0, not for commercial use"; a `<p>` beside a licensed figure): its
            # words reach the licence reader too (read once per box)
            for item in _near_facts(page, box).evidence:
                add(*item)
    if page.page_author:
        extra["page_author"] = page.page_author
    for a in ("width", "height"):
        v = (attrs.get(a) or "").strip().removesuffix("px")
        if v.isdigit() and len(v) < 7:
            extra[f"html_{a}"] = int(v)
    return ev, author, title or page.title, extra


# words that give a caption's parts to some of its images: a licence beside them in a
# caption of several images is not known to be every image's (fail closed)
_PER_IMAGE = re.compile(
    r"\b(?:left|right|top|bottom|above|below|clockwise|links|rechts|gauche|droite|izquierda"
    r"|derecha|oben|unten)\b",
    re.IGNORECASE,
)
# where `licenses.notice_apart` may find a notice (to charge its cost, not to decide)
_NOTICE_HINT = re.compile(r"©|&copy;|\(c\)|copyright|copr\.|rights|rechte|droits|derechos", re.I)


def _container_text(
    box: LexborNode,
    caption_node: LexborNode | None,
    caption_words: str,
    has_licence: bool,
    n_img: int,
    out: list[tuple[str, str, str]],
) -> None:
    """A container's words as `container` text evidence: its caption whole (up to
    `MAX_CAPTION`) when it has a licence link, a rights mark or words withholding a use,
    so "CC BY 4.0 - not for commercial use" and "Story CC BY 4.0. Photo © Reuters" reach the
    licence reader as written; its other text (less `caption_words`, the caption's text)
    as a snippet around each rights mark or restriction. A container holding several
    images whose text has a licence and a rights notice apart from it ("Left: Jane Doe,
    CC BY 4.0. Right: © Reuters"), or a licence and words giving parts of it to some
    images (`_PER_IMAGE`: "Left: …, CC BY 4.0. Right: Reuters"), also gets
    `MIXED_RIGHTS`: its licence is not known to be any one image's."""
    box_text = _text(box)
    recorded = ""
    if caption_node is not None:
        caption = _caption_text(caption_node)
        short = len(caption) <= MAX_CAPTION
        # read once: it decides whether the caption is recorded and is what a long one keeps
        cap_snip = None if has_licence and short else rights_snippet(caption)
        if has_licence or cap_snip:
            recorded = caption if short else cap_snip or ""
            out.append(("container", "text", recorded))
            # the rest of the container's text, beside the caption (as `_near_facts` read it)
            box_text = box_text.replace(caption_words, " ", 1)
    snip = rights_snippet(box_text)
    if snip:
        out.append(("container", "text", snip))
    if n_img > 1:
        words = f"{recorded} ... {snip or ''}"
        if not (has_licence or _FOOTER_LICENCE.search(words)):
            return
        if _PER_IMAGE.search(words):  # "Left: Jane Doe, CC BY 4.0. Right: Reuters"
            out.append(("container", "text", MIXED_RIGHTS))
            return
        # the licence reader reads up to 300 characters from each notice, at about thrice
        # the cost of a character scanned elsewhere: charged to the page's budget
        n = len(words)
        _spend(n + sum(3 * min(300, n - m.start()) for m in _NOTICE_HINT.finditer(words)))
        if notice_apart(words):
            out.append(("container", "text", MIXED_RIGHTS))


def extract_images(
    html: bytes | str,
    page_url: str,
    *,
    user_agent_token: str = "ccurate",
    encoding: str | None = None,
) -> PageExtract:
    """Every `<img>` of a page as a `Sample`, with evidence, attribution and the page's opt-out.

    `encoding` is the HTTP charset when known (it outranks `<meta charset>`).
    Never raises: a page that cannot be decoded or parsed, or that holds more text for
    the licence reader than `PAGE_TEXT_BUDGET`, returns no images and `error` set.
    The same image URL twice on a page keeps the first occurrence as is (nothing of
    the repeats, e.g. another alt text, is merged into it); repeats are counted in
    `skipped["duplicate_in_page"]` and on the kept sample as `extra["repeats_in_page"]`
    (repeated images are often logos).
    """
    budget = _SCAN_LEFT.set([PAGE_TEXT_BUDGET])
    try:
        text = _decode(html, encoding) if isinstance(html, bytes | bytearray) else html
        tree = LexborHTMLParser(text)  # lone surrogates in a str are dropped, not raised
        page = _Page(tree, page_url, user_agent_token)
        out = PageExtract(
            images=[],
            optout=page.optout,
            optouts=set(page.optouts),
            page_license_evidence=list(page.evidence),
            title=page.title,
        )
        seen: dict[str, Sample] = {}
        for img in tree.css("img"):
            out.n_img += 1
            cands = _image_candidates(img)
            if not cands:
                out.skipped["empty_src"] += 1
                continue
            url = next((u for c in cands if (u := norm_url(c, page.base))), None)
            if url is None:
                non_data = [c for c in cands if not c.lower().startswith("data:")]
                out.skipped["bad_url" if non_data else "data_uri"] += 1
                continue
            first = seen.get(url)
            if first is not None:
                out.repeat(first)
                continue
            ev, author, title, extra = _image_facts(img, url, cands, page)
            seen[url] = sample = Sample(
                key=make_key(url, page_url),
                url=url,
                page_url=page_url,
                alt_text=_alt(img),
                # the page's items, not copies (see PageExtract): one copy per image cost
                # a page of many images and licence links gigabytes
                license_evidence=[*ev, *page.evidence],
                author=author,
                title=title,
                source_url=page_url,
                extra=extra,
            )
            out.images.append(sample)
        return out
    except Exception as exc:  # a broken page must not stop a crawl
        return PageExtract(images=[], error=f"{type(exc).__name__}: {exc}"[:500])
    finally:
        _SCAN_LEFT.reset(budget)
