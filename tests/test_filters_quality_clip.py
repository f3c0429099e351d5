"""CLIP-score and aesthetic filters on tiny random-init open_clip models saved to tmp paths.

The models are built here from a config, saved the way users receive them
(an open_clip folder, a bare checkpoint file), and loaded by the real loading
code; the tests check that the saved weights (not a random init) are used.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccurate.filters import clip_models
from ccurate.filters.clip_models import AestheticMLP, load_clip
from ccurate.filters.quality import (
    AestheticConfig,
    AestheticFilter,
    ClipScoreConfig,
    ClipScoreFilter,
)
from ccurate.record import Sample
from ccurate.stage import FilterStage
from ccurate.weights import WeightsNotFoundError

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny CLIP as an open_clip folder and as a bare checkpoint of a registered name."""
    import open_clip
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    model = CLIP(**TINY)
    folder = root / "tiny-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY, "preprocess_cfg": {"mean": MEAN, "std": STD}})
    )
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    cfg_dir = root / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "ccurate-tiny-clip.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(cfg_dir)
    ckpt = root / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    clip_models.unload_all()
    return {"folder": folder, "ckpt": ckpt}


def jpeg(color: tuple[int, int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color) + rng.normal(0, 25, (64, 80, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def samples() -> list[Sample]:
    specs = [((220, 30, 30), "a red square"), ((30, 200, 40), "green grass field"),
             ((20, 40, 210), "deep blue water"), ((240, 240, 240), "white snow"),
             ((10, 10, 10), "black night sky"), ((200, 180, 20), "yellow sand")]  # fmt: skip
    return [Sample(key=f"s{i}", url=f"https://x.org/{i}.jpg", alt_text=t, image=jpeg(c, i))
            for i, (c, t) in enumerate(specs)]  # fmt: skip


def reference_sims(folder: Path, batch: list[Sample]) -> list[float]:
    """Cosine similarities computed independently of the filter, from the saved weights."""
    import open_clip

    model, _, pre = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tok = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    with torch.no_grad():
        pil = [Image.open(io.BytesIO(s.image or b"")).convert("RGB") for s in batch]
        ims = torch.stack([pre(im) for im in pil])
        e = torch.nn.functional.normalize(model.encode_image(ims), dim=-1)
        tokens = tok([s.alt_text for s in batch])
        t = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    return (e * t).sum(-1).tolist()


def test_clip_score_recorded_from_the_saved_weights(tiny) -> None:
    f = ClipScoreFilter(ClipScoreConfig(weights=str(tiny["folder"]), device="cpu", min_score=-1.0))
    assert f.active
    batch = samples()
    FilterStage([f]).process(batch)
    got = [s.scores["clip_score.score"] for s in batch]
    assert all(-1.0 <= g <= 1.0 for g in got)
    np.testing.assert_allclose(got, reference_sims(tiny["folder"], batch), atol=1e-4)
    assert all(s.kept for s in batch)


def test_clip_threshold_is_respected(tiny) -> None:
    probe = samples()
    FilterStage([ClipScoreFilter(ClipScoreConfig(weights=str(tiny["folder"]), min_score=-1.0,
                                                  device="cpu"))]).process(probe)  # fmt: skip
    sims = sorted(s.scores["clip_score.score"] for s in probe)
    cut = (sims[2] + sims[3]) / 2
    batch = samples()
    f = ClipScoreFilter(ClipScoreConfig(weights=str(tiny["folder"]), min_score=cut, device="cpu"))
    FilterStage([f]).process(batch)
    for s in batch:
        below = s.scores["clip_score.score"] < cut
        assert s.kept is not below
        assert (s.drop_reason == "clip_score_low") is below


def test_checkpoint_file_form_and_shared_model(tiny) -> None:
    a = load_clip("ccurate-tiny-clip", str(tiny["ckpt"]), "cpu")
    b = load_clip("ccurate-tiny-clip", str(tiny["ckpt"]), "cpu")
    assert a is b  # one model per process, shared by clip_score and aesthetic
    s = samples()[:1]
    e1 = a.image_embeddings([s[0].image])[0]
    e2 = a.image_embeddings([s[0].image])[0]
    assert e1 is e2  # cached per image bytes: the second filter does not re-encode
    assert e1 is not None and abs(float(np.linalg.norm(e1)) - 1.0) < 1e-5


def test_no_text_is_kept_unjudged_and_bad_bytes_dropped(tiny) -> None:
    f = ClipScoreFilter(ClipScoreConfig(weights=str(tiny["folder"]), min_score=0.99, device="cpu"))
    no_alt = Sample(key="n", url="u", alt_text="  ", image=jpeg((1, 2, 3), 9))
    broken = Sample(key="b", url="u", alt_text="cat", image=b"garbage")
    d1, d2 = f.decide_batch([no_alt, broken])
    assert d1.keep and "score" not in d1.scores
    assert not d2.keep and d2.reason == "decode_error"


def test_missing_weights_name_the_expected_path(tmp_path) -> None:
    missing = tmp_path / "models" / "clip-vit-l-14"
    with pytest.raises(WeightsNotFoundError) as e:
        ClipScoreFilter(ClipScoreConfig(weights=str(missing)))
    msg = str(e.value)
    assert str(missing) in msg and "filters.clip_score.weights" in msg and "hf download" in msg
    no_cfg = tmp_path / "folder"
    no_cfg.mkdir()
    with pytest.raises(WeightsNotFoundError, match=r"open_clip_config\.json"):
        ClipScoreFilter(ClipScoreConfig(weights=str(no_cfg)))


def test_hub_weights_offline_not_cached_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    f = ClipScoreFilter(ClipScoreConfig(weights="hf-hub:ccurate-test/no-such-clip", device="cpu"))
    with pytest.raises(WeightsNotFoundError) as e:
        f.setup()
    msg = str(e.value)
    assert "HF_HUB_OFFLINE=1" in msg and "hf download ccurate-test/no-such-clip" in msg


def test_not_configured_is_off_with_one_message(caplog) -> None:
    clip_models._off_logged.discard("clip_score")
    clip_models._off_logged.discard("aesthetic")
    with caplog.at_level(logging.WARNING, logger="ccurate.filters"):
        f = ClipScoreFilter(ClipScoreConfig())
        ClipScoreFilter(ClipScoreConfig())
        a = AestheticFilter(AestheticConfig())
    msgs = [r.getMessage() for r in caplog.records]
    clip_msgs = [m for m in msgs if "'clip_score' is OFF" in m]
    assert len(clip_msgs) == 1 and "filters.clip_score.weights" in clip_msgs[0]
    aes = [m for m in msgs if "'aesthetic' is OFF" in m]
    assert len(aes) == 1 and "filters.aesthetic.weights" in aes[0]
    assert "filters.aesthetic.clip_weights" in aes[0]
    assert not f.active and not a.active
    batch = samples()[:2]
    FilterStage([f, a]).process(batch)
    # off is explicit in every record, never a silent pass
    assert all(s.kept and s.scores["clip_score.off"] == 1.0 for s in batch)
    assert all(s.scores["aesthetic.off"] == 1.0 for s in batch)
    assert f.describe()["active"] is False


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    mlp = AestheticMLP(32)
    p = tmp_path_factory.mktemp("aes") / "tiny-aesthetic.pth"
    torch.save(mlp.state_dict(), p)
    return p


def test_aesthetic_mlp_has_the_laion_layout() -> None:
    shapes = {k: tuple(v.shape) for k, v in AestheticMLP(768).state_dict().items()}
    assert shapes == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }  # fmt: skip


def test_aesthetic_scores_and_threshold(tiny, mlp_path) -> None:
    cfg = AestheticConfig(weights=str(mlp_path), clip_weights=str(tiny["folder"]),
                          min_score=-1e9, device="cpu")  # fmt: skip
    probe = samples()
    f = AestheticFilter(cfg)
    FilterStage([f]).process(probe)
    got = np.array([s.scores["aesthetic.score"] for s in probe])
    # independent computation: saved MLP on L2-normalised embeddings of the saved CLIP
    mlp = AestheticMLP(32)
    mlp.load_state_dict(torch.load(mlp_path, weights_only=True))
    mlp.eval()
    clip = load_clip("ViT-L-14", str(tiny["folder"]), "cpu")
    embs = np.stack([clip.encode_images([Image.open(io.BytesIO(s.image or b"")).convert("RGB")])[0]
                     for s in probe])  # fmt: skip
    with torch.no_grad():
        want = mlp(torch.from_numpy(embs)).squeeze(-1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    cut = float(np.median(got))
    batch = samples()
    FilterStage([AestheticFilter(cfg.model_copy(update={"min_score": cut}))]).process(batch)
    for s in batch:
        assert (s.drop_reason == "aesthetic_low") is (s.scores["aesthetic.score"] < cut)


def test_aesthetic_errors(tiny, tmp_path) -> None:
    with pytest.raises(WeightsNotFoundError) as e:
        AestheticFilter(AestheticConfig(weights=str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"),
                                        clip_weights=str(tiny["folder"])))  # fmt: skip
    assert "sac+logos+ava1-l14-linearMSE.pth" in str(e.value)
    wide = tmp_path / "wide.pth"
    torch.save(AestheticMLP(768).state_dict(), wide)
    f = AestheticFilter(AestheticConfig(weights=str(wide), clip_weights=str(tiny["folder"]),
                                        device="cpu"))  # fmt: skip
    with pytest.raises(ValueError, match="768"):
        f.setup()


def test_pickles_without_the_loaded_model(tiny) -> None:
    import pickle

    f = ClipScoreFilter(ClipScoreConfig(weights=str(tiny["folder"]), device="cpu", min_score=-1))
    f.setup()
    clone = pickle.loads(pickle.dumps(f))
    assert clone._m_clip is None and f._m_clip is not None
    s = samples()[:1]
    FilterStage([clone]).process(s)
    assert "clip_score.score" in s[0].scores


def test_non_finite_scores_are_dropped_not_passed(tiny, mlp_path, monkeypatch) -> None:
    """A NaN similarity compared with the threshold is never 'below' it: such a sample
    used to pass both model filters with a NaN score. It drops as `score_invalid`."""
    batch = samples()[:2]
    clip = load_clip("ccurate-tiny-clip", str(tiny["folder"]), "cpu")
    real = clip.image_embeddings

    def broken_first(images, batch_size=64):
        embs = list(real(images, batch_size))
        if embs and embs[0] is not None:
            embs[0] = np.full_like(embs[0], np.nan)
        return embs

    monkeypatch.setattr(clip, "image_embeddings", broken_first)
    clip_f = ClipScoreFilter(ClipScoreConfig(weights=str(tiny["folder"]), min_score=-1.0,
                                             device="cpu"))  # fmt: skip
    aes_f = AestheticFilter(AestheticConfig(weights=str(mlp_path), clip_weights=str(tiny["folder"]),
                                            min_score=-1e9, device="cpu"))  # fmt: skip
    for f in (clip_f, aes_f):
        d_bad, d_ok = f.decide_batch(batch)
        assert not d_bad.keep and d_bad.reason == "score_invalid", f.name
        assert d_ok.keep, f.name
