"""Dedup's reference sets (`against`: evaluation sets, `previous`: earlier releases) and
the verified near match that the plan shares with them.

A reference set is parquet files or folders (with `sha256`, `pixel_sha256`, `phash`
or `dhash` columns, and `key` when known; perceptual hashes as 16 hex digits or 64-bit
integers), images, webdataset `.tar` files (their image members), or releases (their
`manifest.parquet`), hashed here. An input row matches a reference row on equal file or
pixel SHA-256 (the first reference row wins), else, with near dedup on, on the closest
verified near match. A decontamination promise must hold or fail loudly: a path that
gives no usable hash is an error naming it, as is a file that cannot be read, and what
is not read (files of unknown type, hidden files, FIFOs and other specials, links to
nothing or back into the tree, non-image tar members, images over `REFERENCE_MAX_BYTES`),
undecodable images and unparsable hash values are logged and counted (`RefSet.report`,
which the dedup summary records). Folders are walked following links, each folder and
file once.

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

import errno
import hashlib
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ccurate.filters.hamming import group_ids, near_pairs
from ccurate.filters.hashing import hex_to_u64, image_hashes
from ccurate.pixels import open_image, upright_rgb
from ccurate.shards.release import is_release
from ccurate.tario import iter_spans

log = logging.getLogger(__name__)

# compared lower-cased; a file named directly is read as an image whatever its name
_IMAGE_EXTS = frozenset(
    {
        *(".jpg", ".jpeg", ".jpe", ".jfif", ".pjpeg", ".pjp", ".png", ".apng", ".webp"),
        *(".gif", ".bmp", ".dib", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jp2"),
        *(".j2k", ".ico", ".tga", ".ppm", ".pgm", ".pbm", ".pnm", ".qoi"),
    }
)
# webdataset members that travel with an image and are no image: not counted as skipped
_SIDECAR_EXTS = frozenset({".json", ".txt", ".cls", ".caption", ".tags"})

REFERENCE_MAX_BYTES = 64_000_000
"""Image files and tar members over this many bytes are skipped and counted, never read:
a 3 GB member was copied whole (6.4 GB peak, or a bare MemoryError). Above ingest's
default 20 MB body cap, so the full-size original of anything ingest keeps is read."""

_IMAGE_BATCH = 65_536  # image rows per Arrow array

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
        with open_image(data) as im:
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
    # undecodable_images, unparsable (per hash column), and when there are any
    # skipped_members (tar) and oversized_images: what the dedup summary records
    report: dict[str, Any] = field(default_factory=dict)


def _kind(f: Path) -> str:
    """How a reference file is read: parquet, tar (webdataset), image, or other (skipped)."""
    name = f.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".tar"):
        return "tar"
    return "image" if f.suffix.lower() in _IMAGE_EXTS else "other"


def _special(mode: int) -> str:
    """What a folder entry that is neither a regular file nor a folder is."""
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "not a regular file"


@dataclass
class _Scan:
    """One reference path: the files read from it, and what was left out with why
    (`skipped`: folder entries, `members`: tar members, `oversized`: images over the cap)."""

    path: Path
    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    members: list[tuple[str, str]] = field(default_factory=list)
    oversized: list[str] = field(default_factory=list)


def _scan(folder: Path, out: _Scan, seen: set[tuple[int, int]]) -> None:
    """A folder's reference files in sorted path order; a release gives its manifest only
    (its shard indexes repeat it, and excluded.parquet has no hashes).

    Links are followed, but each folder and file (by device and inode) is read once: a
    link back into the tree made every file count 41 times, and two such links never
    ended. Whatever is not read is recorded in `out.skipped` with why."""
    if is_release(folder):
        out.files.append(folder / "manifest.parquet")
        return
    entries = sorted(folder.iterdir())
    names = {e.name.lower() for e in entries}
    for e in entries:
        name = e.name.lower()
        if name.startswith("."):
            out.skipped.append((str(e), "hidden"))  # e.g. stale builds
            continue
        if name.endswith(".dropped.parquet"):
            out.skipped.append((str(e), "dropped samples' side output"))
            continue
        try:
            st = e.stat()
        except FileNotFoundError:
            out.skipped.append((str(e), "dangling link"))
            continue
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            out.skipped.append((str(e), "link loop"))
            continue
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            out.skipped.append((str(e), _special(st.st_mode)))
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in seen:
            out.skipped.append((str(e), "already read through a link"))
            continue
        seen.add(ident)
        if stat.S_ISDIR(st.st_mode):
            _scan(e, out, seen)
        elif _kind(e) == "other":
            out.skipped.append((str(e), "unknown type"))
        elif _kind(e) != "tar" or f"{name[:-4]}.parquet" not in names:
            out.files.append(e)  # a shard's tar is read through its parquet index


def _scan_paths(paths: list[str]) -> list[_Scan]:
    """Each reference path's scan; a missing path, or one that is no file or folder (a
    FIFO, a device), is an error naming it."""
    out: list[_Scan] = []
    for p in paths:
        scan = _Scan(Path(p).expanduser())
        try:
            st = scan.path.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"dedup reference set not found: {scan.path}") from None
        if stat.S_ISDIR(st.st_mode):
            _scan(scan.path, scan, {(st.st_dev, st.st_ino)})
        elif stat.S_ISREG(st.st_mode):
            scan.files.append(scan.path)
        else:
            raise ValueError(
                f"dedup reference {scan.path} is a {_special(st.st_mode)}, not a file or folder"
            )
        out.append(scan)
    return out


def reference_files(paths: list[str]) -> list[Path]:
    """The files that reference paths are read from, in order (see `load_reference`)."""
    return [f for scan in _scan_paths(paths) for f in scan.files]


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


def _row_names(f: Path, rows: np.ndarray) -> pa.Array:
    """`<file>#row=<i>` for rows without a key, built in Arrow: a Python string per row
    was 837 MB of a 4M-row parquet's 1.4 GB peak."""
    return pc.binary_join_element_wise(f"{f}#row=", pa.array(rows).cast(pa.string()), "")


