"""The trainer's branches on CPU with the tiny preset: resume checks, EMA at resume, gradient
accumulation, warm-up, mid-run checkpoints and samples, divergence, latent-data checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from ccurate.train.checkpoint import CheckpointError, load_checkpoint
from ccurate.train.config import TrainConfig
from ccurate.train.loop import DiffusionLoss, make_noise_scheduler, snr_weights, train
from ccurate.train.presets import TINY_UNET
from ccurate.train.stream import DataError
from ccurate.train.synthetic import write_image_release, write_latent_release
from tests.test_train_loop import FAST as LOOP_FAST
from tests.test_train_loop import _offline_one_thread  # noqa: F401 - autouse: 1 thread

FAST = {**LOOP_FAST, "ema": False}


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("release")
    write_image_release(root, [4, 7, 3], resolution=16)
    return root


@pytest.fixture(scope="module")
def other_unets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Local UNet directories of other shapes than the tiny preset's."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("unets")
    out = {}
    for name, change in (("narrow", {"block_out_channels": [16, 32]}),
                         ("cross16", {"cross_attention_dim": 16})):  # fmt: skip
        torch.manual_seed(0)
        UNet2DConditionModel(**{**TINY_UNET, **change}).save_pretrained(root / name)
        out[name] = root / name
    return out


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _steps(out: Path) -> list[dict]:
    return [e for e in _log(out) if "loss" in e and "event" not in e]


def _losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in _steps(out)}


def test_resume_refuses_a_checkpoint_that_does_not_fit(
    release: Path, other_unets: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    train(TrainConfig(**FAST, steps=2), release, out)
    ck = out / "checkpoints" / "step-00000002"

    def refused(message: str, **change: object) -> None:
        cfg = TrainConfig(**{**FAST, "steps": 3, "resume": "latest", **change})
        with pytest.raises(CheckpointError, match=message):
            train(cfg, release, out)

    refused(r"no checkpoint at .*nowhere", resume=str(tmp_path / "nowhere"))
    # the data position was recorded for 2-sample batches and an in-process reader
    refused(r"num_workers=0, batch_size=2; resume with the same values", batch_size=1)
    refused(r"num_workers=0, batch_size=2", num_workers=1)
    # another UNet: named, not torch's bare state_dict error
    refused(
        r"does not fit this run's UNet \(checkpoint of unet='scratch', preset='tiny'; this "
        r"run: unet='.*narrow', preset='tiny'\): size mismatch for ",
        unet=str(other_unets["narrow"]),
    )
    # written by two ranks: one rank cannot take over their data positions
    two = tmp_path / "two-ranks"
    shutil.copytree(ck, two)
    state = json.loads((two / "state.json").read_text())
    state["data"]["world_size"] = 2
    (two / "state.json").write_text(json.dumps(state))
    refused(r"written by 2 ranks, this run has 1", resume=str(two))
    # none of the refused runs wrote anything
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == [ck.name]
    assert max(_losses(out)) == 2


def test_ema_switched_on_at_resume_starts_from_the_resumed_weights(
    release: Path, tmp_path: Path
) -> None:
    """A run without EMA resumed with EMA: the average starts at the resumed weights, not at
    the random init (which would make every EMA sample noise for thousands of steps)."""
    out = tmp_path / "run"
    train(TrainConfig(**dict(FAST, lr=1e-3), steps=2), release, out)
    s = train(TrainConfig(**dict(FAST, lr=1e-3, ema=True), steps=3, resume="latest"), release, out)
    c2 = load_checkpoint(out / "checkpoints" / "step-00000002")
    c3 = load_checkpoint(s["checkpoint"])
    assert c2.ema is None and c3.ema is not None and set(c3.ema) == set(c3.unet)
    decay = min(0.9999, (1 + 2) / (10 + 2))  # EMA.decay_at(2): its one update, after step 3
    for name, avg in c3.ema.items():
        torch.testing.assert_close(avg, decay * c2.unet[name] + (1 - decay) * c3.unet[name])


def test_grad_accum_resume_continues_the_data_and_the_loss(release: Path, tmp_path: Path) -> None:
    """Two micro-batches a step, crossing an epoch (14 samples = 7 batches < 4 x 2), stopped
    after step 2 and resumed: the same micro-batches in the same order, the same losses."""
    base = dict(FAST, grad_accum=2, log_keys=True, ema=True)
    whole = train(TrainConfig(**base, steps=4), release, tmp_path / "a")
    train(TrainConfig(**base, steps=2), release, tmp_path / "b")
    resumed = train(TrainConfig(**base, steps=4, resume="latest"), release, tmp_path / "b")

    def keys(out: Path) -> list[tuple[int, int, list[str]]]:
        lines = (out / "keys-rank0.jsonl").read_text().splitlines()
        return [(e["step"], e["micro"], e["keys"]) for e in map(json.loads, lines)]

    ka, kb = keys(tmp_path / "a"), keys(tmp_path / "b")
    assert [(s, m) for s, m, _ in ka] == [(s, m) for s in range(4) for m in range(2)]
    assert ka == kb
    assert all(len(k) == 2 for _, _, k in ka)
    assert len({k for _, _, ks in ka[:7] for k in ks}) == 14  # one epoch: each sample once
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]
    for step, loss in la.items():
        assert lb[step] == pytest.approx(loss, rel=1e-5, abs=1e-7)
    ca, cb = load_checkpoint(whole["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    assert ca.ema is not None and cb.ema is not None
    for name, t in ca.ema.items():
        torch.testing.assert_close(cb.ema[name], t, rtol=1e-5, atol=1e-6)


def test_resume_with_nothing_to_do(release: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = train(TrainConfig(**FAST, steps=2, resume="latest"), release, out)
    assert first["steps"] == 2  # nothing to resume: a fresh start, said in the log
    assert {"event": "resume", "checkpoint": None, "note": "none found: fresh start"} in _log(out)
    pointer = (out / "checkpoints" / "latest.json").read_text()
    again = train(TrainConfig(**FAST, steps=2, resume="latest"), release, out)
    assert again["steps"] == 2 and again["checkpoint"] is None and again["images_per_s"] is None
    assert [e["step"] for e in _steps(out)] == [1, 2]  # no step trained twice
    assert (out / "checkpoints" / "latest.json").read_text() == pointer
    assert [e.get("step") for e in _log(out) if e.get("event") == "resume"][-1] == 2


def test_mid_run_checkpoints_samples_warmup_and_channels_last(
    release: Path, tmp_path: Path
) -> None:
    base = dict(FAST, lr=1e-3, lr_warmup_steps=3)
    ref = tmp_path / "ref"
    train(TrainConfig(**base, steps=4), release, ref)
    busy = tmp_path / "busy"
    summary = train(
        TrainConfig(
            **dict(base, sample_prompts=["a red square"]),
            steps=4,
            sample_steps=1,
            sample_every=2,
            checkpoint_every=1,
            keep_checkpoints=2,
            timing_skip_steps=0,
        ),
        release,
        busy,
    )
    # linear warm-up over 3 steps, then the full rate
    assert [e["lr"] for e in _steps(ref)] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])
    # a checkpoint every step, the newest two kept; a sample every 2 steps and at the end
    saved = [e["step"] for e in _log(busy) if e.get("event") == "checkpoint"]
    assert saved == [1, 2, 3, 4]
    assert sorted(p.name for p in (busy / "checkpoints").glob("step-*")) == [
        "step-00000003",
        "step-00000004",
    ]
    assert sorted(p.name for p in (busy / "samples").iterdir()) == [
        "step-00000002.png",
        "step-00000004.png",
    ]
    assert Image.open(busy / "samples" / "step-00000002.png").size == (16, 16)
    assert summary["sample_image"] == str(busy / "samples" / "step-00000004.png")
    # timing from the first step (timing_skip_steps = 0): a rate over all 4 steps
    assert summary["images_per_s"] is not None and summary["images_per_s"] > 0
    # checkpointing and sampling in between change nothing in the training
    assert _losses(busy) == _losses(ref)
    # channels-last memory format: the same model, the same losses (up to kernel rounding)
    cl = tmp_path / "cl"
    train(TrainConfig(**base, steps=4, channels_last=True), release, cl)
    for step, loss in _losses(ref).items():
        assert _losses(cl)[step] == pytest.approx(loss, rel=1e-3)


def test_a_diverging_run_stops_before_it_saves(release: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step 2"):
        train(TrainConfig(**dict(FAST, lr=1e30), steps=3), release, out)
    assert not (out / "checkpoints").exists()  # no checkpoint of broken weights


def test_min_snr_weighting_in_the_loss() -> None:
    """snr_gamma > 0 weights each sample's error by min(SNR, γ)/SNR (epsilon objective)."""
    cfg = TrainConfig(snr_gamma=5.0)
    ab = make_noise_scheduler(cfg).alphas_cumprod

    class Echo(torch.nn.Module):  # returns its input: the error is ‖noisy − noise‖²
        def forward(self, x, t, encoder_hidden_states):  # type: ignore[no-untyped-def]
            return type("O", (), {"sample": x})()

    t = torch.tensor([10, 400, 990])
    lat, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    a = ab[t].view(-1, 1, 1, 1)
    per = ((a.sqrt() * lat + (1 - a).sqrt() * noise - noise) ** 2).mean(dim=(1, 2, 3))
    w = snr_weights(ab[t], 5.0, "epsilon")
    assert w[0] < 1 and w[-1] == pytest.approx(1.0)  # high SNR down-weighted, low SNR not
    got = DiffusionLoss(Echo(), ab, cfg, False)(lat, None, noise, t)
    torch.testing.assert_close(got, (per * w).mean())
    plain = DiffusionLoss(Echo(), ab, TrainConfig(), False)(lat, None, noise, t)
    torch.testing.assert_close(plain, per.mean())


