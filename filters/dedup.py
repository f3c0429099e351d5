"""Global deduplication: exact, near (perceptual hash) and semantic, plus decontamination.

Dedup needs every shard at once, so it is planned in `DedupStage.prepare` on the
driver from the shards' parquet indexes (no image bytes unless a hash is
missing), written as one decisions parquet, and then applied shard by shard in
`process`, like any other stage.

Order of the plan (each step only sees what the previous ones left):

1. decontamination: samples matching an evaluation set (`against`) ->
   `contaminated`; samples matching an earlier release (`previous`) ->
   `duplicate_exact` / `duplicate_near` with `duplicate_of` = the earlier key; a match
   holds for every exact copy (same bytes or pixels) of the matched row too;
2. exact groups: same file SHA-256 or same pixel SHA-256 (transitive: equality);
3. near groups: 64-bit pHash (or dHash) within `radius` bits; with `verify = "dhash"`
   a pHash match must also be confirmed by the stored dHash (see below);
4. semantic groups (optional): CLIP embeddings with cosine >= 1 - `semantic_eps`.

Grouping for steps 3-4 is *leader clustering in keep order*, not union-find:
samples are visited best first (by the `keep` policy); an unassigned sample
becomes a keeper and takes every unassigned sample within the radius of
*itself*. Union-find would chain A~B~C~... into one group whose ends can be
far apart (distinct images); here every dropped sample is within the radius of
its keeper, and `duplicate_of` always names a *kept* sample (chains through a
dropped sample are re-pointed to the final keeper). The reason says how a
sample relates to that keeper: exact < near < semantic, the weakest link wins.
The price: B within r of a dropped A but not of A's keeper stays, as its own keeper.

Keep policy (`keep`), deterministic: `best_license` = most permissive licence
family (public domain > BY > BY-SA > BY-ND > BY-NC > BY-NC-SA > BY-NC-ND >
unknown), then most pixels (original size when recorded), then earliest;
`highest_resolution` = pixels, licence, earliest; `earliest` = smallest
(shard, row), shards in sorted path order so input order does not matter.

Verification (`verify = "dhash"`). Crops and small rotations move the pHash by
8-14 bits (median 8), where distinct photos start to appear: on
bench/dedup_eval.py pHash <= 12 alone has pair precision 0.988. The dHash
(gradient signs of a 9x8 image) is stored per sample at ingest and errs on
different pairs, so a pHash match within `radius` is kept only if pHash +
dHash distance <= `verify_sum`; rows without a dHash (undecodable, no bytes)
fall back to pHash <= 4. At radius 12, verify_sum 24 the pair precision is
0.999 and near-dup recall 0.958 (crops 0.87, rotations 0.89). The catch is the
search: an exact search grows steeply with the radius (`ccurate.filters.hamming`),
hence:

Wide radius at scale (`search = "tables"`, the default, with radius 12,
`verify = "dhash"`, verify_sum 24). The candidates
are those that two radius-4 searches meet, one over the pHash and one over the dHash
(codes agreeing to within 1 bit on one of three 21-22-bit chunks), and `radius` and
`verify_sum` then apply as above: no pair outside the rule gets in, some inside it
are missed. The dHash tables meet the crops and rotations whose pHash moved on every
chunk. On bench/dedup_eval.py at radius 12, verify_sum 24: precision 0.999, recall
0.951 (the exact search: 0.964); the search costs about two radius-4 searches plus
the checks (10M rows: 304 s, 1.05 GB on one core, against 137 s for radius 4), and
drops 91.9 % of the planted p12+dh24 copies among random codes (uniform 1-12 bit pHash
moves: harder than photos); the whole 10M-row plan takes 328 s and 4.7 GB. The
plain radius-4 pHash search (`verify = "none"`, which brings radius 4 and
`search = "exact"` as its defaults; also what `hash = "dhash"` gets): precision
1.000, recall 0.788, 10M plan 131-171 s.

The near search over 64-bit codes and the leader clustering are
`ccurate.filters.hamming`; the reference sets (`against`, `previous`) and the
verified near match (the rule above, shared by the plan) are
`ccurate.filters.dedup_reference`. This module holds the config, the licence rank,
the rows, the plan and the stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from ccurate.configbase import Section
from ccurate.filters.dedup_reference import (
    Hash128,
    RefSet,
    hash_image,
    load_reference,
    match_reference,
    near_matches,
    reference_files,
    sha_parts,
)
from ccurate.filters.hamming import group_ids, leader_groups
from ccurate.filters.hashing import hex_to_u64
from ccurate.record import Decision, Sample
from ccurate.shardio import iter_samples, write_json_atomic, write_table_atomic
from ccurate.stage import Resources, Stage

log = logging.getLogger(__name__)

REASONS: dict[str, str] = {
    "duplicate_exact": "same file bytes or same decoded pixels as the kept sample in duplicate_of",
    "duplicate_near": "perceptual hash within `radius` bits of the kept sample in duplicate_of "
    "(and, with verify, pHash + dHash distance <= verify_sum)",
    "duplicate_semantic": "image embedding cosine >= 1 - semantic_eps to the kept sample in "
    "duplicate_of",
    "contaminated": "matches (exactly or within `radius`) an image of an evaluation set in "
    "`against`; duplicate_of names that image's key",
}

KeepPolicy = Literal["best_license", "highest_resolution", "earliest"]
DECISIONS_FILE = "dedup_decisions.parquet"
SUMMARY_FILE = "dedup_summary.json"

# reason codes, ordered by how loose the link is (chains keep the loosest)
_NONE, _EXACT, _NEAR, _SEMANTIC, _CONTAMINATED = 0, 1, 2, 3, 4
_REASON_NAMES = {
    _EXACT: "duplicate_exact",
    _NEAR: "duplicate_near",
    _SEMANTIC: "duplicate_semantic",
    _CONTAMINATED: "contaminated",
}


class DedupConfig(Section):
    """Exact, near and semantic dedup settings ([dedup] in the pipeline TOML)."""

    enabled: bool = True
    exact: bool = True
    near: bool = True
    hash: Literal["phash", "dhash"] = "phash"
    # pHash of real re-posts (resize, JPEG q30-90, colour jitter) lands within 4 bits,
    # crops and small rotations within 8-14 (bench/dedup_eval.py); past 4 distinct photos
    # come in unless the dHash confirms (`verify`). Without verify: 4.
    radius: int = Field(default=12, ge=0, le=16)
    # "dhash": a pHash match must also have pHash + dHash distance <= verify_sum, which
    # keeps precision at a wide radius; rows without a stored dHash get it from their
    # image bytes, or are matched within pHash 4 only (module docstring)
    verify: Literal["none", "dhash"] = "dhash"
    verify_sum: int = Field(default=24, ge=0, le=128)
    # "exact": every pair within `radius` (the search cost grows steeply past radius 6).
    # "tables": the candidates of two radius-4 searches, one over the pHash and one over
    # the dHash, then `radius` and `verify_sum` apply: approximate, but a wide radius at
    # about twice the cost of a radius-4 search (module docstring); needs verify = "dhash"
    search: Literal["exact", "tables"] = "tables"
    semantic: bool = False
    semantic_eps: float = Field(default=0.05, gt=0.0, lt=1.0)
    semantic_model: str = "ViT-B-32"
    semantic_weights: str | None = None
    semantic_model_config: str | None = None
    semantic_clusters: int = Field(default=0, ge=0)  # 0: about n/5000
    semantic_batch_size: int = Field(default=64, ge=1)
    semantic_device: str = Field(default="cpu", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    keep: KeepPolicy = "best_license"
    against: list[str] = Field(default_factory=list)
    previous: list[str] = Field(default_factory=list)
    # a row matching a `previous` row of its own key is that sample fetched again, not a
    # copy of it (rebuilds: a released sample refetched keeps its place, and new copies of
    # it are dropped as its duplicates); off: such a row is dropped like any other match
    previous_own_key_kept: bool = False
    # near-search threads: numpy holds the GIL for part of each probe, and on a shared
    # 2-core box a second thread measured slower, so one by default
    threads: int = Field(default=1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _plain_defaults(cls, data: Any) -> Any:
        """`hash = "dhash"` or `verify = "none"` alone mean the plain search (radius 4,
        exact): the wide one needs the dHash to confirm pHash matches."""
        if isinstance(data, dict) and (data.get("hash") == "dhash" or data.get("verify") == "none"):
            return {"radius": 4, "verify": "none", "search": "exact", **data}
        return data

    @model_validator(mode="after")
    def _check_verify(self) -> Self:
        if self.verify == "dhash" and self.hash != "phash":
            raise ValueError("dedup.verify = 'dhash' checks pHash matches: needs hash = 'phash'")
        if self.search == "tables" and self.verify != "dhash":
            raise ValueError(
                "dedup.search = 'tables' searches pHash and dHash: needs verify = 'dhash'"
            )
        return self


# --------------------------------------------------------------------------- licence rank


_PUBLIC_DOMAIN = (
    "cc0",
    "pdm",
    "cc-pdm",
    "cc-pddc",
    "pddc",
    "public",
    "pd-",
    "cc-zero",
    "us-government",
    "flickr-no-known-copyright",
    "no-known-copyright",
)


def license_rank(license_id: str | None) -> int:
    """Smaller is more permissive: public domain (CC0, PDM, PDDC, US-Gov, no known
    copyright) 0, BY 1, BY-SA 2, BY-ND 3, BY-NC 4, BY-NC-SA 5, BY-NC-ND 6, anything else 9.

    Reads the licence filter's SPDX ids (`CC-BY-SA-4.0`, `LicenseRef-CC-BY-2.0-DE`,
    `CC0-1.0`, `CC-PDM-1.0`, `LicenseRef-Public-Domain`) and looser spellings
    (`cc_by_nc 2.0`, `by-sa`); legacy CC 1.0 ids without BY rank with their BY twin.
    """
    if not license_id:
        return 9
    s = license_id.strip().lower().replace("_", "-").replace(" ", "-")
    s = s.removeprefix("licenseref-")
    if s.startswith(_PUBLIC_DOMAIN) or s in ("pd", "cc-pd"):
        return 0
    tokens = set(s.replace("/", "-").replace(".", "-").split("-"))
    if "by" not in tokens and not ("cc" in tokens and tokens & {"nc", "nd", "sa"}):
        return 9
    nc, nd, sa = "nc" in tokens, "nd" in tokens, "sa" in tokens
    if nc:
        return 6 if nd else 5 if sa else 4
    return 3 if nd else 2 if sa else 1


# --------------------------------------------------------------------------- rows


_INDEX_COLUMNS = [
    "key",
    "sha256",
    "pixel_sha256",
    "phash",
    "dhash",
    "width",
    "height",
    "original_width",
    "original_height",
    "license",
]


def _cat128(parts: list[Hash128]) -> Hash128:
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, bool)
    return (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        np.concatenate([p[2] for p in parts]),
    )


Computed = tuple[str | None, str | None, str | None, str | None]
"""(sha256, pixel_sha256, phash, dhash) computed from image bytes at dedup time."""


@dataclass
class _Rows:
    """Everything prepare needs about the input samples, as flat arrays (10M rows fit)."""

    keys: pa.ChunkedArray
    shard: np.ndarray
    row: np.ndarray
    lic: np.ndarray
    pixels: np.ndarray
    sha: Hash128
    pix: Hash128
    code: np.ndarray  # the configured perceptual hash (phash or dhash) as uint64
    code_ok: np.ndarray
    computed: dict[int, Computed]  # row -> hashes computed here (None: was stored)
    undecodable: int
    check: np.ndarray | None = None  # dHash verifying pHash matches (verify = "dhash")
    check_ok: np.ndarray | None = None


def _int_col(t: pa.Table, name: str) -> np.ndarray:
    if name not in t.column_names:
        return np.zeros(t.num_rows, np.int64)
    return np.asarray(t.column(name).fill_null(0).to_numpy(), dtype=np.int64)


def _license_ranks(col: pa.ChunkedArray) -> np.ndarray:
    """Rank per row through the column's dictionary: a few distinct ids, millions of rows."""
    enc = col.combine_chunks().dictionary_encode() if len(col) else None
    if enc is None:
        return np.zeros(0, np.int64)
    ranks = np.array([license_rank(v) for v in enc.dictionary.to_pylist()] + [9], np.int64)
    idx = enc.indices.fill_null(len(enc.dictionary)).to_numpy()
    return ranks[np.asarray(idx, np.int64)]


