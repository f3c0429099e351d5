"""Settings of the captioning stage ([caption] in the pipeline TOML)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ccurate.configbase import Section

DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"
"""The checkpoint LAVIS's `blip2_opt` captioner uses (set `[caption] model` to enable it)."""

KNOWN_MODELS = (
    "Salesforce/blip2-opt-2.7b",
    "Salesforce/blip2-opt-6.7b",
    "Salesforce/blip2-opt-2.7b-coco",
    "Salesforce/blip2-opt-6.7b-coco",
    "Salesforce/blip2-flan-t5-xl",
    "Salesforce/blip2-flan-t5-xxl",
    "Salesforce/blip2-flan-t5-xl-coco",
)
"""Hub ids the stage is written for; any BLIP-2 checkpoint in the HF format loads."""


class CaptionConfig(Section):
    """Which BLIP-2 weights to use and how to decode. No model -> the stage is skipped, loudly.

    Defaults follow LAVIS's BLIP-2 captioning where that is cheap (prompt
    "a photo of", at most 30 new tokens, at least 1) but decode greedily: LAVIS's
    5-beam search costs ~5x for a small gain; `num_beams = 5` restores it.
    """

    model: str | None = None
    """Hub id (e.g. "Salesforce/blip2-opt-2.7b") or a local directory holding the weights;
    unset or "" = captioning off (skipped, loudly)."""
    model_id: str | None = None
    """Name recorded in `caption_model` when `model` is a directory (default: from its config)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); None = "main". Recorded as the resolved commit."""
    local_files_only: bool = False
    """Never touch the network (also implied by HF_HUB_OFFLINE=1)."""

    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    """"auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N"."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """"auto" = bfloat16 on GPUs that have it, else float16; float32 on CPU. The dtype in
    effect (and TF32 for float32 on a GPU) is part of `caption_model` and the cache key:
    captions made at another precision differ and are not reused."""

    prompt: str = "a photo of"
    """Text the language model continues (LAVIS's default); it is not part of the caption."""
    num_beams: int = Field(default=1, ge=1)
    """1 = greedy (or plain sampling); > 1 = beam search (beam sampling with do_sample)."""
    do_sample: bool = False
    top_p: float = Field(default=0.9, gt=0, le=1)
    temperature: float = Field(default=1.0, gt=0)
    seed: int = 0
    """Seed for sampling, set once per batch: a rerun with the same batches (same shards,
    batch size and cache hits) gives the same captions; another batch layout, or an OOM
    halving, draws others (greedy and beam decoding are unaffected)."""
    max_new_tokens: int = Field(default=30, ge=1)
    """At most this many caption tokens; prompt + max_new_tokens must fit the language
    model's positions (2048 for OPT; checked when the model loads)."""
    min_new_tokens: int = Field(default=1, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)
    length_penalty: float = 1.0
    """Beam search only (ignored, and not in the cache key, when num_beams = 1)."""
    num_captions: int = Field(default=1, ge=1)
    """Captions per image. The first goes to `caption`; when > 1, all of them (first
    included; best first with beam search) go to `sample.extra["captions"]` as a list of
    strings. Needs num_beams >= num_captions (beam search, also with do_sample) or
    num_beams = 1 with do_sample = true (independent samples)."""

    batch_size: int | None = Field(default=None, ge=1)
    """Images per GPU batch; None = sized from free GPU memory (halved on OOM)."""
    max_batch_size: int = Field(default=512, ge=1)
    decode_workers: int | None = Field(default=None, ge=1)
    """Threads that decode and resize JPEGs ahead of the GPU; None = min(12, cores - 1)."""
    fast_decode: bool = True
    """Greedy OPT decoding with a static KV cache (CUDA graphs on GPU) instead of HF generate."""
    cuda_graphs: bool = True

    cache_dir: str | None = None
    """Caption cache folder (parquet parts); the pipeline uses <work>/catalog/caption_cache."""
    cache_flush_rows: int = Field(default=2048, ge=1)
    """New cache rows kept in memory before a part file is written (and at teardown/exit)."""

    @field_validator("model", mode="before")
    @classmethod
    def _empty_model_is_off(cls, value: object) -> object:
        """`model = ""` means off, as omitting it does (TOML has no null), never the current
        directory."""
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @model_validator(mode="after")
    def _check(self) -> CaptionConfig:
        """Refuse here what `generate` would refuse on every batch, after the model loaded."""
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens "
                f"({self.max_new_tokens})"
            )
        if self.num_captions > self.num_beams and not self.do_sample:
            raise ValueError(
                f"num_captions = {self.num_captions} needs num_beams >= num_captions (beam "
                f"search returns the best num_captions beams) or do_sample = true with "
                f"num_beams = 1 (independent samples); num_beams is {self.num_beams}"
            )
        if self.num_beams > 1 and self.num_captions > self.num_beams:
            raise ValueError(
                f"num_captions = {self.num_captions} with num_beams = {self.num_beams} and "
                f"do_sample = true: beam sampling returns at most num_beams captions per "
                f"image; set num_beams >= num_captions, or num_beams = 1 to draw "
                f"num_captions independent samples"
            )
        return self
