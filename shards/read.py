"""Reading a published release: shard lists, samples, random access, a fast tar expander.

`read_at` uses the manifest's byte offsets: one seek + one read per member,
no scan of the tar (what a random-access loader or a takedown tool needs).

`tar_samples` is a drop-in webdataset pipeline stage (in place of
`wds.tarfile_to_samples()`): webdataset walks tars with Python's streaming
`tarfile`, which reads 10 KiB records and decodes every header field; for
small samples (a 256-px JPEG + txt + json) that costs more than the bytes.
Here headers are parsed directly from an mmap (`ccurate.tario.iter_members`:
USTAR, GNU long names, pax paths; checksums verified) and members grouped as
webdataset groups them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ccurate.tario import iter_members

from .release import is_release, listed_files


def release_shards(release_dir: str | Path, split: str | None = None) -> list[Path]:
    """The tar shards of a release (one split or all), in deterministic order.

    The shards SHA256SUMS lists, not every `*.tar` on disk: a stray tar (a copy, a
    half-synced or injected file) is no part of the release (`verify` reports it)."""
    root = Path(release_dir)
    if not is_release(root):
        raise ValueError(f"{root} is not a complete release (no _SUCCESS)")
    prefix = f"{split}/" if split else ""
    return sorted(
        (
            root / rel
            for rel in listed_files(root)
            if rel.endswith(".tar") and rel.startswith(prefix)
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def hf_features(release_dir: str | Path) -> Any:
    """The declared features of a release's samples, as `datasets.Features` (from
    release.json, the same list the card's YAML header declares).

    `datasets.load_dataset("<release dir>")` reads them from the card. The `data_files`
    form does not: `datasets` then guesses the schema from the first 5 samples of the first
    tar, and a score null in all of them but set later (`safety.frames`, say) fails the load
    ("Couldn't cast array of type double to null"). Pass them:
    `datasets.load_dataset("webdataset", data_files=..., features=hf_features(release))`.
    """
    import json

    import datasets

    path = Path(release_dir) / "release.json"
    declared = json.loads(path.read_text(encoding="utf-8")).get("features")
    if not declared:
        raise ValueError(f"{path} declares no features (a release written before them)")
    return datasets.Features._from_yaml_list(declared)


# webdataset's rules (tariterators.base_plus_ext and the metadata skips of tar_file_iterator)
_KEY_FIELD = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")


def split_key(name: str) -> tuple[str, str]:
    """`abc.alt.txt` -> (`abc`, `alt.txt`): webdataset's rule (the key ends at the first dot
    of the basename). A name it gives no field (`README`, `.hidden`) -> (name, "")."""
    if "/" not in name:  # the usual flat name: the same split without the regex
        dot = name.find(".")
        return (name[:dot], name[dot + 1 :]) if dot > 0 else (name, "")
    m = _KEY_FIELD.match(name)
    return (m.group(1), m.group(2)) if m else (name, "")


def is_meta(name: str) -> bool:
    """A member webdataset skips as tar metadata (`__index__`, `__x__/...`)."""
    if "/" not in name and "\n" not in name:  # `_META` then matches exactly these names
        return name.startswith("__") and name.endswith("__")
    return bool(_META.match(name))


T = TypeVar("T")


def group_members(
    members: Iterable[tuple[str, T]], where: str = ""
) -> Iterator[tuple[str, dict[str, T]]]:
    """(key, {field: item}) per sample from (member name, item) in tar order: webdataset's
    grouping, the one rule every reader here follows.

    Consecutive members sharing a key form a sample; fields are lower-cased; metadata
    members and names without a field are skipped, as webdataset skips them. A field
    twice in one sample is a broken shard: ValueError naming `where`, as webdataset raises.
    """
    key: str | None = None
    fields: dict[str, T] = {}
    for name, item in members:
        k, field = split_key(name)
        if not field or is_meta(name):
            continue
        field = field.lower()
        if key is not None and k != key:
            yield key, fields
            fields = {}
        elif field in fields:
            raise ValueError(f"{where}: duplicate member {name}")
        key = k
        fields[field] = item
    if key is not None:
        yield key, fields


def iter_tar(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) per sample of a local shard (`group_members`' grouping)."""
    return group_members(iter_members(path), str(path))


def read_at(release_dir: str | Path, shard: str, offset: int) -> tuple[str, dict[str, bytes]]:
    """The sample whose first member starts at `offset` in `shard` (manifest coordinates).

    Read by the scanner and grouping `iter_tar` uses (GNU long names, pax paths, checksums,
    metadata skipped, fields lower-cased), so both give the same sample; a truncated or
    corrupt shard is a ValueError naming it, never short bytes.
    """
    path = Path(release_dir) / shard
    first = next(group_members(iter_members(path, offset), str(path)), None)
    if first is None:
        raise ValueError(f"no tar member at offset {offset} of {path}")
    return first


def tar_samples(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Webdataset stage: shard dicts (`{"url": path}`) -> samples, grouped like webdataset.

    Use it where `wds.tarfile_to_samples()` would go, e.g.
    `wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker, tar_samples, ...)`.
    Local paths only (the shards of a release on disk).
    """
    for shard in src:
        url = shard["url"]
        for key, fields in iter_tar(url):
            yield {"__key__": key, "__url__": url, "__local_path__": url, **fields}
