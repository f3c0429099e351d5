"""Review of CLIP loading for the CLIP-score, aesthetic and semantic-dedup steps.

Tiny random-init open_clip models are built here and saved the way users receive
them; every test checks the embeddings against open_clip loading the same weights
independently, so a model that silently differs from the one trained fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccurate.filters import clip_models
from ccurate.filters.clip_models import load_clip, resolve_clip_source
from ccurate.filters.semantic import semantic_groups
from ccurate.weights import WeightsNotFoundError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NAME = "ccurate-review-tiny-clip"
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
HALF = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash"}


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A QuickGELU tiny CLIP (as OpenAI's weights are), its architecture registered as GELU."""
    import open_clip
    from open_clip.model import CLIP

    root = tmp_path_factory.mktemp("review-clip")
    (root / f"{NAME}.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(root / f"{NAME}.json")
    torch.manual_seed(3)
    model = CLIP(**TINY, quick_gelu=True)
    with torch.no_grad():  # large weights, so GELU and QuickGELU give clearly different outputs
        for p in model.parameters():
            p.mul_(4.0)
    model.eval()
    ckpt = root / "oai.pt"
    torch.save(model.state_dict(), ckpt)
    clip_models.unload_all()
    return ckpt, model


def photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))


def reference(model: torch.nn.Module, ims: list[Image.Image], mean: list[float],
              std: list[float], squash: bool = False) -> np.ndarray:  # fmt: skip
    """Embeddings computed by hand: resize to 32, normalise, encode, L2-normalise."""
    rows = []
    for im in ims:
        if squash:
            im = im.resize((32, 32), Image.Resampling.BICUBIC)
        else:
            short = min(im.size)  # torchvision: short side to 32, long side truncated
            size = (int(32 * im.width / short), int(32 * im.height / short))
            im = im.resize(size, Image.Resampling.BICUBIC)
            left, top = round((im.width - 32) / 2), round((im.height - 32) / 2)
            im = im.crop((left, top, left + 32, top + 32))
        x = torch.from_numpy(np.asarray(im, np.float32) / 255.0).permute(2, 0, 1)
        rows.append((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
    with torch.no_grad():
        e = model.encode_image(torch.stack(rows))  # type: ignore[operator]
    return torch.nn.functional.normalize(e, dim=-1).numpy()


@pytest.mark.parametrize("offline", ["1", "0"])
def test_tag_of_quick_gelu_weights_builds_a_quick_gelu_model(
    quick_model: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch, offline: str
) -> None:
    """`ViT-L-14` + tag `openai` (the aesthetic head's CLIP) loaded OpenAI's QuickGELU
    weights into open_clip's GELU architecture: open_clip only warns, every embedding
    (so every aesthetic score) came out wrong."""
    import open_clip.pretrained as pretrained
    from open_clip.model import QuickGELU

    ckpt, model = quick_model
    mean, std = [0.4, 0.45, 0.5], [0.25, 0.26, 0.27]
    tag = {"file": str(ckpt), "quick_gelu": True, "mean": mean, "std": std}
    monkeypatch.setitem(pretrained._PRETRAINED, NAME, {"oai": tag})
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    clip_models.unload_all()
    clip = load_clip(NAME, "oai", "cpu", key="filters.aesthetic.clip_weights")
    assert any(isinstance(m, QuickGELU) for m in clip.model.modules())
    ims = [photo(i) for i in range(3)]
    np.testing.assert_allclose(clip.encode_images(ims), reference(model, ims, mean, std),
                               atol=1e-4)  # fmt: skip


def test_checkpoint_file_of_an_export_folder_keeps_its_preprocessing(
    quick_model: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    """`hf download org/repo --local-dir d` then weights = d/open_clip_pytorch_model.bin:
    the folder's mean/std, resize mode and QuickGELU were ignored for the architecture's
    defaults (OpenAI mean/std, GELU), so e.g. a SigLIP checkpoint saw wrongly scaled pixels."""
    ckpt, model = quick_model
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": {**TINY, "quick_gelu": True}, "preprocess_cfg": HALF})
    )
    (folder / "open_clip_pytorch_model.bin").write_bytes(ckpt.read_bytes())
    clip_models.unload_all()
    clip = load_clip(NAME, str(folder / "open_clip_pytorch_model.bin"), "cpu")
    ims = [photo(i) for i in range(3)]
    want = reference(model, ims, HALF["mean"], HALF["std"], squash=True)  # type: ignore[arg-type]
    np.testing.assert_allclose(clip.encode_images(ims), want, atol=1e-4)
    # the same weights as the folder (open_clip's own reading of it) give the same vectors
    whole = load_clip(NAME, str(folder), "cpu")
    np.testing.assert_allclose(whole.encode_images(ims), want, atol=1e-4)


def test_folder_without_a_checkpoint_names_the_expected_file(tmp_path: Path) -> None:
    """A folder with only open_clip_config.json (a partial download) used to fail at load
    time with open_clip's bare "Required pretrained weights ... could not be loaded"."""
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    with pytest.raises(WeightsNotFoundError) as e:
        resolve_clip_source(NAME, str(folder), "dedup.semantic_weights")
    msg = str(e.value)
    assert "dedup.semantic_weights" in msg and str(folder / "open_clip_model.safetensors") in msg
    assert "hf download" in msg


def test_checkpoint_of_another_architecture_names_the_key(
    quick_model: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    """A checkpoint that does not fit `model` raised open_clip's raw state-dict error,
    which names neither the config key nor the model it was loaded as."""
    from open_clip.model import CLIP

    other = {**TINY, "embed_dim": 24}
    bad = tmp_path / "other.pt"
    torch.save(CLIP(**other).state_dict(), bad)
    clip_models.unload_all()
    with pytest.raises(ValueError, match=rf"filters\.clip_score\.weights = .*other\.pt.*{NAME}"):
        load_clip(NAME, str(bad), "cpu", key="filters.clip_score.weights")


def test_semantic_groups_keep_the_first_and_survive_degenerate_input() -> None:
    """Keeper = lowest index (best-ranked) even when k-means runs; identical, zero and
    NaN rows neither crash nor group wrongly; more clusters than rows is fine."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(120, 16)).astype(np.float32)
    copies = base[::-1] * 3.0 + rng.normal(scale=0.01, size=base.shape).astype(np.float32)
    emb = np.concatenate([base, copies])  # copy of row i sits at 239 - i, scaled (unnormalised)
    groups = semantic_groups(emb, 20, eps=0.01)
    assert sorted((g[0], g[1]) for g in groups) == [(i, 239 - i) for i in range(120)]
    assert groups == semantic_groups(emb.astype(np.float64), 20, eps=0.01)
    same = np.tile(base[:1], (9, 1))
    assert semantic_groups(same, 50, eps=0.01) == [list(range(9))]
    odd = np.concatenate([base[:4], np.zeros((2, 16), np.float32), base[:1]])
    odd[1] = np.nan
    assert semantic_groups(odd, 3, eps=0.01) == [[0, 6]]


def _fake_hub_cache(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """A Hugging Face cache holding `repo` at one commit, as `hf download` leaves it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)
    for name, data in files.items():
        (snap / name).write_bytes(data)


def test_offline_set_after_import_reads_only_the_cache(
    quick_model: tuple[Path, torch.nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub fixes HF_HUB_OFFLINE and HF_HUB_CACHE at import: exported later,
    `hf-hub:` CLIP weights and `hf-hub:` aesthetic heads still went to the network (and
    looked in the import-time cache, not the one the error message named)."""
    import huggingface_hub.file_download as fd
    from huggingface_hub import constants

    from ccurate.weights import hub_file

    ckpt, model = quick_model
    cfg = {"model_cfg": TINY, "preprocess_cfg": HALF}
    _fake_hub_cache(tmp_path / "hub", "ccurate-test/tiny-clip", {
        "open_clip_config.json": json.dumps(cfg).encode(),
        "open_clip_pytorch_model.bin": ckpt.read_bytes(),
        "head.pth": b"not used",
    })  # fmt: skip
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as if imported before the export
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_network(*a: object, **k: object) -> None:
        raise AssertionError("network access with HF_HUB_OFFLINE=1")

    monkeypatch.setattr(fd, "get_hf_file_metadata", no_network)
    spec = "hf-hub:ccurate-test/tiny-clip/head.pth"
    assert hub_file(spec, "filters.aesthetic.weights").read_bytes() == b"not used"
    clip_models.unload_all()
    clip = load_clip(NAME, "hf-hub:ccurate-test/tiny-clip", "cpu")
    assert clip.encode_texts(["a cat"]).shape == (1, 16)
    with pytest.raises(WeightsNotFoundError, match="hf download ccurate-test/not-cached"):
        load_clip(NAME, "hf-hub:ccurate-test/not-cached", "cpu")
    # an open_clip tag (e.g. ViT-L-14 'openai') is read from the cache too, with its
    # preprocessing and QuickGELU
    import open_clip.pretrained as pretrained

    mean, std = [0.4, 0.45, 0.5], [0.25, 0.26, 0.27]
    tag = {"hf_hub": "ccurate-test/tiny-tag/", "quick_gelu": True, "mean": mean, "std": std}
    monkeypatch.setitem(pretrained._PRETRAINED, NAME, {"oai": tag})
    _fake_hub_cache(tmp_path / "hub", "ccurate-test/tiny-tag",
                    {"open_clip_pytorch_model.bin": ckpt.read_bytes()})  # fmt: skip
    clip_models.unload_all()
    ims = [photo(i) for i in range(2)]
    got = load_clip(NAME, "oai", "cpu").encode_images(ims)
    np.testing.assert_allclose(got, reference(model, ims, mean, std), atol=1e-4)


def test_embedding_cache_does_not_keep_the_image_bytes(
    quick_model: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    """The per-model embedding cache (4096 entries) held every image's bytes object to
    key it by id(): up to GBs of encoded images per worker, long after their batch."""
    import io
    import sys

    from ccurate.filters import images

    ckpt, _ = quick_model
    clip_models.unload_all()
    clip = load_clip(NAME, str(ckpt), "cpu")
    buf = io.BytesIO()
    photo(7).save(buf, "PNG")
    data = buf.getvalue()
    before = sys.getrefcount(data)
    (e1,) = clip.image_embeddings([data])
    images._cache.clear()  # the bounded decode cache is not under test here
    assert sys.getrefcount(data) == before
    (e2,) = clip.image_embeddings([bytes(bytearray(data))])  # equal content, other object
    assert e1 is not None and e2 is e1
