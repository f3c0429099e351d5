"""Export a release to MosaicML Streaming's MDS format, written by us (no package needed).

`mosaicml-streaming` (0.13) pins numpy<2.2 and transformers<5, which this
project cannot take, so the format is written here as documented by
`streaming.base.format.mds` (index version 2, uncompressed joint shards):

- `<out>/<split>/index.json`: `{"version": 2, "shards": [shard_info, ...]}`, each
  shard_info = the writer config (`column_encodings`, `column_names`,
  `column_sizes`, `compression`, `format`, `hashes`, `size_limit`, `version`)
  + `samples`, `raw_data` `{basename, bytes, hashes}`, `zip_data` (null).
- `shard.NNNNN.mds`: uint32 sample count, uint32 offsets[n+1] (absolute), the
  config as sorted JSON, then the samples. A sample is uint32 sizes of its
  variable-size columns, then every column's bytes, columns sorted by name.
- `.ccurate-export.json`: the release (and size_limit) the split came from, so a rerun
  after a kill keeps the finished splits (Streaming ignores the file).

Columns: bucket (str), caption (str), height/width (int32), image (`jpeg`, `png`
or `bytes` for webp), json (the full record), key, license, url (str).
`StreamingDataset(local=<out>, split=<split>)` reads it; `read_mds` is our reader.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .read import iter_tar, release_shards
from .release import SUCCESS, is_release

IMAGE_ENCODING = {"jpg": "jpeg", "png": "png", "webp": "bytes"}
FIXED_SIZES = {"int32": 4, "int64": 8, "float32": 4, "float64": 8, "uint8": 1, "uint32": 4}


def _columns(image_format: str) -> dict[str, str]:
    return {
        "bucket": "str",
        "caption": "str",
        "height": "int32",
        "image": IMAGE_ENCODING[image_format],
        "json": "json",
        "key": "str",
        "license": "str",
        "url": "str",
        "width": "int32",
    }


class MDSWriter:
    """Minimal MDS joint-shard writer (uncompressed, no hashes), byte-compatible with MDSWriter."""

    def __init__(self, out: Path, columns: dict[str, str], size_limit: int = 1 << 26) -> None:
        if size_limit < 0:  # streaming's readers raise on it: refuse before writing anything
            raise ValueError(f"size_limit must be >= 0 (0: no limit), got {size_limit}")
        self.out = out
        self.names = sorted(columns)
        self.encodings = [columns[n] for n in self.names]
        self.sizes = [FIXED_SIZES.get(e) for e in self.encodings]
        self.size_limit = size_limit
        config = {
            "version": 2,
            "format": "mds",
            "compression": None,
            "hashes": [],
            "size_limit": size_limit,
            "column_names": self.names,
            "column_encodings": self.encodings,
            "column_sizes": self.sizes,
        }
        self.config = config
        self.config_data = json.dumps(config, sort_keys=True).encode()
        self.shards: list[dict[str, Any]] = []
        self._samples: list[bytes] = []
        self._size = 0
        self._reset()

    def _reset(self) -> None:
        self._samples = []
        self._size = 4 + 4 + len(self.config_data)

    def _encode(self, encoding: str, value: Any) -> bytes:
        if encoding in ("str",):
            return str(value).encode()
        if encoding in ("bytes", "jpeg", "png", "json"):
            if isinstance(value, bytes):
                return value
            if encoding == "json":
                return json.dumps(value).encode()
            raise TypeError(f"{encoding} column needs bytes")
        if encoding == "int32":
            return np.int32(value).tobytes()
        if encoding == "int64":
            return np.int64(value).tobytes()
        raise ValueError(f"unsupported encoding {encoding}")

    def write(self, sample: dict[str, Any]) -> None:
        head: list[int] = []
        body: list[bytes] = []
        for name, enc, size in zip(self.names, self.encodings, self.sizes, strict=True):
            datum = self._encode(enc, sample[name])
            if size is None:  # fixed-size encodings (int32, int64) always give `size` bytes
                head.append(len(datum))
            body.append(datum)
        data = np.array(head, np.uint32).tobytes() + b"".join(body)
        if self.size_limit and self._samples and self.size_limit < self._size + len(data) + 4:
            self._flush()
        self._samples.append(data)
        self._size += len(data) + 4

    def _flush(self) -> None:
        if not self._samples:
            return
        n = len(self._samples)
        sizes = [len(s) for s in self._samples]
        offsets = np.array([0, *sizes], np.uint64).cumsum()
        offsets += 4 + 4 * (n + 1) + len(self.config_data)
        if offsets[-1] >= 1 << 32:
            raise ValueError("MDS shard over 4 GiB: lower size_limit")
        raw = (
            np.uint32(n).tobytes()
            + offsets.astype(np.uint32).tobytes()
            + self.config_data
            + b"".join(self._samples)
        )
        basename = f"shard.{len(self.shards):05d}.mds"
        (self.out / basename).write_bytes(raw)
        info = {
            "samples": n,
            "raw_data": {"basename": basename, "bytes": len(raw), "hashes": {}},
            "zip_data": None,
            **self.config,
        }
        self.shards.append(info)
        self._reset()

    def finish(self) -> None:
        self._flush()
        (self.out / "index.json").write_text(
            json.dumps({"version": 2, "shards": self.shards}, sort_keys=True)
        )


MARKER = ".ccurate-export.json"  # in each exported split: what it was made from


def _stale_tmp(out: Path, split: str) -> list[Path]:
    """Temp folders of exports of `split` whose process is gone (a kill -9 leaves them) or
    is this one; a live export's folder is left alone."""
    stale = []
    for p in out.glob(f".tmp-{split}-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not p.is_dir() or p.is_symlink():
            continue
        if int(pid) == os.getpid():
            stale.append(p)
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            stale.append(p)
        except PermissionError:  # alive, another user's
            pass
    return stale


def _intact(final: Path, marker: dict[str, Any]) -> bool:
    """`final` is an untouched export made with `marker`'s release and settings: its marker,
    its index and exactly the files the index names, at their sizes."""
    try:
        if json.loads((final / MARKER).read_text()) != marker:
            return False
        index = json.loads((final / "index.json").read_text())
        want = {i["raw_data"]["basename"]: i["raw_data"]["bytes"] for i in index["shards"]}
        files = {p.name: p.stat().st_size for p in final.iterdir()}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    files.pop(MARKER, None)
    files.pop("index.json", None)
    return files == want


def export_mds(
    release_dir: str | Path,
    out: str | Path,
    *,
    splits: list[str] | None = None,
    size_limit: int = 1 << 26,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write each split of a release as an MDS dataset under `out/<split>/`; atomic per split.

    Resumable: a split already exported from this same release with the same settings is
    kept as it is (a rerun after a kill finishes the rest); another existing split needs
    `overwrite`. Temp folders of killed exports are removed.
    """
    if size_limit < 0:
        raise ValueError(f"size_limit must be >= 0 (0: no limit), got {size_limit}")
    root = Path(release_dir)
    if not is_release(root):
        raise ValueError(f"{root} is not a complete release (no _SUCCESS)")
    summary = json.loads((root / "release.json").read_text())
    fmt = summary["config"]["image_format"]
    known = set(summary["config"].get("splits", [])) | set(summary["rows_per_split"])
    unknown = sorted(set(splits or []) - known)
    if unknown:  # a typo would otherwise export an empty dataset
        raise ValueError(f"{root} has no split {unknown[0]!r} (splits: {sorted(known)})")
    splits = list(dict.fromkeys(splits or sorted(summary["rows_per_split"])))
    success = json.loads((root / SUCCESS).read_text())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done: dict[str, Path] = {}
    for split in splits:
        final = out / split
        marker = {
            "release": success.get("release"),
            "sha256sums": success.get("sha256sums"),
            "split": split,
            "size_limit": size_limit,
        }
        for stale in _stale_tmp(out, split):
            shutil.rmtree(stale)
        if final.exists():
            if not overwrite:
                if _intact(final, marker):  # finished by an earlier (killed or repeated) run
                    done[split] = final
                    continue
                raise FileExistsError(f"{final} exists (pass overwrite=True to replace it)")
            shutil.rmtree(final)
        tmp = out / f".tmp-{split}-{os.getpid()}"
        tmp.mkdir()
        try:
            _export_split(root, split, fmt, tmp, size_limit)
            (tmp / MARKER).write_text(json.dumps(marker, sort_keys=True) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a kill -9 leaves it: a rerun removes it
            raise
        os.rename(tmp, final)
        done[split] = final
    return done


def _export_split(root: Path, split: str, fmt: str, tmp: Path, size_limit: int) -> None:
    w = MDSWriter(tmp, _columns(fmt), size_limit)
    for shard in release_shards(root, split):
        bucket = shard.parent.name if shard.parent.name.startswith("res-") else ""
        for key, fields in iter_tar(shard):
            rec = json.loads(fields["json"])
            w.write(
                {
                    "bucket": bucket,
                    "caption": fields.get("txt", b"").decode(),
                    "height": rec["height"],
                    "image": fields[fmt],
                    "json": fields["json"],
                    "key": key,
                    "license": rec["license"],
                    "url": rec["url"],
                    "width": rec["width"],
                }
            )
    w.finish()


def _decode(encoding: str, data: bytes) -> Any:
    if encoding == "str":
        return data.decode()
    if encoding == "int32":
        return int(np.frombuffer(data, np.int32)[0])
    if encoding == "int64":
        return int(np.frombuffer(data, np.int64)[0])
    if encoding == "json":
        return json.loads(data)
    if encoding in ("jpeg", "png"):
        return Image.open(io.BytesIO(data))
    if encoding == "bytes":
        return data
    raise ValueError(f"unsupported encoding {encoding}")


def read_mds(split_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Decode every sample of an MDS dataset directory (what StreamingDataset would return)."""
    split_dir = Path(split_dir)
    index = json.loads((split_dir / "index.json").read_text())
    if index.get("version") != 2:
        raise ValueError(f"unsupported MDS index version {index.get('version')}")
    for info in index["shards"]:
        if info["format"] != "mds" or info.get("compression"):
            raise ValueError("only uncompressed MDS shards are supported")
        raw = (split_dir / info["raw_data"]["basename"]).read_bytes()
        n = struct.unpack_from("<I", raw, 0)[0]
        if n != info["samples"]:
            raise ValueError(
                f"{info['raw_data']['basename']}: {n} samples, index says {info['samples']}"
            )
        offsets = np.frombuffer(raw, np.uint32, count=n + 1, offset=4)
        names, encs, sizes = info["column_names"], info["column_encodings"], info["column_sizes"]
        for i in range(n):
            data = raw[int(offsets[i]) : int(offsets[i + 1])]
            idx = 0
            lens = []
            for size in sizes:
                if size:
                    lens.append(size)
                else:
                    lens.append(struct.unpack_from("<I", data, idx)[0])
                    idx += 4
            sample: dict[str, Any] = {}
            for name, enc, ln in zip(names, encs, lens, strict=True):
                sample[name] = _decode(enc, data[idx : idx + ln])
                idx += ln
            yield sample
