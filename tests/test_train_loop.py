"""The trainer end to end on CPU with the tiny preset: resume, latents, safety, DDP."""

from __future__ import annotations

import json
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccurate.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    match_param_layout,
    optimizer_from_flat,
    optimizer_to_flat,
)
from ccurate.train.config import TrainConfig
from ccurate.train.loop import DiffusionLoss, dropout_mask, make_noise_scheduler, snr_weights, train
from ccurate.train.models import (
    OpenCLIPTextEncoder,
    OpenCLIPTokenizer,
    build_unet,
)
from ccurate.train.stream import DataError, find_shards
from ccurate.train.synthetic import write_image_release
from ccurate.weights import WeightsNotFoundError, safe_torch_load

FAST = {
    "resolution": 16,
    "num_workers": 0,
    "shuffle_buffer": 8,
    "log_every": 1,
    "sample_prompts": [],
    "batch_size": 2,
}


@pytest.fixture(autouse=True)
def _offline_one_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("release")
    return root, write_image_release(root, [4, 7, 3], resolution=16)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in _log(out) if "loss" in e and "event" not in e}


def _keys(out: Path, rank: int = 0) -> list[tuple[int, list[str]]]:
    lines = (out / f"keys-rank{rank}.jsonl").read_text().splitlines()
    return [(e["step"], e["keys"]) for e in map(json.loads, lines)]


def test_resume_continues_the_loss_curve_and_the_data(release, tmp_path):
    root, _ = release
    # random_flip: the flips, drawn per (seed, data epoch, key), repeat exactly on resume
    base = dict(
        FAST, num_workers=2, log_keys=True, grad_accum=1, ema=True, lr_warmup_steps=2,
        random_flip=True,
    )  # fmt: skip
    a = tmp_path / "a"
    sa = train(TrainConfig(**base, steps=6), root, a)
    b = tmp_path / "b"
    sb1 = train(TrainConfig(**base, steps=3), root, b)
    assert sb1["steps"] == 3 and Path(sb1["checkpoint"]).name == "step-00000003"
    sb = train(TrainConfig(**base, steps=6, resume="latest"), root, b)
    assert sa["steps"] == sb["steps"] == 6
    assert _keys(a) == _keys(b)  # same samples, same order, nothing repeated or skipped
    la, lb = _losses(a), _losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 7))
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-5, abs=1e-7)
    ca, cb = load_checkpoint(sa["checkpoint"]), load_checkpoint(sb["checkpoint"])
    for name, t in ca.unet.items():
        torch.testing.assert_close(cb.unet[name], t, rtol=1e-5, atol=1e-6)
    assert ca.state["data"] == cb.state["data"]
    assert ca.ema is not None and set(ca.ema) == set(ca.unet)


def test_precompute_then_train_on_latents(release, tmp_path):
    from typer.testing import CliRunner

    from ccurate.cli import app

    root, keys = release
    lat = tmp_path / "latents"
    res = CliRunner().invoke(
        app,
        [
            "train",
            "precompute",
            "--data",
            str(root),
            "--out",
            str(lat),
            "--resolution",
            "16",
            "--set",
            "caption_source=mix",
            "--batch",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    manifest = json.loads((lat / "latents.json").read_text())
    assert manifest["resolution"] == 16 and manifest["vae_scale_factor"] == 2
    shards = find_shards(lat)
    assert [Path(s).name for s in shards] == [Path(s).name for s in find_shards(root)]
    import tarfile

    with tarfile.open(shards[0]) as tf:
        names = tf.getnames()
    first = names[0].split(".")[0]
    want = {f"{first}.{ext}" for ext in ("latent.npy", "emb.npy", "alt.npy", "json")}
    assert want <= set(names)
    from ccurate.train.decode import load_npy
    from ccurate.train.stream import iter_tar

    raw = next(iter_tar(shards[0]))
    m = raw.members["latent.npy"]
    with open(shards[0], "rb") as fh:
        fh.seek(m.offset)
        latent = load_npy(fh.read(m.size))
    assert latent.shape == (8, 8, 8) and latent.dtype == np.float16  # mean ‖ std, 16 px / 2
    # rerun is a no-op (markers), then train from the latents with sampling at the end
    mtime = os.path.getmtime(shards[0])
    res = CliRunner().invoke(
        app, ["train", "precompute", "--data", str(root), "--out", str(lat), "--resolution", "16"]
    )
    assert res.exit_code == 0 and os.path.getmtime(shards[0]) == mtime
    out = tmp_path / "run"
    cfg = TrainConfig(
        **dict(
            FAST,
            sample_prompts=["a red square", "a blue circle"],
            sample_steps=2,
            log_keys=True,
            caption_source="mix",
        ),
        steps=2,
    )
    summary = train(cfg, lat, out)
    assert summary["latents"] is True and summary["steps"] == 2
    # latents are of unflipped images: random_flip there is refused, not silently ignored
    with pytest.raises(DataError, match="random_flip needs pixels"):
        train(cfg.model_copy(update={"random_flip": True}), lat, tmp_path / "flip")
    used = {k for _, ks in _keys(out) for k in ks}
    assert used <= set(keys) and len(used) == 4
    img = Image.open(summary["sample_image"])
    assert img.size == (32, 16)  # two 16 px samples side by side
    assert np.asarray(img).std() > 0


def test_checkpoint_loading_never_unpickles(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"weights": Evil()}))
    with pytest.raises(pickle.UnpicklingError):
        safe_torch_load(evil)
    assert not marker.exists()
    # a checkpoint whose weight file was replaced by a pickle is refused
    ck = tmp_path / "ck"
    (ck / "unet").mkdir(parents=True)
    (ck / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(pickle.dumps(Evil()))
    (ck / "state.json").write_text(json.dumps({"format": "ccurate-train-checkpoint/1", "step": 1}))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(ck)
    assert not marker.exists()


def test_optimizer_state_round_trip():
    p = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.AdamW(p, lr=1e-3, betas=(0.8, 0.95))
    for _ in range(2):
        for q in p:
            q.grad = torch.randn_like(q)
        opt.step()
    tensors, structure = optimizer_to_flat(opt.state_dict())
    json.dumps(structure)  # the structure is plain json
    restored = optimizer_from_flat(tensors, json.loads(json.dumps(structure)))
    opt2 = torch.optim.AdamW([torch.nn.Parameter(q.detach().clone()) for q in p], lr=1.0)
    opt2.load_state_dict(restored)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95)
    for i in range(2):
        for k, v in opt.state[p[i]].items():
            torch.testing.assert_close(opt2.state[opt2.param_groups[0]["params"][i]][k], v)


