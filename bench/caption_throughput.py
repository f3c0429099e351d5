"""Caption throughput: ccurate's BLIP-2 captioner vs plain HF `generate`, end to end from shards.

Builds the full BLIP-2 OPT-2.7b architecture with random weights (nothing can
be downloaded; the FLOPs are the real model's), writes procedural JPEGs into
shards, reads them back and captions them two ways in the same run:

  naive : iter_samples(batch 64) -> PIL decode + Blip2Processor -> model.generate (eager)
  ours  : iter_samples -> CaptionStage.process (threaded decode, GPU batches, fastgen + CUDA graphs)

Random weights never emit EOS, so both variants decode exactly max_new_tokens
tokens (min_new_tokens = max_new_tokens) and do equal work. Greedy, bf16, 224 px.

    python3 bench/caption_throughput.py            # GPU, full size
    python3 bench/caption_throughput.py --tiny     # CPU smoke run with the tiny model

Ends with: RESULT caption ours_img_s=... naive_img_s=... ratio=... batch=... device=...
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ccurate.captioning.blip2 import Blip2Captioner
from ccurate.captioning.config import CaptionConfig
from ccurate.captioning.stage import CaptionStage
from ccurate.captioning.tiny import build_processor, build_tiny_blip2
from ccurate.record import Sample, make_key
from ccurate.shardio import ShardWriter, iter_samples


def full_blip2_opt27b_config() -> Any:
    """Salesforce/blip2-opt-2.7b's architecture, written out (the config cannot be downloaded)."""
    from transformers import Blip2Config, OPTConfig

    text = OPTConfig(
        vocab_size=50272,
        hidden_size=2560,
        num_hidden_layers=32,
        ffn_dim=10240,
        num_attention_heads=32,
        max_position_embeddings=2048,
        word_embed_proj_dim=2560,
        do_layer_norm_before=True,
        activation_function="relu",
        bos_token_id=2,
        eos_token_id=50118,  # "\n", as LAVIS and the hub config use
        pad_token_id=1,
    )
    return Blip2Config(
        vision_config={  # EVA ViT-g/14 without its last block, as BLIP-2 uses it
            "hidden_size": 1408,
            "intermediate_size": 6144,
            "num_hidden_layers": 39,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
            "qkv_bias": True,
            "layer_norm_eps": 1e-6,
        },
        qformer_config={
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "cross_attention_frequency": 2,
            "encoder_hidden_size": 1408,
            "vocab_size": 30522,
        },
        text_config=text.to_dict(),
        num_query_tokens=32,
        image_token_index=50265,
    )


