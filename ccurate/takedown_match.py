"""Which samples of a parquet index a blocklist removes: takedowns and earlier removals.

`match_index` works vectorised over the index (no image bytes), so the release
gate can check millions of rows a second: first direct matches (key, URL, page,
domain, author, exact hashes, pHash within a radius), then the near copies of
what was matched (one hop: a copy of a copy is not chased, as in dedup's leader
clustering). Near search reuses dedup's exact multi-index hashing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ccurate.takedown import (
    HEX16,
    HOST_LABELS,
    IPV4_SPELLING,
    NOT_SENT_AS_IS,
    TakedownEntry,
    TakedownError,
    canonical_host,
    normalize_escapes,
    url_host,
    url_key,
)

DEFAULT_RADIUS = 8
"""pHash bits for near matches of takedowns, removals and `ccurate lookup` (the pHash alone,
erring towards removing): re-posts land within 4, crops and heavy recompression within 8,
distinct photos rarely below 12 (bench/dedup_eval.py)."""

_SCHEME = r"^[A-Za-z][A-Za-z0-9+.\-]*://"
_PLAIN_HOST = rf"^{HOST_LABELS}\.*$"  # the whole authority: no port, user, escapes
# an IPv4 address as `inet_aton` spells it (`16909060`, `01.02.03.04`): `canonical_host` respells it
_IPV4_SPELLING = rf"^{IPV4_SPELLING}\.*$"
_NOT_PLAIN = rf"{NOT_SENT_AS_IS}|%"  # what `url_key` may respell (escapes, non-ASCII, spaces)


@dataclass
class Blocklist:
    """What the release gate removes, compiled for vectorised matching.

    `keys`, `urls`, ... map a value to (reason, detail); hashes come from
    takedown entries and from earlier removals; `codes` are pHashes with their
    own radius.
    """

    keys: dict[str, tuple[str, str]] = field(default_factory=dict)
    urls: dict[str, tuple[str, str]] = field(default_factory=dict)
    pages: dict[str, tuple[str, str]] = field(default_factory=dict)
    domains: dict[str, tuple[str, str]] = field(default_factory=dict)
    authors: dict[str, tuple[str, str]] = field(default_factory=dict)
    hashes: dict[str, tuple[str, str]] = field(default_factory=dict)  # sha256 or pixel sha256
    codes: list[tuple[str, int, str, str]] = field(default_factory=list)  # phash, radius, why

    def __len__(self) -> int:
        return (
            len(self.keys)
            + len(self.urls)
            + len(self.pages)
            + len(self.domains)
            + len(self.authors)
            + len(self.hashes)
            + len(self.codes)
        )

    def add_entries(self, entries: Iterable[TakedownEntry], radius: int) -> None:
        for e in entries:
            why = ("takedown", f"{e.id} {e.kind}")
            if e.kind == "url":
                self.urls.setdefault(e.value, why)
            elif e.kind == "page_url":
                self.pages.setdefault(e.value, why)
            elif e.kind == "domain":
                self.domains.setdefault(e.value, why)
            elif e.kind == "author":
                self.authors.setdefault(e.value, why)
            elif e.kind == "sha256":
                self.hashes.setdefault(e.value, why)
            elif e.kind == "phash":
                self.codes.append((e.value, e.radius if e.radius is not None else radius, *why))
            elif e.kind == "image":
                self.hashes.setdefault(e.value, why)
                if e.pixel_sha256:
                    self.hashes.setdefault(e.pixel_sha256, why)
                assert e.phash is not None
                self.codes.append((e.phash, e.radius if e.radius is not None else radius, *why))

    def add_removals(self, removals: pa.Table, radius: int) -> None:
        """Removed keys, and their exact hashes and pHash: the image must not come back."""
        for r in removals.select(["key", "sha256", "pixel_sha256", "phash", "reason"]).to_pylist():
            why = (r["reason"] or "takedown", f"removed {r['key']}")
            self.keys.setdefault(r["key"], why)
            for h in (r["sha256"], r["pixel_sha256"]):
                if h:
                    self.hashes.setdefault(h, why)
            if r["phash"] and HEX16.match(r["phash"]):
                self.codes.append((r["phash"], radius, *why))


MATCH_COLUMNS = ["key", "url", "page_url", "author", "sha256", "pixel_sha256", "phash"]
DECISION_SCHEMA = pa.schema(
    [("key", pa.string()), ("reason", pa.string()), ("detail", pa.string())]
)


def _col(t: pa.Table, name: str) -> pa.ChunkedArray:
    if name in t.column_names:
        return t.column(name).cast(pa.string())
    return pa.chunked_array([pa.nulls(t.num_rows, pa.string())])


def _hosts(col: pa.ChunkedArray) -> pa.Array:
    """Each row's host as `url_key` reads it (`url_host(url, unescape=True)`). Vectorised:
    where the authority is a plain ASCII host it is only lower-cased and loses its trailing
    dots; Python parses the few others (port, userinfo, IDNA, escapes, IP literals), so no spelling
    slips past the rules."""
    url = pc.fill_null(pc.match_substring_regex(col, _SCHEME), False)
    parts = pc.split_pattern(pc.if_else(url, col, pa.scalar("-://")), "/", max_splits=3)
    auth = pc.utf8_lower(pc.list_element(parts, 2))  # `scheme:`, ``, authority, rest
    plain = pc.and_(url, pc.fill_null(pc.match_substring_regex(auth, _PLAIN_HOST), False))
    plain = pc.and_not(plain, pc.fill_null(pc.match_substring_regex(auth, _IPV4_SPELLING), False))
    hosts = pc.if_else(plain, pc.utf8_rtrim(auth, characters="."), pa.scalar(None, pa.string()))
    hosts = hosts.combine_chunks()
    odd = pc.and_(pc.invert(plain), pc.is_valid(col)).combine_chunks()
    if pc.any(odd).as_py():
        urls = col.filter(odd).to_pylist()
        hosts = pc.replace_with_mask(
            hosts, odd, pa.array([url_host(u, unescape=True) for u in urls], pa.string())
        )
    return hosts


class _UrlColumn:
    """A URL column and its hosts (`_hosts`), parsed once, when a rule first needs them."""

    def __init__(self, values: pa.ChunkedArray) -> None:
        self.values = values
        self._hosts: pa.Array | None = None

    @property
    def hosts(self) -> pa.Array:
        if self._hosts is None:
            self._hosts = _hosts(self.values)
        return self._hosts


def _bools(a: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(pc.fill_null(a, False).to_numpy(zero_copy_only=False), bool)


def _last_segments(urls: pa.ChunkedArray) -> pa.ChunkedArray:
    """What follows the last `/` before any `?` or `#`, trailing slashes ignored: a plain
    URL's last path segment (its authority when the path is empty; null without a `/`)."""
    head = pc.list_element(pc.split_pattern(urls, "?", max_splits=1), 0)
    if pc.any(pc.fill_null(pc.match_substring(head, "#"), False)).as_py():
        head = pc.list_element(pc.split_pattern(head, "#", max_splits=1), 0)
    head = pc.utf8_rtrim(head, characters="/")
    last = pc.split_pattern(head, "/", max_splits=1, reverse=True)
    one = pc.equal(pc.list_value_length(last), 1)
    last = pc.if_else(one, pa.scalar(["", ""], pa.list_(pa.string())), last)
    return pc.if_else(one, pa.scalar(None, pa.string()), pc.list_element(last, 1))


