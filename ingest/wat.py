"""Images from Common Crawl WAT records: the crawler's link metadata, no HTML to parse.

A WAT file is a WARC file of `metadata` records (Content-Type
`application/json`), one per WARC record of the matching WARC file. The JSON
of a response's record (layout as produced by webarchive-commons and used by
cc2dataset) is::

    Container         Filename, Offset            (where the capture is in its WARC)
    Envelope
      WARC-Header-Metadata   WARC-Type, WARC-Target-URI, WARC-Truncated, ...
      Payload-Metadata
        HTTP-Response-Metadata
          Response-Message   Status ("200"), Reason, Version
          Headers            {name: value}  (a value may be a list when repeated)
          HTML-Metadata
            Head   Title, Base, Link [{path: "LINK@/href", rel, url}],
                   Metas [{name|http-equiv|property, content}]
            Links  [{path: "IMG@/src", url, alt, title}, {path: "A@/href", url, rel, text}]

`extract_wat_images` turns `HTML-Metadata` into the same `PageExtract` that
`ingest.html.extract_images` makes from the page, so `ingest.warc.iter_warc`
applies opt-outs, stats and drops identically to both. Attribute values and the
title are raw in some WATs and already decoded in others: only complete
character references are decoded (`unescape_attr`). What a WAT cannot tell,
by construction: `srcset`/lazy-load candidates (only `IMG@/src` is kept),
containers (figure, ccREL blocks: all licence evidence is page scope), footer
rights text, and RDFa/microdata `property`/`itemprop` licences; with several
`<base>` or `<title>` elements (an inline SVG's `<title>`) the WAT keeps the last,
the HTML path the first.
"""

from __future__ import annotations

import html as _html
import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from html.entities import html5 as _HTML5
from typing import Any

from ccurate.ingest.html import (
    PageExtract,
    PageFacts,
    abs_or_raw,
    clean_text,
    is_cc_url,
    is_license_rel,
    norm_url,
    rights_snippet,
)
from ccurate.record import LicenseEvidence, Sample, make_key

IMG_PATH = "IMG@/src"
_ANCHOR_PATHS = ("A@/href", "AREA@/href", "LINK@/href")


@dataclass
class WatResponse:
    """What one WAT record says about the HTTP response it describes.

    `status` is None when the record has HTTP metadata but no readable status
    (the WARC path's "unreadable HTTP status line"); `is_http` is False for
    captures without an HTTP message (dns:, whois:). `headers` are lower-cased
    names to every value.
    """

    page_url: str
    is_http: bool
    status: int | None
    mime: str
    identified_type: str
    headers: dict[str, list[str]] = field(default_factory=dict)
    html: Mapping[str, Any] | None = None
    truncated: bool = False
    source_file: str | None = None
    source_offset: int | None = None


