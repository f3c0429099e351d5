"""Dedup's reference sets (`against`: evaluation sets, `previous`: earlier releases) and
the verified near match that the plan shares with them.

A reference set is parquet files or folders (with `sha256`, `pixel_sha256`, `phash`
or `dhash` columns, and `key` when known; perceptual hashes as 16 hex digits or 64-bit
integers), images, webdataset `.tar` files (their image members), or releases (their
`manifest.parquet`), hashed here. An input row matches a reference row on equal file or
pixel SHA-256 (the first reference row wins), else, with near dedup on, on the closest
verified near match. A decontamination promise must hold or fail loudly: a path that
gives no usable hash is an error naming it, and files of unknown type, undecodable
images and unparsable hash values are logged and counted (`RefSet.report`, which the
dedup summary records).

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
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from ccurate.filters.hamming import group_ids, near_pairs
from ccurate.filters.hashing import hex_to_u64, image_hashes
from ccurate.pixels import upright_rgb
from ccurate.shards.release import is_release
from ccurate.tario import iter_members

log = logging.getLogger(__name__)

# compared lower-cased; a file named directly is read as an image whatever its name
_IMAGE_EXTS = frozenset(
    {
        *(".jpg", ".jpeg", ".jpe", ".jfif", ".pjpeg", ".pjp", ".png", ".apng", ".webp"),
        *(".gif", ".bmp", ".dib", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jp2"),
        *(".j2k", ".ico", ".tga", ".ppm", ".pgm", ".pbm", ".pnm", ".qoi"),
    }
)

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
    # rows, usable (a parseable hash, not an undecodable image), skipped_files,
    # undecodable_images, unparsable (per hash column): what the dedup summary records
    report: dict[str, Any] = field(default_factory=dict)


def _kind(f: Path) -> str:
    """How a reference file is read: parquet, tar (webdataset), image, or other (skipped)."""
    name = f.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".tar"):
        return "tar"
    return "image" if f.suffix.lower() in _IMAGE_EXTS else "other"


def _scan(folder: Path, files: list[Path], skipped: list[Path]) -> None:
    """A folder's reference files in sorted path order; a release gives its manifest only
    (its shard indexes repeat it, and excluded.parquet has no hashes)."""
    if is_release(folder):
        files.append(folder / "manifest.parquet")
        return
    entries = sorted(folder.iterdir())
    names = {e.name.lower() for e in entries}
    for e in entries:
        name = e.name.lower()
        if name.startswith(".") or name.endswith(".dropped.parquet"):
            continue  # hidden (stale builds) and pipeline side outputs of dropped samples
        if e.is_dir():
            _scan(e, files, skipped)
        elif e.is_file():
            kind = _kind(e)
            if kind == "other":
                skipped.append(e)
            elif kind != "tar" or f"{name[:-4]}.parquet" not in names:
                files.append(e)  # a shard's tar is read through its parquet index


def _scan_paths(paths: list[str]) -> list[tuple[Path, list[Path], list[Path]]]:
    """(path, files, skipped files) per reference path; a missing path is an error."""
    out: list[tuple[Path, list[Path], list[Path]]] = []
    for p in paths:
        path = Path(p).expanduser()
        files: list[Path] = []
        skipped: list[Path] = []
        if path.is_dir():
            _scan(path, files, skipped)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"dedup reference set not found: {path}")
        out.append((path, files, skipped))
    return out


def reference_files(paths: list[str]) -> list[Path]:
    """The files that reference paths are read from, in order (see `load_reference`)."""
    return [f for _, files, _ in _scan_paths(paths) for f in files]


def _u64_hex(col: pa.Array) -> pa.Array:
    """Integer hashes (e.g. `int(str(imagehash.phash(im)), 16)`, often stored as a signed
    int64) as the 16 hex digits of their unsigned 64-bit value; nulls stay null."""
    v = np.asarray(col.fill_null(0).to_numpy(zero_copy_only=False)).astype(np.uint64)
    nib = v.astype(">u8").view(np.uint8).reshape(-1, 8)
    digits = np.frombuffer(b"0123456789abcdef", np.uint8)
    chars = np.empty((len(v), 16), np.uint8)
    chars[:, 0::2] = digits[nib >> 4]
    chars[:, 1::2] = digits[nib & 15]
    null = np.asarray(col.is_null().to_numpy(zero_copy_only=False), bool)
    return pa.array(chars.view("S16").ravel(), pa.binary(), mask=null).cast(pa.string())


def _hash_column(t: pa.Table, name: str, f: Path) -> pa.Array:
    """A hash column as hex strings; a type that cannot hold one is refused, not ignored."""
    col = t.column(name).combine_chunks()
    if pa.types.is_integer(col.type) and name in ("phash", "dhash"):
        return _u64_hex(col)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.cast(pa.string())
    if pa.types.is_null(col.type):
        return pa.nulls(len(col), pa.string())
    want = "hex strings or 64-bit integers" if name in ("phash", "dhash") else "hex strings"
    raise ValueError(f"dedup reference {f}: column {name} is {col.type}; expected {want}")


def load_reference(paths: list[str], hash_name: str = "phash", check: bool = False) -> RefSet:
    """Parquet files/dirs with `sha256`/`pixel_sha256`/`phash` (or `dhash`) columns, images,
    webdataset tars or releases (see the module docstring).

    Parquet rows keep their `key` column (if any) as the `duplicate_of` target, rows
    without one are named `<file>#row=<i>`; image files are hashed here and named by
    their path, tar members by `<tar>#<member>`. `check` also loads the `dhash` column to
    verify pHash matches (rows without one: pHash <= 4 only). A path without a usable
    row is a ValueError naming it; what was skipped or unreadable is logged.
    """
    keys: list[pa.Array] = []
    cols: dict[str, list[pa.Array]] = {c: [] for c in ("sha256", "pixel_sha256", "code", "dhash")}
    broken: list[np.ndarray] = []  # per row: an image that did not decode
    scanned = _scan_paths(paths)

    def add_image(key: str, data: bytes) -> None:
        got = hash_image(data)
        keys.append(pa.array([key], pa.string()))
        cols["sha256"].append(pa.array([hashlib.sha256(data).hexdigest()], pa.string()))
        pix, ph, dh = got if got else (None, None, None)
        for c, v in (("pixel_sha256", pix), ("code", dh if hash_name == "dhash" else ph)):
            cols[c].append(pa.array([v], pa.string()))
        cols["dhash"].append(pa.array([dh], pa.string()))
        broken.append(np.array([got is None]))

    chunk_at = []  # per path: its first chunk of `keys`
    for _, files, _ in scanned:
        chunk_at.append(len(keys))
        for f in files:
            kind = _kind(f)
            if kind == "tar":
                for member, data in iter_members(f):
                    if Path(member).suffix.lower() in _IMAGE_EXTS:
                        add_image(f"{f}#{member}", data)
                continue
            if kind != "parquet":
                add_image(str(f), f.read_bytes())
                continue
            names = set(pq.read_schema(f).names)
            if not {"sha256", "pixel_sha256", hash_name} & names:
                raise ValueError(
                    f"dedup reference {f} has none of the columns sha256, pixel_sha256, {hash_name}"
                )
            wanted = [
                c for c in ("key", "sha256", "pixel_sha256", hash_name, "dhash") if c in names
            ]
            t = pq.read_table(f, columns=list(dict.fromkeys(wanted)))
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
                ("sha256", "sha256"),
                ("pixel_sha256", "pixel_sha256"),
                ("code", hash_name),
                ("dhash", "dhash"),
            ):
                cols[out].append(_hash_column(t, c, f) if c in names else pa.nulls(n, pa.string()))
            broken.append(np.zeros(n, bool))

    def chunked(c: str) -> pa.ChunkedArray:
        return pa.chunked_array(cols[c], pa.string())

    sha, pix = sha_parts(chunked("sha256")), sha_parts(chunked("pixel_sha256"))
    code_u, ok = hex_to_u64(chunked("code"))
    chk_u, chk_ok = hex_to_u64(chunked("dhash"))
    bad = np.concatenate(broken) if broken else np.zeros(0, bool)
    usable = (sha[2] | pix[2] | ok) & ~bad
    parsed = {"sha256": sha[2], "pixel_sha256": pix[2], hash_name: ok}
    if check:
        parsed["dhash"] = chk_ok
    unparsable = {}  # per column: rows with a value that is not a hash
    for c, valid in parsed.items():
        length = pc.utf8_length(chunked("code" if c == hash_name else c))
        unparsable[c] = (np.asarray(pc.fill_null(length, 0).to_numpy()) > 0) & ~valid
    skipped = [f for _, _, sk in scanned for f in sk]

    def counts(a: int, b: int, sk: list[Path]) -> dict[str, Any]:
        return {
            "rows": int(b - a),
            "usable": int(usable[a:b].sum()),
            "skipped_files": len(sk),
            "undecodable_images": int(bad[a:b].sum()),
            "unparsable": {c: int(m[a:b].sum()) for c, m in unparsable.items() if m[a:b].any()},
        }

    at = np.cumsum([0, *(len(k) for k in keys)])[[*chunk_at, len(keys)]]
    for (path, _, sk), a, b in zip(scanned, at[:-1], at[1:], strict=True):
        if not usable[a:b].any():
            got = ", ".join(f"{k} {v}" for k, v in counts(a, b, sk).items())
            raise ValueError(
                f"dedup reference {path} gives no usable hash ({got}): it reads parquet "
                f"with sha256/pixel_sha256/{hash_name} columns, images, webdataset .tar "
                "files and releases (their manifest.parquet)"
            )
    report = counts(0, len(usable), skipped)
    if skipped or report["undecodable_images"] or report["unparsable"]:
        log.warning(
            "dedup reference %s: %d of %d rows usable; %d files of unknown type skipped%s; "
            "%d undecodable images; unparsable hash values: %s",
            ", ".join(paths),
            report["usable"],
            report["rows"],
            len(skipped),
            f" (e.g. {', '.join(str(f) for f in skipped[:3])})" if skipped else "",
            report["undecodable_images"],
            report["unparsable"] or "none",
        )
    return RefSet(
        pa.chunked_array(keys, pa.string()),
        sha,
        pix,
        code_u,
        ok,
        chk_u if check else None,
        chk_ok if check else None,
        report,
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