class _Hits:
    """First match per row, vectorised: which rule table and entry matched, and how."""

    def __init__(self, n: int) -> None:
        self.src = np.full(n, -1, np.int32)  # index into self.rules
        self.pos = np.zeros(n, np.int64)  # entry within that rule table
        self.dist = np.full(n, -1, np.int32)  # pHash bits for near matches
        self.rules: list[tuple[list[tuple[str, str]], str]] = []  # ([(reason, detail)], label)

    @property
    def free(self) -> np.ndarray:
        return self.src < 0

    def add(
        self,
        mask: np.ndarray,
        pos: np.ndarray,
        whys: list[tuple[str, str]],
        label: str,
        dist: np.ndarray | None = None,
    ) -> None:
        m = mask & self.free
        if not m.any():
            return
        self.rules.append((whys, label))
        self.src[m] = len(self.rules) - 1
        self.pos[m] = pos[m]
        if dist is not None:
            self.dist[m] = dist[m]

    def lookup(
        self, values: pa.Array | pa.ChunkedArray, table: dict[str, tuple[str, str]], label: str
    ) -> None:
        """Rows whose value is a key of `table` (exact, via Arrow's hash lookup)."""
        if not table:
            return
        keys = list(table)
        idx = pc.index_in(values, value_set=pa.array(keys, pa.string()))
        pos = np.asarray(pc.fill_null(idx, -1).to_numpy(zero_copy_only=False), np.int64)
        self.add(pos >= 0, pos, [table[k] for k in keys], label)

    def near(
        self, codes: np.ndarray, ok: np.ndarray, refs: list[tuple[str, int, str, str]], label: str
    ) -> None:
        """Rows whose pHash is within each reference's own radius (closest reference wins)."""
        from ccurate.filters.hamming import near_pairs
        from ccurate.filters.hashing import hex_to_u64

        todo = ok & self.free
        if not refs or not todo.any():
            return
        ref_codes, ref_ok = hex_to_u64([r[0] for r in refs])
        radii = np.array([r[1] for r in refs], np.int64)
        good_refs = np.flatnonzero(ref_ok)
        if not len(good_refs):
            return
        rows = np.flatnonzero(todo)
        if len(good_refs) <= 64:
            # few references (the usual takedown list): a popcount scan per reference
            best_d = np.full(len(rows), 99, np.int64)
            best_j = np.zeros(len(rows), np.int64)
            sub = codes[rows]
            for jj in good_refs.tolist():
                dj = np.bitwise_count(sub ^ ref_codes[jj]).astype(np.int64)
                better = (dj <= radii[jj]) & (dj < best_d)
                best_d[better] = dj[better]
                best_j[better] = jj
            found = best_d < 99
            i, j, d = rows[found], best_j[found], best_d[found]
        else:
            # many (removals pile up): multi-index search, the rows as the index
            q, x, dd = near_pairs(
                ref_codes[good_refs], int(radii[good_refs].max()), index=codes[rows]
            )
            j = good_refs[q]
            d = dd.astype(np.int64)
            keep = d <= radii[j]
            i, j, d = rows[x[keep]], j[keep], d[keep]
            o = np.lexsort((j, d, i))
            i, j, d = i[o], j[o], d[o]
            first = np.ones(len(i), bool)
            first[1:] = i[1:] != i[:-1]
            i, j, d = i[first], j[first], d[first]
        mask = np.zeros(len(codes), bool)
        mask[i] = True
        pos = np.zeros(len(codes), np.int64)
        pos[i] = j
        dist = np.full(len(codes), -1, np.int64)
        dist[i] = d
        self.add(mask, pos, [(r[2], r[3]) for r in refs], label, dist)

    def explain(self, rows: np.ndarray) -> tuple[list[str], list[str]]:
        reasons, details = [], []
        for r in rows.tolist():
            whys, label = self.rules[self.src[r]]
            reason, detail = whys[self.pos[r]]
            d = int(self.dist[r])
            reasons.append(reason)
            details.append(f"{detail} ({label} {d} bits)" if d >= 0 else f"{detail} ({label})")
        return reasons, details


