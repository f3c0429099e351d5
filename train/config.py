"""Settings of the latent diffusion trainer ([train] in the pipeline TOML).

Zero means "the preset's value" for the size settings (`resolution`, `batch_size`),
so one `preset = "sd2-base"` line gives a sensible run and every number can still
be overridden. Model references: `""` is the preset's default, `"scratch"` builds
the preset's architecture with random (seeded) weights, anything else is a hub id
or a local directory (`open_clip:ARCH:PRETRAINED` for an OpenCLIP text tower).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ccurate.configbase import Section

DEFAULT_PROMPTS = [
    "a photograph of a red bicycle leaning against a brick wall",
    "a watercolor painting of a lighthouse at dusk",
    "a close-up photo of a bowl of fresh strawberries",
    "a mountain lake reflecting snowy peaks, morning light",
]


Split = Literal["commercial", "noncommercial"]
DEFAULT_SPLITS: tuple[Split, ...] = ("commercial",)


class TrainConfig(Section):
    """Model preset, data, optimisation and checkpointing."""

    enabled: bool = True
    preset: Literal["tiny", "sd2-base"] = "tiny"
    # models: "" = preset default, "scratch" = random init, else hub id / local path
    unet: str = ""
    vae: str = ""
    text_encoder: str = ""
    # which hidden layer of the text encoder conditions the UNet (SD2: penultimate)
    text_layer: Literal["default", "last", "penultimate"] = "default"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")

    # ---- data ---------------------------------------------------------------
    # which splits of a release to train on. Default: the commercial split only (the
    # CommonCanvas recipe: its commercial model is trained on CC-BY, CC-BY-SA and CC0 /
    # public-domain images); add "noncommercial" only to train a non-commercial model. When
    # the release's noncommercial split already includes the commercial samples
    # (shards.noncommercial_includes_commercial), choose ["noncommercial"] alone: both is
    # refused, as it would train each commercial sample twice. A missing split is an error.
    splits: list[Split] = Field(default_factory=lambda: list(DEFAULT_SPLITS), min_length=1)
    resolution: int = Field(0, ge=0)  # 0 = preset default (pixels)
    aspect_buckets: bool = False
    max_aspect: float = Field(2.0, ge=1.0)
    caption_source: Literal["synthetic", "alt_text", "mix"] = "synthetic"
    caption_mix: float = Field(0.5, ge=0.0, le=1.0)  # P(synthetic caption) under "mix"
    caption_dropout: float = Field(0.1, ge=0.0, le=1.0)  # for classifier-free guidance
    random_flip: bool = False  # flip half the images left-right (pixel mode only)
    # libjpeg-turbo's fast IDCT + upsampling: 11 % faster decode, 45 dB PSNR from accurate
    # (the loader workers' decode; nvJPEG's under jpeg_decode = "device" has no such switch)
    fast_jpeg: bool = True
    # where JPEGs are decoded (pixel mode): "workers" (the loader processes, on the CPU),
    # "device" (the training device: nvJPEG on a GPU, leaving the workers only the tar
    # reading; see ccurate.train.device_decode), "auto" = "device" on CUDA, else "workers"
    # (H200, 2 cores: 17,300 samples/s against the workers' 4,300; bench/shard_read.py)
    jpeg_decode: Literal["auto", "workers", "device"] = "auto"
    shuffle_shards: bool = True
    shuffle_buffer: int = Field(1000, ge=0)
    num_workers: int = Field(2, ge=0)
    prefetch_factor: int = Field(4, ge=1)
    epoch_samples: int = Field(0, ge=0)  # samples per epoch, all ranks; 0 = count the shards
    latents: Literal["auto", "yes", "no"] = "auto"  # read precomputed latent shards

    # ---- objective ----------------------------------------------------------
    steps: int = Field(10, ge=1)
    batch_size: int = Field(0, ge=0)  # per rank and micro-step; 0 = preset default
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    lr_warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    # the ranges torch.optim.AdamW accepts (it would refuse others only when training starts)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_eps: float = Field(1e-8, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 = no clipping
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    noise_scheduler: Literal["ddpm"] = "ddpm"
    num_train_timesteps: int = Field(1000, ge=2)
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    snr_gamma: float = Field(0.0, ge=0)  # min-SNR weighting; 0 = off (5.0 is typical)
    seed: int = 0

    # ---- speed --------------------------------------------------------------
    mixed_precision: Literal["bf16", "no"] = "bf16"
    compile: bool = False
    compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = "default"
    channels_last: bool = False
    fused_adam: bool = True  # used on CUDA only
    gpu_prefetch: bool = True  # copy the next batch on a side stream (CUDA)
    pin_memory: bool = True
    ema: bool = True
    ema_decay: float = Field(0.9999, ge=0.0, le=1.0)

    # ---- outputs ------------------------------------------------------------
    log_every: int = Field(10, ge=1)
    log_keys: bool = False  # write the sample keys of every step (audits, resume tests)
    checkpoint_every: int = Field(0, ge=0)  # 0 = only at the end
    checkpoint_at_end: bool = True
    keep_checkpoints: int = Field(2, ge=1)
    sample_every: int = Field(0, ge=0)  # 0 = only at the end (no prompts: never)
    sample_prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS))
    sample_steps: int = Field(0, ge=0)  # 0 = preset default
    sampler: Literal["ddim", "euler", "dpm"] = "ddim"
    guidance_scale: float = Field(5.0, ge=0)
    resume: str = ""  # "" = fresh run, "latest" = newest checkpoint in out_dir, or a path
    # "exact": continue the data stream where the checkpoint left it (same shards and
    # settings, else an error); "restart": keep weights, optimizer, EMA and step, and read
    # the current shards from their start (continuing training on a new release)
    resume_data: Literal["exact", "restart"] = "exact"
    timing_skip_steps: int = Field(-1, ge=-1)  # steps left out of images/s; -1 = auto

    # ---- precompute ---------------------------------------------------------
    precompute_batch: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits {self.splits} names a split twice")
        if self.resolution and self.resolution % 8:
            raise ValueError(f"resolution {self.resolution} must be a multiple of 8")
        return self
