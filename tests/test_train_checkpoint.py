"""Checkpoint files on their own: atomic save, pruning, finding `latest`, refusing bad ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ccurate.train.checkpoint import (
    WEIGHTS,
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)


def _opt_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(3, 2, generator=g))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn(3, 2, generator=g)
    opt.step()
    return opt.state_dict()


def _save(root: Path, step: int, value: float = 0.0, **kw) -> Path:
    unet = {"w": torch.full((2, 2), value), "b": torch.arange(3.0)}
    return save_checkpoint(root, step, unet, {"arch": "t"}, _opt_state(), {"loss": value}, **kw)


def test_checkpoint_without_ema_and_non_tensor_optimizer_state(tmp_path: Path) -> None:
    """EMA off: no `unet_ema/`, `ema` false, loads as None. Optimizer state that is not a
    tensor (an int step, as older torch and some optimizers keep it) goes through the json."""
    state = _opt_state()
    state["state"][0]["step"] = 7  # a plain int, not a tensor
    tensors, structure = optimizer_to_flat(state)
    assert "state.0.step" not in tensors and structure["scalars"] == {"0": {"step": 7}}
    back = optimizer_from_flat(tensors, json.loads(json.dumps(structure)))
    assert back["state"][0]["step"] == 7
    torch.testing.assert_close(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])

    path = save_checkpoint(
        tmp_path, 5, {"w": torch.ones(2)}, {"arch": "t"}, state, {"loss": 0.5}, ema_state=None
    )
    assert path.name == "step-00000005" and not (path / "unet_ema").exists()
    ck = load_checkpoint(path)
    assert ck.ema is None and ck.state["ema"] is False and ck.step == 5
    assert ck.optimizer["state"][0]["step"] == 7
    assert json.loads((path / "unet" / "config.json").read_text()) == {"arch": "t"}


def test_save_prunes_old_checkpoints_and_replaces_a_step(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, value=float(step), keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000003", "step-00000004"]
    assert json.loads((tmp_path / "latest.json").read_text()) == {
        "step": 4,
        "path": "step-00000004",
    }
    # the same step again (a resume from an older checkpoint) replaces it whole
    _save(tmp_path, 4, value=40.0, keep=2)
    ck = load_checkpoint(tmp_path / "step-00000004")
    assert float(ck.unet["w"][0, 0]) == 40.0 and ck.state["loss"] == 40.0
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_failed_save_leaves_no_partial_checkpoint(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    shared = torch.zeros(4)
    with pytest.raises(Exception, match="share memory"):  # safetensors refuses aliases
        save_checkpoint(tmp_path, 2, {"a": shared, "b": shared}, {}, _opt_state(), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-00000001"]
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 1


def test_find_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert find_checkpoint(out, "") is None
    assert find_checkpoint(out, "latest") is None  # nothing yet: a fresh start
    root = out / "checkpoints"
    _save(root, 2, keep=5)
    _save(root, 10, keep=5)
    assert find_checkpoint(out, "latest") == root / "step-00000010"
    # latest.json is written after the checkpoint is published: a crash in between leaves
    # none, or one naming a step since removed; the newest complete directory is used
    (root / "latest.json").unlink()
    assert find_checkpoint(out, "latest") == root / "step-00000010"
    (root / "latest.json").write_text(json.dumps({"step": 11, "path": "step-00000011"}))
    assert find_checkpoint(out, "latest") == root / "step-00000010"
    # a crashed save's temp dir is not a checkpoint
    (root / ".step-00000012.tmp-1-abc").mkdir()
    assert find_checkpoint(out, "latest") == root / "step-00000010"
    # an explicit directory must hold state.json
    assert find_checkpoint(out, str(root / "step-00000002")) == root / "step-00000002"
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*nowhere"):
        find_checkpoint(out, str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("state_missing", "unreadable state.json"),
        ("state_truncated", "unreadable state.json"),
        ("other_format", "unknown checkpoint format 'someone-else/3'"),
        ("optimizer_missing", "checkpoint file missing: .*optimizer.safetensors"),
        ("ema_missing", "checkpoint file missing: .*unet_ema"),
        ("weights_truncated", "not a valid safetensors file"),
    ],
)
def test_damaged_checkpoints_are_refused(tmp_path: Path, damage: str, message: str) -> None:
    path = save_checkpoint(
        tmp_path,
        3,
        {"w": torch.ones(64, 64)},
        {},
        _opt_state(),
        {"loss": 1.0},
        ema_state={"w": torch.zeros(64, 64)},
    )
    load_checkpoint(path)  # intact: loads
    state = path / "state.json"
    if damage == "state_missing":
        state.unlink()
    elif damage == "state_truncated":
        state.write_text(state.read_text()[:40])
    elif damage == "other_format":
        state.write_text(json.dumps(dict(json.loads(state.read_text()), format="someone-else/3")))
    elif damage == "optimizer_missing":
        (path / "optimizer.safetensors").unlink()
    elif damage == "ema_missing":
        (path / "unet_ema" / WEIGHTS).unlink()
    elif damage == "weights_truncated":
        w = path / "unet" / WEIGHTS
        w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