def _url_hits(
    hits: _Hits, col: _UrlColumn, rules: dict[str, tuple[str, str]], label: str, page: bool
) -> None:
    """Rows whose `url_key` is a rule's. Python keys only the rows vectorised prefilters
    keep: the host is a rule's, and so is the last path segment, unless that segment has
    escapes or non-ASCII (`url_key` respells it) or is a dot-segment. Escapes elsewhere
    cannot change it: decoding yields unreserved characters only, never a `/`."""
    keys = list(rules)
    where: dict[str, int] = {}
    rule_hosts: set[str] = set()
    segs = {".", ".."}  # dot-segments may remove the segment a rule ends with
    for i, k in enumerate(keys):
        try:
            key = url_key(k, page)
        except TakedownError:
            continue
        where.setdefault(key, i)
        rule_hosts.add(url_host(k, unescape=True) or "")
        path = key[2:].partition("/")[2].partition("?")[0]
        segs.add(next((x for x in reversed(path.split("/")) if x), ""))
    if not where:
        return
    on_host = _bools(pc.is_in(col.hosts, pa.array(sorted(rule_hosts), pa.string())))
    rows = np.flatnonzero(on_host & hits.free)
    if not len(rows):
        return
    if "" not in segs:  # a rule for a site's root (`/`) reads every row of its host
        seg = _last_segments(col.values.take(pa.array(rows)))
        same = pc.fill_null(pc.is_in(seg, pa.array(sorted(segs))), True)
        odd = pc.and_(
            pc.invert(same), pc.fill_null(pc.match_substring_regex(seg, _NOT_PLAIN), True)
        )
        keep = np.asarray(pc.or_(same, odd).to_numpy(zero_copy_only=False), bool)
        at = np.flatnonzero(np.asarray(odd.to_numpy(zero_copy_only=False), bool))
        for j, x in zip(at.tolist(), seg.take(pa.array(at)).to_pylist(), strict=True):
            if x is not None and x.isprintable() and x.isascii() and " " not in x:
                keep[j] = normalize_escapes(x) in segs  # only escapes: spelled as `url_key` does
        rows = rows[keep]
    mask = np.zeros(len(hits.free), bool)
    pos = np.zeros(len(hits.free), np.int64)
    urls = col.values.take(pa.array(rows, pa.int64())).to_pylist()
    for r, raw in zip(rows.tolist(), urls, strict=True):
        try:
            at_rule = where.get(url_key(raw, page))
        except TakedownError:
            at_rule = None
        if at_rule is not None:
            mask[r], pos[r] = True, at_rule
    hits.add(mask, pos, [rules[k] for k in keys], label)


