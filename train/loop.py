"""The training loop: `train(cfg, data, out_dir)` for one process or each rank of `torchrun`.

Speed rules the loop keeps: fp32 master weights with bf16 autocast, fused AdamW
on CUDA, no host synchronisation between log steps (losses stay on the device,
randomness comes from a device generator re-seeded per step), pinned batches
copied on a side stream one step ahead, static shapes (full batches only), and
optional `torch.compile` / channels-last. Reproducibility rules: the noise,
timesteps and caption dropout of step s on rank r depend only on (seed, s, r),
and the data stream only on (seed, data epoch, slot), so a resumed run continues
the exact loss curve of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ccurate.train.checkpoint import (
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    match_param_layout,
    save_checkpoint,
)
from ccurate.train.config import TrainConfig
from ccurate.train.decode import Decoder, load_npy
from ccurate.train.device_decode import DeviceJpegDecoder, device_decode_error
from ccurate.train.loader import ShardDataset, TrainLoader
from ccurate.train.models import (
    TextEncoder,
    build_text_encoder,
    build_unet,
    build_vae,
    count_params,
    place,
    resolve_refs,
    vae_scale_factor,
    vae_shift_factor,
)
from ccurate.train.presets import get_preset
from ccurate.train.stream import (
    LATENT_FORMAT,
    DataError,
    StreamSpec,
    countable,
    find_manifest,
    find_shards,
    make_buckets,
    shard_counts,
    shard_names,
)

# ---- distributed -------------------------------------------------------------------


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we initialised the process group and must destroy it


def init_distributed(cfg: TrainConfig) -> DistContext:
    """Join the `torchrun` process group when WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        device = torch.device("cuda", local_rank if world > 1 else (torch.device(want).index or 0))
        torch.cuda.set_device(device)
    else:
        device = torch.device(want)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistContext(rank, world, local_rank, device, owns)


# ---- pieces of the step --------------------------------------------------------------


def make_noise_scheduler(cfg: TrainConfig) -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
    )


def snr_weights(alpha_bar: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) for the epsilon or v objective."""
    snr = alpha_bar / (1 - alpha_bar)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


class DiffusionLoss(nn.Module):
    """Noising, the UNet call and the weighted MSE in one module (one graph to compile)."""

    def __init__(
        self, unet: nn.Module, alphas_cumprod: torch.Tensor, cfg: TrainConfig, autocast: bool
    ):
        super().__init__()
        self.unet = unet
        # a plain attribute, not a buffer: DDP must not broadcast it every step
        self.alphas_cumprod = alphas_cumprod.float()
        self.prediction_type = cfg.prediction_type
        self.snr_gamma = cfg.snr_gamma
        self.autocast = autocast

    def forward(
        self,
        latents: torch.Tensor,
        cond: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        ab = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        sa, s1 = ab.sqrt(), (1 - ab).sqrt()
        noisy = sa * latents + s1 * noise
        target = noise if self.prediction_type == "epsilon" else sa * noise - s1 * latents
        with torch.autocast(latents.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            pred = self.unet(noisy, timesteps, encoder_hidden_states=cond).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.snr_gamma > 0:
            per_sample = per_sample * snr_weights(ab.view(-1), self.snr_gamma, self.prediction_type)
        return per_sample.mean()


class EMA:
    """Exponential moving average of the trainable weights (fp32, one foreach op per step)."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], decay: float) -> None:
        self.names = [n for n, _ in named]
        self.shadow = [p.detach().float().clone() for _, p in named]
        self.decay = decay

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, params: list[nn.Parameter], step: int) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1.0 - self.decay_at(step))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow, strict=True))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, t in zip(self.names, self.shadow, strict=True):
            t.copy_(state[name])


