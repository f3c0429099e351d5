"""Build or load the three models of a latent diffusion run: UNet, VAE, text encoder.

Each comes from a hub id or local directory (diffusers layout, subfolders `unet`,
`vae`, `text_encoder`, `tokenizer`), from an OpenCLIP checkpoint
(`open_clip:ViT-H-14:<tag or file>`), or from the preset's config with seeded
random weights (`scratch`). Weights are never fetched behind the user's back:
`HF_HUB_OFFLINE` is honoured, and a missing weight raises `WeightsNotFoundError`
naming the path that was looked at and the command that fetches it.
Only safetensors or `torch.load(weights_only=True)` ever read a weight file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ccurate.train.config import TrainConfig
from ccurate.train.presets import Preset, get_preset
from ccurate.weights import (
    WeightsNotFoundError,
    fetch_command,
    hub_cache,
    hub_offline,
    load_state_dict,
)

# fixed init seeds: a "scratch" VAE / text encoder must be the same model in the
# precompute run and in the training run that decodes its latents
VAE_SEED = 0x5EED01
TEXT_SEED = 0x5EED02


def resolve_refs(cfg: TrainConfig) -> dict[str, str]:
    """The effective model references: config overrides, else the preset's defaults."""
    p = get_preset(cfg.preset)
    return {
        "unet": cfg.unet or p.unet,
        "vae": cfg.vae or p.vae,
        "text_encoder": cfg.text_encoder or p.text_encoder,
    }


def _fetch_hint(ref: str, subfolder: str | None) -> str:
    cmd = fetch_command(ref, include=f"{subfolder}/*" if subfolder else None)
    return (
        f"fetch it on a machine with network access with `{cmd}` "
        f"(then copy the Hugging Face cache or pass the local directory), "
        f"or set the reference to 'scratch' to start from random weights"
    )


def _pretrained(
    cls: Any, ref: str, subfolder: str, what: str, marker: str = "config.json", **kwargs: Any
) -> Any:
    """`cls.from_pretrained` for a local dir (with or without the subfolder) or hub id.

    `marker` is the file that says the folder holds one: a tokenizer folder has
    `tokenizer_config.json`, no `config.json`."""
    path = Path(ref).expanduser()
    sub: str | None = subfolder
    if path.exists():
        if (path / subfolder / marker).exists():
            sub = subfolder
        elif (path / marker).exists():
            sub = None
        else:
            raise WeightsNotFoundError(
                f"{what}: no model at {path} (looked for {path / subfolder / marker} "
                f"and {path / marker}); {_fetch_hint(ref, subfolder)}"
            )
        ref = str(path)
    try:
        if sub:
            return cls.from_pretrained(ref, subfolder=sub, local_files_only=hub_offline(), **kwargs)
        return cls.from_pretrained(ref, local_files_only=hub_offline(), **kwargs)
    except (OSError, ValueError) as exc:
        where = f"{ref}/{sub}" if sub else ref
        raise WeightsNotFoundError(
            f"{what}: weights for {where!r} are not available locally "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}, "
            f"cache {hub_cache()}); "
            f"{_fetch_hint(ref, sub)}. Cause: {exc}"
        ) from exc


def _seeded(seed: int, build: Any, device: torch.device | None = None) -> Any:
    """Build under a fixed seed (and on `device`: an 865M UNet inits in ms on a GPU, not s)."""
    cuda = device is not None and device.type == "cuda"
    with torch.random.fork_rng(devices=[device.index or 0] if cuda else []):  # type: ignore[union-attr]
        torch.manual_seed(seed)
        if device is None:
            return build()
        with device:
            return build()


def build_unet(cfg: TrainConfig, device: torch.device | None = None) -> Any:
    """The UNet to train: pretrained, or the preset's architecture with seeded random weights."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    ref = resolve_refs(cfg)["unet"]
    preset = get_preset(cfg.preset)
    if ref == "scratch":
        unet = _seeded(cfg.seed, lambda: UNet2DConditionModel(**preset.unet_config), device)
    else:
        unet = _pretrained(UNet2DConditionModel, ref, "unet", "UNet")
    unet.set_attn_processor(AttnProcessor2_0())  # SDPA (flash / memory-efficient kernels)
    return unet


def build_vae(cfg: TrainConfig, ref: str | None = None) -> Any:
    from diffusers import AutoencoderKL

    ref = ref or resolve_refs(cfg)["vae"]
    preset = get_preset(cfg.preset)
    if ref == "scratch":
        vae = _seeded(VAE_SEED, lambda: AutoencoderKL(**preset.vae_config))
    else:
        vae = _pretrained(AutoencoderKL, ref, "vae", "VAE")
    vae.requires_grad_(False).eval()
    return vae


def vae_scale_factor(vae: Any) -> int:
    return int(2 ** (len(vae.config.block_out_channels) - 1))


def vae_shift_factor(vae: Any) -> float:
    """The VAE's latent shift (SD3 / Flux VAEs: `(z - shift) * scale`); 0 when it has none."""
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