_HASH_COLUMNS = ("sha256", "pixel_sha256", "phash", "dhash")


def _valid_hex(col: pa.ChunkedArray, chars: int) -> tuple[pa.ChunkedArray, np.ndarray]:
    """The column with anything but `chars` hex digits nulled, and which rows that are."""
    col = col.cast(pa.string())
    ok = pc.fill_null(pc.match_substring_regex(col, f"^[0-9a-fA-F]{{{chars}}}$"), False)
    fixed = pc.if_else(ok, col, pa.scalar(None, pa.string()))
    return fixed, ~np.asarray(ok.to_numpy(), bool).reshape(len(col))


def _fill_missing_hashes(
    prefix: str, t: pa.Table, need: np.ndarray
) -> tuple[pa.Table, dict[int, Computed], int]:
    """Hash the images of rows missing a hash, reading the shard's tar."""
    cols = [t.column(c).to_pylist() for c in _HASH_COLUMNS]
    computed: dict[int, Computed] = {}
    undecodable = 0
    pos = {k: r for r, k in enumerate(t.column("key").to_pylist())}
    for batch in iter_samples(prefix, batch_size=64):
        for s in batch:
            r = pos.get(s.key)
            if r is None or not need[r] or s.image is None:
                continue
            old = [c[r] for c in cols]
            got = hash_image(s.image)
            if got is None:
                undecodable += 1
            now = [old[0] or hashlib.sha256(s.image).hexdigest()]
            now += [o or (got[k] if got else None) for k, o in enumerate(old[1:])]
            new = tuple(None if o else v for o, v in zip(old, now, strict=True))
            if any(v is not None for v in new):
                computed[r] = new  # type: ignore[assignment]
                for c, v in zip(cols, now, strict=True):
                    c[r] = v
    for name, col in zip(_HASH_COLUMNS, cols, strict=True):
        t = t.set_column(t.column_names.index(name), name, pa.array(col, pa.string()))
    return t, computed, undecodable


