"""Settings of the release writer ([shards] in the pipeline TOML)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ccurate.configbase import Section

ImageFormat = Literal["jpg", "webp", "png"]
CaptionSource = Literal["synthetic", "alt_text", "both"]
Family = Literal["commercial", "noncommercial"]
FAMILIES: tuple[Family, ...] = ("commercial", "noncommercial")


class ShardsConfig(Section):
    """Release layout: shard size, splits, image format, caption policy.

    A shard closes when it holds `samples_per_shard` samples or when the next
    sample would make its tar file larger than `shard_max_bytes` (0 = no byte
    limit; the tar's end padding to a 10 KiB record counts), whichever comes
    first; a single sample larger than the byte limit still gets a shard.
    """

    samples_per_shard: int = Field(default=1000, ge=1)
    shard_max_bytes: int = Field(default=0, ge=0)
    # image members: stored bytes are copied when their mime matches, re-encoded otherwise
    image_format: ImageFormat = "jpg"
    jpeg_quality: int = Field(default=95, ge=1, le=100)
    webp_quality: int = Field(default=90, ge=1, le=100)
    # which text goes into `{key}.txt`: synthetic caption (alt text when none, recorded),
    # alt text (synthetic caption when none), or both (`.txt` synthetic + `.alt.txt` alt text)
    caption_source: CaptionSource = "synthetic"
    # licence families published; `release_split(licence)` assigns each sample to one
    splits: list[Family] = Field(default_factory=lambda: list(FAMILIES), min_length=1)
    # CommonCatalog-style superset: commercial samples are also written to `noncommercial`
    noncommercial_includes_commercial: bool = False
    # lower bounds on the short side, e.g. [256, 512, 1024] -> <split>/res-512/...;
    # samples below the first bound go to res-0. Empty: no buckets.
    resolution_buckets: list[int] = Field(default_factory=list)

    @field_validator("resolution_buckets")
    @classmethod
    def _sorted_unique(cls, v: list[int]) -> list[int]:
        if any(b <= 0 for b in v):
            raise ValueError("resolution_buckets must be positive pixel sizes")
        if v != sorted(set(v)):
            raise ValueError("resolution_buckets must be strictly increasing")
        return v
