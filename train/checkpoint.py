"""Training checkpoints: safetensors + json only, so loading one never runs pickled code.

Layout of `checkpoints/step-00001000/` (published by renaming a finished temp dir):

- `unet/` and `unet_ema/`: diffusers layout (`config.json` +
  `diffusion_pytorch_model.safetensors`), loadable with `from_pretrained`;
- `optimizer.safetensors`: every optimizer state tensor, named `state.<param>.<name>`;
- `state.json`: step, optimizer structure (param groups, non-tensor state),
  each rank's data position, config and the loss of the last interval.

`checkpoints/latest.json` names the newest one and is written last.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ccurate.shardio import host_name, pid_alive, write_json_atomic

WEIGHTS = "diffusion_pytorch_model.safetensors"
FORMAT = "ccurate-train-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, unsafe or does not fit this run."""


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def optimizer_to_flat(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into named tensors and a json-able structure."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = []
    for g in state_dict["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(
    tensors: dict[str, torch.Tensor], structure: dict[str, Any]
) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, idx, field = name.split(".", 2)
        state.setdefault(int(idx), {})[field] = t
    for idx, entry in structure.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    groups = []
    for g in structure["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def match_param_layout(optimizer: torch.optim.Optimizer) -> int:
    """Give restored optimizer moments their parameter's memory layout; returns how many
    were changed. A checkpoint stores every tensor contiguous, so after a resume the moments
    of channels-last conv weights are contiguous while the weights are not, and CUDA's fused
    AdamW refuses the mix on its first step ("must have same dtype, device, and layout")."""
    changed = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for name, value in state.items():
                if (
                    isinstance(value, torch.Tensor)
                    and value.shape == p.shape
                    and value.stride() != p.stride()
                ):
                    state[name] = torch.empty_like(p, dtype=value.dtype).copy_(value)
                    changed += 1
    return changed


def save_checkpoint(
    root: str | Path,
    step: int,
    unet_state: dict[str, torch.Tensor],
    unet_config: dict[str, Any],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    ema_state: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Write a checkpoint atomically and point `latest.json` at it; prune old ones."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _recover(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".{final.name}.tmp-{host_name()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for sub, weights in (("unet", unet_state), ("unet_ema", ema_state)):
            if weights is None:
                continue
            (tmp / sub).mkdir(parents=True)
            save_file(_cpu_state(weights), str(tmp / sub / WEIGHTS))
            with open(tmp / sub / "config.json", "w") as fh:
                json.dump(unet_config, fh, indent=1, default=str)
        tensors, structure = optimizer_to_flat(optimizer_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        doc = dict(state, format=FORMAT, step=step, optimizer=structure, ema=ema_state is not None)
        with open(tmp / "state.json", "w") as fh:
            json.dump(doc, fh, indent=1, default=str)
        old = None
        if final.exists():  # moved aside, not deleted in place: a kill never leaves it half gone
            old = root / f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:
                os.replace(old, final)
            raise
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    write_json_atomic(root / "latest.json", {"step": step, "path": final.name})
    prune_checkpoints(root, keep, final)
    return final


def _stale_tmp(tmp: Path, newest: float | None) -> bool:
    """A `.step-N.tmp-<host>-<pid>-<id>` temporary no live writer can still be filling: its
    writer ran on this machine and is gone (or was an earlier process with our pid: this one
    writes one checkpoint at a time and calls this before it starts), or it is older than
    the newest complete checkpoint (written after it, so its writer stopped; this is also
    the rule for names without a host, from before hosts were recorded)."""
    parts = tmp.name.split(".tmp-", 1)[-1].rsplit("-", 2)
    if len(parts) == 3 and parts[0] == host_name() and parts[1].isdigit():
        pid = int(parts[1])
        if pid == os.getpid() or not pid_alive(pid):
            return True
    try:
        return newest is not None and tmp.stat().st_mtime < newest
    except OSError:
        return False


def _recover(root: Path) -> None:
    """Finish a replacement a kill interrupted: a `.step-N.old-*` whose step-N is missing
    (killed between the two renames) is moved back; one whose step-N exists (killed while
    deleting it) is deleted. Then delete the temporaries of checkpoints whose writing a
    kill interrupted (`_stale_tmp`): each is a checkpoint's full size (~13 GB at SD2 size
    with EMA and optimizer), and a few preemptions during saves would fill the disk."""
    for old in root.glob(".step-*.old-*"):
        final = root / old.name[1:].split(".old-", 1)[0]
        if not old.is_dir():
            continue
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
    done = [p for p in root.glob("step-*") if p.is_dir() and (p / "state.json").exists()]
    newest = max((p.stat().st_mtime for p in done), default=None)
    for tmp in root.glob(".step-*.tmp-*"):
        if tmp.is_dir() and _stale_tmp(tmp, newest):
            shutil.rmtree(tmp, ignore_errors=True)


def prune_checkpoints(root: str | Path, keep: int, newest: Path | None = None) -> None:
    """Keep the `keep` latest steps; `newest` (the one just written, which may be an older
    step than some there when a run resumed from an earlier checkpoint) is always kept."""
    done = sorted(p for p in Path(root).glob("step-*") if p.is_dir() and p != newest)
    for old in done[: max(0, len(done) - keep + (newest is not None))]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out_dir: str | Path, resume: str) -> Path | None:
    """`latest` -> the newest checkpoint under `out_dir/checkpoints` (None if none); else a path."""
    if not resume:
        return None
    if resume == "latest":
        root = Path(out_dir) / "checkpoints"
        if root.is_dir():
            _recover(root)
        pointer = root / "latest.json"
        if pointer.exists():
            with open(pointer) as fh:
                path = root / json.load(fh)["path"]
            if path.is_dir():
                return path
        done = sorted(p for p in root.glob("step-*") if p.is_dir())
        return done[-1] if done else None
    path = Path(resume)
    if not (path / "state.json").exists():
        raise CheckpointError(f"no checkpoint at {path} (expected {path / 'state.json'})")
    return path


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]
    unet: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:  # e.g. a pickle under a .safetensors name
        raise CheckpointError(f"{path} is not a valid safetensors file (refused): {exc}") from exc


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint; only safetensors and json are parsed, never a pickle."""
    path = Path(path)
    try:
        with open(path / "state.json") as fh:
            state = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable state.json: {exc}") from exc
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {state.get('format')!r}")
    unet = _load_tensors(path / "unet" / WEIGHTS)
    ema = _load_tensors(path / "unet_ema" / WEIGHTS) if state.get("ema") else None
    opt = optimizer_from_flat(_load_tensors(path / "optimizer.safetensors"), state["optimizer"])
    return Checkpoint(path, state, unet, ema, opt)