def _load_rows(inputs: list[str], cfg: DedupConfig) -> _Rows:
    """Read every shard's index; hashes become integers shard by shard to bound memory."""
    keys: list[pa.Array] = []
    shard, row, lic, pixels, code, code_ok = ([] for _ in range(6))
    sha: list[Hash128] = []
    pix: list[Hash128] = []
    check: list[np.ndarray] = []
    check_ok: list[np.ndarray] = []
    computed: dict[int, Computed] = {}
    undecodable = 0
    base = 0
    verify = cfg.near and cfg.verify == "dhash"
    for si, prefix in enumerate(inputs):
        path = f"{prefix}.parquet"
        names = set(pq.read_schema(path).names)
        want_dh = cfg.hash == "dhash" or verify  # else the column is not worth reading
        cols = [c for c in _INDEX_COLUMNS if c in names and (want_dh or c != "dhash")]
        t = pq.read_table(path, columns=cols)
        n = t.num_rows
        for c in (*_HASH_COLUMNS, "license"):
            if c not in t.column_names:
                t = t.append_column(c, pa.nulls(n, pa.string()))
        need = np.zeros(n, bool)
        wanted = ["sha256", "pixel_sha256", "phash"]
        if want_dh:
            wanted.append("dhash")
        for c in wanted:
            # empty or malformed hex counts as missing: recomputed from the image, not
            # silently left out of exact / near dedup
            col, invalid = _valid_hex(t.column(c), 64 if c.endswith("sha256") else 16)
            t = t.set_column(t.column_names.index(c), c, col)
            need |= invalid
        if need.any():
            t, got, bad = _fill_missing_hashes(prefix, t, need)
            computed.update({base + r: v for r, v in got.items()})
            undecodable += bad
        keys.append(t.column("key").combine_chunks().cast(pa.string()))
        shard.append(np.full(n, si, np.int64))
        row.append(np.arange(n, dtype=np.int64))
        lic.append(_license_ranks(t.column("license")))
        # the size as published, where recorded: ingest may upscale small images, and a crop
        # (a smaller original) is upscaled more, so stored pixels preferred re-posted crops
        # to the photo they were cut from
        orig = _int_col(t, "original_width") * _int_col(t, "original_height")
        pixels.append(np.where(orig > 0, orig, _int_col(t, "width") * _int_col(t, "height")))
        sha.append(sha_parts(t.column("sha256")))
        pix.append(sha_parts(t.column("pixel_sha256")))
        c_u, c_ok = hex_to_u64(t.column(cfg.hash))
        code.append(c_u)
        code_ok.append(c_ok)
        if verify:
            k_u, k_ok = hex_to_u64(t.column("dhash"))
            check.append(k_u)
            check_ok.append(k_ok)
        base += n

    def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    pa.default_memory_pool().release_unused()  # the string columns are gone: give pages back

    return _Rows(
        keys=pa.chunked_array(keys, pa.string()),
        shard=cat(shard, np.int64),
        row=cat(row, np.int64),
        lic=cat(lic, np.int64),
        pixels=cat(pixels, np.int64),
        sha=_cat128(sha),
        pix=_cat128(pix),
        code=cat(code, np.uint64),
        code_ok=cat(code_ok, bool),
        computed=computed,
        undecodable=undecodable,
        check=cat(check, np.uint64) if verify else None,
        check_ok=cat(check_ok, bool) if verify else None,
    )


