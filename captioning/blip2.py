"""BLIP-2 loading (hub id or local directory, offline-aware) and batched caption generation.

Loading: a hub id resolves through the Hugging Face cache (`HF_HUB_OFFLINE=1`
or `local_files_only` never touch the network); a directory is used as it is.
Missing weights raise `ccurate.weights.WeightsNotFoundError` naming the expected location and
the command that fetches them - there is no fallback model.

Generation keeps the GPU busy: JPEG decode + resize run on a thread pool ahead
of the GPU (PIL releases the GIL), uint8 pixels travel to the device pinned and
are normalised there, the vision encoder + Q-Former run in sub-batches as soon
as their images are decoded, and the language model decodes the whole GPU
batch at once (`fastgen.GreedyOPT` for greedy OPT, HF `generate` otherwise).
An out-of-memory error (cuBLAS/cuDNN allocation failures included) halves the
batch size (sticky) and retries; a single image that still does not fit gets no
caption and is listed in `Blip2Captioner.oom_lost`: the stage then leaves its shard
unfinished, so a rerun captions it.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ccurate.captioning.config import DEFAULT_MODEL, CaptionConfig
from ccurate.executor import usable_cpus
from ccurate.pixels import jpeg_size, upright_rgb
from ccurate.weights import (
    WeightsNotFoundError,
    fetch_command,
    files_sha256,
    hub_cache,
    hub_offline,
)

log = logging.getLogger("ccurate.captioning")

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
MODEL_FILE_PATTERNS = ("*.json", "*.txt", "*.model", "*.tiktoken")
"""Config, generation, tokenizer and processor files: a download's files besides the weights."""
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ENCODE_BATCH = 128
"""Images per vision-encoder call: big enough for full GEMMs, small enough to start early."""
OOM_MESSAGES = (
    "out of memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "can't allocate memory",  # PyTorch's CPU allocator
)
"""Lower-cased parts of RuntimeError messages that mean an allocation failed: halving the
batch helps (as accelerate's `should_reduce_batch_size` recognises them)."""
OOM_GIVE_UP = 8
"""Images in a row that do not fit alone before `caption` stops trying the rest of its call
(they are `oom_lost` too): with the GPU held elsewhere, each try only costs time."""


@dataclass(frozen=True)
class ResolvedWeights:
    path: Path
    model_id: str
    revision: str


def _hub_cache_dir(model_id: str) -> Path:
    return Path(hub_cache()) / ("models--" + model_id.replace("/", "--"))


def _has_weights(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        next(path.glob(pat), None) is not None for pat in WEIGHT_PATTERNS
    )


