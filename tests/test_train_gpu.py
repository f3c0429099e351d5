"""The trainer's CUDA fast path (compile, channels-last, fused AdamW, prefetch); needs a GPU."""

from __future__ import annotations

import json
import math
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


def test_device_decode_on_cuda_matches_the_workers_decode(tmp_path):
    """nvJPEG (hardware engines on A100/H100/H200) against the workers' libjpeg-turbo:
    the same batch, pixels within JPEG-decoder differences."""
    from ccurate.train.decode import Decoder
    from ccurate.train.device_decode import DeviceJpegDecoder
    from ccurate.train.models import ByteTokenizer
    from ccurate.train.stream import MemberReader, find_shards, iter_tar

    root = tmp_path / "rel"
    write_image_release(root, [24], resolution=64, bad_keys=["00000004"])
    raws = list(iter_tar(find_shards(root)[0]))
    reader = MemberReader()
    for size in (64, 48, 96):
        tok = ByteTokenizer(16)
        plain = Decoder("image", size, size, seed=1, tokenizer=tok, random_flip=True)
        on_gpu = Decoder("image", size, size, seed=1, tokenizer=tok, random_flip=True)
        on_gpu.defer_jpeg = True
        a = plain.decode(raws, 0, reader)
        deferred = on_gpu.decode(raws, 0, reader)
        jpeg_rows = list(deferred["deferred"]["jpeg_rows"])
        dev = DeviceJpegDecoder("cuda")
        b = dev(deferred)
        assert b["pixels"].is_cuda and b["pixels"].shape == (24, 3, size, size)
        assert dev.decoded == len(jpeg_rows) == 11 and dev.cpu_fallback == 0
        assert b["keys"] == a["keys"] and b["bad"] == a["bad"] == ["00000004"]
        assert b["captions"] == a["captions"]
        for i in range(24):
            x, y = a["pixels"][i].float(), b["pixels"][i].cpu().float()
            mse = float(((x - y) ** 2).mean())
            psnr = 99.0 if mse == 0 else 10 * math.log10(255**2 / mse)
            assert psnr > 35, (size, i, psnr)
    reader.close()


def test_training_with_jpegs_decoded_on_the_gpu(tmp_path):
    root = tmp_path / "rel"
    write_image_release(root, [9, 5, 7], resolution=32)
    cfg = dict(FASTEST, compile=False, jpeg_decode="auto", random_flip=True, sample_prompts=[])
    s = train(TrainConfig(**cfg, steps=6), root, tmp_path / "run")
    assert s["steps"] == 6 and s["jpeg_decode"] == "device" and not s["latents"]
    assert math.isfinite(s["final_loss"]) and s["bad_samples"] == 0
    keys = [k for e in _log(tmp_path / "run", "keys-rank0.jsonl") for k in e["keys"]]
    assert len(keys) == 6 * s["batch_size"]