def procedural_jpeg(i: int, lo: int, hi: int) -> bytes:
    """A photo-like JPEG: smooth gradients, a few discs, mild noise (compresses like a photo)."""
    rng = np.random.default_rng(i)
    w, h = (int(v) for v in rng.integers(lo, hi + 1, 2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        a, b, d = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 80 * np.sin(a * xx / w * 6 + b * yy / h * 6 + d * 3)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.3) * min(w, h)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_shards(
    out: Path, unique: int, per_shard: int, shards: int, lo: int, hi: int
) -> list[Path]:
    """`unique` procedural JPEGs cycled into `shards` shards of `per_shard` samples each."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as pool:
        jpegs = list(pool.map(lambda i: procedural_jpeg(i, lo, hi), range(unique)))
    prefixes = []
    n = 0
    for s in range(shards):
        prefix = out / f"shard-{s:05d}"
        w = ShardWriter(prefix)
        for _ in range(per_shard):
            url = f"https://example.org/img/{n}.jpg"
            data = jpegs[n % unique]
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
            w.write(
                Sample(
                    key=make_key(url),
                    url=url,
                    alt_text=f"procedural image {n % unique}",
                    image=data,
                    mime="image/jpeg",
                    width=width,
                    height=height,
                )
            )
            n += 1
        w.commit({"n": per_shard})
        prefixes.append(prefix)
    return prefixes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_naive(
    model: Any,
    processor: Any,
    shards: list[Path],
    cfg: CaptionConfig,
    batch: int,
    device: torch.device,
    limit: int,
) -> float:
    """The script everyone writes first: decode, process, generate, batch after batch."""
    dtype = next(model.parameters()).dtype
    n_img = 0
    t0 = 0.0
    warm = False
    for prefix in shards:
        for samples in iter_samples(prefix, batch_size=batch):
            images = [Image.open(io.BytesIO(s.image or b"")).convert("RGB") for s in samples]
            inputs = processor(images=images, text=[cfg.prompt] * len(images), return_tensors="pt")
            inputs = inputs.to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            with torch.inference_mode():
                out = model.generate(
                    **inputs,
                    max_new_tokens=cfg.max_new_tokens,
                    min_new_tokens=cfg.min_new_tokens,
                    do_sample=False,
                    num_beams=1,
                )
            p = inputs["input_ids"].shape[1]
            texts = processor.batch_decode(out[:, p:], skip_special_tokens=True)
            assert len(texts) == len(samples)
            if not warm:  # first batch pays one-time costs
                sync(device)
                warm, t0 = True, time.perf_counter()
                continue
            n_img += len(samples)
            if n_img >= limit:
                break
        if n_img >= limit:
            break
    sync(device)
    return n_img / (time.perf_counter() - t0)


def run_ours(
    captioner: Blip2Captioner,
    shards: list[Path],
    cfg: CaptionConfig,
    repeat: int,
    device: torch.device,
) -> float:
    stage = CaptionStage(cfg)
    stage.attach(captioner)
    stage.setup()
    for samples in iter_samples(shards[0], batch_size=stage.batch_size):  # warm-up, graph capture
        stage.process(samples)
    sync(device)
    n_img = 0
    t0 = time.perf_counter()
    for _ in range(repeat):
        for prefix in shards:
            for samples in iter_samples(prefix, batch_size=stage.batch_size):
                out = stage.process(samples)
                n_img += len(out)
                assert all(s.caption is not None for s in out)
    sync(device)
    rate = n_img / (time.perf_counter() - t0)
    stage.teardown()
    return rate


def vision_ceiling(captioner: Blip2Captioner, device: torch.device, n: int) -> float:
    """Vision encoder + Q-Former alone on device-resident pixels (the upper bound)."""
    x = torch.randint(0, 255, (128, captioner.height, captioner.width, 3), dtype=torch.uint8)
    x = x.to(device)
    with torch.inference_mode():
        captioner.encode(x)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(max(1, n // 128)):
            captioner.encode(x)
        sync(device)
    return max(1, n // 128) * 128 / (time.perf_counter() - t0)


def naive_gpu_only(
    model: Any,
    processor: Any,
    cfg: CaptionConfig,
    batch: int,
    device: torch.device,
    n_batches: int,
) -> float:
    """Plain generate on pixels already on the GPU: the figure the lead quotes (109 img/s @64)."""
    dtype = next(model.parameters()).dtype
    images = [Image.new("RGB", (320, 240), (i * 3 % 255, 90, 160)) for i in range(batch)]
    inputs = processor(images=images, text=[cfg.prompt] * batch, return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    kw = dict(
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=cfg.min_new_tokens,
        do_sample=False,
        num_beams=1,
    )
    with torch.inference_mode():
        model.generate(**inputs, **kw)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            model.generate(**inputs, **kw)
        sync(device)
    return n_batches * batch / (time.perf_counter() - t0)


def cpu_decode_rate(captioner: Blip2Captioner, shards: list[Path]) -> float:
    """JPEG decode + resize alone on the captioner's thread pool (the input pipeline's ceiling)."""
    from ccurate.captioning.blip2 import load_image

    data = [s.image or b"" for batch in iter_samples(shards[0], batch_size=4096) for s in batch]
    t0 = time.perf_counter()
    futs = [
        captioner._pool.submit(load_image, d, captioner.height, captioner.width, captioner.resample)
        for d in data
    ]
    for f in futs:
        f.result()
    return len(data) / (time.perf_counter() - t0)


def lm_rate(captioner: Blip2Captioner, device: torch.device, reps: int = 3) -> float:
    """fastgen prefill + decode alone on random prompt embeddings (GPU batch = captioner's)."""
    b = captioner.batch_size
    d = captioner.model.get_input_embeddings().weight.shape[1]
    emb = torch.randn(b, len(captioner.prompt_ids), d, device=device, dtype=captioner.dtype)
    with torch.inference_mode():
        captioner.generate(emb)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            captioner.generate(emb)
        sync(device)
    return reps * b / (time.perf_counter() - t0)


def check_graphs(captioner: Blip2Captioner, device: torch.device) -> str:
    """Same tokens with and without CUDA graphs (and vs HF generate) on a few images."""
    from ccurate.captioning.fastgen import GreedyOPT

    if captioner.fast is None:
        return "fastgen=off"
    c = captioner.cfg
    x = torch.randint(0, 255, (8, captioner.height, captioner.width, 3), dtype=torch.uint8)
    with torch.inference_mode():
        emb = captioner.encode(x.to(device))
        a = captioner.fast.generate(emb, captioner.prompt_ids, c.max_new_tokens, c.min_new_tokens)
        lm = captioner.model.language_model
        eager = GreedyOPT(lm, captioner.eos_ids, captioner.pad_id, use_graphs=False)
        b = eager.generate(emb, captioner.prompt_ids, c.max_new_tokens, c.min_new_tokens)
        hf = captioner.model.language_model.generate(
            inputs_embeds=emb,
            input_ids=captioner.prompt_ids.unsqueeze(0).expand(8, -1),
            attention_mask=torch.ones(emb.shape[:2], dtype=torch.long, device=device),
            max_new_tokens=c.max_new_tokens,
            min_new_tokens=c.min_new_tokens,
            do_sample=False,
            num_beams=1,
        )[:, emb.shape[1] :]
    graphs = captioner.fast.use_graphs
    same = bool((a == b).all())
    agree = float((a == hf).float().mean())
    return f"graphs={graphs} graph_vs_eager_equal={same} token_agreement_vs_hf={agree:.3f}"


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random-init model (CPU smoke run)")
    ap.add_argument("--unique", type=int, default=None, help="distinct procedural JPEGs")
    ap.add_argument("--per-shard", type=int, default=None, help="samples per shard")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=None, help="timed passes over the shards (ours)")
    ap.add_argument("--naive-batch", type=int, default=64, help="the anchor of the ratio")
    ap.add_argument(
        "--naive-ref-batch",
        type=int,
        default=None,
        help="also time naive generate at this batch (reference only)",
    )
    ap.add_argument("--naive-images", type=int, default=None, help="images timed for naive")
    ap.add_argument(
        "--variants",
        default=None,
        help="ours: GPU batch:attention variants, e.g. 512:pos,1024:mask "
        "(pos = one CUDA graph per position, mask = one graph, masked)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    tiny = args.tiny
    unique = args.unique or (48 if tiny else 512)
    per_shard = args.per_shard or (32 if tiny else 2048)
    repeat = args.repeat or 1
    naive_images = args.naive_images or (32 if tiny else 512)
    variants = [
        (int(v.split(":")[0]), v.split(":")[1] if ":" in v else "mask")
        for v in (
            args.variants or ("16:mask,16:pos" if tiny else "1024:mask,512:mask,1024:pos")
        ).split(",")
    ]
    lo, hi = (48, 96) if tiny else (256, 640)
    tmp = tempfile.TemporaryDirectory(dir=args.workdir)
    work = Path(tmp.name)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_num_threads(1)  # tiny GEMMs: more threads only contend on a busy CI box

    t = time.perf_counter()
    shards = make_shards(work / "shards", unique, per_shard, args.shards, lo, hi)
    print(
        f"[bench] {args.shards} shards x {per_shard} samples ({unique} distinct JPEGs) "
        f"in {time.perf_counter() - t:.1f}s",
        flush=True,
    )

    n = args.max_new_tokens
    base = {"max_new_tokens": n, "min_new_tokens": n, "prompt": "a photo of"}
    if tiny:
        model_dir = build_tiny_blip2(work / "tiny-blip2")
        cfg0 = CaptionConfig(model=str(model_dir), device="cpu", **base)
        captioner = Blip2Captioner.load(cfg0)  # the real loading path
        model, processor = captioner.model, captioner.processor
        model_id, revision = captioner.model_id, captioner.revision
    else:
        from transformers import Blip2ForConditionalGeneration

        t = time.perf_counter()
        config = full_blip2_opt27b_config()
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device(device):
            model = Blip2ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
        model.to(torch.bfloat16).eval()
        processor = build_processor(224, 32, vocab_size=50265)
        model_id, revision = "random-init/blip2-opt-2.7b", "random"
        n_params = sum(p.numel() for p in model.parameters()) / 1e9
        print(
            f"[bench] built BLIP-2 OPT-2.7b ({n_params:.2f}B params, random) "
            f"in {time.perf_counter() - t:.1f}s",
            flush=True,
        )
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    t = time.perf_counter()
    naive = run_naive(
        model, processor, shards, CaptionConfig(**base), args.naive_batch, device, naive_images
    )
    print(
        f"[bench] naive generate batch {args.naive_batch}: {naive:.1f} img/s "
        f"({time.perf_counter() - t:.1f}s)",
        flush=True,
    )
    if args.naive_ref_batch:
        ref = run_naive(
            model,
            processor,
            shards,
            CaptionConfig(**base),
            args.naive_ref_batch,
            device,
            3 * args.naive_ref_batch,
        )
        print(
            f"[bench] naive generate batch {args.naive_ref_batch} (reference): {ref:.1f} img/s",
            flush=True,
        )

    gpu_only = naive_gpu_only(
        model, processor, CaptionConfig(**base), args.naive_batch, device, 2 if tiny else 5
    )
    print(
        f"[bench] naive generate batch {args.naive_batch}, GPU only (pixels resident): "
        f"{gpu_only:.1f} img/s",
        flush=True,
    )

    best = (0.0, 0)
    results: dict[str, float] = {"naive_img_s": naive, "naive_gpu_only_img_s": gpu_only}
    for i, (b, mode) in enumerate(variants):
        cfg = CaptionConfig(model=model_id, device=str(device), batch_size=b, **base)
        captioner = Blip2Captioner(model, processor, cfg, model_id, revision, device)
        if captioner.fast is not None:
            captioner.fast.per_position = mode == "pos"
        try:
            if i == 0:
                print(f"[bench] check: {check_graphs(captioner, device)}", flush=True)
                vis = vision_ceiling(captioner, device, 1024 if not tiny else 128)
                results["vision_img_s"] = vis
                print(f"[bench] vision encoder + Q-Former alone: {vis:.1f} img/s", flush=True)
                dec = cpu_decode_rate(captioner, shards)
                print(
                    f"[bench] JPEG decode+resize alone ({captioner._pool._max_workers} threads): "
                    f"{dec:.1f} img/s",
                    flush=True,
                )
            lm = lm_rate(captioner, device, 1 if tiny else 3)
            print(
                f"[bench] {b}:{mode} language model alone (prefill + {n} tokens): {lm:.1f} img/s",
                flush=True,
            )
            t = time.perf_counter()
            rate = run_ours(captioner, shards, cfg, repeat, device)
        finally:
            captioner.close()
        results[f"ours_b{b}_{mode}_img_s"] = rate
        print(
            f"[bench] ours {b}:{mode} (final batch {captioner.batch_size}): {rate:.1f} img/s "
            f"({time.perf_counter() - t:.1f}s)",
            flush=True,
        )
        if rate > best[0]:
            best = (rate, captioner.batch_size)
        del captioner
        if device.type == "cuda":
            torch.cuda.empty_cache()

    ours, batch = best
    results.update(ours_img_s=ours, ratio=ours / naive, batch=batch)
    print(
        f"RESULT caption ours_img_s={ours:.1f} naive_img_s={naive:.1f} ratio={ours / naive:.2f} "
        f"batch={batch} device={dev_name.replace(' ', '_')}",
        flush=True,
    )
    tmp.cleanup()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