def _domain_hits(
    hits: _Hits, col: _UrlColumn, rules: dict[str, tuple[str, str]], label: str
) -> None:
    """Host = a listed domain or one of its subdomains: a suffix test per domain for short
    lists, a hash lookup of every parent level of every host for long ones."""
    table = {canonical_host(k.strip("[]")) or k: why for k, why in rules.items()}
    if len(table) > 16:
        levels = _parent_domains(col.hosts)
        for level in levels:
            hits.lookup(level, table, label)
        deep = np.flatnonzero(_bools(pc.match_substring(levels[-1], ".")) & hits.free)
        if len(deep):  # more labels than `_parent_domains` peels: the rest in Python
            where = {d: i for i, d in enumerate(table)}
            mask = np.zeros(len(hits.free), bool)
            pos = np.zeros(len(hits.free), np.int64)
            rest = levels[-1].take(pa.array(deep)).to_pylist()
            for r, h in zip(deep.tolist(), rest, strict=True):
                while "." in h and not mask[r]:
                    h = h.split(".", 1)[1]
                    mask[r], pos[r] = h in where, where.get(h, 0)
            hits.add(mask, pos, list(table.values()), label)
        return
    domains = sorted(table, key=lambda d: -d.count("."))  # the most specific entry wins
    whys = [table[d] for d in domains]
    for i, d in enumerate(domains):
        on = pc.or_(pc.equal(col.hosts, d), pc.ends_with(col.hosts, "." + d))
        hits.add(_bools(on), np.full(len(hits.free), i, np.int64), whys, label)


