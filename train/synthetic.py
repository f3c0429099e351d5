"""Procedural shards for tests, the demo and the throughput benchmark.

`write_image_release` writes release-style shards (`.jpg` + `.txt` + `.json`
with `caption` / `alt_text` / licence fields) with procedural images of varied
sizes; `write_latent_release` writes random latent shards plus the manifest the
trainer expects, so a benchmark can stream real tar files from disk without a
VAE or text encoder.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ccurate.shardio import atomic_path, write_json_atomic
from ccurate.tario import TarWriter
from ccurate.train.decode import npy_bytes
from ccurate.train.stream import LATENT_FORMAT, LATENT_MANIFEST


def _image_bytes(rng: np.random.Generator, width: int, height: int, fmt: str) -> bytes:
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.random(3) * 255
    freq = rng.random(2) * 0.3 + 0.02
    wave = (np.sin(xx * freq[0]) * np.cos(yy * freq[1]) + 1) * 64
    arr = np.clip(base[None, None, :] + wave[..., None] * rng.random(3), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_image_release(
    root: str | Path,
    sizes: Sequence[int],
    resolution: int = 32,
    seed: int = 0,
    prefix: str = "shard",
    bad_keys: Sequence[str] = (),
) -> list[str]:
    """One tar per entry of `sizes` (samples per shard); returns every key in write order.

    Keys are `{shard:03d}{index:05d}`; images alternate landscape / square /
    portrait and JPEG / PNG; keys in `bad_keys` get undecodable image bytes.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    keys: list[str] = []
    for si, n in enumerate(sizes):
        path = root / f"{prefix}-{si:05d}.tar"
        with atomic_path(path) as tmp, TarWriter(tmp) as tf:
            for j in range(n):
                key = f"{si:03d}{j:05d}"
                keys.append(key)
                shape = j % 3
                w = resolution * (2 if shape == 0 else 1)
                h = resolution * (2 if shape == 2 else 1)
                ext, fmt = ("jpg", "JPEG") if j % 2 == 0 else ("png", "PNG")
                img = b"not an image" if key in bad_keys else _image_bytes(rng, w, h, fmt)
                rec = {
                    "key": key,
                    "url": f"http://127.0.0.1/img/{key}.{ext}",
                    "caption": f"a synthetic caption of sample {key}",
                    "alt_text": f"alt text {key}",
                    "license": "cc-by-4.0",
                    "author": "procedural",
                    "width": w,
                    "height": h,
                }
                tf.add(f"{key}.{ext}", img)
                tf.add(f"{key}.txt", str(rec["caption"]).encode())
                tf.add(f"{key}.json", json.dumps(rec).encode())
    return keys


def write_latent_release(
    root: str | Path,
    samples: int,
    shards: int,
    latent_hw: tuple[int, int],
    text_len: int,
    text_dim: int,
    preset: str,
    resolution: int,
    vae_scale_factor: int = 8,
    latent_channels: int = 4,
    seed: int = 0,
) -> list[str]:
    """Random latent shards in the precompute format (moments + embeddings + json)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = latent_hw
    paths: list[str] = []
    per = -(-samples // shards)
    k = 0
    for si in range(shards):
        path = root / f"latents-{si:05d}.tar"
        with atomic_path(path) as tmp, TarWriter(tmp) as tf:
            n_here = min(per, samples - k)
            for _ in range(n_here):
                key = f"{k:09d}"
                mean = rng.standard_normal((latent_channels, h, w), dtype=np.float32) * 4
                std = np.full((latent_channels, h, w), 0.01, np.float32)
                lat = np.concatenate([mean, std]).astype(np.float16)
                emb = rng.standard_normal((text_len, text_dim), dtype=np.float32).astype(np.float16)
                tf.add(f"{key}.latent.npy", npy_bytes(lat))
                tf.add(f"{key}.emb.npy", npy_bytes(emb))
                rec = {"key": key, "latent_hw": [h, w]}
                tf.add(f"{key}.json", json.dumps(rec).encode())
                k += 1
        write_json_atomic(str(path)[: -len(".tar")] + ".done", {"samples": n_here})
        paths.append(str(path))
    uncond = np.zeros((text_len, text_dim), np.float16)
    with atomic_path(root / "uncond.npy") as tmp:
        tmp.write_bytes(npy_bytes(uncond))
    write_json_atomic(
        root / LATENT_MANIFEST,
        {
            "format": LATENT_FORMAT,
            "preset": preset,
            "vae": "scratch",
            "text_encoder": "scratch",
            "resolution": resolution,
            "aspect_buckets": False,
            "scaling_factor": 0.18215,
            "vae_scale_factor": vae_scale_factor,
            "latent_channels": latent_channels,
            "moments": True,
            "caption_source": "synthetic",
            "text_dim": text_dim,
            "uncond": "uncond.npy",
            "samples": samples,
        },
    )
    return paths
