"""Model weights on this machine: one error, one offline switch, one safe reader.

No stage downloads weights behind the user's back, and none falls back to random
weights: every loader (CLIP score and aesthetic, watermark classifier, semantic
dedup, BLIP-2, the trainer's models) reads a local path or the Hugging Face cache,
honours `HF_HUB_OFFLINE` (read at call time: tests set it late), and raises
`WeightsNotFoundError` naming the expected location and the `hf download` command
that fetches it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HF_PREFIX = "hf-hub:"


class WeightsNotFoundError(FileNotFoundError):
    """Configured weights are not on this machine; the message names the path and the fetch."""


def hub_offline() -> bool:
    """`HF_HUB_OFFLINE` as huggingface_hub reads it (1/ON/YES/TRUE), but now, not at import."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache() -> str:
    """Where huggingface_hub looks for cached repos (`HF_HUB_CACHE` read now, else its
    import-time default from `HF_HOME`)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or str(constants.HF_HUB_CACHE)


def fetch_command(
    repo: str,
    filename: str | None = None,
    *,
    include: str | None = None,
    local_dir: str | Path | None = None,
) -> str:
    """The `hf download` command that fetches `repo` (or one file of it) on a networked machine."""
    cmd = f"hf download {repo}"
    if filename:
        cmd += f" {filename}"
    if include:
        cmd += f" --include '{include}'"
    if local_dir is not None:
        cmd += f" --local-dir {local_dir}"
    return cmd


def hub_file(spec: str, key: str) -> Path:
    """``hf-hub:org/repo/path/in/repo`` -> the cached file (fetched only when online)."""
    from huggingface_hub import hf_hub_download

    parts = spec[len(HF_PREFIX) :].split("/", 2)
    if len(parts) < 3:
        raise ValueError(f"{key} = {spec!r}: expected 'hf-hub:<org>/<repo>/<file>'")
    repo, filename = "/".join(parts[:2]), parts[2]
    try:
        # offline and cache read now: huggingface_hub fixed both at import
        return Path(
            hf_hub_download(repo, filename, cache_dir=hub_cache(), local_files_only=hub_offline())
        )
    except Exception as e:
        state = "HF_HUB_OFFLINE=1, so only" if hub_offline() else "looked in"
        raise WeightsNotFoundError(
            f"{key} = {spec!r}: {filename} of {repo} is not available ({state} the Hugging Face "
            f"cache {hub_cache()}): {e}. Fetch it on a machine with network: "
            f"`{fetch_command(repo, filename)}`"
        ) from e


def weights_file(spec: str, key: str, fetch_hint: str) -> Path:
    """A local weights file from a path or ``hf-hub:org/repo/file``; missing is an error
    naming the config `key`, the path expected and `fetch_hint`."""
    if spec.startswith(HF_PREFIX):
        return hub_file(spec, key)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{key} = {spec!r}: no such file (expected {path.resolve()}). {fetch_hint}"
        )
    return path


def safe_torch_load(path: str | Path) -> Any:
    """Read a foreign `.pt`/`.bin` file without executing pickled code."""
    import torch

    return torch.load(str(path), map_location="cpu", weights_only=True)


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """A plain state dict from `.safetensors` or a torch pickle (weights only), unwrapped from
    a `state_dict` entry and from DDP's `module.` prefix."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path), device="cpu")
    else:
        sd = safe_torch_load(path)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}


def cache_dir() -> Path:
    """ccurate's per-machine cache: `$CCURATE_CACHE_DIR`, else `$XDG_CACHE_HOME/ccurate`
    (default `~/.cache/ccurate`); read now, not at import."""
    own = os.environ.get("CCURATE_CACHE_DIR")
    if own:
        return Path(own).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ccurate"


def digest_memo_path() -> Path:
    """Where `files_sha256` remembers digests."""
    return cache_dir() / "file-sha256.json"


# a file changed less than this long ago is hashed but not remembered: file times tick at
# the kernel's clock granularity (milliseconds), so a rewrite within the same tick would
# keep every field of the identity (git calls such entries "racily clean")
_RACY_NS = 2_000_000_000


def _identity(st: os.stat_result) -> list[int]:
    # ctime changes on every write, rename or chmod and cannot be set from user space (unlike
    # the mtime that `rsync -a` or `touch -r` copy): with size, inode and device it tells a
    # file from any later content at the same path
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def files_sha256(paths: Iterable[Path], memo: Path | None = None) -> dict[Path, str]:
    """SHA-256 hex digest of each file, remembered across runs by the file's identity.

    Hashing a multi-GB model folder takes tens of seconds, and every worker of every run
    did it again for the same unchanged files. A digest is reused only while the file's
    size, mtime, ctime, inode and device all match what they were when it was hashed (and
    only files unchanged for `_RACY_NS` are remembered), so the result is always the
    content's digest. The memo is a cache: unreadable, corrupt
    or unwritable, it is ignored (and the files are hashed)."""
    memo = memo or digest_memo_path()
    try:
        known = json.loads(memo.read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    out: dict[Path, str] = {}
    changed = False
    for path in paths:
        key = str(path.resolve())
        ident = _identity(path.stat())
        entry = known.get(key)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == ident:
            out[path] = str(entry[1])
            continue
        with path.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        settled = time.time_ns() - max(ident[1], ident[2]) >= _RACY_NS
        if settled and _identity(path.stat()) == ident:  # and not rewritten while read
            known[key] = [ident, digest]
            changed = True
        out[path] = digest
    if changed:
        from ccurate.shardio import atomic_path

        known = {k: v for k, v in known.items() if os.path.exists(k)}
        try:
            with atomic_path(memo) as tmp:
                tmp.write_text(json.dumps(known, sort_keys=True))
        except OSError:
            pass  # a read-only home: hashing again next time is the only cost
    return out
