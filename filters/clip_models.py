"""open_clip loading shared by the CLIP-score and aesthetic filters.

Weights are user-supplied (nothing is downloaded by the tests or the demo), as
one string:

- ``hf-hub:org/repo`` — an open_clip repo (config + weights), read from the
  Hugging Face cache when ``HF_HUB_OFFLINE=1``;
- a folder holding ``open_clip_config.json`` and a checkpoint (or ``local-dir:<folder>``);
- a checkpoint file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``) for the architecture
  named by ``model`` (e.g. ``ViT-L-14``); inside an open_clip export folder, the folder's
  preprocessing (mean/std, resize) and QuickGELU setting apply;
- an open_clip pretrained tag of that architecture (e.g. ``openai``), from the cache,
  built with the tag's QuickGELU setting (OpenAI's weights need it; the plain
  ``ViT-L-14`` config says GELU).

A configured source that cannot be found is an error naming the expected path
and how to fetch it; a filter whose weights are not configured is off and says
so once. Loaded models are cached per process, so the CLIP-score and aesthetic
filters share one ViT-L/14 when they name the same weights, and image
embeddings are cached per image bytes so the two do not encode an image twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ccurate.filters.images import DecodeError, decode_rgb
from ccurate.weights import (
    HF_PREFIX,
    WeightsNotFoundError,
    fetch_command,
    hub_cache,
    hub_offline,
    load_state_dict,
    weights_file,
)

log = logging.getLogger("ccurate.filters")

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
LOCAL_PREFIX = "local-dir:"

_off_logged: set[str] = set()
_off_lock = threading.Lock()


def log_off_once(key: str, message: str) -> None:
    """Log that a model-backed filter is off (once per process and filter)."""
    with _off_lock:
        if key in _off_logged:
            return
        _off_logged.add(key)
    log.warning(message)


def _fetch_hint(repo: str) -> str:
    return (
        f"fetch it on a machine with network: `{fetch_command(repo)}` (or "
        f"`{fetch_command(repo, local_dir='<folder>')}` and configure that folder)"
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class ClipSource:
    """What `open_clip.create_model` gets: a model name (maybe with schema) + pretrained."""

    model_name: str
    pretrained: str | None
    describe: str
    # QuickGELU weights (OpenAI's) in an architecture whose config says GELU: open_clip only
    # warns, and the activations (so every embedding) come out wrong
    quick_gelu: bool = False
    # the preprocessing an open_clip export folder declares for a checkpoint file inside it
    # (JSON, hashable for the model cache); None: the architecture's or the tag's own
    preprocess: str | None = None


def _folder_config(path: Path) -> dict[str, Any]:
    """The open_clip_config.json next to a checkpoint file (an `hf download` folder), or {}."""
    cfg = path.parent / "open_clip_config.json"
    try:
        data = json.loads(cfg.read_text()) if cfg.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _checkpoint_in(folder: Path) -> bool:
    """Whether open_clip's local-dir loader finds a checkpoint in `folder`."""
    return any(p.is_file() for ext in ("*.safetensors", "*.bin", "*.pth") for p in folder.glob(ext))


def resolve_clip_source(model: str, weights: str, key: str) -> ClipSource:
    """Map the user's weights string to open_clip arguments; missing local paths raise.

    `key` is the config key (e.g. ``filters.clip_score.weights``) named in errors.
    """
    w = weights.strip()
    if w.startswith(HF_PREFIX):
        return ClipSource(w, None, w)
    if w.startswith(LOCAL_PREFIX):
        w = w[len(LOCAL_PREFIX) :]
    path = Path(w).expanduser()
    if path.is_dir():
        cfg = path / "open_clip_config.json"
        if not cfg.is_file():
            raise WeightsNotFoundError(
                f"{key} = {weights!r}: folder has no open_clip_config.json (expected {cfg}); "
                "point it at an open_clip export (config + open_clip_model.safetensors) "
                f"or at a checkpoint file for model {model!r}"
            )
        if not _checkpoint_in(path):  # open_clip would fail with a bare "could not be loaded"
            raise WeightsNotFoundError(
                f"{key} = {weights!r}: folder has open_clip_config.json but no checkpoint "
                f"(expected {path / 'open_clip_model.safetensors'} or "
                f"{path / 'open_clip_pytorch_model.bin'}); fetch the full export, e.g. "
                f"`hf download <org>/<repo> --local-dir {path}`"
            )
        return ClipSource(f"{LOCAL_PREFIX}{path}", None, str(path))
    if path.is_file():
        folder = _folder_config(path)
        model_cfg = folder.get("model_cfg")
        pre = folder.get("preprocess_cfg")
        if isinstance(pre, dict):  # the input size is the architecture's, not the folder's
            pre = {k: v for k, v in pre.items() if k != "size"}
        return ClipSource(
            model,
            str(path),
            str(path),
            quick_gelu=isinstance(model_cfg, dict) and bool(model_cfg.get("quick_gelu")),
            preprocess=json.dumps(pre, sort_keys=True) if isinstance(pre, dict) and pre else None,
        )
    import open_clip

    if model in open_clip.list_models() and w in open_clip.list_pretrained_tags_by_model(model):
        from open_clip.pretrained import get_pretrained_cfg

        tag_qg = bool(get_pretrained_cfg(model, w).get("quick_gelu", False))
        model_qg = bool((open_clip.get_model_config(model) or {}).get("quick_gelu", False))
        return ClipSource(model, w, f"{model}/{w}", quick_gelu=tag_qg and not model_qg)
    raise WeightsNotFoundError(
        f"{key} = {weights!r}: no such file or folder (expected {path.resolve()}) and not an "
        f"open_clip tag of {model!r}. Put the weights there, e.g. "
        f"`hf download laion/CLIP-ViT-L-14-laion2B-s32B-b82K --local-dir {path}`, "
        "or set it to 'hf-hub:<org>/<repo>' with the repo in the local Hugging Face cache"
    )


