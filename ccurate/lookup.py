"""`ccurate lookup`: is this image, or a near copy of it, in a release?

A rights holder brings image files; we hash them as ingest does (file SHA-256,
decoded-pixel SHA-256, 64-bit pHash) and scan the release's `manifest.parquet`
(columns `sha256` = the fetched file, `image_sha256` = the bytes in the
release, `pixel_sha256`, `phash`) in row batches: exact matches by hash, near
ones by popcount over the pHash codes (`np.bitwise_count`, no index to build:
a lookup is a few queries against N codes, which a linear scan does at memory
speed; memory stays bounded by the batch). The answer names the matching
keys with their licence, attribution, source URLs and where they are stored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ccurate.takedown import ImageHashes, TakedownError, hash_image_file
from ccurate.takedown_match import DEFAULT_RADIUS  # a lookup reports what a takedown removes

_DETAIL_COLUMNS = [
    "key",
    "split",
    "shard",
    "offset",
    "license",
    "license_url",
    "attribution",
    "url",
    "page_url",
    "width",
    "height",
]
_HASH_COLUMNS = ["key", "sha256", "image_sha256", "pixel_sha256", "phash"]


class ReleaseLookupError(ValueError):
    """A release or image that cannot be looked up; the message says why."""


@dataclass
class Match:
    """One released sample that matches a query image."""

    key: str
    match: str  # sha256 (the fetched file) | image_sha256 (released bytes) | pixel_sha256 | phash
    distance: int  # pHash bits (0 for exact matches)
    license: str | None = None
    license_url: str | None = None
    attribution: str | None = None
    url: str | None = None
    page_url: str | None = None
    splits: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    width: int | None = None
    height: int | None = None


@dataclass
class LookupResult:
    """The answer for one query image; `error` says why it could not be hashed (then
    `matches` is empty and means "not looked up", not "not released")."""

    query: str
    release: str
    sha256: str
    phash: str
    matches: list[Match]
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def resolve_release(path: str | Path) -> Path:
    """A release directory, or a folder of releases (its newest complete one)."""
    from ccurate.shards.release import is_release

    p = Path(path)
    if (p / "manifest.parquet").exists():
        if not is_release(p):
            raise ReleaseLookupError(f"{p} is not a complete release (no _SUCCESS marker)")
        return p
    if p.is_dir():
        found = [q for q in p.iterdir() if q.is_dir() and is_release(q)]
        if found:
            return max(found, key=lambda q: ((q / "_SUCCESS").stat().st_mtime, q.name))
    raise ReleaseLookupError(
        f"no release at {p}: expected a release directory (with manifest.parquet and "
        "_SUCCESS) or a folder holding releases"
    )


def _best(a: Match | None, b: Match) -> Match:
    order = {"sha256": 0, "image_sha256": 0, "pixel_sha256": 1, "phash": 2}
    if a is None or (order[b.match], b.distance) < (order[a.match], a.distance):
        return b
    return a


def lookup(
    images: list[str | Path],
    release: str | Path,
    radius: int = DEFAULT_RADIUS,
    batch_rows: int = 1 << 20,
    *,
    skip_unreadable: bool = False,
) -> list[LookupResult]:
    """For each image file, the release samples it matches (exactly or within `radius`).

    An image that cannot be read raises `ReleaseLookupError`, unless `skip_unreadable`:
    then its result carries `error` and the other images are still answered (a caller
    that shows results must show the error, not "not in release").
    """
    from ccurate.filters.hashing import hex_to_u64

    if not 0 <= radius <= 64:  # a negative one would answer "not released" for everything
        raise ReleaseLookupError(f"radius must be within 0..64 pHash bits, not {radius}")
    root = resolve_release(release)
    manifest = root / "manifest.parquet"
    names = set(pq.read_schema(manifest).names)
    missing = [c for c in _HASH_COLUMNS if c not in names]
    if "key" in missing:
        raise ReleaseLookupError(f"{manifest} has no key column: not a ccurate manifest")
    if len(missing) == len(_HASH_COLUMNS) - 1:
        raise ReleaseLookupError(f"{manifest} has no hash columns ({', '.join(_HASH_COLUMNS[1:])})")
    queries: list[tuple[str, ImageHashes]] = []
    errors: dict[str, str] = {}
    for img in images:
        try:
            queries.append((str(img), hash_image_file(img)))
        except TakedownError as e:
            if not skip_unreadable:
                raise ReleaseLookupError(str(e)) from None
            errors[str(img)] = str(e)
    qcodes, qok = hex_to_u64([q.phash for _, q in queries])
    best: list[dict[str, Match]] = [{} for _ in queries]
    cols = [c for c in _HASH_COLUMNS if c in names]
    pf = pq.ParquetFile(manifest)
    for rb in pf.iter_batches(batch_size=batch_rows, columns=cols):
        t = pa.Table.from_batches([rb])
        keys = t.column("key")
        codes, ok = (
            hex_to_u64(t.column("phash"))
            if "phash" in cols
            else (np.zeros(t.num_rows, np.uint64), np.zeros(t.num_rows, bool))
        )
        for qi, (_, q) in enumerate(queries):
            for col, value in (
                ("sha256", q.sha256),
                ("image_sha256", q.sha256),
                ("pixel_sha256", q.pixel_sha256),
            ):
                if col not in cols:
                    continue
                hit = np.asarray(
                    pc.fill_null(pc.equal(t.column(col), value), False).to_numpy(
                        zero_copy_only=False
                    ),
                    bool,
                )
                for i in np.flatnonzero(hit).tolist():
                    k = keys[i].as_py()
                    best[qi][k] = _best(best[qi].get(k), Match(k, col, 0))
            if qok[qi] and ok.any():
                dist = np.bitwise_count(codes ^ qcodes[qi]).astype(np.int64)
                near = np.flatnonzero(ok & (dist <= radius))
                for i in near.tolist():
                    k = keys[i].as_py()
                    best[qi][k] = _best(best[qi].get(k), Match(k, "phash", int(dist[i])))
    wanted = sorted({k for b in best for k in b})
    details = _details(manifest, wanted, names)
    results = []
    for (path, q), found in zip(queries, best, strict=True):
        matches = []
        for k, m in found.items():
            d = details.get(k, {})
            m.license, m.license_url = d.get("license"), d.get("license_url")
            m.attribution, m.url, m.page_url = d.get("attribution"), d.get("url"), d.get("page_url")
            m.width, m.height = d.get("width"), d.get("height")
            m.splits, m.shards = d.get("splits", []), d.get("shards", [])
            matches.append(m)
        matches.sort(key=lambda m: (m.match == "phash", m.distance, m.key))
        results.append(LookupResult(path, root.name, q.sha256, q.phash, matches))
    if not errors:
        return results
    answered = iter(results)  # back in the order the images were given
    return [
        LookupResult(str(img), root.name, "", "", [], errors[str(img)])
        if str(img) in errors
        else next(answered)
        for img in images
    ]


def _details(manifest: Path, keys: list[str], names: set[str]) -> dict[str, dict[str, Any]]:
    """Licence, attribution and storage of the matched keys (a filtered read of the manifest)."""
    if not keys:
        return {}
    cols = [c for c in _DETAIL_COLUMNS if c in names]
    t = pq.read_table(manifest, columns=cols, filters=[("key", "in", keys)])
    out: dict[str, dict[str, Any]] = {}
    for r in t.to_pylist():
        d = out.setdefault(r["key"], {**r, "splits": [], "shards": []})
        if r.get("split") and r["split"] not in d["splits"]:
            d["splits"].append(r["split"])
        if r.get("shard"):
            d["shards"].append(f"{r['shard']}@{r.get('offset')}")
    return out
