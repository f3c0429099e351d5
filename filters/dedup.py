"""Global deduplication: exact, near (perceptual hash) and semantic, plus decontamination.

Dedup needs every shard at once, so it is planned in `DedupStage.prepare` on the
driver from the shards' parquet indexes (no image bytes unless a hash is
missing), written as one decisions parquet, and then applied shard by shard in
`process`, like any other stage.

Order of the plan (each step only sees what the previous ones left):

1. decontamination: samples matching an evaluation set (`against`) ->
   `contaminated`; samples matching an earlier release (`previous`) ->
   `duplicate_exact` / `duplicate_near` with `duplicate_of` = the earlier key;
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
search: an exact multi-index search grows steeply with the radius (1M hashes:
radius 4 10.5 s, 8 63 s, 10 306 s on one shared core; hours at 10M), hence:

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

Near search is multi-index hashing (Norouzi et al., the idea behind faiss'
`IndexBinaryMultiHash`): the 64 bits are cut into m chunks; two codes within r
bits agree to within floor(r/m) bits on at least one chunk (pigeonhole), so
probing each chunk's table with every flip pattern of up to floor(r/m) bits
finds every pair, exactly. Tables are direct-addressed arrays (2^21 buckets)
and probes are batched numpy, which measured ~4.6x faster than faiss'
`IndexBinaryMultiHash.range_search` on the same data (bench/dedup_eval.py
keeps faiss as the anchor; tests check exactness against faiss'
brute-force `IndexBinaryFlat.range_search`). At radius 4, 10M hashes search in
~2.5 min and the whole 10M-row plan takes ~3 min on one shared core.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from pydantic import Field, model_validator

from ccurate.configbase import Section
from ccurate.filters.hashing import hex_to_u64, image_hashes
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
_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}

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
    semantic_device: str = "cpu"
    keep: KeepPolicy = "best_license"
    against: list[str] = Field(default_factory=list)
    previous: list[str] = Field(default_factory=list)
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


# --------------------------------------------------------------------------- near search


def _chunk_plan(n_index: int, radius: int) -> tuple[list[int], int]:
    """Chunk widths and per-chunk flip budget minimising the estimated probe + candidate work."""
    best: tuple[float, list[int], int] | None = None
    for m in range(3, 9):
        widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
        f = radius // m
        b = min(widths)
        probes = sum(sum(math.comb(w, k) for k in range(f + 1)) for w in widths)
        cost = probes * (1.0 + 4.0 * n_index / float(1 << b))
        if best is None or cost < best[0]:
            best = (cost, widths, f)
    assert best is not None
    return best[1], best[2]


def _flip_masks(width: int, f: int) -> np.ndarray:
    masks = [0]
    for k in range(1, f + 1):
        for comb in itertools.combinations(range(width), k):
            masks.append(sum(1 << b for b in comb))
    return np.array(masks, dtype=np.int32)


def near_pairs(
    codes: np.ndarray,
    radius: int,
    index: np.ndarray | None = None,
    threads: int = 1,
    candidate_budget: int = 1 << 21,
    table_radius: int | None = None,
    also: tuple[np.ndarray, np.ndarray, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of 64-bit codes within `radius` bits, exactly (multi-index hashing).

    Self-join (`index=None`): pairs (i, j) with i < j. Cross-join: (query i, index j).
    Returns (i, j, distance) sorted by (i, j). Duplicate codes are fine but cost
    candidates; callers dedupe equal codes first. `table_radius` < `radius` sizes the
    tables and probes for that smaller radius instead: every pair within it, and those
    up to `radius` that its probes happen to meet (approximate, at its cost).
    `also` = (second codes of the queries, of the index, max distance): a pair must
    be that close in those codes too (checked on the candidates, so the result stays small).
    """
    q = np.ascontiguousarray(codes, dtype=np.uint64)
    self_join = index is None
    x = q if index is None else np.ascontiguousarray(index, dtype=np.uint64)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int8))
    if len(q) == 0 or len(x) == 0:
        return empty
    widths, f = _chunk_plan(len(x), radius if table_radius is None else table_radius)
    shifts = np.cumsum([0, *widths[:-1]]).tolist()
    r = np.uint64(radius)
    # 32-bit row indices halve the memory of tables and candidates when they fit
    idx_t = np.int32 if max(len(q), len(x)) < 2**31 - 1 else np.int64

    def chunk(values: np.ndarray, c: int) -> np.ndarray:
        return ((values >> np.uint64(shifts[c])) & np.uint64((1 << widths[c]) - 1)).astype(np.int32)

    def run_chunk(c: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        vx = chunk(x, c)
        order = np.argsort(vx, kind="stable").astype(idx_t)
        offs = np.zeros((1 << widths[c]) + 1, idx_t)
        np.cumsum(np.bincount(vx, minlength=1 << widths[c]), out=offs[1:])
        del vx
        vq = chunk(q, c)
        masks = _flip_masks(widths[c], f)
        # batch so that probes and their candidates stay around `candidate_budget` entries
        occupancy = len(x) / float(1 << widths[c])
        qb = max(1, int(candidate_budget / (len(masks) * (1.0 + occupancy))))
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for q0 in range(0, len(q), qb):
            qidx = np.arange(q0, min(len(q), q0 + qb), dtype=idx_t)
            probe = (vq[qidx, None] ^ masks[None, :]).ravel()
            qrep = np.repeat(qidx, len(masks))
            start = offs[probe]
            cnt = offs[probe + 1] - start
            hit = cnt > 0
            qrep, start, cnt = qrep[hit], start[hit], cnt[hit]
            total = int(cnt.sum())
            if total == 0:
                continue
            qi = np.repeat(qrep, cnt)
            pos = np.arange(total, dtype=idx_t) + np.repeat(start - (np.cumsum(cnt) - cnt), cnt)
            cj = order[pos]
            if self_join:
                keep = cj > qi
                qi, cj = qi[keep], cj[keep]
            xo = q[qi] ^ x[cj]
            dist = np.bitwise_count(xo)
            ok = dist <= r
            if also is not None:
                ok &= np.bitwise_count(also[0][qi] ^ also[1][cj]) <= also[2]
            for c2 in range(c):  # found already through an earlier chunk
                part = (xo >> np.uint64(shifts[c2])) & np.uint64((1 << widths[c2]) - 1)
                ok &= np.bitwise_count(part) > f
            out.append((qi[ok].astype(np.int64), cj[ok].astype(np.int64), dist[ok].astype(np.int8)))
        return out

    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            parts = [p for res in pool.map(run_chunk, range(len(widths))) for p in res]
    else:
        parts = [p for c in range(len(widths)) for p in run_chunk(c)]
    if not parts:
        return empty
    i = np.concatenate([p[0] for p in parts])
    j = np.concatenate([p[1] for p in parts])
    d = np.concatenate([p[2] for p in parts])
    o = np.lexsort((j, i))
    return i[o], j[o], d[o]


def leader_groups(
    n: int, i: np.ndarray, j: np.ndarray, d: np.ndarray, rank: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy leader clustering of a match graph, best rank first.

    Returns (leader, dist): leader[u] == u for keepers, else the keeper u was
    matched to *directly* (no chaining), dist the match's distance. Components
    that are single pairs (the common case) are solved vectorised; bigger ones
    in a loop over their nodes only.
    """
    leader = np.arange(n, dtype=np.int64)
    dist = np.zeros(n, dtype=d.dtype if len(d) else np.int8)
    if len(i) == 0:
        return leader, dist
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes, inv = np.unique(np.concatenate([i, j]), return_inverse=True)
    li, lj = inv[: len(i)], inv[len(i) :]
    k = len(nodes)
    graph = coo_matrix((np.ones(len(li), np.int8), (li, lj)), shape=(k, k))
    ncomp, comp = connected_components(graph, directed=False)
    size = np.bincount(comp, minlength=ncomp)
    # pairs: the better-ranked end keeps
    pair = size[comp[li]] == 2
    a, b, dd = nodes[li[pair]], nodes[lj[pair]], d[pair]
    a_wins = rank[a] < rank[b]
    win, lose = np.where(a_wins, a, b), np.where(a_wins, b, a)
    leader[lose] = win
    dist[lose] = dd
    big = ~pair
    if big.any():
        u = np.concatenate([nodes[li[big]], nodes[lj[big]]])
        v = np.concatenate([nodes[lj[big]], nodes[li[big]]])
        w = np.concatenate([d[big], d[big]])
        o = np.lexsort((rank[v], u))
        u, v, w = u[o], v[o], w[o]
        starts = np.searchsorted(u, np.unique(u))
        heads = u[starts]
        ends = np.append(starts[1:], len(u))
        span = {int(h): (int(s), int(e)) for h, s, e in zip(heads, starts, ends, strict=True)}
        assigned: set[int] = set()
        for node in heads[np.argsort(rank[heads], kind="stable")].tolist():
            if node in assigned:
                continue
            assigned.add(node)
            s, e = span[node]
            for other, dv in zip(v[s:e].tolist(), w[s:e].tolist(), strict=True):
                if other not in assigned:
                    assigned.add(other)
                    leader[other] = node
                    dist[other] = dv
    return leader, dist


def _group_ids(parts: list[np.ndarray], valid: np.ndarray) -> np.ndarray:
    """Dense ids for equal tuples of uint64 columns (e.g. a 128-bit SHA prefix); -1 if invalid."""
    n = len(valid)
    ids = np.full(n, -1, np.int64)
    idx = np.flatnonzero(valid)
    if len(idx) == 0:
        return ids
    cols = [p[idx] for p in parts]
    o = np.lexsort(cols[::-1])
    change = np.zeros(len(idx), bool)
    change[0] = True
    for c in cols:
        cs = c[o]
        change[1:] |= cs[1:] != cs[:-1]
    ids[idx[o]] = np.cumsum(change) - 1
    return ids


def _sha_parts(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First 128 bits of hex SHA-256 strings as two uint64 columns, plus a validity mask."""
    hi, v1 = hex_to_u64(pc.utf8_slice_codeunits(col, 0, 16))
    lo, v2 = hex_to_u64(pc.utf8_slice_codeunits(col, 16, 32))
    return hi, lo, v1 & v2


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
_DIM_COLUMNS = ["width", "height", "original_width", "original_height"]

Hash128 = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(high 64 bits, low 64 bits, valid) of hex SHA-256 strings: 16 bytes a row instead of ~70."""


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


def _hash_image(data: bytes) -> tuple[str, str, str] | None:
    """(pixel_sha256, phash, dhash) of image bytes, None if they do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return tuple(image_hashes(im))  # type: ignore[return-value]
    except Exception:  # undecodable bytes: no perceptual hash, exact only on file bytes
        return None


_HASH_COLUMNS = ("sha256", "pixel_sha256", "phash", "dhash")


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
            got = _hash_image(s.image)
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
            need |= np.asarray(t.column(c).is_null().to_numpy(zero_copy_only=False), bool)
        if need.any():
            t, got, bad = _fill_missing_hashes(prefix, t, need)
            computed.update({base + r: v for r, v in got.items()})
            undecodable += bad
        keys.append(t.column("key").combine_chunks().cast(pa.string()))
        shard.append(np.full(n, si, np.int64))
        row.append(np.arange(n, dtype=np.int64))
        lic.append(_license_ranks(t.column("license")))
        w = np.maximum(_int_col(t, "original_width"), _int_col(t, "width"))
        h = np.maximum(_int_col(t, "original_height"), _int_col(t, "height"))
        pixels.append(w * h)
        sha.append(_sha_parts(t.column("sha256")))
        pix.append(_sha_parts(t.column("pixel_sha256")))
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


# --------------------------------------------------------------------------- reference sets


@dataclass
class _RefSet:
    """Hashes to match against (evaluation sets, earlier releases); keys may be unknown."""

    keys: pa.ChunkedArray
    sha: Hash128
    pix: Hash128
    code: np.ndarray
    code_ok: np.ndarray
    check: np.ndarray | None = None  # dHash, when verifying
    check_ok: np.ndarray | None = None


def _reference_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            files.extend(
                f
                for f in sorted(path.rglob("*"))
                if f.is_file()
                and not f.name.startswith(".")
                and not f.name.endswith(".dropped.parquet")
                and (f.suffix == ".parquet" or f.suffix.lower() in _IMAGE_EXTS)
            )
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"dedup reference set not found: {path}")
    return files


def load_reference(paths: list[str], hash_name: str = "phash", check: bool = False) -> _RefSet:
    """Parquet files/dirs with `sha256`/`pixel_sha256`/`phash` (or `dhash`) columns, or images.

    Parquet rows keep their `key` column (if any) as the `duplicate_of` target;
    image files are hashed here and named by their path. `check` also loads the
    `dhash` column to verify pHash matches (rows without one: pHash <= 4 only).
    """
    keys: list[pa.Array] = []
    sha: list[pa.Array] = []
    pix: list[pa.Array] = []
    codes: list[pa.Array] = []
    checks: list[pa.Array] = []
    for f in _reference_files(paths):
        if f.suffix == ".parquet":
            names = set(pq.read_schema(f).names)
            cols = dict.fromkeys(("key", "sha256", "pixel_sha256", hash_name, "dhash"))
            wanted = [c for c in cols if c in names]
            if not {"sha256", "pixel_sha256", hash_name} & names:
                raise ValueError(
                    f"dedup reference {f} has none of the columns sha256, pixel_sha256, {hash_name}"
                )
            t = pq.read_table(f, columns=wanted)
            n = t.num_rows
            keys.append(
                t.column("key").combine_chunks().cast(pa.string())
                if "key" in names
                else pa.nulls(n, pa.string())
            )
            for out, c in (
                (sha, "sha256"),
                (pix, "pixel_sha256"),
                (codes, hash_name),
                (checks, "dhash"),
            ):
                out.append(
                    t.column(c).combine_chunks().cast(pa.string())
                    if c in names
                    else pa.nulls(n, pa.string())
                )
        else:
            data = f.read_bytes()
            got = _hash_image(data)
            keys.append(pa.array([str(f)], pa.string()))
            sha.append(pa.array([hashlib.sha256(data).hexdigest()], pa.string()))
            pix.append(pa.array([got[0] if got else None], pa.string()))
            code = (got[2] if hash_name == "dhash" else got[1]) if got else None
            codes.append(pa.array([code], pa.string()))
            checks.append(pa.array([got[2] if got else None], pa.string()))
    code_u, ok = hex_to_u64(pa.chunked_array(codes, pa.string()))
    chk_u, chk_ok = hex_to_u64(pa.chunked_array(checks, pa.string())) if check else (None, None)
    return _RefSet(
        pa.chunked_array(keys, pa.string()),
        _sha_parts(pa.chunked_array(sha, pa.string())),
        _sha_parts(pa.chunked_array(pix, pa.string())),
        code_u,
        ok,
        chk_u,
        chk_ok,
    )


_UNVERIFIED_RADIUS = 4  # pHash-only matches when a dHash is missing: the measured-safe radius


def _verified(
    d: np.ndarray,
    chk_a: np.ndarray | None,
    ok_a: np.ndarray | None,
    chk_b: np.ndarray | None,
    ok_b: np.ndarray | None,
    cfg: DedupConfig,
) -> np.ndarray:
    """Which matches (pHash distance d, dHashes of both ends) pass `verify`."""
    if cfg.verify == "none" or chk_a is None or chk_b is None:
        return np.ones(len(d), bool)
    assert ok_a is not None and ok_b is not None
    both = ok_a & ok_b
    dd = np.bitwise_count(chk_a ^ chk_b).astype(np.int64)
    d64 = d.astype(np.int64)
    return np.where(both, d64 + dd <= cfg.verify_sum, d64 <= _UNVERIFIED_RADIUS)


TABLE_RADIUS = 4  # search = "tables": each table set is sized as the radius-4 search


def _near_matches(
    code_q: np.ndarray,
    chk_q: np.ndarray | None,
    ok_q: np.ndarray | None,
    cfg: DedupConfig,
    index: tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Verified near matches (i, j, pHash distance), sorted by (i, j): a self-join of the
    query codes (i < j), or queries against `index` = (codes, dHashes, dHash present).

    `search = "tables"` adds to the pHash candidates those of a dHash search (pairs whose
    dHashes are within `verify_sum`), so a crop that moved the pHash but not the dHash
    is still met; `radius` and the verify rule then apply to all."""
    code_x, chk_x, ok_x = (code_q, chk_q, ok_q) if index is None else index
    x = None if index is None else code_x
    table_radius = TABLE_RADIUS if cfg.search == "tables" else None
    i, j, d = near_pairs(code_q, cfg.radius, x, cfg.threads, table_radius=table_radius)
    if chk_q is None or ok_q is None or chk_x is None or ok_x is None:
        return i, j, d
    if table_radius is not None:
        sq, sx = np.flatnonzero(ok_q), np.flatnonzero(ok_x)
        xd = None if index is None else chk_x[sx]
        # pHash within `radius` checked on the candidates: random dHashes that share a
        # table chunk are mostly within verify_sum bits, and would pile up otherwise
        i2, j2, _ = near_pairs(
            chk_q[sq],
            cfg.verify_sum,
            xd,
            cfg.threads,
            table_radius=table_radius,
            also=(code_q[sq], code_x[sx], cfg.radius),
        )
        i2, j2 = sq[i2], sx[j2]
        i = np.concatenate([i, i2])
        j = np.concatenate([j, j2])
        d = np.concatenate([d, np.bitwise_count(code_q[i2] ^ code_x[j2]).astype(np.int8)])
        o = np.lexsort((j, i))
        i, j, d = i[o], j[o], d[o]
        first = np.ones(len(i), bool)
        first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
        i, j, d = i[first], j[first], d[first]
    ok = _verified(d, chk_q[i], ok_q[i], chk_x[j], ok_x[j], cfg)
    return i[ok], j[ok], d[ok]


def _match_reference(
    rows: _Rows, alive: np.ndarray, ref: _RefSet, cfg: DedupConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row: index of the matching reference row (-1 if none), distance, exact flag."""
    n = len(alive)
    match = np.full(n, -1, np.int64)
    dist = np.zeros(n, np.int16)
    exact = np.zeros(n, bool)
    if len(ref.keys) == 0:
        return match, dist, exact
    for (hi_a, lo_a, ok_a), (hi_b, lo_b, ok_b) in ((rows.sha, ref.sha), (rows.pix, ref.pix)):
        ids = _group_ids(
            [np.concatenate([hi_a, hi_b]), np.concatenate([lo_a, lo_b])],
            np.concatenate([ok_a & alive, ok_b]),
        )
        ida, idb = ids[:n], ids[n:]
        ref_ids = np.full(int(ids.max(initial=-1)) + 1, -1, np.int64)
        have = np.flatnonzero(idb >= 0)[::-1]  # reversed: the first reference row wins
        ref_ids[idb[have]] = have
        hit = (ida >= 0) & (match < 0)
        hit[hit] = ref_ids[ida[hit]] >= 0
        match[hit] = ref_ids[ida[hit]]
        exact[hit] = True
    if cfg.near:
        q = np.flatnonzero(alive & rows.code_ok & (match < 0))
        x = np.flatnonzero(ref.code_ok)
        if len(q) and len(x):

            def at(a: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
                return None if a is None else a[idx]

            i, j, d = _near_matches(
                rows.code[q],
                at(rows.check, q),
                at(rows.check_ok, q),
                cfg,
                (ref.code[x], at(ref.check, x), at(ref.check_ok, x)),
            )
        else:
            i = j = np.zeros(0, np.int64)
            d = np.zeros(0, np.int8)
        if len(i):
            o = np.lexsort((j, d, i))  # closest, then first reference row
            i, j, d = i[o], j[o], d[o]
            first = np.ones(len(i), bool)
            first[1:] = i[1:] != i[:-1]
            match[q[i[first]]] = x[j[first]]
            dist[q[i[first]]] = d[first]
    return match, dist, exact


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


def _repeated_keys(keys: pa.ChunkedArray) -> np.ndarray:
    """True for every row whose key already appeared in an earlier row."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, bool)
    codes = keys.combine_chunks().dictionary_encode().indices.fill_null(-1)
    idx = np.asarray(codes.to_numpy(), np.int64)
    _, first = np.unique(idx, return_index=True)
    repeat = np.ones(n, bool)
    repeat[first] = False
    return repeat


def _resolve(target: np.ndarray, reason: np.ndarray) -> None:
    """Point every row at its final keeper; the loosest link on the chain is the reason."""
    while True:
        nxt = target[target]
        moved = nxt != target
        if not moved.any():
            return
        reason[moved] = np.maximum(reason[moved], reason[target[moved]])
        target[moved] = nxt[moved]


@dataclass
class Plan:
    """The decisions for every row (arrays over all input rows) and a summary."""

    table: pa.Table
    summary: dict[str, Any]


def plan_dedup(
    rows: _Rows,
    cfg: DedupConfig,
    against: _RefSet | None = None,
    previous: _RefSet | None = None,
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
    # only: later copies stay out of the plan and share the first copy's fate in `process`
    repeat = _repeated_keys(rows.keys)
    alive[repeat] = False
    ext_src = np.full(n, -1, np.int8)  # which reference set a row matched (0 against, 1 previous)
    ext_idx = np.zeros(n, np.int64)  # and which row of it
    refs = [against, previous]

    for src, (ref, is_eval) in enumerate(((against, True), (previous, False))):
        if ref is None:
            continue
        match, dist, exact = _match_reference(rows, alive, ref, cfg)
        hit = np.flatnonzero(match >= 0)
        ext_src[hit] = src
        ext_idx[hit] = match[hit]
        reason[hit] = _CONTAMINATED if is_eval else np.where(exact[hit], _EXACT, _NEAR)
        hdist[hit] = dist[hit]
        alive[hit] = False

    if cfg.exact:
        sh, sl, sok = rows.sha
        ph, pl, pok = rows.pix
        sid = _group_ids([sh, sl], sok & alive)
        pid = _group_ids([ph, pl], pok & alive)
        ns, npx = int(sid.max(initial=-1)) + 1, int(pid.max(initial=-1)) + 1
        if ns > 0 or npx > 0:
            from scipy.sparse import coo_matrix
            from scipy.sparse.csgraph import connected_components

            a = np.concatenate([np.flatnonzero(sid >= 0), np.flatnonzero(pid >= 0)])
            b = np.concatenate([n + sid[sid >= 0], n + max(ns, 0) + pid[pid >= 0]])
            size = n + max(ns, 0) + max(npx, 0)
            g = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(size, size))
            _, comp = connected_components(g, directed=False)
            comp = comp[:n]
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
                inv = _group_ids(parts, np.ones(len(cand), bool))
            o = np.lexsort((rank[cand], inv))  # by code, best rank first
            starts = np.flatnonzero(np.r_[True, inv[o][1:] != inv[o][:-1]])
            best = cand[o][starts]  # the best row of each distinct code
            uc = rows.code[best]
            i, j, d = _near_matches(
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
    counts = {name: int((reason == code).sum()) for code, name in _REASON_NAMES.items()}
    summary = {
        "rows": n,
        "kept": int(n - dropped.sum()),
        "dropped": int(dropped.sum()),
        "drops": counts,
        "groups": int((group_size > 1).sum()),
        "hashes_computed": len(rows.computed),
        "undecodable": rows.undecodable,
        "missing_perceptual_hash": int((~rows.code_ok).sum()),
        "repeated_keys": int(repeat.sum()),
    }
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
    for f in _reference_files([*cfg.against, *cfg.previous]):
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
        write_table_atomic(out, table)
        plan.summary["config"] = json.loads(self.cfg.model_dump_json())
        write_json_atomic(Path(scratch_dir) / SUMMARY_FILE, plan.summary)
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
            s.sha256 = s.sha256 or sha
            s.pixel_sha256 = s.pixel_sha256 or pix
            s.phash = s.phash or ph
            s.dhash = s.dhash or dh
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
