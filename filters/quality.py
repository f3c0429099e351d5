"""Cheap image and alt-text quality checks.

Every score is computed and recorded for every decodable sample (so thresholds
can be re-tuned from the records alone); the first failing check, in the order
of `REASONS`, names the drop.

Size is judged on the image as published (`original_width/height`, set by
ingest before it resizes; ingest upscales thumbnails), aspect on the stored
image (a centre-cropped one trains square). Pixel checks judge
a grey copy whose short side is brought down to `analysis_side` (antialiased
Lanczos), so the blur score (variance of the Laplacian) of a photo is the same
whether it arrives at 256 or 2048 px. Images already below that size are judged
as they are: upsampling them would make every small image "blurry", and
smallness is `min_side`'s job. `file_too_small` measures the stored bytes.

Alt-text checks are used judiciously: CommonCanvas-style datasets train on
synthetic captions, so alt text is metadata, not a training target. By default
only whole-alt boilerplate ("logo", "click here", "image") drops; empty,
file-name-like and over-long alt text are recorded but kept (switch them on for
alt-text-trained runs).
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import cv2
import numpy as np
from PIL import Image
from pydantic import Field, model_validator

from ccurate.configbase import Section
from ccurate.filters.images import DecodeError, decode_rgb
from ccurate.record import Decision, Sample
from ccurate.stage import Filter, Resources

if TYPE_CHECKING:
    from ccurate.filters.clip_models import AestheticMLP, ClipModel

REASONS: dict[str, str] = {
    "decode_error": "the image bytes could not be decoded",
    "too_small": "shorter side below quality.min_side pixels (as published: before ingest's "
    "resize, from original_width/height)",
    "bad_aspect": "long/short side ratio above quality.max_aspect",
    "file_too_small": "encoded file below quality.min_file_bytes (pixels, placeholders)",
    "low_entropy": "near-uniform image: grey entropy below quality.min_entropy bits "
    "or grey std below quality.min_std",
    "blurry": "variance of the Laplacian at analysis size below quality.min_blur",
    "alt_text_empty": "no alt text (only with quality.drop_alt_empty)",
    "alt_text_filename": "alt text is a file name such as IMG_1234.jpg "
    "(only with quality.drop_alt_filename)",
    "alt_text_boilerplate": "alt text is only boilerplate such as 'image', 'logo', 'click here'",
    "alt_text_length": "alt text shorter than quality.alt_min_chars or longer than "
    "quality.alt_max_chars",
    "clip_score_low": "CLIP image-text cosine similarity below clip_score.min_score",
    "aesthetic_low": "LAION aesthetic score below aesthetic.min_score",
    "score_invalid": "the CLIP or aesthetic model gave a NaN or infinite score (a broken "
    "embedding: the threshold cannot judge it, so it is not kept as passing)",
}

DEFAULT_BOILERPLATE: list[str] = [
    "image", "img", "photo", "photograph", "picture", "pic", "graphic", "thumbnail", "thumb",
    "untitled", "untitled image", "no image", "no photo", "image not found", "image not available",
    "placeholder", "spacer", "blank", "pixel", "transparent", "logo", "site logo", "company logo",
    "icon", "button", "banner", "header", "footer", "background", "avatar", "profile picture",
    "click here", "click to enlarge", "read more", "more", "loading", "advertisement", "ad",
    "alt", "alt text", "default", "null", "undefined", "none",
]  # fmt: skip

_IMAGE_EXT = r"(?:jpe?g|jfif|png|gif|webp|bmp|tiff?|svg|heic|heif|avif)"
_FILENAME_RE = re.compile(rf"^\S*[^\s/]\.{_IMAGE_EXT}(?:\?\S*)?$", re.IGNORECASE)
_CAMERA_RE = re.compile(
    r"^(?:img|dsc|dscn|dscf|dcim|pict|pxl|imag|mvimg|p|gopr|dji|sam|wp|screenshot)"
    r"[_\- ]?\d{3,}[\w\-]*$",  # one token after the number: "DSC 1234 at dusk" is prose
    re.IGNORECASE,
)
_NON_WORD_RE = re.compile(r"[\W_]+", re.UNICODE)
_DIGITS_RE = re.compile(r"\d+", re.UNICODE)
NUMBERED_WORDS = frozenset(
    {"image", "img", "photo", "photograph", "picture", "pic", "untitled", "thumbnail"}
)
"""Generic image words that stay boilerplate with a number ('image 1', 'Photo #3'). Other
listed words with a number name something ('Pixel 7', 'Avatar 2', 'AD 1066')."""


class QualityConfig(Section):
    """Thresholds of the quality filter ([filters.quality]); see the module doc for defaults."""

    enabled: bool = True
    # 64 px: the demo plants 32-48 px "too small" images; thumbnails below it train nothing.
    min_side: Annotated[int, Field(ge=1)] = 64
    max_aspect: Annotated[float, Field(ge=1.0)] = 3.0  # long side / short side
    min_file_bytes: Annotated[int, Field(ge=0)] = 1024  # tracking pixels, placeholders; 0 = off
    analysis_side: Annotated[int, Field(ge=32)] = 256  # short side of the grey copy judged
    # variance of Laplacian at analysis size; 20 = clearly out of focus (a sharp photo scores
    # in the hundreds to thousands; a Gaussian blur of sigma 4 at 512 px scores ~20), so
    # JPEG-recompressed or upscaled copies are left to dedup
    min_blur: Annotated[float, Field(ge=0.0)] = 20.0
    min_entropy: Annotated[float, Field(ge=0.0, le=8.0)] = 3.0  # bits, 256-bin grey histogram
    min_std: Annotated[float, Field(ge=0.0)] = 6.0  # grey standard deviation (0-255)
    drop_alt_empty: bool = False  # captions are synthetic: an empty alt says nothing
    drop_alt_filename: bool = False  # camera and slug file names often label real photos
    drop_alt_boilerplate: bool = True  # whole-alt "logo", "click here", "image": page furniture
    alt_boilerplate: list[str] = Field(default_factory=lambda: list(DEFAULT_BOILERPLATE))
    alt_min_chars: Annotated[int, Field(ge=0)] = 0  # 0 = off
    alt_max_chars: Annotated[int, Field(ge=0)] = 0  # 0 = off

    @model_validator(mode="after")
    def _alt_bounds(self) -> QualityConfig:
        if self.alt_min_chars and self.alt_max_chars and self.alt_min_chars > self.alt_max_chars:
            raise ValueError(
                f"alt_min_chars {self.alt_min_chars} > alt_max_chars {self.alt_max_chars}: "
                "every sample would be dropped (0 = off)"
            )
        return self


def grey_analysis(img: Image.Image, side: int) -> np.ndarray:
    """Grey copy with short side `side` (if larger), antialiased Lanczos.

    Lanczos, not INTER_AREA: an area average at a factor near 1 (264 -> 256 px)
    smooths like a blur filter and halves the Laplacian variance; Lanczos keeps
    a photo's score within ~10% from 2048 px down to 256 px (see the tests).
    """
    grey = img.convert("L")
    w, h = grey.size
    short = min(w, h)
    if short > side:
        scale = side / short
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        grey = grey.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(grey)


def pixel_scores(img: Image.Image, analysis_side: int = 256) -> dict[str, float]:
    """Blur (variance of Laplacian), grey entropy (bits) and grey std at analysis size."""
    grey = grey_analysis(img, analysis_side)
    blur = float(cv2.Laplacian(grey, cv2.CV_64F).var())
    hist = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    p = hist[hist > 0] / grey.size
    entropy = float(-(p * np.log2(p)).sum())
    return {"blur": blur, "entropy": entropy, "grey_std": float(grey.std())}


def _norm_alt(alt: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", alt).split())


def alt_is_filename(alt: str) -> bool:
    """'IMG_1234.jpg', 'photo-2.png', a bare image URL, or a camera name like 'DSC01234'."""
    a = _norm_alt(alt)
    return bool(a) and (_FILENAME_RE.match(a) is not None or _CAMERA_RE.match(a) is not None)


def _words(text: str) -> list[str]:
    return _NON_WORD_RE.sub(" ", text).split()


def alt_is_boilerplate(alt: str, phrases: set[str]) -> bool:
    """The whole alt text, without punctuation and an image extension, is a phrase; or,
    without its numbers too, a phrase of `NUMBERED_WORDS` only ('image 1', 'Photo #3').

    Numbers are not dropped for every phrase: 'Pixel 7' is a phone, not a tracking pixel.
    Camera file names ('IMG_1234.jpg') are not boilerplate: they label real photos.
    """
    a = re.sub(rf"\.{_IMAGE_EXT}$", "", _norm_alt(alt).lower())
    if _CAMERA_RE.match(a):
        return False
    words = _words(a)
    if not words:
        return False
    if " ".join(words) in phrases:
        return True
    bare = _DIGITS_RE.sub(" ", " ".join(words)).split()
    return bool(bare) and set(bare) <= NUMBERED_WORDS and " ".join(bare) in phrases


class QualityFilter(Filter):
    """Size, aspect, file size, blur, near-uniformity and alt-text checks."""

    name: ClassVar[str] = "quality"

    def __init__(self, cfg: QualityConfig | None = None) -> None:
        self.cfg = cfg or QualityConfig()
        self._phrases = {" ".join(_words(p.lower())) for p in self.cfg.alt_boilerplate}

    def alt_scores(self, alt: str | None) -> dict[str, float]:
        text = _norm_alt(alt or "")
        return {
            "alt_len": float(len(text)),
            "alt_filename": float(alt_is_filename(text)),
            "alt_boilerplate": float(alt_is_boilerplate(text, self._phrases)),
        }

    def decide(self, sample: Sample) -> Decision:
        if not self.cfg.enabled:
            return self.keep()
        try:
            img = decode_rgb(sample.image)
        except DecodeError:
            return self.reject("decode_error")
        c = self.cfg
        # size as published: ingest may have resized (and upscales thumbnails), so the
        # original size says "too small"; aspect of what is stored (and trained on)
        w = sample.original_width or img.width
        h = sample.original_height or img.height
        file_bytes = len(sample.image or b"")
        scores: dict[str, float] = {
            "width": float(w),
            "height": float(h),
            "aspect": max(img.size) / max(1, min(img.size)),
            "file_bytes": float(file_bytes),
        }
        scores.update(pixel_scores(img, c.analysis_side))
        scores.update(self.alt_scores(sample.alt_text))
        n = scores["alt_len"]
        checks: list[tuple[str, bool]] = [
            ("too_small", min(w, h) < c.min_side),
            ("bad_aspect", scores["aspect"] > c.max_aspect),
            ("file_too_small", file_bytes < c.min_file_bytes),
            ("low_entropy", scores["entropy"] < c.min_entropy or scores["grey_std"] < c.min_std),
            ("blurry", scores["blur"] < c.min_blur),
            ("alt_text_empty", c.drop_alt_empty and n == 0),
            ("alt_text_filename", c.drop_alt_filename and scores["alt_filename"] > 0),
            ("alt_text_boilerplate", c.drop_alt_boilerplate and scores["alt_boilerplate"] > 0),
            (
                "alt_text_length",
                n > 0
                and ((c.alt_min_chars > 0 and n < c.alt_min_chars)
                     or (c.alt_max_chars > 0 and n > c.alt_max_chars)),
            ),
        ]  # fmt: skip
        for reason, failed in checks:
            if failed:
                return self.reject(reason, **scores)
        return self.keep(**scores)

    def describe(self) -> dict[str, Any]:
        d = self.cfg.model_dump()
        d["alt_boilerplate"] = len(self.cfg.alt_boilerplate)
        return d


# ---- model-backed quality: CLIP image-text similarity and LAION aesthetics ----------------


_DEVICE = r"^(auto|cpu|cuda(:\d+)?|mps)$"


class ClipScoreConfig(Section):
    """CLIP image-text similarity ([filters.clip_score]); off until `weights` is set."""

    enabled: bool = True
    model: str = "ViT-L-14"  # open_clip architecture, for checkpoint-file and tag weights
    # hf-hub:org/repo, an open_clip folder (config + weights), a checkpoint file, or a tag
    weights: str | None = None
    # cosine; permissive because alt text is metadata when captions are synthetic
    min_score: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.2
    text: Literal["alt_text", "caption"] = "alt_text"
    device: Annotated[str, Field(pattern=_DEVICE)] = "auto"
    batch_size: Annotated[int, Field(ge=1)] = 32


class AestheticConfig(Section):
    """LAION improved aesthetic predictor ([filters.aesthetic]); off until weights are set."""

    enabled: bool = True
    weights: str | None = None  # the MLP head: .pth/.safetensors path or hf-hub:org/repo/file
    clip_model: str = "ViT-L-14"
    clip_weights: str | None = None  # the CLIP it was trained on (OpenAI ViT-L/14), as above
    min_score: float = 4.5  # LAION-Aesthetics published 4.5+, 5+ and 6+ subsets
    device: Annotated[str, Field(pattern=_DEVICE)] = "auto"
    batch_size: Annotated[int, Field(ge=1)] = 32


class _ModelFilter(Filter):
    """Shared on/off logic: without weights the filter is off, says so once, and marks
    every sample it sees with `off=1` instead of passing it silently."""

    section: ClassVar[str] = ""
    off_reason: str | None

    def _set_off(self, reason: str) -> None:
        from ccurate.filters.clip_models import log_off_once

        self.off_reason = reason
        log_off_once(self.name, f"filter '{self.name}' is OFF: {reason}")

    @property
    def active(self) -> bool:
        return self.off_reason is None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for k in [k for k in state if k.startswith("_m_")]:
            state[k] = None  # loaded models stay in their process
        return state

    def _off_decisions(self, n: int) -> list[Decision]:
        return [self.keep(off=1.0) for _ in range(n)]

    def decide(self, sample: Sample) -> Decision:
        return self.decide_batch([sample])[0]


class ClipScoreFilter(_ModelFilter):
    """Cosine similarity of CLIP image and text embeddings (alt text by default).

    Samples without text are kept unjudged (no score): with synthetic captions a
    missing alt text says nothing about the image.
    """

    name: ClassVar[str] = "clip_score"

    def __init__(self, cfg: ClipScoreConfig | None = None) -> None:
        self.cfg = cfg or ClipScoreConfig()
        self.off_reason = None
        self._m_clip: ClipModel | None = None
        if not self.cfg.enabled:
            self.off_reason = "disabled (filters.clip_score.enabled = false)"
        elif self.cfg.weights is None:
            self._set_off(
                "no CLIP weights configured. To enable, set filters.clip_score.weights to "
                "'hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K' (in the local HF cache), an "
                "open_clip folder, or a checkpoint file for filters.clip_score.model "
                f"({self.cfg.model!r})"
            )
        else:
            from ccurate.filters.clip_models import resolve_clip_source

            resolve_clip_source(self.cfg.model, self.cfg.weights, "filters.clip_score.weights")

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1.0, gpus=1.0 if self.cfg.device.startswith("cuda") else 0.0,
                         memory_gb=3.0 if self.active else 0.1)  # fmt: skip

    def setup(self) -> None:
        if self.active and self._m_clip is None:
            from ccurate.filters.clip_models import load_clip

            assert self.cfg.weights is not None
            self._m_clip = load_clip(
                self.cfg.model, self.cfg.weights, self.cfg.device, "filters.clip_score.weights"
            )

    def teardown(self) -> None:
        self._m_clip = None

    def decide_batch(self, samples: list[Sample]) -> list[Decision]:
        if not self.active:
            return self._off_decisions(len(samples))
        self.setup()
        clip = self._m_clip
        assert clip is not None
        embs = clip.image_embeddings([s.image for s in samples], self.cfg.batch_size)
        texts = [
            ((s.caption if self.cfg.text == "caption" else s.alt_text) or "").strip()
            for s in samples
        ]
        todo = [i for i, (e, t) in enumerate(zip(embs, texts, strict=True)) if e is not None and t]
        sims: dict[int, float] = {}
        for start in range(0, len(todo), self.cfg.batch_size):
            idx = todo[start : start + self.cfg.batch_size]
            temb = clip.encode_texts([texts[i] for i in idx])
            for i, t in zip(idx, temb, strict=True):
                e = embs[i]
                assert e is not None
                sims[i] = float(np.dot(e, t))
        out: list[Decision] = []
        for i in range(len(samples)):
            if embs[i] is None:
                out.append(self.reject("decode_error"))
            elif i not in sims:
                out.append(self.keep())
            elif not math.isfinite(sims[i]):  # NaN < min_score is False: it would pass
                out.append(self.reject("score_invalid"))
            elif sims[i] < self.cfg.min_score:
                out.append(self.reject("clip_score_low", score=sims[i]))
            else:
                out.append(self.keep(score=sims[i]))
        return out

    def describe(self) -> dict[str, Any]:
        return {**self.cfg.model_dump(), "active": self.active, "off_reason": self.off_reason}


class AestheticFilter(_ModelFilter):
    """LAION improved aesthetic predictor: MLP on L2-normalised CLIP ViT-L/14 image embeddings."""

    name: ClassVar[str] = "aesthetic"

    def __init__(self, cfg: AestheticConfig | None = None) -> None:
        self.cfg = cfg or AestheticConfig()
        self.off_reason = None
        self._m_clip: ClipModel | None = None
        self._m_mlp: AestheticMLP | None = None
        missing = [
            k for k, v in (("weights", self.cfg.weights), ("clip_weights", self.cfg.clip_weights))
            if v is None
        ]  # fmt: skip
        if not self.cfg.enabled:
            self.off_reason = "disabled (filters.aesthetic.enabled = false)"
        elif missing:
            self._set_off(
                f"{' and '.join('filters.aesthetic.' + k for k in missing)} not configured. "
                "To enable, set filters.aesthetic.weights to the improved-aesthetic-predictor "
                "head (e.g. models/sac+logos+ava1-l14-linearMSE.pth) and "
                "filters.aesthetic.clip_weights to the OpenAI CLIP ViT-L/14 it was trained on "
                "(e.g. 'openai' in the open_clip cache, or a checkpoint file)"
            )
        else:
            from ccurate.filters.clip_models import AESTHETIC_HINT, resolve_clip_source
            from ccurate.weights import weights_file

            assert self.cfg.weights is not None and self.cfg.clip_weights is not None
            resolve_clip_source(
                self.cfg.clip_model, self.cfg.clip_weights, "filters.aesthetic.clip_weights"
            )
            if not self.cfg.weights.startswith("hf-hub:"):
                weights_file(self.cfg.weights, "filters.aesthetic.weights", AESTHETIC_HINT)

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1.0, gpus=1.0 if self.cfg.device.startswith("cuda") else 0.0,
                         memory_gb=3.0 if self.active else 0.1)  # fmt: skip

    def setup(self) -> None:
        if not self.active or self._m_mlp is not None:
            return
        from ccurate.filters.clip_models import load_aesthetic_mlp, load_clip

        assert self.cfg.weights is not None and self.cfg.clip_weights is not None
        clip = load_clip(
            self.cfg.clip_model, self.cfg.clip_weights, self.cfg.device,
            "filters.aesthetic.clip_weights",
        )  # fmt: skip
        mlp = load_aesthetic_mlp(self.cfg.weights, "filters.aesthetic.weights", clip.device)
        if mlp.input_size != clip.embed_dim:
            raise ValueError(
                f"filters.aesthetic: the head expects {mlp.input_size}-d embeddings but CLIP "
                f"{clip.source} gives {clip.embed_dim}-d; the LAION head needs ViT-L/14 (768)"
            )
        self._m_clip, self._m_mlp = clip, mlp

    def teardown(self) -> None:
        self._m_clip = self._m_mlp = None

    def scores(self, embs: np.ndarray) -> np.ndarray:
        """Aesthetic ratings of L2-normalised embeddings [n, d]."""
        import torch

        self.setup()
        assert self._m_mlp is not None and self._m_clip is not None
        with torch.inference_mode():
            x = torch.from_numpy(embs).to(self._m_clip.device)
            return self._m_mlp(x).squeeze(-1).float().cpu().numpy()

    def decide_batch(self, samples: list[Sample]) -> list[Decision]:
        if not self.active:
            return self._off_decisions(len(samples))
        self.setup()
        assert self._m_clip is not None
        embs = self._m_clip.image_embeddings([s.image for s in samples], self.cfg.batch_size)
        ok = [i for i, e in enumerate(embs) if e is not None]
        values: dict[int, float] = {}
        if ok:
            stacked = np.stack([embs[i] for i in ok])  # type: ignore[misc]
            values = dict(zip(ok, (float(v) for v in self.scores(stacked)), strict=True))
        out: list[Decision] = []
        for i in range(len(samples)):
            if i not in values:
                out.append(self.reject("decode_error"))
            elif not math.isfinite(values[i]):
                out.append(self.reject("score_invalid"))
            elif values[i] < self.cfg.min_score:
                out.append(self.reject("aesthetic_low", score=values[i]))
            else:
                out.append(self.keep(score=values[i]))
        return out

    def describe(self) -> dict[str, Any]:
        return {**self.cfg.model_dump(), "active": self.active, "off_reason": self.off_reason}