class Prefetcher:
    """Moves the next batch to the GPU on a side stream while the current step runs."""

    def __init__(self, it: Iterator[dict[str, Any]], device: torch.device, enabled: bool) -> None:
        self.it = it
        self.device = device
        self.stream = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None
        self.next_batch: dict[str, Any] | None = None
        if self.stream is not None:
            self._preload()

    def _move(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {
            k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }

    def _preload(self) -> None:
        assert self.stream is not None
        with torch.cuda.stream(self.stream):  # a loader's `finish` (device decode) runs here too
            self.next_batch = self._move(next(self.it))

    def __next__(self) -> dict[str, Any]:
        if self.stream is None:
            return self._move(next(self.it))
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        batch = self.next_batch
        assert batch is not None
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                v.record_stream(current)
        self._preload()
        return batch


def dropout_mask(n: int, p: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Which captions of a batch become the empty caption (classifier-free guidance)."""
    return torch.rand(n, generator=gen, device=device) < p


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1009 + micro * 101 + rank * 7919 + 17) % (2**63 - 1)


def lr_at(cfg: TrainConfig, step: int) -> float:
    if cfg.lr_warmup_steps <= 0:
        return cfg.lr
    return cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup_steps)


# ---- sampling ------------------------------------------------------------------------


@torch.no_grad()
def sample_grid(
    unet: nn.Module,
    vae: nn.Module,
    text_encoder: TextEncoder,
    prompts: list[str],
    cfg: TrainConfig,
    height: int,
    width: int,
    device: torch.device,
    autocast: bool,
) -> np.ndarray:
    """Images for fixed prompts (fixed noise, DDIM, classifier-free guidance) as one grid."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    kind = {
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "dpm": DPMSolverMultistepScheduler,
    }
    sched = kind[cfg.sampler].from_config(make_noise_scheduler(cfg).config)
    sched.set_timesteps(cfg.sample_steps or get_preset(cfg.preset).sample_steps)
    factor = vae_scale_factor(vae)
    scale = float(vae.config.scaling_factor)  # type: ignore[union-attr, arg-type]
    shift = vae_shift_factor(vae)
    n = len(prompts)
    cond = text_encoder.encode(prompts, device).float()
    uncond = text_encoder.encode([""] * n, device).float()
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 12345)
    channels = int(unet.config.in_channels)  # type: ignore[union-attr, arg-type]
    x = torch.randn((n, channels, height // factor, width // factor), generator=gen).to(device)
    x = x * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([x, x]), t)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = unet(inp, t.to(device), encoder_hidden_states=torch.cat([uncond, cond])).sample
        u, c = out.float().chunk(2)
        x = sched.step(u + cfg.guidance_scale * (c - u), t, x).prev_sample
    vae_dtype = next(vae.parameters()).dtype
    images = vae.decode((x / scale + shift).to(vae_dtype)).sample.float()  # type: ignore[operator]
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    grid = torch.zeros((3, rows * height, cols * width), dtype=torch.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[:, r * height : (r + 1) * height, c * width : (c + 1) * width] = im
    return grid.permute(1, 2, 0).numpy()


def save_png(array: np.ndarray, path: Path) -> Path:
    from PIL import Image

    from ccurate.shardio import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path


# ---- what the data is -------------------------------------------------------------------

RELEASE_SUMS = "SHA256SUMS"  # a release's `sha256sum -c` list (ccurate.shards.release)


def _read_sums(path: Path) -> dict[str, str]:
    table = {}
    for line in path.read_text().splitlines():
        digest, _, rel = line.partition("  ")
        if rel:
            table[rel] = digest
    return table


def shard_sources(
    shards: Sequence[str], with_mtime: bool = False
) -> tuple[list[str], list[str], list[str]]:
    """What identifies each shard's content without reading it; the releases and splits
    the shards are of.

    A release shard is identified by the sha256 its release records in `SHA256SUMS` (a
    release is never changed once published, and a rebuild with the same bytes gives the
    same digest, whatever its name); another local file by its size and `edge_digest` (and
    mtime when asked: precompute's reuse check, tied to one location anyway; not the resume
    check, which must accept the same shards copied elsewhere); a URL by nothing ("")."""
    tables: dict[Path, dict[str, str] | None] = {}
    sources: list[str] = []
    releases: set[str] = set()
    splits: set[str] = set()
    for shard in shards:
        path = Path(shard)
        if not path.is_file():
            sources.append("")
            continue
        found = ""
        for root in list(path.absolute().parents)[:4]:
            if root not in tables:
                sums = root / RELEASE_SUMS
                tables[root] = _read_sums(sums) if sums.is_file() else None
            table = tables[root]
            if table is not None:
                found = table.get(path.absolute().relative_to(root).as_posix(), "")
                if found:
                    releases.add(root.name)
                    splits.add(path.absolute().relative_to(root).parts[0])
                    break
        if found:
            sources.append(f"sha256:{found}")
        else:
            st = path.stat()
            sources.append(
                f"size:{st.st_size}:{edge_digest(path, st.st_size)}"
                + (f":{st.st_mtime_ns}" if with_mtime else "")
            )
    return sources, sorted(releases), sorted(splits)


EDGE_BYTES = 16 << 10


def edge_digest(path: Path, size: int) -> str:
    """sha256 of a loose shard's first and last 16 KiB: a content identity read in two small
    reads at every start, not a hash of the whole shard. Size alone is not one: tar pads to
    10 KiB records, so another shard set with the same sample counts often has the same
    sizes. The head holds the first tar headers, whose names carry the first sample's key,
    and the first members; the tail the last sample's members and headers: a shard rebuilt
    with other samples (a new filter, another source) or other order differs there, while a
    byte-identical copy elsewhere keeps its identity. (Edited in its middle only, with the
    same size, a shard would pass: the release's SHA256SUMS covers that case for releases.)"""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(EDGE_BYTES))
        if size > EDGE_BYTES:
            fh.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            h.update(fh.read(EDGE_BYTES))
    return h.hexdigest()[:16]


def sources_digest(sources: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sources).encode()).hexdigest()[:16]