# ---- tokenizers -------------------------------------------------------------


class Tokenizer(Protocol):
    max_length: int

    def __call__(self, texts: Sequence[str]) -> torch.Tensor: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: a tokenizer that needs no vocabulary file or download.

    Ids: 0 pad, 1 begin, 2 end, 3 + byte. Good enough for the tiny preset, where
    the point is exercising the conditioning path, not language understanding.
    """

    pad_id, bos_id, eos_id, offset = 0, 1, 2, 3
    vocab_size = 256 + 3

    def __init__(self, max_length: int = 32) -> None:
        self.max_length = max_length

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            body = [b + self.offset for b in text.encode("utf-8")][: self.max_length - 2]
            ids = [self.bos_id, *body, self.eos_id]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class HFTokenizer:
    """A transformers CLIP tokenizer padded to its model length (picklable for workers).

    `limit` is the text model's position count: a tokenizer saved without
    `model_max_length` reports 1e30, and padding to that never ends well.
    """

    def __init__(self, tok: Any, limit: int | None = None) -> None:
        self.tok = tok
        length = int(tok.model_max_length)
        self.max_length = min(length, limit) if limit else length

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tok(
            list(texts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids: torch.Tensor = enc.input_ids
        return ids


class OpenCLIPTokenizer:
    """OpenCLIP's BPE tokenizer (its vocabulary ships with the package: no download)."""

    def __init__(self, arch: str) -> None:
        import open_clip

        self.tok = open_clip.get_tokenizer(arch)
        self.max_length = int(getattr(self.tok, "context_length", 77))

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        ids: torch.Tensor = self.tok(list(texts))
        return ids


# ---- text encoders ----------------------------------------------------------


class TextEncoder(nn.Module):
    """Frozen text encoder: token ids -> per-token hidden states that condition the UNet."""

    def __init__(self, tokenizer: Tokenizer, dim: int, ref: str) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.dim = dim
        self.ref = ref

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
        return self(self.tokenize(texts).to(device))


class HFCLIPTextEncoder(TextEncoder):
    """transformers `CLIPTextModel`; `penultimate` takes the second-to-last layer + final LN."""

    def __init__(self, model: Any, tokenizer: Tokenizer, layer: str, ref: str) -> None:
        super().__init__(tokenizer, int(model.config.hidden_size), ref)
        self.model: Any = model
        self.layer = layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.layer == "penultimate":
            out = self.model(ids, output_hidden_states=True)
            hidden = out.hidden_states[-2]
            # transformers 5 flattened CLIPTextModel (no `.text_model`); 4.x nests it
            inner = getattr(self.model, "text_model", self.model)
            normed: torch.Tensor = inner.final_layer_norm(hidden)
            return normed
        last: torch.Tensor = self.model(ids).last_hidden_state
        return last


