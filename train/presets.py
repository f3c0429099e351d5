"""Model presets: architecture configs and default weights for each preset.

`tiny` is for CPU tests and the demo (random init, nothing downloaded); `sd2-base`
is Stable Diffusion 2 base (865M-parameter UNet, 512 px, OpenCLIP ViT-H/14 text
tower at its penultimate layer). Architecture configs live here so a run can
train from scratch and a test can build the same models without weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SD2_REPO = "stabilityai/stable-diffusion-2-base"


@dataclass(frozen=True)
class Preset:
    """Everything a preset fixes; `TrainConfig` may override the references and sizes."""

    name: str
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    # text encoder: "byte-clip" (tiny transformers CLIP + byte tokenizer) or open_clip arch
    text_kind: str
    text_config: dict[str, Any]
    text_layer: str  # "last" or "penultimate"
    resolution: int
    batch_size: int
    size_multiple: int  # image sides must be multiples of this (VAE x UNet downsampling)
    unet: str = "scratch"
    vae: str = "scratch"
    text_encoder: str = "scratch"
    sample_steps: int = 25
    extra: dict[str, Any] = field(default_factory=dict)


TINY_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
    "scaling_factor": 1.0,
}

TINY_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 32,
}

# Stable Diffusion 2 base (stabilityai/stable-diffusion-2-base unet/config.json)
SD2_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
}

SD2_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        unet_config=TINY_UNET,
        vae_config=TINY_VAE,
        text_kind="byte-clip",
        text_config=TINY_TEXT,
        text_layer="last",
        resolution=32,
        batch_size=4,
        size_multiple=4,  # VAE /2, UNet /2
        sample_steps=4,
    ),
    "sd2-base": Preset(
        name="sd2-base",
        unet_config=SD2_UNET,
        vae_config=SD2_VAE,
        text_kind="open_clip:ViT-H-14",
        text_config={},
        text_layer="penultimate",
        resolution=512,
        batch_size=16,
        size_multiple=64,  # VAE /8, UNet /8
        unet="scratch",
        vae=SD2_REPO,
        text_encoder="open_clip:ViT-H-14:laion2b_s32b_b79k",
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