# --------------------------------------------------------------------------- the plan


def keep_rank(
    lic: np.ndarray, pixels: np.ndarray, shard: np.ndarray, row: np.ndarray, policy: KeepPolicy
) -> np.ndarray:
    """Rank of every row under the keep policy (0 = kept first); ties by (shard, row)."""
    if policy == "best_license":
        order = np.lexsort((row, shard, -pixels, lic))
    elif policy == "highest_resolution":
        order = np.lexsort((row, shard, lic, -pixels))
    else:
        order = np.lexsort((row, shard))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank


def _first_of_key(keys: pa.ChunkedArray) -> np.ndarray:
    """For every row, the first row with its key (itself unless the key repeats)."""
    if len(keys) == 0:
        return np.zeros(0, np.int64)
    codes = keys.combine_chunks().dictionary_encode().indices.fill_null(-1)
    idx = np.asarray(codes.to_numpy(), np.int64)
    _, first, inv = np.unique(idx, return_index=True, return_inverse=True)
    return np.asarray(first[inv.reshape(-1)], np.int64)


def _resolve(target: np.ndarray, reason: np.ndarray) -> None:
    """Point every row at its final keeper; the loosest link on the chain is the reason."""
    while True:
        nxt = target[target]
        moved = nxt != target
        if not moved.any():
            return
        reason[moved] = np.maximum(reason[moved], reason[target[moved]])
        target[moved] = nxt[moved]