# ---- the trainer -----------------------------------------------------------------------


class Trainer:
    """State of one rank's run; `train()` is the public entry point."""

    def __init__(
        self, cfg: TrainConfig, data: str | Path | list[str], out_dir: Path, ctx: DistContext
    ):
        self.cfg = cfg
        self.out = out_dir
        self.ctx = ctx
        self.device = ctx.device
        self.is_main = ctx.rank == 0
        self.cuda = self.device.type == "cuda"
        self.autocast = self.cuda and cfg.mixed_precision == "bf16"
        self.frozen_dtype = torch.bfloat16 if self.autocast else torch.float32
        self.preset = get_preset(cfg.preset)
        self.batch_size = cfg.batch_size or self.preset.batch_size
        self.shards = find_shards(data, cfg.splits)
        self.manifest: dict[str, Any] | None = None
        self.manifest_dir: Path | None = None
        if cfg.latents != "no":
            mpath = find_manifest(data)
            if mpath is not None:
                with open(mpath) as fh:
                    self.manifest = json.load(fh)
                self.manifest_dir = mpath.parent
                if self.manifest.get("format") != LATENT_FORMAT:
                    raise DataError(
                        f"{mpath}: unknown latent format {self.manifest.get('format')!r}"
                    )
            elif cfg.latents == "yes":
                raise DataError(f"latents = 'yes' but no latents.json next to {data}")
        self.latent_mode = self.manifest is not None
        # JPEGs decoded on the training device (pixel mode; "auto": on CUDA)
        self.device_decode = not self.latent_mode and (
            cfg.jpeg_decode == "device" or (cfg.jpeg_decode == "auto" and self.cuda)
        )
        self.device_decode_note = ""
        if self.device_decode and self.cuda:  # "device" on a CPU runs torchvision's CPU decoder
            why = device_decode_error(self.device)
            if why is not None and cfg.jpeg_decode == "device":
                raise DataError(
                    f"jpeg_decode = 'device' but JPEGs do not decode on {self.device}: {why} "
                    "(set jpeg_decode = 'workers')"
                )
            if why is not None:  # "auto": the workers decode, as on a CPU
                self.device_decode = False
                self.device_decode_note = f"JPEGs decoded by the loader workers: {why}"
        self.jpeg_decode = "device" if self.device_decode else "workers"
        if self.latent_mode:
            assert self.manifest is not None
            if cfg.random_flip:
                raise DataError(
                    "random_flip needs pixels: the precomputed latents are of unflipped "
                    "images (set latents = 'no', or random_flip = false)"
                )
            if self.manifest.get("preset") != cfg.preset:
                raise DataError(
                    f"latent shards were made with preset {self.manifest.get('preset')!r}, "
                    f"this run uses {cfg.preset!r}"
                )
            self.resolution = int(self.manifest["resolution"])
            if cfg.resolution and cfg.resolution != self.resolution:
                raise DataError(
                    f"resolution = {cfg.resolution} but the latent shards are of "
                    f"{self.resolution} px images (precompute again at {cfg.resolution}, "
                    "or set resolution = 0 to take the shards' value)"
                )
            need = {"synthetic": {"emb"}, "alt_text": {"alt"}, "mix": {"emb", "alt"}}
            carried = self.manifest.get("captions")
            if carried is not None and not need[cfg.caption_source] <= set(carried):
                raise DataError(
                    f"caption_source = {cfg.caption_source!r} but the latent shards carry "
                    f"embeddings of {self.manifest.get('caption_source')!r} captions only "
                    f"(precompute again with caption_source = {cfg.caption_source!r})"
                )
            made_from = self.manifest.get("splits")
            if made_from is not None and sorted(made_from) != sorted(cfg.splits):
                raise DataError(
                    f"the latent shards were precomputed from the {made_from} split(s), "
                    f"this run selects train.splits = {list(cfg.splits)} (precompute again "
                    "with these splits, or set train.splits to the latents')"
                )
            refs = resolve_refs(cfg)
            for model in ("vae", "text_encoder"):
                # a model set in [train] must be the one the latents were made with: the UNet
                # would otherwise be trained (and sampled) in another latent / text space
                if getattr(cfg, model) and refs[model] != self.manifest.get(model):
                    raise DataError(
                        f"train.{model} = {refs[model]!r} but the latent shards were made with "
                        f"{self.manifest.get(model)!r} (precompute again with this {model}, or "
                        f"set {model} = '' to use the latents' one)"
                    )
            if bool(self.manifest.get("aspect_buckets")) and not cfg.aspect_buckets:
                raise DataError(
                    "the latent shards were precomputed with aspect_buckets = true: their "
                    "latents differ in shape, so this run needs aspect_buckets = true too"
                )
        else:
            self.resolution = cfg.resolution or self.preset.resolution
        # what the data is, by content: a resume on other data (a new release with the same
        # shard names, latents of another release or VAE) must not pass for an exact one
        refs = resolve_refs(cfg)
        if self.manifest is not None:
            # latents made from the same release as a pixel run carry its digest; older
            # manifests without one: the latent shards' own sizes
            digest = self.manifest.get("source_digest")
            self.data_digest = str(digest or sources_digest(shard_sources(self.shards)[0]))
            self.releases = list(self.manifest.get("releases") or [])
            self.models = {
                "vae": self.manifest.get("vae"),
                "text_encoder": self.manifest.get("text_encoder"),
                "text_layer": self.manifest.get("text_layer"),
            }
        else:
            sources, self.releases, _ = shard_sources(self.shards)
            self.data_digest = sources_digest(sources)
            self.models = {
                "vae": refs["vae"],
                "text_encoder": refs["text_encoder"],
                "text_layer": cfg.text_layer,
            }
        self.log_path = out_dir / "train_log.jsonl"
        self._vae: nn.Module | None = None
        self._text: TextEncoder | None = None
        self._keys_fh: Any = None

    # -- models on demand (sampling in latent mode needs them only on rank 0) --
    def vae(self) -> nn.Module:
        if self._vae is None:
            ref = self.manifest["vae"] if self.manifest else None
            self._vae = place(build_vae(self.cfg, ref), self.device, self.frozen_dtype)
        return self._vae

    def text_encoder(self) -> TextEncoder:
        if self._text is None:
            ref = self.manifest["text_encoder"] if self.manifest else None
            cfg = self.cfg
            if self.manifest and self.manifest.get("text_layer"):
                # sample with the layer the UNet was conditioned on, not this run's setting
                cfg = cfg.model_copy(update={"text_layer": self.manifest["text_layer"]})
            self._text = place(build_text_encoder(cfg, ref), self.device, self.frozen_dtype)
        return self._text

    def log(self, entry: dict[str, Any], console: bool = True) -> None:
        if not self.is_main:
            return
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        if console:
            parts = [
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()
            ]
            print("[train] " + " ".join(parts), flush=True)

    def run(self) -> dict[str, Any]:
        cfg, ctx, device = self.cfg, self.ctx, self.device
        self.out.mkdir(parents=True, exist_ok=True)
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

        unet = build_unet(cfg, device).to(device)
        unet.train()
        cross_dim = int(unet.config.cross_attention_dim)
        in_channels = int(unet.config.in_channels)
        if cfg.channels_last:
            unet.to(memory_format=torch.channels_last)
        named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
        params = [p for _, p in named]

        # conditioning inputs
        if self.latent_mode:
            assert self.manifest is not None and self.manifest_dir is not None
            uncond = load_npy((self.manifest_dir / self.manifest["uncond"]).read_bytes(), "uncond")
            uncond_t = torch.from_numpy(uncond).to(device, torch.float32)
            if uncond_t.shape[-1] != cross_dim:
                raise DataError(
                    f"latent shards carry {uncond_t.shape[-1]}-dim text embeddings but the "
                    f"UNet expects {cross_dim} (precompute with the same preset)"
                )
            scale = float(self.manifest["scaling_factor"])
            shift = float(self.manifest.get("shift_factor") or 0.0)
            factor = int(self.manifest["vae_scale_factor"])
            latent_channels = int(self.manifest.get("latent_channels", in_channels))
            tokenizer = None
        else:
            vae, text = self.vae(), self.text_encoder()
            if text.dim != cross_dim:
                raise ValueError(
                    f"text encoder width {text.dim} != UNet cross_attention_dim {cross_dim}"
                )
            uncond_t = text.tokenize([""]).to(device)
            scale = float(vae.config.scaling_factor)  # type: ignore[union-attr, arg-type]
            shift = vae_shift_factor(vae)
            factor = vae_scale_factor(vae)
            latent_channels = int(vae.config.latent_channels)  # type: ignore[union-attr, arg-type]
            tokenizer = text.tokenizer
        if latent_channels != in_channels:  # else a conv shape error at the first step
            raise ValueError(
                f"the VAE makes {latent_channels}-channel latents but the UNet takes "
                f"{in_channels} input channels (use a VAE and UNet of the same family)"
            )

        # data
        spec = StreamSpec(tuple(self.shards), cfg.seed, cfg.shuffle_shards, cfg.shuffle_buffer)
        decoder = Decoder(
            "latent" if self.latent_mode else "image",
            self.resolution,
            self.resolution,
            cfg.caption_source,
            cfg.caption_mix,
            cfg.seed,
            tokenizer,
            random_flip=cfg.random_flip,
            fast_jpeg=cfg.fast_jpeg,
            defer_jpeg=self.device_decode,
        )
        buckets = (
            make_buckets(self.resolution, self.preset.size_multiple, cfg.max_aspect)
            if cfg.aspect_buckets
            else None
        )
        # what fixes the sample order besides the positions: a resume must find the same
        names = shard_names(self.shards)
        self.stream_id: dict[str, Any] = {
            # 2: slots split each data epoch by sample counts and buckets flush leftovers;
            # a checkpoint of the earlier stream (no key: 1) cannot resume its position
            # 3: streamed (URL, `pipe:`) shards, never counted, split by whole shards
            "stream": 2 if countable(self.shards) else 3,
            "seed": cfg.seed,
            "shuffle_shards": cfg.shuffle_shards,
            "shuffle_buffer": cfg.shuffle_buffer,
            "buckets": [list(b) for b in buckets] if buckets else None,
            "shards": len(names),
            "shards_digest": hashlib.sha256("\n".join(names).encode()).hexdigest()[:16],
            "data_digest": self.data_digest,
            "mode": "latents" if self.latent_mode else "pixels",
            # where JPEGs decode: a batch with no decodable image is skipped by the worker or
            # after its worker's round-robin turn, so the two orders differ once one is skipped
            "jpeg_decode": None if self.latent_mode else self.jpeg_decode,
            **self.models,
        }
        # the loader's cached counts (a broken shard without an index counts to its break);
        # streamed shards are counted (read whole) only when epoch_samples is not set
        total = cfg.epoch_samples or sum(n for n, _ in shard_counts(self.shards))
        per_step = self.batch_size * cfg.grad_accum * ctx.world
        epoch_batches = max(1, total // (self.batch_size * ctx.world))

        # optimisation
        fused = self.cuda and cfg.fused_adam
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            fused=fused or None,
            foreach=None if fused else True,
        )
        ema = EMA(named, cfg.ema_decay) if cfg.ema else None

        # resume
        start_step = 0
        loader_state = None
        ckpt_path = find_checkpoint(self.out, cfg.resume)
        if ckpt_path is None and cfg.resume:
            self.log({"event": "resume", "checkpoint": None, "note": "none found: fresh start"})
        if ckpt_path is not None:
            ck = load_checkpoint(ckpt_path)
            data_state = ck.state.get("data", {})
            if int(data_state.get("world_size", ctx.world)) != ctx.world:
                raise CheckpointError(
                    f"{ckpt_path} was written by {data_state.get('world_size')} ranks, this run "
                    f"has "
                    f"{ctx.world}: the data position cannot be restored exactly"
                )
            try:
                unet.load_state_dict(ck.unet)
                optimizer.load_state_dict(ck.optimizer)
                match_param_layout(optimizer)  # channels-last weights: fused AdamW needs it
            except (RuntimeError, ValueError) as exc:  # torch's size / key mismatch report
                was = ck.state.get("models", {}).get("unet")
                lines = str(exc).strip().splitlines() or [type(exc).__name__]
                raise CheckpointError(
                    f"{ckpt_path} does not fit this run's UNet (checkpoint of unet={was!r}, "
                    f"preset={ck.state.get('config', {}).get('preset')!r}; this run: "
                    f"unet={resolve_refs(cfg)['unet']!r}, preset={cfg.preset!r}): "
                    f"{lines[min(1, len(lines) - 1)].strip()}"
                ) from exc
            if ema is not None:
                if ck.ema is not None:
                    ema.load_state_dict(ck.ema)
                else:  # EMA turned on at resume: average from the resumed weights, not the init
                    ema = EMA(named, cfg.ema_decay)
            saved = dict(data_state.get("stream") or {"seed": data_state.get("seed", cfg.seed)})
            saved.setdefault("stream", 1)
            changed = [k for k, v in saved.items() if self.stream_id.get(k, v) != v]
            if changed and cfg.resume_data == "exact":
                diff = ", ".join(f"{k}={saved[k]!r} (now {self.stream_id[k]!r})" for k in changed)
                other = ""
                if "data_digest" in changed:
                    was = ", ".join(data_state.get("releases") or []) or "other shards"
                    reads = ", ".join(self.releases) or "other shards"
                    other = f"the checkpoint was written on {was}, this run reads {reads}; "
                raise CheckpointError(
                    f"{ckpt_path}: {other}the data stream was recorded with {diff}; the data "
                    "position cannot be restored exactly: resume with the same data and "
                    "settings, or set train.resume_data = 'restart' to keep the weights, "
                    "optimizer and step and read the current data from its start"
                )
            start_step = ck.step
            ranks = data_state.get("ranks", []) if cfg.resume_data == "exact" else []
            loader_state = ranks[ctx.rank] if ctx.rank < len(ranks) else None
            if loader_state and (
                int(loader_state["num_workers"]) != cfg.num_workers
                or int(loader_state["batch_size"]) != self.batch_size
            ):
                raise CheckpointError(
                    f"{ckpt_path}: data position was recorded with num_workers="
                    f"{loader_state['num_workers']}, batch_size={loader_state['batch_size']}; "
                    "resume with the same values"
                )
            self.log({"event": "resume", "step": start_step, "checkpoint": str(ckpt_path),
                      "data": cfg.resume_data, "changed": changed})  # fmt: skip
        dataset = ShardDataset(
            spec,
            decoder,
            self.batch_size,
            ctx.rank,
            ctx.world,
            cfg.num_workers,
            buckets,
            factor,
        )
        jpeg_device = DeviceJpegDecoder(device) if self.device_decode else None
        loader = TrainLoader(
            dataset,
            epoch_batches,
            pin_memory=cfg.pin_memory and self.cuda,
            prefetch_factor=cfg.prefetch_factor,
            state=loader_state,
            # each batch is moved to the device (or stepped on, on CPU) and its backward done
            # before the next is asked for: no copy out of the workers' ring buffers
            copy_out=False,
            finish=jpeg_device,
        )
        if self.device_decode_note:
            self.log({"event": "jpeg_decode", "note": self.device_decode_note})

        # the model to step
        sched = make_noise_scheduler(cfg)
        alphas = sched.alphas_cumprod.to(device)
        loss_mod: nn.Module = DiffusionLoss(unet, alphas, cfg, self.autocast)
        ddp: nn.Module = loss_mod
        if ctx.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ddp = DistributedDataParallel(
                loss_mod,
                device_ids=[device.index] if self.cuda else None,
                gradient_as_bucket_view=True,
            )
        model = ddp
        if cfg.compile:
            import torch._inductor.config as inductor_config

            inductor_config.conv_1x1_as_mm = True
            model = torch.compile(ddp, mode=cfg.compile_mode, dynamic=False)  # type: ignore[assignment]
        cudagraphs = cfg.compile and cfg.compile_mode in ("reduce-overhead", "max-autotune")

        gen = torch.Generator(device=device)
        prefetch = Prefetcher(loader, device, cfg.gpu_prefetch)
        keys_fh = self._open_keys_log(start_step) if cfg.log_keys else None
        self._keys_fh = keys_fh
        skip = cfg.timing_skip_steps
        if skip < 0:
            skip = min(max(3, (cfg.steps - start_step) // 10), (cfg.steps - start_step) // 2)
        timed_from = start_step + skip

        loss_sum = torch.zeros((), device=device)
        loss_n = 0
        last_loss = float("nan")
        grad_norm: torch.Tensor | None = None
        bad = 0
        bad_shards = 0
        t_int = time.perf_counter()
        wait_int = 0.0
        imgs_int = 0
        t_timed: float | None = None
        wait_timed = 0.0
        checkpoint_path: Path | None = None
        sample_path: Path | None = None
        step = start_step
        if start_step == timed_from:
            t_timed = time.perf_counter()
        try:
            for step in range(start_step, cfg.steps):
                lr = lr_at(cfg, step)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                for micro in range(cfg.grad_accum):
                    t0 = time.perf_counter()
                    batch = next(prefetch)
                    waited = time.perf_counter() - t0
                    loader.mark(batch)
                    wait_int += waited
                    if t_timed is not None:
                        wait_timed += waited
                    bad += len(batch.get("bad", ()))
                    for error in batch.get("bad_shards", ()):
                        bad_shards += 1
                        self.log({"event": "bad_shard", "step": step, "error": error})
                    if keys_fh is not None:
                        keys_fh.write(
                            json.dumps({"step": step, "micro": micro, "keys": batch["keys"]}) + "\n"
                        )
                    gen.manual_seed(step_seed(cfg.seed, step, micro, ctx.rank))
                    latents, cond = self._inputs(batch, gen, uncond_t, scale, shift)
                    noise = torch.randn(latents.shape, generator=gen, device=device)
                    timesteps = torch.randint(
                        0,
                        cfg.num_train_timesteps,
                        (latents.shape[0],),
                        generator=gen,
                        device=device,
                    )
                    if cfg.channels_last:
                        latents = latents.contiguous(memory_format=torch.channels_last)
                        noise = noise.contiguous(memory_format=torch.channels_last)
                    if cudagraphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    sync_ctx = (
                        ddp.no_sync()  # type: ignore[operator]
                        if ctx.world > 1 and micro < cfg.grad_accum - 1
                        else contextlib.nullcontext()
                    )
                    with sync_ctx:
                        loss = model(latents, cond, noise, timesteps)
                        (loss / cfg.grad_accum).backward()
                    loss_sum += loss.detach()
                    loss_n += 1
                    imgs_int += latents.shape[0]
                if cfg.max_grad_norm > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        params, cfg.max_grad_norm, foreach=True
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(params, step)
                done = step + 1
                if done == timed_from:
                    if self.cuda:
                        torch.cuda.synchronize(device)
                    t_timed = time.perf_counter()
                    wait_timed = 0.0
                if done % cfg.log_every == 0 or done == cfg.steps:
                    last_loss = self._reduce_mean(loss_sum / max(loss_n, 1))
                    if not math.isfinite(last_loss):
                        raise FloatingPointError(f"loss is {last_loss} at step {done}")
                    now = time.perf_counter()
                    span = max(now - t_int, 1e-9)
                    self.log(
                        {
                            "step": done,
                            "loss": last_loss,
                            "lr": lr,
                            "epoch": loader.epoch_index,
                            "images_per_s": imgs_int * ctx.world / span,
                            "data_wait": wait_int / span,
                            "grad_norm": float(grad_norm) if grad_norm is not None else None,
                            "bad_samples": bad,
                            "bad_shards": bad_shards,
                            **{k: v for k, v in loader.stats.items() if k != "bad_samples"},
                        }
                    )
                    loss_sum.zero_()
                    loss_n, imgs_int, wait_int, t_int = 0, 0, 0.0, time.perf_counter()
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != cfg.steps:
                    checkpoint_path = self._checkpoint(
                        done, unet, optimizer, ema, loader, last_loss
                    )
                if cfg.sample_every and done % cfg.sample_every == 0 and done != cfg.steps:
                    sample_path = self._sample(done, unet, ema)
            end_step = max(step + 1, start_step) if cfg.steps > start_step else start_step
            if self.cuda:
                torch.cuda.synchronize(device)
            t_end = time.perf_counter()
            timed_steps = end_step - timed_from
            ips = wait_frac = None
            if t_timed is not None and timed_steps > 0:
                span = max(t_end - t_timed, 1e-9)
                ips = timed_steps * per_step / span
                wait_frac = wait_timed / span
            if cfg.checkpoint_at_end and end_step > start_step:
                checkpoint_path = self._checkpoint(
                    end_step, unet, optimizer, ema, loader, last_loss
                )
            if cfg.sample_prompts and end_step > start_step:
                sample_path = self._sample(end_step, unet, ema)
        finally:
            if keys_fh is not None:
                keys_fh.close()
            loader.close()
        summary = {
            "steps": end_step,
            "final_loss": last_loss,
            "images_per_s": ips,
            "data_wait": wait_frac,
            "checkpoint": str(checkpoint_path) if checkpoint_path else None,
            "sample_image": str(sample_path) if sample_path else None,
            "log": str(self.log_path),
            "world_size": ctx.world,
            "batch_size": self.batch_size,
            "resolution": self.resolution,
            "latents": self.latent_mode,
            # where the JPEGs were decoded (pixel mode): the loader workers or this device
            "jpeg_decode": None if self.latent_mode else self.jpeg_decode,
            # JPEGs the device decoded, and those it refused (decoded the workers' way in this
            # process, one image at a time: a slow path worth knowing about)
            "jpeg_device_decoded": jpeg_device.decoded if jpeg_device else 0,
            "jpeg_cpu_fallback": jpeg_device.cpu_fallback if jpeg_device else 0,
            "params": count_params(unet),
            "epoch_batches": epoch_batches,
            "bad_samples": bad,
            "bad_shards": bad_shards,
            # empty captions, skipped all-bad batches, bucket padding (stats outlive close())
            **{k: v for k, v in loader.stats.items() if k != "bad_samples"},
        }
        self.log({"event": "done", **summary}, console=False)
        return summary

    def _inputs(
        self,
        batch: dict[str, Any],
        gen: torch.Generator,
        uncond: torch.Tensor,
        scale: float,
        shift: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (sampled from the VAE posterior, `(z - shift) * scale` as diffusers'
        pipelines undo it) and the text conditioning, dropout applied."""
        cfg, device = self.cfg, self.device
        with torch.no_grad():
            if self.latent_mode:
                moments = batch["latents"].float()
                n = moments.shape[0]
                drop = dropout_mask(n, cfg.caption_dropout, gen, device)
                mean, std = moments.chunk(2, dim=1)
                latents = (
                    mean + std * torch.randn(mean.shape, generator=gen, device=device) - shift
                ) * scale
                cond = torch.where(drop.view(-1, 1, 1), uncond.unsqueeze(0), batch["emb"].float())
                return latents, cond
            pixels = batch["pixels"]
            n = pixels.shape[0]
            drop = dropout_mask(n, cfg.caption_dropout, gen, device)
            x = pixels.to(self.frozen_dtype) / 127.5 - 1.0
            vae = self.vae()
            dist_ = vae.encode(x).latent_dist  # type: ignore[operator]
            latents = (dist_.sample(generator=gen).float() - shift) * scale
            ids = torch.where(drop.view(-1, 1), uncond, batch["input_ids"])
            cond = self.text_encoder()(ids).float()
            return latents, cond

    def _open_keys_log(self, start_step: int) -> Any:
        """The per-step keys log, holding only the steps before `start_step` (a killed run may
        have written steps past its checkpoint, which the resumed run writes again), line
        buffered so that a kill loses at most the line being written."""
        from ccurate.shardio import atomic_path

        path = self.out / f"keys-rank{self.ctx.rank}.jsonl"
        if path.exists():
            kept = []
            for line in path.read_text().splitlines(keepends=True):
                try:
                    if int(json.loads(line)["step"]) < start_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue  # the line a kill cut short
            with atomic_path(path) as tmp:
                tmp.write_text("".join(kept))
        return open(path, "a", buffering=1)  # closed at the end of run()

    def _reduce_mean(self, value: torch.Tensor) -> float:
        if self.ctx.world > 1:
            value = value.detach().clone()
            dist.all_reduce(value)
            value /= self.ctx.world
        return float(value)

    def _checkpoint(
        self,
        step: int,
        unet: Any,
        optimizer: torch.optim.Optimizer,
        ema: EMA | None,
        loader: TrainLoader,
        loss: float,
    ) -> Path:
        if self._keys_fh is not None:  # the keys of the steps this checkpoint covers are on disk
            self._keys_fh.flush()
            os.fsync(self._keys_fh.fileno())
        states: list[Any] = [loader.state()]
        if self.ctx.world > 1:
            states = [None] * self.ctx.world
            dist.all_gather_object(states, loader.state())
        path = self.out / "checkpoints" / f"step-{step:08d}"
        if self.is_main:
            path = save_checkpoint(
                self.out / "checkpoints",
                step,
                unet.state_dict(),
                dict(unet.config),
                optimizer.state_dict(),
                {
                    "loss": loss,
                    "data": {
                        "world_size": self.ctx.world,
                        "seed": self.cfg.seed,
                        "stream": self.stream_id,
                        "releases": self.releases,
                        "ranks": states,
                    },
                    "config": self.cfg.model_dump(),
                    "models": resolve_refs(self.cfg),
                },
                ema.state_dict() if ema is not None else None,
                keep=self.cfg.keep_checkpoints,
            )
            self.log({"event": "checkpoint", "step": step, "path": str(path)})
        if self.ctx.world > 1:
            dist.barrier()
        return path

    def _sample(self, step: int, unet: nn.Module, ema: EMA | None) -> Path | None:
        if not self.is_main:
            return None
        model = unet
        if ema is not None:
            model = copy.deepcopy(unet)
            with torch.no_grad():
                for (_, p), e in zip(
                    [(n, p) for n, p in model.named_parameters() if p.requires_grad],
                    ema.shadow,
                    strict=True,
                ):
                    p.copy_(e)
        model.eval()
        grid = sample_grid(
            model,
            self.vae(),
            self.text_encoder(),
            list(self.cfg.sample_prompts),
            self.cfg,
            self.resolution,
            self.resolution,
            self.device,
            self.autocast,
        )
        if model is unet:
            unet.train()
        else:
            del model
        path = save_png(grid, self.out / "samples" / f"step-{step:08d}.png")
        self.log({"event": "sample", "step": step, "path": str(path)})
        return path


def train(cfg: TrainConfig, data: str | Path | list[str], out_dir: str | Path) -> dict[str, Any]:
    """Train (or resume) a latent diffusion UNet on release shards; returns a summary.

    A release directory gives the shards of `cfg.splits` only (default: commercial). An
    exact resume needs the same data by content (the release's recorded shard digests, or
    the latents' source digest), the same pixel or latent mode and the same models.

    Summary keys: steps, final_loss, images_per_s (all ranks, after warm-up steps),
    data_wait (fraction of wall time the loop waited for batches), checkpoint,
    sample_image, log, plus sizes. Run under `torchrun` for DDP.
    """
    ctx = init_distributed(cfg)
    try:
        return Trainer(cfg, data, Path(out_dir), ctx).run()
    finally:
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()