def _authors(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Authors normalised exactly as author entries are (`normalize_author`: whitespace
    collapsed, casefolded; `utf8_lower` is not casefold: "Straße" must meet "strasse").
    Python runs once per distinct author, not per row."""
    enc = pc.dictionary_encode(col).combine_chunks()
    names = [" ".join(v.split()).casefold() for v in enc.dictionary.to_pylist()]
    return pa.chunked_array([pc.take(pa.array(names, pa.string()), enc.indices)])


def _parent_domains(hosts: pa.Array, depth: int = 8) -> list[pa.Array]:
    """`a.b.example.org` -> [a.b.example.org, b.example.org, example.org, org] (vectorised)."""
    out = [hosts]
    h = hosts
    for _ in range(depth):
        has_dot = pc.fill_null(pc.match_substring(h, "."), False)
        if not pc.any(has_dot).as_py():
            break
        h = pc.if_else(
            has_dot, pc.replace_substring_regex(h, r"^[^.]*\.", ""), pa.scalar(None, pa.string())
        )
        out.append(h)
    return out


def match_index(table: pa.Table, block: Blocklist, radius: int = DEFAULT_RADIUS) -> pa.Table:
    """Rows of `table` (a parquet index) the blocklist removes: key, reason, detail.

    Direct matches first, then near copies of the matched rows (exact hash or
    pHash within `radius`) among the others, with the reason of what they copy.
    Vectorised (Arrow hash lookups, multi-index pHash search): millions of rows
    a second; Python only touches the matched rows.
    """
    from ccurate.filters.hashing import hex_to_u64

    n = table.num_rows
    if n == 0 or not len(block):
        return DECISION_SCHEMA.empty_table()
    hits = _Hits(n)
    hits.lookup(_col(table, "key"), block.keys, "key")
    urls = {c: _UrlColumn(_col(table, c)) for c in ("url", "page_url")}  # hosts parsed once
    for col, rules in (("url", block.urls), ("page_url", block.pages)):
        if rules:
            _url_hits(hits, urls[col], rules, col, page=col == "page_url")
    if block.domains:
        for col in ("url", "page_url"):
            _domain_hits(hits, urls[col], block.domains, f"{col} host")
    if block.authors:
        hits.lookup(_authors(_col(table, "author")), block.authors, "author")
    if block.hashes:
        hits.lookup(_col(table, "sha256"), block.hashes, "sha256")
        hits.lookup(_col(table, "pixel_sha256"), block.hashes, "pixel_sha256")
    codes, ok = hex_to_u64(_col(table, "phash"))
    hits.near(codes, ok, block.codes, "phash")
    # near copies of what matched directly: one hop
    seeds = np.flatnonzero(~hits.free)
    if len(seeds):
        keys = _col(table, "key").take(pa.array(seeds)).to_pylist()
        reasons, _ = hits.explain(seeds)
        copies = Blocklist()
        for col in ("sha256", "pixel_sha256"):
            vals = _col(table, col).take(pa.array(seeds)).to_pylist()
            for v, k, r in zip(vals, keys, reasons, strict=True):
                if v:
                    copies.hashes.setdefault(v, (r, f"copy of {k}"))
        phs = _col(table, "phash").take(pa.array(seeds)).to_pylist()
        for i, ph, k, r in zip(seeds.tolist(), phs, keys, reasons, strict=True):
            if ph and ok[i]:
                copies.codes.append((ph, radius, r, f"copy of {k}"))
        hits.lookup(_col(table, "sha256"), copies.hashes, "sha256")
        hits.lookup(_col(table, "pixel_sha256"), copies.hashes, "pixel_sha256")
        hits.near(codes, ok, copies.codes, "phash")
    rows = np.flatnonzero(~hits.free)
    reasons, details = hits.explain(rows)
    return pa.table(
        {
            "key": _col(table, "key").take(pa.array(rows, pa.int64())).combine_chunks(),
            "reason": pa.array(reasons, pa.string()),
            "detail": pa.array(details, pa.string()),
        },
        schema=DECISION_SCHEMA,
    )
