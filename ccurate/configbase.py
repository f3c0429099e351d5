"""Base class for every config section: unknown keys are errors, every field has a default."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# Settings that say how fast a step runs, never what it outputs (thread and worker counts,
# devices, batching, caches, network patience). Changing one recomputes nothing: neither a
# pipeline step's recorded settings (`ccurate.pipeline`) nor a rebuild's judging digest
# (`ccurate.rebuild.settings_digest`) holds them.
PERF_KEYS = frozenset({
    "threads", "decode_threads", "batch_size", "device", "cache_dir", "decode_pixel_budget",
    "user_agent",
    # captioning's batching, decode workers, CUDA graphs and cache flushing; the OCR's arena
    "max_batch_size", "decode_workers", "cuda_graphs", "cache_flush_rows", "ocr_mem_arena",
    "per_host_connections", "per_host_rate", "retries", "backoff_base", "backoff_max",
    "max_retry_after", "connect_timeout", "read_timeout", "total_timeout",
})  # fmt: skip


class Section(BaseModel):
    """A validated config section. Wrong keys or values fail before any work starts.

    inf and nan are refused for every float: an infinite timeout or factor is never what a
    config means (`jpeg_draft_factor = inf` dropped every JPEG as a decode error).
    Values are strict: TOML has its own booleans and numbers, so `"yes"`, `"8"` or `0` for
    a boolean are mistakes, not conversions (`allow_private = "yes"` had turned the
    private-address guard off). An integer is still taken for a float."""

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        frozen=False,
        allow_inf_nan=False,
        strict=True,
    )
