"""Training throughput of the SD2-base UNet from precomputed latent shards on disk.

Writes random latent shards (SD2-base shapes: 4-channel latents as posterior
moments, 77x1024 text embeddings) to disk, then streams them through ccurate's
own loader and trainer (`ccurate.train.loop.train`) in three settings, measured
in the same run on the same shards:

- `eager`  : the anchor: naive eager PyTorch — bf16 autocast, no compile,
             NCHW, for-each AdamW, pageable batches copied synchronously;
- `eager+` : eager with ccurate's data path and optimizer (pinned memory, side-
             stream prefetch, fused AdamW, channels-last) — shows what compile adds;
- `ours`   : ccurate's best settings: the above plus `torch.compile`.

All three do the same work per step: fp32 master weights, EMA, gradient
clipping, epsilon loss, caption dropout, posterior sampling of the latents.
images/s excludes warm-up (compile) steps; data_wait is the fraction of wall
time the loop waited for a batch.

    python bench/train_throughput.py                  # GPU: 256 px and 512 px
    python bench/train_throughput.py --tiny           # CPU smoke run, tiny preset

Ends with `RESULT train ours_img_s=... eager_img_s=... ratio=... data_wait=... res=256 ...`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from ccurate.train.config import TrainConfig
from ccurate.train.loop import train
from ccurate.train.synthetic import write_latent_release

VARIANTS: dict[str, dict[str, object]] = {
    "eager": {
        "compile": False,
        "channels_last": False,
        "fused_adam": False,
        "gpu_prefetch": False,
        "pin_memory": False,
    },
    "ours": {
        "compile": True,
        "channels_last": True,
        "fused_adam": True,
        "gpu_prefetch": True,
        "pin_memory": True,
    },
    "eager+": {
        "compile": False,
        "channels_last": True,
        "fused_adam": True,
        "gpu_prefetch": True,
        "pin_memory": True,
    },
}


def make_shards(root: Path, preset: str, res: int, samples: int, shards: int) -> Path:
    if preset == "tiny":
        hw, text_len, text_dim, factor = (res // 2, res // 2), 32, 32, 2
    else:
        hw, text_len, text_dim, factor = (res // 8, res // 8), 77, 1024, 8
    out = root / f"latents-{preset}-{res}"
    t0 = time.perf_counter()
    write_latent_release(out, samples, shards, hw, text_len, text_dim, preset, res, factor)
    size = sum(p.stat().st_size for p in out.glob("*.tar")) / 2**20
    print(
        f"[bench] wrote {samples} samples in {shards} shards ({size:.0f} MiB) "
        f"in {time.perf_counter() - t0:.1f}s -> {out}",
        flush=True,
    )
    return out


def run_variant(name: str, base: dict[str, object], data: Path, work: Path, batch: int) -> dict:
    """One trainer run; on CUDA out-of-memory the batch is halved and the run retried."""
    while True:
        cfg = TrainConfig.model_validate({**base, **VARIANTS[name], "batch_size": batch})
        out = work / f"run-{name}-{batch}"
        shutil.rmtree(out, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            summary = train(cfg, data, out)
        except torch.cuda.OutOfMemoryError:
            if batch <= 1:
                raise
            print(f"[bench] {name}: out of memory at batch {batch}, retrying with {batch // 2}")
            batch //= 2
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()
            continue
        summary["wall_s"] = time.perf_counter() - t0
        summary["peak_gib"] = (
            torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        )
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        torch._dynamo.reset()
        print(
            f"[bench] {name:7s} batch={batch:3d} img/s={summary['images_per_s']:8.1f} "
            f"data_wait={summary['data_wait']:.3f} peak={summary['peak_gib']:.1f}GiB "
            f"wall={summary['wall_s']:.0f}s",
            flush=True,
        )
        return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiny", action="store_true", help="tiny preset on CPU (smoke run)")
    ap.add_argument("--res", type=int, nargs="+", default=None, help="resolutions (px)")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="batch per resolution")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (compile) per run")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--breakdown-all", action="store_true", help="eager+ at every resolution")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    preset = "tiny" if args.tiny else "sd2-base"
    res_list = args.res or ([32] if args.tiny else [256, 512])
    default_batch = {32: 8, 256: 64, 512: 16}
    batches = args.batch or [default_batch.get(r, 16) for r in res_list]
    steps = args.steps or (6 if args.tiny else 40)
    warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 6)
    variants = list(args.variants)
    if not cuda and "ours" in variants:
        variants.remove("ours")  # compiling on a CPU takes minutes: the smoke run skips it
        print("[bench] no CUDA: `ours` (torch.compile) skipped; eager+ stands in for it")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ccurate-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"[bench] torch {torch.__version__} device="
        f"{torch.cuda.get_device_name() if cuda else 'cpu'} preset={preset}",
        flush=True,
    )

    results: dict[int, dict[str, dict]] = {}
    for res, batch in zip(res_list, batches, strict=True):
        samples = max(batch * 16, 256) if not args.tiny else 64
        data = make_shards(work, preset, res, samples, shards=16 if not args.tiny else 4)
        base: dict[str, object] = {
            "preset": preset,
            "unet": "scratch",
            "latents": "yes",
            "steps": warmup + steps,
            "timing_skip_steps": warmup,
            "num_workers": args.workers if cuda else 1,
            "prefetch_factor": 4,
            "shuffle_buffer": 256,
            "log_every": max(1, (warmup + steps) // 3),
            "sample_prompts": [],
            "checkpoint_at_end": False,
            "ema": True,
            "compile_mode": args.compile_mode,
            "resolution": res,
        }
        results[res] = {}
        for name in variants:
            if name == "eager+" and res != res_list[0] and not args.breakdown_all:
                continue  # the breakdown at the first resolution is enough
            try:
                results[res][name] = run_variant(name, base, data, work, batch)
            except Exception:  # report the others; the table says which one is missing
                traceback.print_exc()
                print(f"[bench] {name} at {res}px FAILED", flush=True)
        shutil.rmtree(data, ignore_errors=True)

    print("\n| res | variant | batch | img/s | vs eager | data wait | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for res, by in results.items():
        if "eager" not in by:
            continue
        anchor = by["eager"]["images_per_s"]
        for name, s in by.items():
            print(
                f"| {res} | {name} | {s['batch_size']} | {s['images_per_s']:.1f} | "
                f"{s['images_per_s'] / anchor:.2f}x | {s['data_wait'] * 100:.1f}% | "
                f"{s['peak_gib']:.1f} |"
            )
    best = "ours" if "ours" in variants else "eager+"  # no compile on CPU: eager+ stands in

    def figure(res: int, name: str, key: str = "images_per_s") -> float:
        value = results.get(res, {}).get(name, {}).get(key)
        return float(value) if value is not None else float("nan")

    first = res_list[0]
    o, e = figure(first, best), figure(first, "eager")
    line = (
        f"RESULT train ours_img_s={o:.1f} eager_img_s={e:.1f} ratio={o / e:.3f} "
        f"data_wait={figure(first, best, 'data_wait'):.4f} res={first}"
    )
    for res in res_list[1:]:
        o, e = figure(res, best), figure(res, "eager")
        line += f" ours_{res}_img_s={o:.1f} eager_{res}_img_s={e:.1f}"
    if args.json:
        Path(args.json).write_text(
            json.dumps({str(k): v for k, v in results.items()}, indent=1, default=str)
        )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