def _keys(t: pa.Table, f: Path) -> pa.Array:
    """The `duplicate_of` targets of a parquet's rows: its `key` column (strings or
    integers), rows without one named by file and row so that it is never left empty."""
    n = t.num_rows
    if "key" not in t.column_names:
        return _row_names(f, np.arange(n))
    col = t.column("key").combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    typ = col.type
    if pa.types.is_null(typ):
        return _row_names(f, np.arange(n))
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_integer(typ)):
        raise ValueError(f"dedup reference {f}: column key is {typ}; expected strings or integers")
    col = col.cast(pa.string())
    if not col.null_count:
        return col
    null = col.is_null()
    where = np.flatnonzero(np.asarray(null.to_numpy(zero_copy_only=False), bool))
    return pc.replace_with_mask(col, null, _row_names(f, where))


@contextmanager
def _naming(f: Path) -> Iterator[None]:
    """Errors reading reference file `f` name it: in a set of thousands of files a bare
    `ArrowInvalid: Parquet file size is 508 bytes` did not say which one was bad."""
    try:
        yield
    except pa.ArrowException as e:  # ArrowInvalid and kin: a corrupt or odd file
        raise ValueError(f"dedup reference {f}: {type(e).__name__}: {e}") from e
    except MemoryError as e:
        raise MemoryError(f"dedup reference {f}: out of memory reading it") from e
    except OSError as e:
        if str(f) in str(e) or e.filename is not None:
            raise
        if e.errno is None:  # pyarrow's: "Couldn't deserialize thrift" and the like
            raise OSError(f"dedup reference {f}: {e}") from e
        raise OSError(e.errno, f"dedup reference {f}: {e.strerror}") from e