def _obj(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


_SURROGATE = re.compile("[\ud800-\udfff]")


def _str(value: object) -> str:
    """A JSON string, else ''. Lone surrogates (`"\\ud83d"` escapes from a non-Java WAT
    writer, or a cut pair) are dropped as the HTML parser drops them: no UTF-8 writer
    downstream (parquet, tar) can encode them."""
    if not isinstance(value, str):
        return ""
    return value if value.isascii() else _SURROGATE.sub("", value)


_CHARREF = re.compile(r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")


def unescape_attr(value: str) -> str:
    """A WAT attribute or text value with its complete character references decoded.

    Writers differ, and a WAT does not say which wrote it: webarchive-commons (and
    Common Crawl before Aug 2019) copy values raw (`a.jpg?w=1&amp;h=2`), CC's writer
    since decodes them itself (ia-web-commons #14, #19: jsoup `unescapeEntities`), so
    decoding like an HTML parser would decode those twice (`?id=7&reg_no=3` -> `®_no=3`).
    Only complete references are decoded (`&name;` with its `;`, `&#...;`, `&#x...;`),
    never legacy ones without `;`: raw values read as the HTML path reads them (`&amp;`,
    `&quot;`, `&#x3D;`), decoded ones stay as they are. Left over, both rare: a decoded
    value holding literal `&name;` text (`&amp;lt;` in the HTML) loses one more level,
    and a raw legacy reference (`&copy 2020`) stays raw where the HTML path decodes it.
    """
    if "&" not in value:
        return value

    def sub(m: re.Match[str]) -> str:
        ref = m.group(0)
        if ref[1] == "#" or ref[1:] in _HTML5:
            return _html.unescape(ref)
        return ref  # `&name;` that HTML does not define: text

    return _CHARREF.sub(sub, value)


def _attr(obj: Mapping[str, Any], name: str) -> str:
    """A WAT attribute value, decoded (see `unescape_attr`); '' when absent or not a string."""
    return unescape_attr(_str(obj.get(name)))


def parse_wat_json(payload: bytes) -> Mapping[str, Any]:
    """The JSON object of a WAT record; raises ValueError when it is not one with an Envelope."""
    try:
        doc = json.loads(payload)  # JSONDecodeError is a ValueError; bytes may be UTF-8/16/32
    except UnicodeDecodeError:
        # a stray non-UTF-8 byte (a writer that copied page bytes raw): keep the record's
        # links, with U+FFFD for the bad bytes, as the HTML path decodes a page
        doc = json.loads(payload.decode("utf-8", "replace"))
    if not isinstance(doc, Mapping) or not isinstance(doc.get("Envelope"), Mapping):
        raise ValueError("WAT JSON without an Envelope object")
    return doc


def wat_response(doc: Mapping[str, Any], fallback_url: str) -> WatResponse | None:
    """The response a WAT record describes, or None for records of requests, metadata, warcinfo."""
    env = _obj(doc.get("Envelope"))
    whead = _obj(env.get("WARC-Header-Metadata"))
    if _str(whead.get("WARC-Type")).lower() not in ("response", ""):
        return None
    payload = _obj(env.get("Payload-Metadata"))
    if not whead and not payload:
        return None  # e.g. the warcinfo-style records some tools write
    page_url = _str(whead.get("WARC-Target-URI")).strip().strip("<>") or fallback_url
    container = _obj(doc.get("Container"))
    offset = container.get("Offset")
    out = WatResponse(
        page_url=page_url,
        is_http="HTTP-Response-Metadata" in payload,
        status=None,
        mime="",
        identified_type=_str(whead.get("WARC-Identified-Payload-Type")).lower(),
        truncated=bool(whead.get("WARC-Truncated")),
        source_file=_str(container.get("Filename")) or None,
        source_offset=int(offset)
        if isinstance(offset, str | int) and str(offset).isdigit()
        else None,
    )
    http = _obj(payload.get("HTTP-Response-Metadata"))
    status = _obj(http.get("Response-Message")).get("Status")
    if isinstance(status, int) or (isinstance(status, str) and status.strip().isdigit()):
        out.status = int(status)
    for name, value in _obj(http.get("Headers")).items():
        values = value if isinstance(value, list) else [value]
        out.headers.setdefault(str(name).lower(), []).extend(str(v) for v in values)
    out.mime = next(iter(out.headers.get("content-type", [])), "").lower().split(";")[0].strip()
    html = http.get("HTML-Metadata")
    out.html = html if isinstance(html, Mapping) else None
    return out


def extract_wat_images(
    html: Mapping[str, Any], page_url: str, *, user_agent_token: str = "ccurate"
) -> PageExtract:
    """Every `IMG@/src` link of a WAT `HTML-Metadata` object as a `Sample`, like `extract_images`.

    Same keys, URL resolution (against `Head.Base`), alt/title cleaning, meta
    opt-outs and page evidence kinds as the HTML path; evidence is page scope
    (rights marks in an image's own alt/title stay image scope, as there).
    Never raises: a malformed object returns no images and `error` set.
    """
    try:
        head = _obj(html.get("Head"))
        base_raw = unescape_attr(_str(head.get("Base")))
        base = (norm_url(base_raw, page_url) or page_url) if base_raw.strip() else page_url
        title_text = unescape_attr(_str(head.get("Title")))  # CC's writer decodes it too
        out = PageExtract(images=[], title=clean_text(title_text) or None)
        facts = PageFacts(base)  # opt-outs, author and page evidence as ingest.html reads them

        def add(kind: str, value: str) -> None:
            facts.add(LicenseEvidence("page", kind, value))

        for meta in head.get("Metas") or []:
            meta = _obj(meta)
            if _str(meta.get("name")).strip():  # `http-equiv`/`property` metas carry none
                facts.read_meta(_attr(meta, "name"), _attr(meta, "content"), user_agent_token)
        out.optout, out.optouts = facts.optout, facts.optouts
        out.page_license_evidence = facts.evidence
        page_author = facts.page_author
        for link in head.get("Link") or []:
            link = _obj(link)
            if is_license_rel(_attr(link, "rel")) and _str(link.get("url")).strip():
                add("link_rel_license", abs_or_raw(_attr(link, "url"), base))
        links = [_obj(lk) for lk in html.get("Links") or []]
        for link in links:  # licence links first: every image carries the page evidence
            path, url, rel = _str(link.get("path")), _attr(link, "url"), _attr(link, "rel")
            if path not in _ANCHOR_PATHS or not url.strip():
                continue
            if is_license_rel(rel):
                add("ccrel" if ":" in rel else "rel_license", abs_or_raw(url, base))
            elif path != "LINK@/href" and is_cc_url(abs_or_raw(url, base)):
                add("cc_link", abs_or_raw(url, base))
        seen: dict[str, Sample] = {}
        for link in links:
            if _str(link.get("path")) != IMG_PATH:
                continue
            out.n_img += 1
            raw = _attr(link, "url").strip()
            img_url = norm_url(raw, base)
            if img_url is None:
                kind = (
                    "empty_src"
                    if not raw
                    else "data_uri"
                    if raw.lower().startswith("data:")
                    else "bad_url"
                )
                out.skipped[kind] += 1
                continue
            first = seen.get(img_url)
            if first is not None:
                out.repeat(first)
                continue
            alt = clean_text(_attr(link, "alt")) if "alt" in link else None
            title = clean_text(_attr(link, "title")) or None
            own: list[LicenseEvidence] = []
            for text in (title, alt):
                snip = rights_snippet(text) if text else None
                if snip and all(e.value != snip for e in own):
                    own.append(LicenseEvidence("image", "text", snip))
            seen[img_url] = sample = Sample(
                key=make_key(img_url, page_url),
                url=img_url,
                page_url=page_url,
                alt_text=alt,
                license_evidence=[*own, *out.page_license_evidence],  # shared items
                title=title or out.title,
                source_url=page_url,
                extra={"page_author": page_author} if page_author else {},
            )
            out.images.append(sample)
        return out
    except Exception as exc:  # a malformed record must not stop a crawl
        return PageExtract(images=[], skipped=Counter(), error=f"{type(exc).__name__}: {exc}"[:500])