def _missing_files(path: Path) -> list[str]:
    """What a model folder with config and weights still lacks to load: the shards its
    `*.index.json` lists, the image processor's config and the tokenizer's files (an
    interrupted or `--include`-filtered download). Transformers' own errors for these point
    at huggingface.co and name neither the folder nor a fetch command."""
    missing: list[str] = []
    for index in sorted(path.glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            missing.append(f"a readable {index.name}")
            continue
        missing += sorted(str(f) for f in shards if not (path / str(f)).is_file())
    if not any((path / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        missing.append("preprocessor_config.json or processor_config.json (the image processor)")
    tokenizer = (
        (path / "tokenizer.json").is_file()
        or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())
        or next(path.glob("*.model"), None) is not None  # sentencepiece (Flan-T5)
    )
    if not tokenizer:
        missing.append("the tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    return missing


def _git_blob_sha1(path: Path) -> str:
    """Git's object id of a file: the etag the hub gives (and `hf download` records) for
    files stored without LFS (configs, tokenizer files)."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def _downloaded_commit(path: Path, files: list[Path]) -> str | None:
    """The commit `hf download --local-dir` recorded, if every one of `files` still holds
    the bytes it downloaded; else None.

    Each file's `.cache/huggingface/download/<name>.metadata` holds the commit and the
    file's etag (the SHA-256 of an LFS file such as the weights, the git object id of
    others). A model retrained or edited in place keeps the metadata but not the bytes, so
    the commit is trusted only when every file's content matches its etag (the weights'
    digests come from `files_sha256`, read once per machine)."""
    meta = path / ".cache" / "huggingface" / "download"
    if not meta.is_dir() or not files:
        return None
    commits: set[str] = set()
    lfs: dict[Path, str] = {}
    for f in files:
        try:
            lines = (meta / f"{f.name}.metadata").read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            return None
        if len(lines) < 2 or not re.fullmatch(r"[0-9a-f]{40}", lines[0].strip()):
            return None
        commits.add(lines[0].strip())
        etag = lines[1].strip().strip('"').lower()
        if re.fullmatch(r"[0-9a-f]{64}", etag):
            lfs[f] = etag
        elif not re.fullmatch(r"[0-9a-f]{40}", etag) or _git_blob_sha1(f) != etag:
            return None
    if len(commits) != 1:
        return None
    digests = files_sha256(sorted(lfs))
    if any(digests[f] != etag for f, etag in lfs.items()):
        return None
    return commits.pop()


def _model_files(path: Path) -> list[Path]:
    """The files `from_pretrained` reads: configs, tokenizer, and the weights (safetensors
    when there are any, as transformers prefers them)."""
    files = {f for pat in MODEL_FILE_PATTERNS for f in path.glob(pat)}
    for pat in WEIGHT_PATTERNS:
        weights = set(path.glob(pat))
        if weights:
            files |= weights
            break
    return sorted(f for f in files if f.is_file())


def _local_revision(path: Path) -> str:
    """The commit a directory was downloaded at (if its files are still those bytes), or a
    short hash of its contents.

    The hash covers every byte of the model's files: a fine-tune has the same file
    names and sizes as its base, and must not be served the base's cached captions.
    It is the cache key on every node, so it depends on content only (not on paths
    or mtimes); `files_sha256` reads each file once per machine, not once per worker
    and run, while the file stays the same. A folder from `hf download --local-dir` is
    named by its commit only while every model file matches what was downloaded
    (`_downloaded_commit`): retrained in place, it gets a content hash.
    """
    files = _model_files(path)
    commit = _downloaded_commit(path, files)
    if commit is not None:
        return commit
    if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name):
        return path.name
    h = hashlib.sha256()
    digests = files_sha256(files)
    for f, digest in digests.items():
        h.update(f"{f.name}:{digest}\n".encode())
    return "local-" + h.hexdigest()[:12]


def _local_model_id(path: Path, configured: str | None) -> str:
    if configured:
        return configured
    try:
        name = json.loads((path / "config.json").read_text()).get("_name_or_path") or ""
    except (OSError, ValueError):
        name = ""
    if isinstance(name, str) and HUB_ID.match(name) and not Path(name).exists():
        return name
    return path.name


def resolve_weights(cfg: CaptionConfig) -> ResolvedWeights:
    """Find the weights of `cfg.model` on disk (downloading only when online and allowed)."""
    if cfg.model is None:
        raise ValueError("no caption model configured")
    spec = cfg.model
    local = Path(spec).expanduser()
    if local.is_dir():
        if not _has_weights(local):
            hint = cfg.model_id or DEFAULT_MODEL
            raise WeightsNotFoundError(
                f"no BLIP-2 weights in {local.resolve()} (expected config.json and "
                f"*.safetensors there). Fetch them with: "
                f"{fetch_command(hint, local_dir=local.resolve())}"
            )
        path = local.resolve()
        _check_complete(path, fetch_command(cfg.model_id or DEFAULT_MODEL, local_dir=path))
        return ResolvedWeights(path, _local_model_id(path, cfg.model_id), _local_revision(path))
    if not HUB_ID.match(spec) or spec.startswith((".", "/", "~")):
        raise WeightsNotFoundError(
            f"no BLIP-2 weights at {local.resolve()} (directory does not exist). Fetch them "
            f"with: {fetch_command(cfg.model_id or DEFAULT_MODEL, local_dir=local.resolve())}"
        )
    offline = cfg.local_files_only or hub_offline()
    from huggingface_hub import snapshot_download

    try:
        snap = snapshot_download(
            spec,
            revision=cfg.revision,
            local_files_only=offline,
            allow_patterns=[*MODEL_FILE_PATTERNS, "*.safetensors"],
        )
    except Exception as exc:
        where = _hub_cache_dir(spec)
        why = "HF_HUB_OFFLINE=1 / local_files_only and not cached" if offline else str(exc)
        raise WeightsNotFoundError(
            f"BLIP-2 weights {spec!r}"
            f"{'@' + cfg.revision if cfg.revision else ''} not found ({why}); expected in the "
            f"Hugging Face cache at {where} (no local directory {local.resolve()} either). "
            f"Fetch them with: {fetch_command(spec)}  "
            f'(or `{fetch_command(spec, local_dir="<dir>")}` and set [caption] model = "<dir>")'
        ) from exc
    path = Path(snap)
    if not _has_weights(path):
        raise WeightsNotFoundError(
            f"the cached snapshot {path} of {spec!r} has no safetensors weights; fetch them "
            f"with: {fetch_command(spec)}"
        )
    _check_complete(path, fetch_command(spec))
    return ResolvedWeights(path, spec, _local_revision(path))


def _check_complete(path: Path, fetch: str) -> None:
    missing = _missing_files(path)
    if missing:
        raise WeightsNotFoundError(
            f"incomplete BLIP-2 model folder {path}: it has config.json and weights but "
            f"lacks {'; '.join(missing)} (an interrupted or filtered download?). Fetch the "
            f"whole model with: {fetch}"
        )


def _num(x: float) -> str:
    """A float setting exactly (`repr`: the shortest text that reads back as the same
    float), so settings that differ in any digit never share a cache key."""
    return repr(float(x))


def decoding_tag(cfg: CaptionConfig) -> str:
    """The decoding settings as they appear in `caption_model` and the cache key."""
    parts: list[str] = []
    if cfg.do_sample:  # with num_beams > 1 too: HF then samples within beams
        parts.append(
            f"sample(top_p={_num(cfg.top_p)},temp={_num(cfg.temperature)},seed={cfg.seed})"
        )
    if cfg.num_beams > 1:
        parts.append(f"beam{cfg.num_beams}")
        if cfg.length_penalty != 1.0:
            parts.append(f"lp{_num(cfg.length_penalty)}")
    if not parts:
        parts.append("greedy")
    parts.append(f"max{cfg.max_new_tokens}")
    if cfg.min_new_tokens:
        parts.append(f"min{cfg.min_new_tokens}")
    if cfg.repetition_penalty != 1.0:
        parts.append(f"rep{_num(cfg.repetition_penalty)}")
    if cfg.num_captions > 1:
        parts.append(f"n{cfg.num_captions}")
    parts.append(f"prompt={cfg.prompt}")
    return "|".join(parts)


def precision_tag(dtype: torch.dtype, device: torch.device) -> str:
    """The precision captions are computed in, as `caption_model` records it: the model's
    dtype ("fp32", "bf16", "fp16") and the process-wide settings that change its results -
    on a GPU, TF32 convolutions ("-convtf32", PyTorch's default) and reduced-precision
    float32 matmuls ("-mmhigh" = TF32, "-mmmedium" = bf16), and full-precision reductions
    in fp16/bf16 matmuls ("-fullreduce"). `dtype = "auto"` is bf16/fp16 on a GPU and fp32 on
    a CPU: their captions differ, so they must not share cache rows."""
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    tag = names.get(dtype, str(dtype).removeprefix("torch."))
    if dtype == torch.float32:
        mm = torch.get_float32_matmul_precision()
        if mm != "highest":
            tag += f"-mm{mm}"
        if device.type == "cuda" and torch.backends.cudnn.allow_tf32:
            tag += "-convtf32"
    elif device.type == "cuda":
        matmul = torch.backends.cuda.matmul
        reduced = (
            matmul.allow_bf16_reduced_precision_reduction
            if dtype == torch.bfloat16
            else matmul.allow_fp16_reduced_precision_reduction
        )
        if not reduced:
            tag += "-fullreduce"
    return tag


def caption_model_tag(model_id: str, revision: str, cfg: CaptionConfig, precision: str) -> str:
    """E.g. "Salesforce/blip2-opt-2.7b@51572668...|bf16|greedy|max30|min1|prompt=a photo of"
    (`precision_tag`: the dtype in effect, not `[caption] dtype = "auto"`)."""
    return f"{model_id}@{revision}|{precision}|{decoding_tag(cfg)}"


def pick_device(spec: str) -> torch.device:
    """ "auto"/"cuda": one GPU per worker - LOCAL_RANK if set, else the pool worker's number.

    Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so it sees cuda:0.
    """
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda:"):
        return torch.device(spec)
    if spec not in {"auto", "cuda"}:
        raise ValueError(f"unknown device {spec!r} (auto, cpu, cuda, cuda:N)")
    if not torch.cuda.is_available():
        if spec == "cuda":
            raise RuntimeError("[caption] device = cuda but no CUDA device is visible")
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if os.environ.get("LOCAL_RANK", "").isdigit():
        index = int(os.environ["LOCAL_RANK"])
    else:
        ident = multiprocessing.current_process()._identity
        index = ident[0] - 1 if ident else 0
    return torch.device(f"cuda:{index % n}")


def pick_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec != "auto":
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
            spec
        ]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _cv2_decode(data: bytes, height: int, width: int) -> np.ndarray | None:
    """RGB uint8 via OpenCV, which holds no GIL while it decodes; None if it cannot.

    Large JPEGs are decoded at a reduced DCT scale no smaller than twice the
    target (PIL's `draft` rule): several times cheaper, same bicubic result in
    practice. EXIF orientation is applied (OpenCV's default): the caption describes the
    image as viewers see it, whose size the record holds (a kept-original phone photo is
    stored sideways with an orientation tag).
    """
    import cv2

    flags = cv2.IMREAD_COLOR
    size = jpeg_size(data)
    if size is not None:
        scale = min(size[0] // (2 * width), size[1] // (2 * height))
        for factor, reduced in (
            (8, cv2.IMREAD_REDUCED_COLOR_8),
            (4, cv2.IMREAD_REDUCED_COLOR_4),
            (2, cv2.IMREAD_REDUCED_COLOR_2),
        ):
            if scale >= factor:
                flags = reduced
                break
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
        return None
    rgb: np.ndarray = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return rgb


def load_image(data: bytes, height: int, width: int, resample: int) -> np.ndarray | None:
    """Decode + RGB + resize to the model's input size -> uint8 HWC; None when undecodable.

    Runs on the decode threads, next to the thread that launches GPU work: both
    steps hold no GIL while they compute (OpenCV decode, PIL resize), so decoding
    does not starve the launcher. The resize is PIL's antialiased bicubic, as in
    BLIP's image processor. Formats OpenCV lacks (GIF, ...) and images that are not
    plain 8-bit RGB or grey (alpha, transparency keys, palettes, 16-bit, CMYK) go through
    PIL and `upright_rgb`, the project's one rule (EXIF orientation, tolerant of malformed
    tags, then alpha over white): OpenCV would drop the alpha and caption hidden pixels
    the filters never saw.
    """
    from PIL import Image

    try:
        try:
            with Image.open(io.BytesIO(data)) as probe:  # header only: cheap
                plain = probe.mode in ("RGB", "L") and "transparency" not in probe.info
        except Exception:  # let OpenCV try what PIL cannot open
            plain = True
        arr = _cv2_decode(data, height, width) if plain else None
        if arr is not None:
            rgb = Image.fromarray(arr)
        else:
            with Image.open(io.BytesIO(data)) as im:
                im.draft("RGB", (width * 2, height * 2))
                im.load()  # `upright_rgb` returns an upright RGB image itself, still lazy
                rgb = upright_rgb(im)
        rgb = rgb.resize((width, height), resample=resample)
        return np.asarray(rgb, dtype=np.uint8)
    except Exception as exc:  # corrupt or unsupported bytes: no caption, the run goes on
        log.warning("caption: cannot decode image (%s)", exc)
        return None


def _image_size(size: Any) -> tuple[int, int]:
    """(height, width) from an image processor's `size` (dict, SizeDict or int)."""
    if isinstance(size, int):
        return size, size
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    h = get("height") or get("shortest_edge")
    w = get("width") or get("shortest_edge")
    if not h or not w:
        raise ValueError(f"unsupported image processor size {size!r}")
    return int(h), int(w)


def _is_oom(exc: BaseException) -> bool:
    """An allocation failure: `OutOfMemoryError`, or a RuntimeError whose message says so
    (cuBLAS and cuDNN report a failed workspace allocation as `*_STATUS_ALLOC_FAILED`)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(m in text for m in OOM_MESSAGES)


class _OutOfMemory:
    """Marks, inside `Blip2Captioner.caption`, an image that did not fit even alone."""


_OOM = _OutOfMemory()
_Row = list[str] | None | _OutOfMemory


class Blip2Captioner:
    """A loaded BLIP-2 + processor on one device, with decoding settings from the config."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        cfg: CaptionConfig,
        model_id: str,
        revision: str,
        device: torch.device | None = None,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model_id = model_id
        self.revision = revision
        self.device = device or next(model.parameters()).device
        self.dtype = next(model.language_model.parameters()).dtype
        self.precision = precision_tag(self.dtype, self.device)
        self.tag = caption_model_tag(model_id, revision, cfg, self.precision)
        mc = model.config
        self.decoder_only = bool(mc.use_decoder_only_language_model)

        ip = processor.image_processor
        self.height, self.width = _image_size(ip.size)
        resample = getattr(ip, "resample", 3)
        self.resample = int(resample) if isinstance(resample, int) else 3  # PIL BICUBIC
        rescale = float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else 1.0
        mean = np.asarray(ip.image_mean if getattr(ip, "do_normalize", True) else [0, 0, 0])
        std = np.asarray(ip.image_std if getattr(ip, "do_normalize", True) else [1, 1, 1])
        # pixel*rescale normalised = pixel*scale - shift
        self._scale = torch.tensor(rescale / std, dtype=torch.float32, device=self.device)
        self._shift = torch.tensor(mean / std, dtype=torch.float32, device=self.device)
        self._scale = self._scale.view(1, 3, 1, 1)
        self._shift = self._shift.view(1, 3, 1, 1)

        image_token = mc.image_token_index
        if image_token is None:
            image_token = self.tokenizer.convert_tokens_to_ids("<image>")
        text_ids = self.tokenizer(cfg.prompt, add_special_tokens=True)["input_ids"]
        ids = [int(image_token)] * int(mc.num_query_tokens) + [int(t) for t in text_ids]
        self.prompt_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        self.image_pos = torch.nonzero(self.prompt_ids == int(image_token)).flatten()
        self._check_length(mc)
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else mc.text_config.eos_token_id
        eos_list = [] if eos is None else eos if isinstance(eos, list) else [eos]
        self.eos_ids = [int(e) for e in eos_list]
        pad = gen.pad_token_id if gen.pad_token_id is not None else mc.text_config.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0))

        self.fast: Any = None
        if self._fast_possible():
            from ccurate.captioning.fastgen import GreedyOPT

            self.fast = GreedyOPT(
                model.language_model, self.eos_ids, self.pad_id, use_graphs=cfg.cuda_graphs
            )
        self.batch_size = cfg.batch_size or self._auto_batch_size()
        workers = cfg.decode_workers or max(1, min(12, usable_cpus() - 1))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="caption-decode")
        self.failed = 0
        self.oom_lost: list[int] = []
        """Indices, in the last `caption` call, of images left without a caption because
        they did not fit in memory even alone (not undecodable: a rerun may caption them)."""
        self.oom_streak = 0
        """Images in a row that did not fit alone in this `caption` call."""

    # ---- construction -----------------------------------------------------
    @classmethod
    def load(cls, cfg: CaptionConfig) -> Blip2Captioner:
        """Resolve the weights, load model + processor on the configured device and dtype."""
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        weights = resolve_weights(cfg)
        device = pick_device(cfg.device)
        dtype = pick_dtype(cfg.dtype, device)
        log.info(
            "caption: loading %s from %s on %s (%s)", weights.model_id, weights.path, device, dtype
        )
        model: Any = Blip2ForConditionalGeneration.from_pretrained(
            weights.path, dtype=dtype, local_files_only=True, attn_implementation="sdpa"
        )
        # HF keeps the Q-Former in fp32; LAVIS runs it under fp16 autocast. One dtype
        # throughout keeps the GEMMs on tensor cores and matches LAVIS.
        model.to(device=device, dtype=dtype).eval()
        processor = Blip2Processor.from_pretrained(weights.path, local_files_only=True)
        return cls(model, processor, cfg, weights.model_id, weights.revision, device)

    def _check_length(self, mc: Any) -> None:
        """Prompt + `max_new_tokens` must fit the decoder's learned positions (OPT: 2048):
        beyond them both decode paths fail on every batch, so refuse it at load."""
        if not self.decoder_only:
            return  # T5's relative positions have no such limit
        limit = getattr(mc.text_config, "max_position_embeddings", None)
        if not isinstance(limit, int):
            return
        prompt = len(self.prompt_ids)
        if prompt + self.cfg.max_new_tokens > limit:
            raise ValueError(
                f"[caption] max_new_tokens = {self.cfg.max_new_tokens} does not fit the "
                f"model: its language model has {limit} positions "
                f"(max_position_embeddings) and the prompt takes {prompt} "
                f"({int(mc.num_query_tokens)} image query tokens + the text prompt), so "
                f"max_new_tokens must be <= {limit - prompt}"
            )

    def _fast_possible(self) -> bool:
        from ccurate.captioning.fastgen import supports

        c = self.cfg
        return (
            c.fast_decode
            and self.decoder_only
            and c.num_beams == 1
            and not c.do_sample
            and c.num_captions == 1
            and supports(self.model)
        )

    def _auto_batch_size(self) -> int:
        """Largest power of two whose activations + KV cache fit in 70% of free memory."""
        cap = self.cfg.max_batch_size
        if self.device.type != "cuda":
            return min(cap, 16)
        mc = self.model.config
        el = torch.finfo(self.dtype).bits // 8
        v, t = mc.vision_config, mc.text_config
        n_vis = (int(v.image_size) // int(v.patch_size)) ** 2 + 1
        vision = n_vis * (2 * int(v.intermediate_size) + 4 * int(v.hidden_size)) * el
        vision = vision * min(ENCODE_BATCH, cap) // cap  # encoded in sub-batches
        seq = len(self.prompt_ids) + self.cfg.max_new_tokens
        layers = int(getattr(t, "num_hidden_layers", getattr(t, "num_layers", 32)))
        hidden = int(getattr(t, "hidden_size", getattr(t, "d_model", 2560)))
        ffn = int(getattr(t, "ffn_dim", getattr(t, "d_ff", 4 * hidden)))
        beams = max(self.cfg.num_beams, self.cfg.num_captions)
        kv = 2 * layers * seq * hidden * el * beams
        prefill = len(self.prompt_ids) * (4 * hidden + 2 * ffn) * el * beams
        logits = int(getattr(t, "vocab_size", 50272)) * 4 * 3 * beams
        per_image = vision + kv + prefill + logits
        free, _ = torch.cuda.mem_get_info(self.device)
        fit = max(1, int(free * 0.7 // per_image))
        size = 1 << (min(fit, cap).bit_length() - 1)
        log.info(
            "caption: GPU batch %d (%.1f MB/image, %.1f GB free)",
            size,
            per_image / 2**20,
            free / 2**30,
        )
        return size

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.fast is not None:
            self.fast.reset()

    # ---- the work ---------------------------------------------------------
    def caption(self, images: Sequence[bytes | None]) -> list[list[str] | None]:
        """Captions (num_captions per image, best first) for encoded images; None = failed:
        undecodable, or out of memory even alone (those are listed in `oom_lost`)."""
        n = len(images)
        out: list[_Row] = [None] * n
        self.oom_streak = 0  # each call tries again: memory may have come back
        futures: list[Future[np.ndarray | None] | None] = [None] * n
        submitted = 0

        def submit_until(end: int) -> None:
            nonlocal submitted
            while submitted < min(end, n):
                data = images[submitted]
                if data is not None:
                    futures[submitted] = self._pool.submit(
                        load_image, data, self.height, self.width, self.resample
                    )
                submitted += 1

        pos = 0
        with torch.inference_mode():
            while pos < n:
                if self.oom_streak >= OOM_GIVE_UP:  # memory is not coming back soon
                    log.error("caption: %d images in a row did not fit alone", self.oom_streak)
                    out[pos:] = [_OOM] * (n - pos)
                    break
                end = min(n, pos + self.batch_size)
                submit_until(end + 2 * self.batch_size)  # decode two batches ahead
                chunk = futures[pos:end]
                out[pos:end] = self._run_chunk(chunk)
                pos = end
        self.oom_lost = [i for i, r in enumerate(out) if r is _OOM]
        return [None if isinstance(r, _OutOfMemory) else r for r in out]

    def _run_chunk(self, futs: Sequence[Future[np.ndarray | None] | None]) -> list[_Row]:
        """One GPU batch with OOM back-off: halve (sticky) and retry the two halves."""
        oom = False
        try:
            result: list[_Row] = list(self._run_batch(futs))
            self.oom_streak = 0
            return result
        except Exception as exc:
            if not _is_oom(exc):
                raise
            oom = True  # handled below, outside `except`, so the traceback's tensors are freed
        assert oom
        if self.fast is not None:
            self.fast.reset()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(futs) <= 1:
            self.failed += len(futs)
            self.oom_streak += len(futs)
            log.error("caption: out of memory on a single image; left without caption")
            return [_OOM] * len(futs)
        half = len(futs) // 2
        if half < self.batch_size:
            log.warning("caption: out of memory at batch %d; retrying at %d", len(futs), half)
            self.batch_size = half
        out: list[_Row] = []
        while len(out) < len(futs):  # pieces of the (possibly shrinking) batch size
            out += self._run_chunk(futs[len(out) : len(out) + self.batch_size])
        return out

    def _run_batch(
        self, futs: Sequence[Future[np.ndarray | None] | None]
    ) -> list[list[str] | None]:
        rows: list[int] = []
        parts: list[torch.Tensor] = []
        pending: list[np.ndarray] = []
        undecodable = 0  # counted once the batch is done: an OOM retry sees them again
        enc = min(ENCODE_BATCH, max(1, self.batch_size))
        for i, fut in enumerate(futs):
            arr = fut.result() if fut is not None else None
            if arr is None:
                undecodable += 1
                continue
            rows.append(i)
            pending.append(arr)
            if len(pending) == enc:  # start the GPU on what is decoded while the rest decodes
                parts.append(self.encode(self._stack(pending)))
                pending = []
        if pending:
            parts.append(self.encode(self._stack(pending)))
        result: list[list[str] | None] = [None] * len(futs)
        if rows:
            texts = self.generate(torch.cat(parts) if len(parts) > 1 else parts[0])
            for i, caps in zip(rows, texts, strict=True):
                result[i] = caps
        self.failed += undecodable
        return result

    def _stack(self, arrays: list[np.ndarray]) -> torch.Tensor:
        shape = (len(arrays), *arrays[0].shape)
        pin = self.device.type == "cuda"
        buf = torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
        np.stack(arrays, out=buf.numpy())
        return buf

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> language-model input embeddings [B, P, D] (image + prompt)."""
        m = self.model
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = (x * self._scale - self._shift).to(self.dtype)
        image_embeds = m.vision_model(pixel_values=x, return_dict=True).last_hidden_state
        queries = m.query_tokens.expand(image_embeds.shape[0], -1, -1)
        q = m.qformer(
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(
                image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device
            ),
            return_dict=True,
        ).last_hidden_state
        lang = m.language_projection(q.to(image_embeds.dtype))
        prompt = m.get_input_embeddings()(self.prompt_ids)  # [P, D]
        embeds = prompt.unsqueeze(0).repeat(lang.shape[0], 1, 1)
        embeds[:, self.image_pos] = lang.to(embeds.dtype)
        result: torch.Tensor = embeds
        return result

    def generate(self, embeds: torch.Tensor) -> list[list[str]]:
        """Decode captions for one GPU batch of prompt embeddings (the expensive call)."""
        c = self.cfg
        b, p, _ = embeds.shape
        if self.fast is not None:
            tokens = self.fast.generate(
                embeds,
                self.prompt_ids,
                max_new_tokens=c.max_new_tokens,
                min_new_tokens=c.min_new_tokens,
                repetition_penalty=c.repetition_penalty,
            )
        else:
            kwargs: dict[str, Any] = {
                "inputs_embeds": embeds,
                "attention_mask": torch.ones(b, p, dtype=torch.long, device=embeds.device),
                # the fast path's and `_decode`'s EOS / pad (the checkpoint's generation
                # config); the language model's own, which `generate` reads, may differ
                "eos_token_id": self.eos_ids or None,
                "pad_token_id": self.pad_id,
                "max_new_tokens": c.max_new_tokens,
                "min_new_tokens": c.min_new_tokens,
                "num_beams": c.num_beams,
                "do_sample": c.do_sample,
                "repetition_penalty": c.repetition_penalty,
                "num_return_sequences": c.num_captions,
            }
            if c.num_beams > 1:
                kwargs["length_penalty"] = c.length_penalty
            if c.do_sample:
                kwargs.update(top_p=c.top_p, temperature=c.temperature)
                torch.manual_seed(c.seed)
            if self.decoder_only:
                kwargs["input_ids"] = self.prompt_ids.unsqueeze(0).expand(b, -1)
            tokens = self.model.language_model.generate(**kwargs)
            if self.decoder_only:
                tokens = tokens[:, p:]
        texts = self._decode(tokens.cpu().tolist())
        n = c.num_captions
        return [texts[i * n : (i + 1) * n] for i in range(b)]

    def _decode(self, seqs: list[list[int]]) -> list[str]:
        eos = set(self.eos_ids)
        cut = []
        for seq in seqs:
            end = next((j for j, t in enumerate(seq) if t in eos), len(seq))
            cut.append(seq[:end])
        texts: list[str] = self.tokenizer.batch_decode(cut, skip_special_tokens=True)
        return [t.strip() for t in texts]