def _exact_components(rows: _Rows, valid: np.ndarray) -> np.ndarray:
    """Component id per row over equal file or pixel SHA-256 (rows not `valid`: alone)."""
    n = len(valid)
    sh, sl, sok = rows.sha
    ph, pl, pok = rows.pix
    sid = group_ids([sh, sl], sok & valid)
    pid = group_ids([ph, pl], pok & valid)
    ns, npx = int(sid.max(initial=-1)) + 1, int(pid.max(initial=-1)) + 1
    if ns == 0 and npx == 0:
        return np.arange(n, dtype=np.int64)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a = np.concatenate([np.flatnonzero(sid >= 0), np.flatnonzero(pid >= 0)])
    b = np.concatenate([n + sid[sid >= 0], n + ns + pid[pid >= 0]])
    size = n + ns + npx
    g = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(size, size))
    _, comp = connected_components(g, directed=False)
    return np.asarray(comp[:n], np.int64)


def _spread_to_exact_copies(
    rows: _Rows,
    alive: np.ndarray,
    rank: np.ndarray,
    match: np.ndarray,
    dist: np.ndarray,
    exact: np.ndarray,
) -> None:
    """A reference match holds for every exact copy (same bytes or pixels) of the row.

    A reference set may lack the hash that links a copy (e.g. only file SHA-256s: a
    re-encode with equal pixels is not met), and the plan takes matched rows out
    before exact grouping, so without this the copy would stay as a fresh keeper.
    Each component takes its closest, then best-ranked, matched row's match.
    """
    hit = alive & (match >= 0)
    if not hit.any():
        return
    comp = _exact_components(rows, alive)
    h = np.flatnonzero(hit)
    h = h[np.lexsort((rank[h], dist[h], comp[h]))]
    first = np.r_[True, comp[h][1:] != comp[h][:-1]]
    src = np.full(int(comp.max(initial=-1)) + 1, -1, np.int64)
    src[comp[h[first]]] = h[first]
    fill = np.flatnonzero(alive & (match < 0) & (src[comp] >= 0))
    s = src[comp[fill]]
    match[fill], dist[fill], exact[fill] = match[s], dist[s], exact[s]


def _own_key(keys: pa.ChunkedArray, ref: RefSet, match: np.ndarray) -> np.ndarray:
    """Rows whose reference match carries the row's own key."""
    same = np.zeros(len(match), bool)
    hit = np.flatnonzero(match >= 0)
    if len(hit):
        eq = pc.equal(keys.take(pa.array(hit)), ref.keys.take(pa.array(match[hit])))
        same[hit] = np.asarray(pc.fill_null(eq, False).to_numpy(zero_copy_only=False), bool)
    return same


@dataclass
class Plan:
    """The decisions for every row (arrays over all input rows) and a summary."""

    table: pa.Table
    summary: dict[str, Any]