def test_data_and_models_that_do_not_fit_are_refused(
    release: Path, other_unets: dict[str, Path], tmp_path: Path
) -> None:
    def latents(name: str, **kw: object) -> Path:
        args: dict = dict(samples=4, shards=1, latent_hw=(8, 8), text_len=8, text_dim=32,
                          preset="tiny", resolution=16, vae_scale_factor=2)  # fmt: skip
        write_latent_release(tmp_path / name, **{**args, **kw})  # type: ignore[arg-type]
        return tmp_path / name

    cfg = TrainConfig(**FAST, steps=1)
    good = latents("good")
    assert train(cfg, good, tmp_path / "ok")["latents"] is True  # intact: trains
    manifest = json.loads((good / "latents.json").read_text())
    (good / "latents.json").write_text(json.dumps(dict(manifest, format="latents/0")))
    with pytest.raises(DataError, match="unknown latent format 'latents/0'"):
        train(cfg, good, tmp_path / "x")
    with pytest.raises(DataError, match="made with preset 'sd2-base', this run uses 'tiny'"):
        train(cfg, latents("sd2", preset="sd2-base"), tmp_path / "x")
    with pytest.raises(DataError, match="carry 16-dim text embeddings but the UNet expects 32"):
        train(cfg, latents("dim16", text_dim=16), tmp_path / "x")
    with pytest.raises(DataError, match=r"latents = 'yes' but no latents\.json"):
        train(cfg.model_copy(update={"latents": "yes"}), release, tmp_path / "x")
    # pixels: the text encoder must give what the UNet cross-attends to
    with pytest.raises(ValueError, match="text encoder width 32 != UNet cross_attention_dim 16"):
        train(cfg.model_copy(update={"unet": str(other_unets["cross16"])}), release, tmp_path / "x")
    assert not (tmp_path / "x" / "checkpoints").exists()