def test_restored_moments_take_their_channels_last_weights_layout():
    """Checkpoints store tensors contiguous; CUDA's fused AdamW refuses moments whose layout
    differs from their channels-last conv weight (seen on an H200 at the first resumed step)."""
    conv = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(conv.parameters())
    conv(torch.randn(2, 4, 8, 8)).sum().backward()
    opt.step()
    tensors, structure = optimizer_to_flat(opt.state_dict())
    opt2 = torch.optim.AdamW(conv.parameters())
    opt2.load_state_dict(optimizer_from_flat(tensors, structure))
    w = conv.weight
    assert opt2.state[w]["exp_avg"].stride() != w.stride()  # as restored: contiguous
    assert match_param_layout(opt2) == 2  # the weight's two moments; the bias's already fit
    for name in ("exp_avg", "exp_avg_sq"):
        assert opt2.state[w][name].stride() == w.stride()
        torch.testing.assert_close(opt2.state[w][name], opt.state[w][name], rtol=0, atol=0)
    assert match_param_layout(opt2) == 0


def test_missing_weights_name_the_path_and_the_fetch(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"(?s)nowhere.*hf download"):
        build_unet(TrainConfig(unet=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError, match=r"config\.json"):
        build_unet(TrainConfig(unet=str(tmp_path / "empty")))
    with pytest.raises(
        WeightsNotFoundError, match="hf download stabilityai/stable-diffusion-2-base"
    ):
        build_unet(TrainConfig(unet="stabilityai/stable-diffusion-2-base"))


def test_objectives_and_dropout():
    cfg = TrainConfig(prediction_type="v_prediction", snr_gamma=5.0)
    ab = make_noise_scheduler(cfg).alphas_cumprod
    t = torch.tensor([0, 500, 999])
    w = snr_weights(ab[t], 5.0, "v_prediction")
    snr = ab[t] / (1 - ab[t])
    torch.testing.assert_close(w, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert snr_weights(ab[t], 5.0, "epsilon")[-1] == pytest.approx(1.0)  # low SNR: weight 1

    class Echo(torch.nn.Module):  # returns its input: the loss is ||noisy - target||²
        def forward(self, x, t, encoder_hidden_states):
            return type("O", (), {"sample": x})()

    lat, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    loss = DiffusionLoss(Echo(), ab, TrainConfig(prediction_type="v_prediction"), False)
    a = ab[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * lat
    expected = ((noisy - v) ** 2).mean()
    torch.testing.assert_close(loss(lat, None, noise, t), expected)

    g = torch.Generator().manual_seed(3)
    m = dropout_mask(20000, 0.1, g, torch.device("cpu"))
    assert 0.09 < m.float().mean().item() < 0.11
    assert torch.equal(
        m, dropout_mask(20000, 0.1, torch.Generator().manual_seed(3), torch.device("cpu"))
    )


def test_open_clip_penultimate_layer():
    from open_clip.model import _build_text_tower

    tower = _build_text_tower(
        16, {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 3}
    )
    tok = OpenCLIPTokenizer("ViT-H-14")
    tok.max_length = 12
    tok.tok.context_length = 12
    enc = OpenCLIPTextEncoder(tower, tok, "penultimate", "test")
    ids = tok(["a photo of a cat"])
    assert ids.shape == (1, 12)
    x = tower.token_embedding(ids) + tower.positional_embedding
    for blk in list(tower.transformer.resblocks)[:-1]:
        x = blk(x, attn_mask=tower.attn_mask)
    torch.testing.assert_close(enc(ids), tower.ln_final(x))
    enc.layer = "last"
    assert not torch.allclose(enc(ids), tower.ln_final(x))


def test_open_clip_text_encoder_from_a_local_checkpoint_or_a_clear_error(tmp_path: Path) -> None:
    """`open_clip:ARCH:/path` loads the text tower of a full OpenCLIP checkpoint (the visual
    half is ignored); an unknown tag, weights not in the offline cache, or a checkpoint of
    another model fail with a message saying what to pass, never with random weights."""
    import open_clip
    from safetensors.torch import save_file

    from ccurate.train.models import build_text_encoder

    arch = "TinyTextTest-1"
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / f"{arch}.json").write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                       "head_width": 16},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 4,
                     "layers": 2},
    }))  # fmt: skip
    open_clip.add_model_config(tmp_path / "cfg")
    torch.manual_seed(7)
    clip = open_clip.create_model(arch)
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    assert any(k.startswith("visual.") for k in state)
    save_file(state, str(tmp_path / "clip.safetensors"))

    cfg = TrainConfig()
    enc = build_text_encoder(cfg, f"open_clip:{arch}:{tmp_path / 'clip.safetensors'}")
    torch.testing.assert_close(enc.token_embedding.weight, state["token_embedding.weight"])
    torch.testing.assert_close(
        enc.transformer.resblocks[1].mlp.c_fc.weight,
        state["transformer.resblocks.1.mlp.c_fc.weight"],
    )
    assert not any(p.requires_grad for p in enc.parameters())
    assert enc(enc.tokenizer(["a red barn"])).shape == (1, 12, 32)

    with pytest.raises(WeightsNotFoundError, match="neither a file nor a known OpenCLIP tag"):
        build_text_encoder(cfg, f"open_clip:{arch}:no-such-tag")
    # a real tag whose weights are not in the (offline) cache: how to fetch them, or a path
    with pytest.raises(WeightsNotFoundError, match="not in the local cache") as err:
        build_text_encoder(cfg, "open_clip:ViT-B-32:laion2b_s34b_b79k")
    assert "HF_HUB_OFFLINE='1'" in str(err.value) and "hf download" in str(err.value)
    other = {"encoder.weight": torch.zeros(2, 2)}
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=f"not an OpenCLIP {arch} checkpoint"):
        build_text_encoder(cfg, f"open_clip:{arch}:{tmp_path / 'other.safetensors'}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    cfg = TrainConfig(**dict(FAST, resolution=8, log_keys=True, ema=False), steps=3, device="cpu")
    train(cfg, root, out)


def test_ddp_two_ranks_on_cpu_uneven_shards(tmp_path):
    import torch.multiprocessing as mp

    root = tmp_path / "rel"
    keys = write_image_release(root, [1, 6, 3], resolution=8)
    out = tmp_path / "ddp"
    # fork: the children inherit the imported modules (spawn re-imports torch + diffusers)
    mp.start_processes(
        _ddp_worker, args=(2, _free_port(), str(root), str(out)), nprocs=2, start_method="fork"
    )
    k0, k1 = _keys(out, 0), _keys(out, 1)
    assert [s for s, _ in k0] == [s for s, _ in k1] == [0, 1, 2]  # 3 steps > 1 epoch (2 batches)
    for (_, a), (_, b) in zip(k0, k1, strict=True):
        assert len(a) == len(b) == 2
        assert a != b  # each rank reads its own slot of the stream
    assert {k for _, ks in k0 + k1 for k in ks} <= set(keys)
    state = load_checkpoint(out / "checkpoints" / "step-00000003").state
    ranks = state["data"]["ranks"]
    assert state["data"]["world_size"] == 2 and [r["batches"] for r in ranks] == [3, 3]


def test_aspect_buckets_end_to_end(release, tmp_path):
    root, keys = release
    cfg = TrainConfig(**dict(FAST, aspect_buckets=True, log_keys=True), steps=3)
    summary = train(cfg, root, tmp_path / "run")
    assert summary["steps"] == 3 and summary["checkpoint"]
    used = [k for _, ks in _keys(tmp_path / "run") for k in ks]
    assert len(used) == 6 and set(used) <= set(keys)


@pytest.mark.slow
def test_compiled_loss_matches_eager(release, tmp_path):
    root, _ = release
    base = dict(FAST, channels_last=True, checkpoint_at_end=False, ema=False)
    eager = train(TrainConfig(**base, steps=3), root, tmp_path / "eager")
    compiled = train(TrainConfig(**base, steps=3, compile=True), root, tmp_path / "compiled")
    le, lc = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert eager["steps"] == compiled["steps"] == 3
    for step in le:
        assert lc[step] == pytest.approx(le[step], rel=1e-3)