@dataclass
class ClipModel:
    """A loaded open_clip model with its eval transform and tokenizer."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    device: torch.device
    embed_dim: int
    source: str
    # keyed by a digest of the bytes: holding the bytes themselves kept up to `cache_size`
    # encoded images (hundreds of MB to GB per worker) alive after their batch was gone
    _emb_cache: OrderedDict[bytes, np.ndarray] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    cache_size: int = 4096

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """L2-normalised image embeddings, float32 [n, d]."""
        return self._encode([self.preprocess(im) for im in images])

    @torch.inference_mode()
    def _encode(self, inputs: list[torch.Tensor]) -> np.ndarray:
        """Embeddings of preprocessed images (the model's small inputs), one batch."""
        if not inputs:
            return np.zeros((0, self.embed_dim), np.float32)
        batch = torch.stack(inputs).to(self.device)
        feats = self.model.encode_image(batch)  # type: ignore[operator]
        feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy().astype(np.float32)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised text embeddings, float32 [n, d]."""
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        tokens = self.tokenizer(texts).to(self.device)
        feats = self.model.encode_text(tokens)  # type: ignore[operator]
        feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy().astype(np.float32)

    def image_embeddings(
        self, datas: list[bytes | None], batch_size: int = 32
    ) -> list[np.ndarray | None]:
        """Embeddings of encoded images (None where undecodable), cached per image content.

        Each image is decoded and preprocessed on its own, and only its small model input
        waits for the batch: holding the decodes would grow memory with batch size times
        image size. A batch is `batch_size` cache misses that decode, in order, whatever
        their size (the batch's makeup can change an embedding's last bits)."""
        out: list[np.ndarray | None] = [None] * len(datas)
        todo: list[tuple[int, bytes]] = []  # all lookups first: misses alone form the batches
        for i, data in enumerate(datas):
            if not data:
                continue
            digest = hashlib.blake2b(data, digest_size=16).digest()
            with self._lock:
                hit = self._emb_cache.get(digest)
                if hit is not None:
                    self._emb_cache.move_to_end(digest)
            if hit is not None:
                out[i] = hit
            else:
                todo.append((i, digest))
        chunk: list[tuple[int, bytes, torch.Tensor]] = []
        for i, digest in todo:
            try:
                chunk.append((i, digest, self.preprocess(decode_rgb(datas[i]))))
            except DecodeError:
                continue
            if len(chunk) == batch_size:
                self._store(chunk, out)
                chunk = []
        if chunk:
            self._store(chunk, out)
        return out

    def _store(
        self, chunk: list[tuple[int, bytes, torch.Tensor]], out: list[np.ndarray | None]
    ) -> None:
        """Encode one batch of preprocessed inputs; record and cache the embeddings."""
        embs = self._encode([x for _, _, x in chunk])
        with self._lock:
            for (i, digest, _), emb in zip(chunk, embs, strict=True):
                out[i] = emb
                self._emb_cache[digest] = emb
            while len(self._emb_cache) > self.cache_size:
                self._emb_cache.popitem(last=False)


def _cached_snapshot(repo: str) -> str:
    """The cached snapshot folder of an open_clip hub repo, without touching the network."""
    from huggingface_hub import snapshot_download

    return str(snapshot_download(repo, cache_dir=hub_cache(), local_files_only=True))


def _cached_tag(model: str, tag: str) -> tuple[str, dict[str, Any]]:
    """An open_clip tag's weights file from the hub cache (offline), with the tag's
    preprocessing, which open_clip applies only when it resolves the tag itself."""
    import os

    from huggingface_hub import hf_hub_download
    from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives, get_pretrained_cfg

    cfg = get_pretrained_cfg(model, tag)
    pre = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    if cfg.get("file"):
        return str(cfg["file"]), pre
    if not cfg.get("hf_hub"):
        raise FileNotFoundError(f"tag {tag!r} of {model!r} has no hub copy to read offline")
    repo, filename = os.path.split(str(cfg["hf_hub"]))
    filename = filename or HF_WEIGHTS_NAME
    err: Exception | None = None
    for name in [*_get_safe_alternatives(filename), filename]:  # open_clip's own order
        try:
            return hf_hub_download(repo, name, cache_dir=hub_cache(), local_files_only=True), pre
        except Exception as e:  # not cached under this name
            err = err or e
    assert err is not None
    raise err


_loaded: dict[tuple[str, str | None, str, bool, str | None], ClipModel] = {}
_load_lock = threading.Lock()


def load_clip(model: str, weights: str, device: str = "auto", key: str = "weights") -> ClipModel:
    """Load (once per process) the CLIP model named by `model` + `weights`."""
    src = resolve_clip_source(model, weights, key)
    dev = resolve_device(device)
    cache_key = (src.model_name, src.pretrained, str(dev), src.quick_gelu, src.preprocess)
    with _load_lock:
        if cache_key in _loaded:
            return _loaded[cache_key]
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        name, pretrained = src.model_name, src.pretrained
        force_pre = json.loads(src.preprocess) if src.preprocess else None
        try:
            # huggingface_hub reads HF_HUB_OFFLINE once, at import: set later (as tests and
            # wrappers do), open_clip's downloads would still go to the network
            if name.startswith(HF_PREFIX) and hub_offline():
                name = f"{LOCAL_PREFIX}{_cached_snapshot(name[len(HF_PREFIX) :])}"
            elif pretrained and not Path(pretrained).exists() and hub_offline():
                pretrained, force_pre = _cached_tag(name, pretrained)
            clip = open_clip.create_model(
                name,
                pretrained,
                cache_dir=hub_cache(),
                device=dev,
                pretrained_text=False,
                require_pretrained=True,
                force_quick_gelu=src.quick_gelu,
                force_preprocess_cfg=force_pre,
            )
        except Exception as e:
            state = "HF_HUB_OFFLINE=1, so only" if hub_offline() else "looked in"
            where = f"({state} the Hugging Face cache {hub_cache()})"
            if src.model_name.startswith(HF_PREFIX):
                hint = _fetch_hint(src.model_name[len(HF_PREFIX) :])
            elif src.pretrained and not Path(src.pretrained).exists():  # an open_clip tag
                hint = (
                    "open_clip fetches tags into that cache; on a machine with network run "
                    f"`python -c \"import open_clip; open_clip.create_model('{src.model_name}', "
                    f"pretrained='{src.pretrained}')\"` and copy the cache, or configure a "
                    "checkpoint file"
                )
            else:  # a local checkpoint or folder whose weights do not fit the architecture
                raise ValueError(
                    f"{key} = {weights!r}: could not be loaded as open_clip model "
                    f"{src.model_name!r} (weights of another architecture? set the model to "
                    f"the one they were trained as): {e}"
                ) from e
            raise WeightsNotFoundError(
                f"{key} = {weights!r}: CLIP weights could not be loaded {where}: {e}. {hint}"
            ) from e
        clip.eval()
        tokenizer = open_clip.get_tokenizer(name)
        preprocess = image_transform_v2(PreprocessCfg(**clip.visual.preprocess_cfg), is_train=False)
        embed_dim = _probe_dim(clip, preprocess, dev)
        loaded = ClipModel(clip, preprocess, tokenizer, dev, embed_dim, src.describe)
        _loaded[cache_key] = loaded
        return loaded


def _probe_dim(
    clip: Any, preprocess: Callable[[Image.Image], torch.Tensor], dev: torch.device
) -> int:
    with torch.inference_mode():
        x = preprocess(Image.new("RGB", (32, 32))).unsqueeze(0).to(dev)
        return int(clip.encode_image(x).shape[-1])


class AestheticMLP(torch.nn.Module):
    """LAION improved-aesthetic-predictor head on L2-normalised CLIP ViT-L/14 embeddings.

    Same layout as the released ``sac+logos+ava1-l14-linearMSE.pth`` (keys
    ``layers.{0,2,4,6,7}.*``): 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts
    and no activations, regressing a 1-10 rating.
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        nn = torch.nn
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


AESTHETIC_HINT = (
    "The LAION improved-aesthetic-predictor head is 'sac+logos+ava1-l14-linearMSE.pth' from "
    "github.com/christophschuhmann/improved-aesthetic-predictor (fetch it on a machine with "
    "network and put it at that path)"
)


def load_aesthetic_mlp(spec: str, key: str, device: torch.device) -> AestheticMLP:
    """The aesthetic head; its input size comes from the checkpoint."""
    sd = load_state_dict(weights_file(spec, key, AESTHETIC_HINT))
    first = sd.get("layers.0.weight")
    if first is None:
        raise ValueError(
            f"{key} = {spec!r}: not an improved-aesthetic-predictor checkpoint "
            f"(no layers.0.weight; keys: {sorted(sd)[:6]})"
        )
    mlp = AestheticMLP(int(first.shape[1]))
    mlp.load_state_dict(sd, strict=True)
    return mlp.to(device).eval()


def unload_all() -> None:
    """Drop cached models (tests; a worker that wants its memory back)."""
    with _load_lock:
        _loaded.clear()
