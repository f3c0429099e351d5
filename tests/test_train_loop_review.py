"""Review of the training loop, models and precompute: VAE shift, latents manifest, reruns."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from ccurate.train import loop as loopmod
from ccurate.train.config import TrainConfig
from ccurate.train.decode import load_npy
from ccurate.train.loop import Trainer, init_distributed, sample_grid, train
from ccurate.train.models import build_text_encoder, build_unet
from ccurate.train.precompute import precompute
from ccurate.train.presets import TINY_VAE
from ccurate.train.stream import DataError, find_shards
from ccurate.train.synthetic import write_image_release
from tests.test_train_loop import _offline_one_thread  # noqa: F401 - autouse: offline, 1 thread

FAST: dict[str, Any] = {
    "resolution": 16,
    "num_workers": 0,
    "shuffle_buffer": 4,
    "log_every": 1,
    "sample_prompts": [],
    "batch_size": 2,
    "device": "cpu",
}
SHIFT = 100.0


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("release")
    write_image_release(root, [3, 3], resolution=16)
    return root


@pytest.fixture(scope="module")
def shifted_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local diffusers-layout VAE with a latent shift (as SD3 / Flux VAEs have)."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKL(**dict(TINY_VAE, shift_factor=SHIFT)).save_pretrained(root / "vae")
    return root


def _capture_latents(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    forward = loopmod.DiffusionLoss.forward

    def spy(self: Any, latents: torch.Tensor, *args: Any) -> torch.Tensor:
        seen.append(latents.detach().clone())
        return forward(self, latents, *args)

    monkeypatch.setattr(loopmod.DiffusionLoss, "forward", spy)
    return seen


def _latent_shape(shard: str) -> tuple[int, ...]:
    with tarfile.open(shard) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(".latent.npy"))
        data = tf.extractfile(member)
        assert data is not None
        return tuple(load_npy(data.read()).shape)


def test_pixel_mode_subtracts_the_vae_shift_factor(
    release: Path, shifted_vae: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _capture_latents(monkeypatch)
    cfg = TrainConfig(**FAST, vae=str(shifted_vae), steps=1, checkpoint_at_end=False, latents="no")
    train(cfg, release, tmp_path / "run")
    assert seen and abs(float(seen[0].mean()) + SHIFT) < 10  # (z - shift) * scale


def test_precompute_records_the_shift_and_training_applies_it(
    release: Path, shifted_vae: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lat = tmp_path / "lat"
    cfg = TrainConfig(**FAST, vae=str(shifted_vae), steps=1, checkpoint_at_end=False)
    precompute(cfg, release, lat)
    assert json.loads((lat / "latents.json").read_text())["shift_factor"] == SHIFT
    seen = _capture_latents(monkeypatch)
    train(cfg, lat, tmp_path / "run")
    assert seen and abs(float(seen[0].mean()) + SHIFT) < 10


def test_sampling_adds_the_shift_back_before_decoding(shifted_vae: Path) -> None:
    from diffusers import AutoencoderKL

    cfg = TrainConfig(**dict(FAST, sample_steps=1))
    vae = AutoencoderKL.from_pretrained(shifted_vae / "vae")
    decoded: list[float] = []
    decode = vae.decode

    def spy(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        decoded.append(float(z.mean()))
        return decode(z, *args, **kwargs)

    vae.decode = spy  # type: ignore[method-assign]
    unet = build_unet(cfg).eval()
    grid = sample_grid(
        unet, vae, build_text_encoder(cfg), ["a"], cfg, 16, 16, torch.device("cpu"), False
    )
    assert grid.shape == (16, 16, 3)
    assert decoded and abs(decoded[0] - SHIFT) < 10  # z / scale + shift


def test_sampling_from_latents_uses_the_text_layer_they_were_made_with(
    release: Path, tmp_path: Path
) -> None:
    lat = tmp_path / "lat"
    precompute(TrainConfig(**FAST, text_layer="penultimate"), release, lat)
    cfg = TrainConfig(**FAST)  # default layer: "last" for the tiny preset
    trainer = Trainer(cfg, lat, tmp_path / "run", init_distributed(cfg))
    assert trainer.text_encoder().layer == "penultimate"  # type: ignore[attr-defined]


def test_precompute_rerun_with_another_resolution_redoes_the_shards(
    release: Path, tmp_path: Path
) -> None:
    lat = tmp_path / "lat"
    precompute(TrainConfig(**FAST), release, lat)
    assert _latent_shape(find_shards(lat)[0]) == (8, 8, 8)
    precompute(TrainConfig(**dict(FAST, resolution=24)), release, lat)
    assert json.loads((lat / "latents.json").read_text())["resolution"] == 24
    assert {_latent_shape(s) for s in find_shards(lat)} == {(8, 12, 12)}


def test_precompute_rerun_needing_alt_text_redoes_synthetic_only_shards(
    release: Path, tmp_path: Path
) -> None:
    lat = tmp_path / "lat"
    precompute(TrainConfig(**FAST), release, lat)
    precompute(TrainConfig(**FAST, caption_source="alt_text"), release, lat)
    with tarfile.open(find_shards(lat)[0]) as tf:
        assert any(n.endswith(".alt.npy") for n in tf.getnames())


def test_training_from_latents_refuses_another_resolution(release: Path, tmp_path: Path) -> None:
    lat = tmp_path / "lat"
    precompute(TrainConfig(**FAST), release, lat)
    with pytest.raises(DataError, match="latent shards are of 16 px"):
        train(TrainConfig(**dict(FAST, resolution=32)), lat, tmp_path / "run")


def test_hf_clip_penultimate_layer_is_the_second_last_hidden_state_normed() -> None:
    enc = build_text_encoder(TrainConfig(**FAST, text_layer="penultimate"))
    ids = enc.tokenize(["a red square"])
    out = enc(ids)
    model = enc.model  # type: ignore[attr-defined]
    hidden = model(ids, output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(out, model.final_layer_norm(hidden), atol=1e-6)
    assert not torch.allclose(out, model(ids).last_hidden_state, atol=1e-4)


def test_training_on_alt_text_refuses_latents_of_synthetic_captions_only(
    release: Path, tmp_path: Path
) -> None:
    lat = tmp_path / "lat"
    precompute(TrainConfig(**FAST), release, lat)  # caption_source = synthetic
    assert json.loads((lat / "latents.json").read_text())["captions"] == ["emb"]
    with pytest.raises(DataError, match="carry embeddings of 'synthetic' captions only"):
        train(TrainConfig(**FAST, caption_source="alt_text"), lat, tmp_path / "run")


def test_a_local_clip_tokenizer_without_model_max_length_pads_to_the_model_length(
    tmp_path: Path,
) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(
        vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt")
    )
    assert tok.model_max_length > 10**9  # not in its config: transformers' "unbounded"
    model_dir = tmp_path / "clip"
    tok.save_pretrained(model_dir / "tokenizer")
    config = CLIPTextConfig(
        vocab_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=16,
    )
    CLIPTextModel(config).save_pretrained(model_dir / "text_encoder")
    enc = build_text_encoder(TrainConfig(**FAST), str(model_dir))
    assert enc.max_length == 16
    assert enc.encode(["a b"]).shape == (1, 16, 32)


def test_a_vae_whose_latents_do_not_fit_the_unet_is_named_before_training(
    release: Path, tmp_path: Path
) -> None:
    from diffusers import AutoencoderKL

    AutoencoderKL(**dict(TINY_VAE, latent_channels=8)).save_pretrained(tmp_path / "vae8")
    cfg = TrainConfig(**FAST, vae=str(tmp_path / "vae8"), steps=1, latents="no")
    with pytest.raises(ValueError, match="8-channel latents but the UNet takes 4"):
        train(cfg, release, tmp_path / "run")
