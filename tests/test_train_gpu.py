"""The trainer's CUDA fast path (compile, channels-last, fused AdamW, prefetch); needs a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ccurate.train.config import TrainConfig
from ccurate.train.loop import train
from ccurate.train.synthetic import write_image_release, write_latent_release

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

FASTEST = {
    "compile": True,
    "channels_last": True,
    "fused_adam": True,
    "gpu_prefetch": True,
    "pin_memory": True,
    "num_workers": 2,
    "log_every": 1,
    "log_keys": True,
    "sample_prompts": ["a red square"],
    "sample_steps": 2,
}


def _log(out: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (out / name).read_text().splitlines()]


def test_fast_path_trains_resumes_and_samples(tmp_path):
    root = tmp_path / "rel"
    write_image_release(root, [9, 5, 7], resolution=32)
    a = train(TrainConfig(**FASTEST, steps=6), root, tmp_path / "a")
    train(TrainConfig(**FASTEST, steps=3), root, tmp_path / "b")
    b = train(TrainConfig(**FASTEST, steps=6, resume="latest"), root, tmp_path / "b")
    assert a["steps"] == b["steps"] == 6 and a["images_per_s"] > 0
    ka = [e["keys"] for e in _log(tmp_path / "a", "keys-rank0.jsonl")]
    kb = [e["keys"] for e in _log(tmp_path / "b", "keys-rank0.jsonl")]
    assert ka == kb
    la = {e["step"]: e["loss"] for e in _log(tmp_path / "a", "train_log.jsonl") if "loss" in e}
    lb = {e["step"]: e["loss"] for e in _log(tmp_path / "b", "train_log.jsonl") if "loss" in e}
    for step, loss in la.items():
        assert lb[step] == pytest.approx(loss, rel=2e-2)  # bf16 + non-deterministic kernels
    assert Path(a["sample_image"]).exists()


def test_latent_shards_feed_the_gpu(tmp_path):
    data = tmp_path / "lat"
    write_latent_release(data, 64, 4, (16, 16), 32, 32, "tiny", 32, vae_scale_factor=2)
    s = train(
        TrainConfig(**dict(FASTEST, sample_prompts=[]), steps=8, latents="yes", batch_size=8),
        data,
        tmp_path / "run",
    )
    assert s["latents"] and s["data_wait"] is not None and s["data_wait"] < 0.5