class OpenCLIPTextEncoder(TextEncoder):
    """OpenCLIP text tower run the way SD2 runs it: stop before the last block, then `ln_final`."""

    def __init__(self, tower: Any, tokenizer: Tokenizer, layer: str, ref: str) -> None:
        super().__init__(tokenizer, int(tower.transformer.width), ref)
        self.token_embedding: Any = tower.token_embedding
        self.positional_embedding: Any = tower.positional_embedding
        self.transformer: Any = tower.transformer
        self.ln_final: Any = tower.ln_final
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self.layer = layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding
        blocks = list(self.transformer.resblocks)
        if self.layer == "penultimate":
            blocks = blocks[:-1]
        batch_first = getattr(self.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        mask: torch.Tensor | None = self.attn_mask  # type: ignore[assignment]
        for block in blocks:
            x = block(x, attn_mask=mask.to(x.dtype) if mask is not None else None)
        if not batch_first:
            x = x.transpose(0, 1)
        out: torch.Tensor = self.ln_final(x)
        return out


def _open_clip_encoder(arch: str, pretrained: str, layer: str, ref: str) -> TextEncoder:
    import open_clip
    from open_clip.model import _build_text_tower

    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ValueError(f"unknown OpenCLIP architecture {arch!r}")
    tower = _seeded(
        TEXT_SEED, lambda: _build_text_tower(model_cfg["embed_dim"], model_cfg["text_cfg"])
    )
    if pretrained and pretrained != "scratch":
        path = Path(pretrained).expanduser()
        if not path.exists():
            from open_clip.pretrained import download_pretrained, get_pretrained_cfg

            pcfg = get_pretrained_cfg(arch, pretrained)
            if not pcfg:
                raise WeightsNotFoundError(
                    f"text encoder: {pretrained!r} is neither a file nor a known OpenCLIP tag "
                    f"for {arch}; pass the checkpoint file path"
                )
            hub = pcfg.get("hf_hub", "")
            try:
                path = Path(download_pretrained(pcfg))
            except Exception as exc:  # offline hub, missing cache entry
                raise WeightsNotFoundError(
                    f"text encoder: OpenCLIP weights {arch}/{pretrained} are not in the local "
                    f"cache (hub {hub!r}, "
                    f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}); "
                    f"{_fetch_hint(hub.rstrip('/') or pretrained, None)}, "
                    f"or pass open_clip:{arch}:/path/to/open_clip_model.safetensors. Cause: {exc}"
                ) from exc
        state = load_state_dict(path)
        text_state = {k: v for k, v in state.items() if not k.startswith("visual.")}
        missing, _unexpected = tower.load_state_dict(text_state, strict=False)
        if [k for k in missing if k != "text_projection"]:
            raise ValueError(f"{path}: not an OpenCLIP {arch} checkpoint (missing {missing[:5]})")
    tower.requires_grad_(False).eval()
    return OpenCLIPTextEncoder(tower, OpenCLIPTokenizer(arch), layer, ref)


def build_text_encoder(cfg: TrainConfig, ref: str | None = None) -> TextEncoder:
    """The frozen text encoder and its tokenizer, per the config's reference."""
    from transformers import CLIPTextModel, CLIPTokenizer

    preset = get_preset(cfg.preset)
    ref = ref or resolve_refs(cfg)["text_encoder"]
    layer = cfg.text_layer if cfg.text_layer != "default" else None
    enc: TextEncoder
    if ref.startswith("open_clip:"):
        _, arch, *rest = ref.split(":", 2)
        enc = _open_clip_encoder(arch, rest[0] if rest else "", layer or "penultimate", ref)
    elif ref == "scratch":
        enc = _scratch_text_encoder(preset, layer, ref)
    else:
        model = _pretrained(CLIPTextModel, ref, "text_encoder", "text encoder")
        tok = _pretrained(CLIPTokenizer, ref, "tokenizer", "tokenizer", "tokenizer_config.json")
        limit = int(model.config.max_position_embeddings)
        enc = HFCLIPTextEncoder(model, HFTokenizer(tok, limit), layer or "last", ref)
    enc.requires_grad_(False).eval()
    return enc


def _scratch_text_encoder(preset: Preset, layer: str | None, ref: str) -> TextEncoder:
    from transformers import CLIPTextConfig, CLIPTextModel

    if preset.text_kind.startswith("open_clip:"):
        arch = preset.text_kind.split(":", 1)[1]
        return _open_clip_encoder(arch, "", layer or preset.text_layer, ref)
    tok = ByteTokenizer(int(preset.text_config["max_position_embeddings"]))
    config = CLIPTextConfig(
        vocab_size=ByteTokenizer.vocab_size,
        bos_token_id=ByteTokenizer.bos_id,
        eos_token_id=ByteTokenizer.eos_id,
        pad_token_id=ByteTokenizer.pad_id,
        **preset.text_config,
    )
    model = _seeded(TEXT_SEED, lambda: CLIPTextModel(config))
    return HFCLIPTextEncoder(model, tok, layer or preset.text_layer, ref)


def place(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move a frozen model; cast only when the dtype changes (diffusers warns on no-op casts)."""
    if dtype == torch.float32:
        return module.to(device)
    return module.to(device=device, dtype=dtype)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
