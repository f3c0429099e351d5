"""Reading a published release: shard lists, samples, random access, a fast tar expander.

`read_at` uses the manifest's byte offsets: one seek + one read per member,
no scan of the tar (what a random-access loader or a takedown tool needs).

`tar_samples` is a drop-in webdataset pipeline stage (in place of
`wds.tarfile_to_samples()`): webdataset walks tars with Python's streaming
`tarfile`, which reads 10 KiB records and decodes every header field; for
small samples (a 256-px JPEG + txt + json) that costs more than the bytes.
Here headers are parsed directly from an mmap (USTAR, GNU long names, pax
paths; checksums verified) and members grouped as webdataset groups them.
"""

from __future__ import annotations

import mmap
import os
import tarfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .release import is_release


def release_shards(release_dir: str | Path, split: str | None = None) -> list[Path]:
    """The tar shards of a release (one split or all), in deterministic order."""
    root = Path(release_dir)
    if not is_release(root):
        raise ValueError(f"{root} is not a complete release (no _SUCCESS)")
    base = root / split if split else root
    return sorted(base.rglob("*.tar"), key=lambda p: p.relative_to(root).as_posix())


def split_key(name: str) -> tuple[str, str]:
    """`abc.alt.txt` -> (`abc`, `alt.txt`): webdataset's rule (key up to the first dot)."""
    base = name.rsplit("/", 1)[-1]
    key, _, field = base.partition(".")
    prefix = name[: len(name) - len(base)]
    return prefix + key, field


def iter_tar(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) per sample, members grouped as webdataset groups them."""
    key: str | None = None
    fields: dict[str, bytes] = {}
    for name, data in iter_members(path):
        k, field = split_key(name)
        if key is not None and k != key:
            yield key, fields
            fields = {}
        key = k
        fields[field] = data
    if key is not None:
        yield key, fields


def read_at(release_dir: str | Path, shard: str, offset: int) -> tuple[str, dict[str, bytes]]:
    """The sample whose first member starts at `offset` in `shard` (manifest coordinates)."""
    path = Path(release_dir) / shard
    fields: dict[str, bytes] = {}
    key: str | None = None
    with open(path, "rb") as fh:
        fh.seek(offset)
        while True:
            header = fh.read(512)
            if len(header) < 512 or header == b"\0" * 512:
                break
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            k, field = split_key(info.name)
            if key is not None and k != key:
                break
            key = k
            fields[field] = fh.read(info.size)
            fh.seek((512 - info.size % 512) % 512, 1)
    if key is None:
        raise ValueError(f"no tar member at offset {offset} of {path}")
    return key, fields


_ZERO = bytes(512)


def _num(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 when the high bit is set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _header_name(hdr: bytes) -> str:
    name = hdr[:100].split(b"\0", 1)[0]
    if hdr[257:262] == b"ustar":
        prefix = hdr[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header, if any."""
    pos = 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        key, _, value = data[sp + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def _scan(mm: mmap.mmap, size: int, path: str | Path) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of every regular file, parsing headers from `mm`."""
    pos = 0
    override: str | None = None
    while pos + 512 <= size:
        hdr = mm[pos : pos + 512]
        if hdr == _ZERO:
            break
        if _num(hdr[148:156]) != sum(hdr) - sum(hdr[148:156]) + 256:
            raise ValueError(f"{path}: bad tar header checksum at byte {pos}")
        n = _num(hdr[124:136])
        kind = hdr[156:157]
        start = pos + 512
        pos = start + (n + 511) // 512 * 512
        if kind in (b"0", b"\0", b"7"):
            yield override or _header_name(hdr), start, n
            override = None
        elif kind == b"L":
            override = mm[start : start + n].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind == b"x":
            override = _pax_path(mm[start : start + n]) or override
        elif kind not in (b"g", b"K"):
            override = None  # directories, links, devices: no data for us


@contextmanager
def _mapping(path: str | Path) -> Iterator[mmap.mmap | None]:
    """The tar read-only mapped for a sequential scan (None when the file is empty)."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            yield None
            return
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_SEQUENTIAL)
            yield mm


def iter_members(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular file in a tar, in order, without `tarfile`."""
    with _mapping(path) as mm:
        if mm is not None:
            for name, start, n in _scan(mm, len(mm), path):
                yield name, mm[start : start + n]


def iter_spans(path: str | Path) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of every regular file in a tar, in order, without reading
    the data: what a lazy reader needs (headers only, ~4x faster than `tarfile`)."""
    with _mapping(path) as mm:
        if mm is not None:
            yield from _scan(mm, len(mm), path)


def tar_samples(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Webdataset stage: shard dicts (`{"url": path}`) -> samples, grouped like webdataset.

    Use it where `wds.tarfile_to_samples()` would go, e.g.
    `wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker, tar_samples, ...)`.
    Local paths only (the shards of a release on disk).
    """
    for shard in src:
        url = shard["url"]
        current: dict[str, Any] | None = None
        for name, data in iter_members(url):
            key, field = split_key(name)
            if not field or os.path.basename(key).startswith("__"):
                continue
            field = field.lower()
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url, "__local_path__": url}
            if field in current:
                raise ValueError(f"{url}: duplicate file {name}")
            current[field] = data
        if current is not None:
            yield current