def _read_capped(f: Path, cap: int) -> bytes | None:
    """A file's bytes, None when over `cap` bytes; never more than `cap` + 1 bytes are
    read, whatever the size said (a file that grows while read). `read(cap + 1)` for
    every file would allocate the cap each time."""
    with open(f, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > cap:
            return None
        data = fh.read(size + 1)
        if len(data) > size:  # grew since: read on, up to the cap
            data += fh.read(cap + 1 - len(data))
    return None if len(data) > cap else data


def _tally(items: list[tuple[str, str]]) -> str:
    """'3 unknown type, 1 FIFO (e.g. a, b, c)' for (where, why) pairs."""
    by = Counter(why for _, why in items)
    eg = ", ".join(w for w, _ in items[:3])
    return f"{', '.join(f'{n} {why}' for why, n in by.most_common())} (e.g. {eg})"


def load_reference(
    paths: list[str],
    hash_name: str = "phash",
    check: bool = False,
    max_bytes: int = REFERENCE_MAX_BYTES,
) -> RefSet:
    """Parquet files/dirs with `sha256`/`pixel_sha256`/`phash` (or `dhash`) columns, images,
    webdataset tars or releases (see the module docstring).

    Parquet rows keep their `key` column (if any) as the `duplicate_of` target, rows
    without one are named `<file>#row=<i>`; image files are hashed here and named by
    their path, tar members by `<tar>#<member>`. `check` also loads the `dhash` column to
    verify pHash matches (rows without one: pHash <= 4 only). An image file or tar member
    over `max_bytes` is skipped and counted, never read whole. A path without a usable
    row is a ValueError naming it; what was skipped or unreadable is logged and counted.
    """
    keys: list[pa.Array] = []
    cols: dict[str, list[pa.Array]] = {c: [] for c in ("sha256", "pixel_sha256", "code", "dhash")}
    broken: list[np.ndarray] = []  # per row: an image that did not decode
    scanned = _scan_paths(paths)
    # image rows as Python lists, one Arrow array per file (or per `_IMAGE_BATCH` rows):
    # five one-row arrays per image took ~6 KB per tar member
    img: dict[str, list[str | None]] = {c: [] for c in ("key", *cols)}
    img_bad: list[bool] = []

    def flush() -> None:
        if img_bad:
            keys.append(pa.array(img["key"], pa.string()))
            for c in cols:
                cols[c].append(pa.array(img[c], pa.string()))
            broken.append(np.array(img_bad, bool))
            for v in img.values():
                v.clear()
            img_bad.clear()

    def add_image(key: str, data: bytes) -> None:
        got = hash_image(data)
        pix, ph, dh = got if got else (None, None, None)
        for c, v in (
            ("key", key),
            ("sha256", hashlib.sha256(data).hexdigest()),
            ("pixel_sha256", pix),
            ("code", dh if hash_name == "dhash" else ph),
            ("dhash", dh),
        ):
            img[c].append(v)
        img_bad.append(got is None)
        if len(img_bad) >= _IMAGE_BATCH:
            flush()

    def read_tar(f: Path, scan: _Scan) -> None:
        with open(f, "rb") as fh:  # member by member: memory is one member, at most the cap
            for member, begin, n in iter_spans(f):
                where, ext = f"{f}#{member}", Path(member).suffix.lower()
                if ext not in _IMAGE_EXTS:
                    if ext not in _SIDECAR_EXTS:
                        why = "of unknown type" if ext else "without an extension"
                        scan.members.append((where, f"tar member {why}"))
                    continue
                if n > max_bytes:
                    scan.oversized.append(where)
                    continue
                fh.seek(begin)
                data = fh.read(n)
                if len(data) != n:
                    raise ValueError(f"{f}: member {member} ends early (changed while read?)")
                add_image(where, data)

    def read_parquet(f: Path) -> None:
        names = set(pq.read_schema(f).names)
        if not {"sha256", "pixel_sha256", hash_name} & names:
            raise ValueError(
                f"dedup reference {f} has none of the columns sha256, pixel_sha256, {hash_name}"
            )
        wanted = [c for c in ("key", "sha256", "pixel_sha256", hash_name, "dhash") if c in names]
        t = pq.read_table(f, columns=list(dict.fromkeys(wanted)))
        n = t.num_rows
        keys.append(_keys(t, f))
        for out, c in (
            ("sha256", "sha256"),
            ("pixel_sha256", "pixel_sha256"),
            ("code", hash_name),
            ("dhash", "dhash"),
        ):
            cols[out].append(_hash_column(t, c, f) if c in names else pa.nulls(n, pa.string()))
        broken.append(np.zeros(n, bool))

    chunk_at = []  # per path: its first chunk of `keys`
    for scan in scanned:
        chunk_at.append(len(keys))
        for f in scan.files:
            kind = _kind(f)
            with _naming(f):
                if kind == "tar":
                    read_tar(f, scan)
                elif kind == "parquet":
                    read_parquet(f)
                elif (data := _read_capped(f, max_bytes)) is None:
                    scan.oversized.append(str(f))
                else:
                    add_image(str(f), data)
            flush()

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

    def counts(a: int, b: int, scans: list[_Scan]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rows": int(b - a),
            "usable": int(usable[a:b].sum()),
            "skipped_files": sum(len(s.skipped) for s in scans),
        }
        # counted only when there are any: most sets have neither
        for name, n in (
            ("skipped_members", sum(len(s.members) for s in scans)),
            ("oversized_images", sum(len(s.oversized) for s in scans)),
            # a pHash but no dHash (a release from before its `dhash` column): the dHash
            # check cannot run, so near matches against these rows stop at pHash <= 4
            ("without_dhash", int((ok[a:b] & ~chk_ok[a:b]).sum()) if check else 0),
        ):
            if n:
                out[name] = n
        out["undecodable_images"] = int(bad[a:b].sum())
        out["unparsable"] = {c: int(m[a:b].sum()) for c, m in unparsable.items() if m[a:b].any()}
        return out

    at = np.cumsum([0, *(len(k) for k in keys)])[[*chunk_at, len(keys)]]
    for scan, a, b in zip(scanned, at[:-1], at[1:], strict=True):
        if not usable[a:b].any():
            got = ", ".join(f"{k} {v}" for k, v in counts(a, b, [scan]).items())
            raise ValueError(
                f"dedup reference {scan.path} gives no usable hash ({got}): it reads parquet "
                f"with sha256/pixel_sha256/{hash_name} columns, images, webdataset .tar "
                "files and releases (their manifest.parquet)"
            )
    report = counts(0, len(usable), scanned)
    skipped = [s for scan in scanned for s in (*scan.skipped, *scan.members)]
    oversized = [w for scan in scanned for w in scan.oversized]
    if report.get("without_dhash"):
        log.warning(
            "dedup reference %s: %d of %d rows have a pHash but no dHash (e.g. a release "
            "written before its dhash column): near copies of them are found only within "
            "pHash distance 4, not by the pHash + dHash rule; a reference with dHash (a newer "
            "release, or hashes re-computed from the images) restores it",
            ", ".join(paths),
            report["without_dhash"],
            report["rows"],
        )
    if skipped or oversized or report["undecodable_images"] or report["unparsable"]:
        log.warning(
            "dedup reference %s: %d of %d rows usable; skipped: %s; %s; "
            "%d undecodable images; unparsable hash values: %s",
            ", ".join(paths),
            report["usable"],
            report["rows"],
            _tally(skipped) if skipped else "none",
            f"{len(oversized)} images over {max_bytes} bytes not read (e.g. "
            f"{', '.join(oversized[:3])})"
            if oversized
            else "no image over the size cap",
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