def plan_dedup(
    rows: _Rows,
    cfg: DedupConfig,
    against: RefSet | None = None,
    previous: RefSet | None = None,
    embed: Any = None,
) -> Plan:
    """Decide keep/drop for every row. `embed(rows_idx) -> embeddings` is used for semantic."""
    n = len(rows.shard)
    rank = keep_rank(rows.lic, rows.pixels, rows.shard, rows.row, cfg.keep)
    alive = np.ones(n, bool)
    target = np.arange(n, dtype=np.int64)
    reason = np.zeros(n, np.int8)
    hdist = np.full(n, -1, np.int16)
    cosine = np.full(n, np.nan, np.float32)
    # a key seen twice (same URL + page ingested into two shards) can carry one decision
    # only: later copies stay out of the plan and share the first copy's fate in `process`,
    # which is how the summary counts them too
    first_of = _first_of_key(rows.keys)
    repeat = first_of != np.arange(n)
    alive[repeat] = False
    ext_src = np.full(n, -1, np.int8)  # which reference set a row matched (0 against, 1 previous)
    ext_idx = np.zeros(n, np.int64)  # and which row of it
    refs = [against, previous]

    for src, (ref, is_eval) in enumerate(((against, True), (previous, False))):
        if ref is None:
            continue
        match, dist, exact = match_reference(rows, alive, ref, cfg)
        own = not is_eval and cfg.previous_own_key_kept
        if own:
            match[_own_key(rows.keys, ref, match)] = -1
        _spread_to_exact_copies(rows, alive, rank, match, dist, exact)
        if own:  # a copy's match spread back onto the sample itself
            match[_own_key(rows.keys, ref, match)] = -1
        hit = np.flatnonzero(match >= 0)
        ext_src[hit] = src
        ext_idx[hit] = match[hit]
        reason[hit] = _CONTAMINATED if is_eval else np.where(exact[hit], _EXACT, _NEAR)
        hdist[hit] = dist[hit]
        alive[hit] = False

    if cfg.exact:
        comp = _exact_components(rows, alive)
        idx = np.flatnonzero(alive)
        o = idx[np.lexsort((rank[idx], comp[idx]))]
        first = np.ones(len(o), bool)
        first[1:] = comp[o[1:]] != comp[o[:-1]]
        keeper_of = o[np.maximum.accumulate(np.where(first, np.arange(len(o)), 0))]
        dup = keeper_of != o
        target[o[dup]] = keeper_of[dup]
        reason[o[dup]] = _EXACT

    if cfg.near:
        cand = np.flatnonzero(alive & (target == np.arange(n)) & rows.code_ok)
        if len(cand):
            chk, chk_ok = rows.check, rows.check_ok
            if chk is None or chk_ok is None:
                _, inv = np.unique(rows.code[cand], return_inverse=True)
            else:  # rows with equal pHash but different (or no) dHash are verified apart
                parts = [rows.code[cand], chk[cand], chk_ok[cand].astype(np.uint64)]
                inv = group_ids(parts, np.ones(len(cand), bool))
            o = np.lexsort((rank[cand], inv))  # by code, best rank first
            starts = np.flatnonzero(np.r_[True, inv[o][1:] != inv[o][:-1]])
            best = cand[o][starts]  # the best row of each distinct code
            uc = rows.code[best]
            i, j, d = near_matches(
                uc,
                None if chk is None else chk[best],
                None if chk_ok is None else chk_ok[best],
                cfg,
            )
            lead, _ = leader_groups(len(uc), i, j, d, rank[best])
            keeper = best[lead[inv]]
            dup = keeper != cand
            target[cand[dup]] = keeper[dup]
            reason[cand[dup]] = _NEAR

    internal = alive.copy()
    _resolve(target, reason)

    if cfg.semantic and embed is not None:
        from ccurate.filters.semantic import semantic_groups

        keepers = np.flatnonzero(internal & (target == np.arange(n)))
        keepers = keepers[np.argsort(rank[keepers], kind="stable")]
        emb, have = embed(keepers)
        kk = keepers[have]
        if len(kk) > 1:
            k = cfg.semantic_clusters or max(1, len(kk) // 5000)
            for group in semantic_groups(emb, k, cfg.semantic_eps):
                head = kk[group[0]]
                for g in group[1:]:
                    target[kk[g]] = head
                    reason[kk[g]] = _SEMANTIC
                    cosine[kk[g]] = float(np.dot(emb[group[0]], emb[g]))
            _resolve(target, reason)

    # hamming distance of every exact/near duplicate to its final keeper
    dup_rows = np.flatnonzero(internal & (target != np.arange(n)))
    both = rows.code_ok[dup_rows] & rows.code_ok[target[dup_rows]]
    hd = np.bitwise_count(rows.code[dup_rows] ^ rows.code[target[dup_rows]]).astype(np.int16)
    hdist[dup_rows] = np.where(both, hd, np.where(reason[dup_rows] == _EXACT, 0, -1))
    # cosine stays known only for direct semantic links (not for rows chained through one)

    group_size = np.bincount(target[internal], minlength=n).astype(np.int32)
    dropped = reason > 0
    keep_row = dropped | (group_size > 1)
    computed_rows = np.array(sorted(rows.computed), np.int64)
    keep_row[computed_rows] = True
    keep_row[repeat] = False
    computed_rows = computed_rows[~repeat[computed_rows]]
    out = np.flatnonzero(keep_row)
    # duplicate_of: the keeper's key, or the matched reference row's key (Arrow takes, no loops)
    internal_dup = target[out] != out
    dup_of: pa.Array = pc.if_else(
        pa.array(internal_dup),
        rows.keys.take(pa.array(target[out])),
        pa.nulls(len(out), pa.string()),
    )
    for src, ref in enumerate(refs):
        mine = ext_src[out] == src
        if ref is not None and mine.any():
            theirs = ref.keys.take(pa.array(np.where(mine, ext_idx[out], 0)))
            dup_of = pc.if_else(pa.array(mine), theirs, dup_of)
    comp_cols: list[list[str | None]] = [[None] * len(out) for _ in range(4)]
    for at, r in zip(
        np.searchsorted(out, computed_rows).tolist(), computed_rows.tolist(), strict=True
    ):
        for c in range(4):
            comp_cols[c][at] = rows.computed[r][c]
    table = pa.table(
        {
            "key": rows.keys.take(pa.array(out)),
            "action": pa.array(np.where(dropped[out], "drop", "keep").tolist(), pa.string()),
            "reason": pa.array([_REASON_NAMES.get(int(v)) for v in reason[out]], pa.string()),
            "duplicate_of": pa.array(dup_of, pa.string()),
            "group_size": pa.array(np.where(dropped[out], 0, group_size[out]), pa.int32()),
            "hamming": pa.array(hdist[out], pa.int16(), mask=hdist[out] < 0),
            "cosine": pa.array(cosine[out], pa.float32(), mask=np.isnan(cosine[out])),
            "sha256": pa.array(comp_cols[0], pa.string()),
            "pixel_sha256": pa.array(comp_cols[1], pa.string()),
            "phash": pa.array(comp_cols[2], pa.string()),
            "dhash": pa.array(comp_cols[3], pa.string()),
        }
    )
    fate = reason[first_of]  # what `process` does to every row, repeated keys included
    counts = {name: int((fate == code).sum()) for code, name in _REASON_NAMES.items()}
    summary: dict[str, Any] = {
        "rows": n,
        "kept": int((fate == _NONE).sum()),
        "dropped": int((fate > _NONE).sum()),
        "drops": counts,
        "groups": int((group_size > 1).sum()),
        "hashes_computed": len(rows.computed),
        "undecodable": rows.undecodable,
        "missing_perceptual_hash": int((~rows.code_ok).sum()),
        "repeated_keys": int(repeat.sum()),
    }
    for name, ref in (("against", against), ("previous", previous)):
        report = ref.report if ref is not None else {}
        # what the decontamination promise rests on: reference rows read, and usable
        summary[f"{name}_rows"] = report.get("rows", 0)
        summary[f"{name}_usable"] = report.get("usable", 0)
        summary[f"{name}_unread"] = {k: v for k, v in report.items() if k not in ("rows", "usable")}
    if repeat.any():
        log.warning(
            "dedup: %d rows repeat an earlier row's key; they follow its decision",
            int(repeat.sum()),
        )
    return Plan(table, summary)


# --------------------------------------------------------------------------- the stage


def _fingerprint(inputs: list[str], cfg: DedupConfig) -> str:
    """Config + input files (size, mtime): a rerun with the same inputs reuses the plan."""
    h = hashlib.sha256(cfg.model_dump_json().encode())
    for prefix in inputs:
        st = os.stat(f"{prefix}.parquet")
        h.update(f"{prefix}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    files = list(reference_files([*cfg.against, *cfg.previous]))
    if cfg.semantic:  # new weights under the same path embed differently: a new plan
        for spec in (cfg.semantic_weights, cfg.semantic_model_config):
            if spec and not spec.startswith("hf-hub:"):
                p = Path(spec.removeprefix("local-dir:")).expanduser()
                files += [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class DedupStage(Stage):
    """Applies the global dedup plan shard by shard (see the module docstring).

    `prepare` must run first, on the driver, over all input shards; `process`
    then looks each sample up in the plan: keepers get `duplicate_count`,
    dropped ones `duplicate_of` and a recorded decision with the reason and the
    Hamming distance (or cosine) to what they duplicate.
    """

    name: ClassVar[str] = "dedup"
    preserves_keys: ClassVar[bool] = True
    batch_size: int = 256

    def __init__(self, cfg: DedupConfig | None = None) -> None:
        self.cfg = cfg or DedupConfig()
        self.decisions_path: str | None = None
        self._decisions: dict[str, tuple[Any, ...]] | None = None

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1.0, memory_gb=2.0)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_decisions"] = None  # workers load the plan in setup, not through pickling
        return state

    def prepare(self, inputs: list[str], scratch_dir: str) -> None:
        if not self.cfg.enabled:
            return
        inputs = sorted(str(p) for p in inputs)
        out = Path(scratch_dir) / DECISIONS_FILE
        fp = _fingerprint(inputs, self.cfg)
        if out.exists():
            meta = pq.read_schema(out).metadata or {}
            if meta.get(b"ccurate.dedup.fingerprint") == fp.encode():
                self.decisions_path = str(out)
                return
        if self.cfg.semantic and not self.cfg.semantic_weights:
            raise ValueError(
                "dedup.semantic needs CLIP weights: set dedup.semantic_weights to a local "
                "open_clip checkpoint of dedup.semantic_model (e.g. open_clip_pytorch_model.bin "
                "from `huggingface-cli download laion/CLIP-ViT-B-32-laion2B-s34B-b79K`) "
                "or an `hf-hub:` id already in the local cache"
            )
        rows = _load_rows(inputs, self.cfg)
        chk = self.cfg.verify == "dhash"
        against = load_reference(self.cfg.against, self.cfg.hash, chk) if self.cfg.against else None
        previous = (
            load_reference(self.cfg.previous, self.cfg.hash, chk) if self.cfg.previous else None
        )
        embed = None
        if self.cfg.semantic:
            from ccurate.filters.semantic import ClipImageEmbedder, embed_rows

            embedder = ClipImageEmbedder(
                self.cfg.semantic_model,
                self.cfg.semantic_weights,
                model_config=self.cfg.semantic_model_config,
                device=self.cfg.semantic_device,
                batch_size=self.cfg.semantic_batch_size,
            )

            def embed(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                return embed_rows(embedder, inputs, rows.shard[idx], rows.row[idx])

        plan = plan_dedup(rows, self.cfg, against, previous, embed)
        table = plan.table.replace_schema_metadata({"ccurate.dedup.fingerprint": fp})
        plan.summary["config"] = json.loads(self.cfg.model_dump_json())
        # the summary first: the decisions file is what a rerun adopts, so a kill between
        # the two must not leave a plan whose summary is an older plan's (or missing)
        write_json_atomic(Path(scratch_dir) / SUMMARY_FILE, plan.summary)
        write_table_atomic(out, table)
        self.decisions_path = str(out)
        log.info("dedup plan: %s", {k: plan.summary[k] for k in ("rows", "kept", "drops")})

    def setup(self) -> None:
        if not self.cfg.enabled:
            return
        if self.decisions_path is None or not Path(self.decisions_path).exists():
            raise RuntimeError(
                "DedupStage.prepare(inputs, scratch_dir) must run before process: dedup is "
                "global and decides from every shard at once"
            )
        t = pq.read_table(self.decisions_path)
        if "dhash" not in t.column_names:  # a plan written before dHash was stored
            t = t.append_column("dhash", pa.nulls(t.num_rows, pa.string()))
        cols = [
            t.column(c).to_pylist()
            for c in (
                "action",
                "reason",
                "duplicate_of",
                "group_size",
                "hamming",
                "cosine",
                "sha256",
                "pixel_sha256",
                "phash",
                "dhash",
            )
        ]
        self._decisions = dict(
            zip(t.column("key").to_pylist(), zip(*cols, strict=True), strict=True)
        )

    def teardown(self) -> None:
        self._decisions = None

    def process(self, batch: list[Sample]) -> list[Sample]:
        if not self.cfg.enabled:
            return batch
        if self._decisions is None:
            self.setup()
        assert self._decisions is not None
        for s in batch:
            if not s.kept:
                continue
            d = self._decisions.get(s.key)
            if d is None:
                s.duplicate_count = 1
                s.record(Decision(self.name, True))
                continue
            action, reason, dup_of, size, ham, cos, sha, pix, ph, dh = d
            # the plan carries a hash only where the stored one was missing or malformed
            s.sha256 = sha or s.sha256
            s.pixel_sha256 = pix or s.pixel_sha256
            s.phash = ph or s.phash
            s.dhash = dh or s.dhash
            scores: dict[str, float] = {}
            if ham is not None:
                scores["hamming"] = float(ham)
            if cos is not None:
                scores["cosine"] = float(cos)
            if action == "drop":
                s.duplicate_of = dup_of
                s.record(Decision(self.name, False, reason, scores))
            else:
                s.duplicate_count = int(size) if size else 1
                s.record(Decision(self.name, True))
        return batch

    def describe(self) -> dict[str, Any]:
        return json.loads(self.cfg.model_dump_json())
