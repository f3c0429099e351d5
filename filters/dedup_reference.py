"""Dedup's reference sets (`against`: evaluation sets, `previous`: earlier releases) and
the verified near match that the plan shares with them.

A reference set is parquet files or folders (with `sha256`, `pixel_sha256`, `phash`
or `dhash` columns, and `key` when known) or plain images, hashed here. An input row
matches a reference row on equal file or pixel SHA-256 (the first reference row
wins), else, with near dedup on, on the closest verified near match.

`near_matches` is the near rule of [dedup]: pHash within `radius`, and with
`verify = "dhash"` also pHash + dHash distance <= `verify_sum` (rows without a
dHash: pHash <= 4, the measured-safe radius). With `search = "tables"` the
candidates are those that two radius-4 searches meet, one over the pHash and one
over the dHash, so a crop that moved the pHash on every chunk is still met through
its dHash (`ccurate.filters.hamming` says what that search finds,
`ccurate.filters.dedup` the measured precision and recall). The settings come in as
`NearSettings`, which `DedupConfig` satisfies: dedup.py imports this module, not
the other way round.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from ccurate.filters.hamming import group_ids, near_pairs
from ccurate.filters.hashing import hex_to_u64, image_hashes
from ccurate.pixels import upright_rgb

_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}

Hash128 = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(high 64 bits, low 64 bits, valid) of hex SHA-256 strings: 16 bytes a row instead of ~70."""


def sha_parts(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First 128 bits of hex SHA-256 strings as two uint64 columns, plus a validity mask."""
    hi, v1 = hex_to_u64(pc.utf8_slice_codeunits(col, 0, 16))
    lo, v2 = hex_to_u64(pc.utf8_slice_codeunits(col, 16, 32))
    return hi, lo, v1 & v2


def hash_image(data: bytes) -> tuple[str, str, str] | None:
    """(pixel_sha256, phash, dhash) of image bytes as ingest hashes them (upright RGB), None
    if they do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return tuple(image_hashes(upright_rgb(im)))  # type: ignore[return-value]
    except Exception:  # undecodable bytes: no perceptual hash, exact only on file bytes
        return None


class NearSettings(Protocol):
    """The [dedup] settings the reference and near matches read (`DedupConfig` has them)."""

    @property
    def near(self) -> bool: ...

    @property
    def radius(self) -> int: ...

    @property
    def verify(self) -> Literal["none", "dhash"]: ...

    @property
    def verify_sum(self) -> int: ...

    @property
    def search(self) -> Literal["exact", "tables"]: ...

    @property
    def threads(self) -> int: ...


class HashColumns(Protocol):
    """The hash columns that the input rows (dedup's `_Rows`) and a `RefSet` share."""

    sha: Hash128
    pix: Hash128
    code: np.ndarray
    code_ok: np.ndarray
    check: np.ndarray | None
    check_ok: np.ndarray | None


@dataclass
class RefSet:
    """Hashes to match against (evaluation sets, earlier releases); keys may be unknown."""

    keys: pa.ChunkedArray
    sha: Hash128
    pix: Hash128
    code: np.ndarray
    code_ok: np.ndarray
    check: np.ndarray | None = None  # dHash, when verifying
    check_ok: np.ndarray | None = None


def reference_files(paths: list[str]) -> list[Path]:
    """The files of reference paths: folders give their parquet and image files, sorted
    (hidden and `.dropped.parquet` files left out); a missing path is an error."""
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


def load_reference(paths: list[str], hash_name: str = "phash", check: bool = False) -> RefSet:
    """Parquet files/dirs with `sha256`/`pixel_sha256`/`phash` (or `dhash`) columns, or images.

    Parquet rows keep their `key` column (if any) as the `duplicate_of` target, rows
    without one are named `<file>#row=<i>`; image files are hashed here and named by
    their path. `check` also loads the
    `dhash` column to verify pHash matches (rows without one: pHash <= 4 only).
    """
    keys: list[pa.Array] = []
    sha: list[pa.Array] = []
    pix: list[pa.Array] = []
    codes: list[pa.Array] = []
    checks: list[pa.Array] = []
    for f in reference_files(paths):
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
            # a row without a key is named by its file and row, so a dropped sample still
            # says which reference row it matched (`duplicate_of` is never left empty)
            where = pa.array([f"{f}#row={i}" for i in range(n)], pa.string())
            keys.append(
                pc.coalesce(t.column("key").combine_chunks().cast(pa.string()), where)
                if "key" in names
                else where
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
            got = hash_image(data)
            keys.append(pa.array([str(f)], pa.string()))
            sha.append(pa.array([hashlib.sha256(data).hexdigest()], pa.string()))
            pix.append(pa.array([got[0] if got else None], pa.string()))
            code = (got[2] if hash_name == "dhash" else got[1]) if got else None
            codes.append(pa.array([code], pa.string()))
            checks.append(pa.array([got[2] if got else None], pa.string()))
    code_u, ok = hex_to_u64(pa.chunked_array(codes, pa.string()))
    chk_u, chk_ok = hex_to_u64(pa.chunked_array(checks, pa.string())) if check else (None, None)
    return RefSet(
        pa.chunked_array(keys, pa.string()),
        sha_parts(pa.chunked_array(sha, pa.string())),
        sha_parts(pa.chunked_array(pix, pa.string())),
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
    cfg: NearSettings,
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


def near_matches(
    code_q: np.ndarray,
    chk_q: np.ndarray | None,
    ok_q: np.ndarray | None,
    cfg: NearSettings,
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


def match_reference(
    rows: HashColumns, alive: np.ndarray, ref: RefSet, cfg: NearSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row: index of the matching reference row (-1 if none), distance, exact flag."""
    n = len(alive)
    match = np.full(n, -1, np.int64)
    dist = np.zeros(n, np.int16)
    exact = np.zeros(n, bool)
    if len(ref.keys) == 0:
        return match, dist, exact
    for (hi_a, lo_a, ok_a), (hi_b, lo_b, ok_b) in ((rows.sha, ref.sha), (rows.pix, ref.pix)):
        ids = group_ids(
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

            i, j, d = near_matches(
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
