"""Settings of the ingest stage ([ingest] in the pipeline TOML)."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ccurate.configbase import Section


class IngestConfig(Section):
    """Sources to read and how to fetch, vet, decode and resize them.

    Defaults are polite and safe: opt-outs honoured, private addresses
    refused, bounded bodies and timeouts. Size/aspect drops are off so the
    quality filter decides (with scores) rather than ingest (without).
    Concurrency and per-host limits apply per worker process.
    """

    # -- identity and safety
    allow_private: bool = False
    # narrower opt-in than allow_private: these CIDRs only (e.g. ["127.0.0.0/8"] for a demo)
    allow_networks: list[str] = Field(default_factory=list)
    user_agent: str = "ccurate/0.1 (+https://github.com/ccurate/ccurate; dataset research bot)"
    # our product token in robots.txt groups, `X-Robots-Tag: <token>: noai`, `<meta name=token>`
    robots_token: str = "ccurate"
    # -- opt-outs (each is its own drop reason)
    respect_robots_txt: bool = True
    respect_x_robots_tag: bool = True
    respect_tdmrep: bool = True
    respect_meta_robots: bool = True
    # X-Robots-Tag directives that opt out (img2dataset also counts noindex, noimageindex)
    optout_directives: list[str] = Field(default_factory=lambda: ["noai", "noimageai"])
    # -- concurrency, politeness, retries
    threads: int = Field(default=32, ge=1, le=1024)  # concurrent fetches per worker
    # concurrent decodes per worker (fetch threads hand bodies over); 0 = the worker's share
    # of the cores (usable cores / local workers, or the CPUs its Ray task reserves)
    decode_threads: int = Field(default=0, ge=0, le=1024)
    per_host_connections: int = Field(default=4, ge=1)  # concurrent requests per host
    per_host_rate: float = Field(default=0.0, ge=0.0)  # requests/s per host; 0 = no limit
    retries: int = Field(default=2, ge=0)  # after the first try, on transient errors only
    backoff_base: float = Field(default=0.5, gt=0.0)  # seconds, doubled per retry, full jitter
    backoff_max: float = Field(default=30.0, gt=0.0)
    max_retry_after: float = Field(default=60.0, ge=0.0)  # longer Retry-After: give up for now
    connect_timeout: float = Field(default=10.0, gt=0.0)  # also the DNS lookup deadline
    read_timeout: float = Field(default=20.0, gt=0.0)  # max silence between bytes
    total_timeout: float = Field(default=60.0, gt=0.0)  # per URL, retries + redirects included
    max_bytes: int = Field(default=20_000_000, gt=0)  # image body cap -> too_large
    max_page_bytes: int = Field(default=5_000_000, gt=0)  # HTML page body cap -> too_large
    max_redirects: int = Field(default=5, ge=0)
    batch_size: int = Field(default=512, ge=1)  # records per process() call
    # -- decode, validate, resize (img2dataset's modes)
    image_size: int = Field(default=512, ge=1)
    resize_mode: Literal["keep_ratio", "keep_ratio_largest", "center_crop", "border", "no"] = (
        "keep_ratio"
    )
    resize_only_if_bigger: bool = False
    # downscale filter: area = cv2 INTER_AREA (img2dataset's default), or Pillow lanczos/bicubic
    resize_filter: Literal["area", "lanczos", "bicubic"] = "area"
    output_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(default=95, ge=0, le=100)  # jpg/webp quality; png: 0-9 level
    # store the downloaded bytes unchanged (validated, not resized) instead of a re-encoding
    keep_original: bool = False
    max_pixels: int = Field(default=89_478_485, gt=0)  # decompression-bomb cap (Pillow's)
    # decode memory held at once per worker, in pixels of 4 bytes (64 M: 256 MB), whatever
    # `threads` is; each decode holds its measured peak in bytes (1-16 B a pixel by mode
    # and path: ingest/images.py `_peak_bytes`), not its pixel count
    decode_pixel_budget: int = Field(default=64_000_000, gt=0)
    min_image_size: int = Field(default=0, ge=0)  # smaller side below -> image_too_small; 0 off
    max_image_size: int = Field(default=0, ge=0)  # larger side above -> image_too_large; 0 off
    max_aspect_ratio: float = Field(default=0.0, ge=0.0)  # long/short above -> image_bad_aspect
    # libjpeg decodes big JPEGs at 1/2..1/8 scale, keeping >= factor x the target size.
    # 1.5: 1024x768 -> 256 decodes at 1/2; PSNR 52 dB vs img2dataset's full decode + area
    # (see ingest/images.py) for ~3x less decode CPU.
    jpeg_draft: bool = True
    jpeg_draft_factor: float = Field(default=1.5, ge=1.0)

    @field_validator("allow_networks")
    @classmethod
    def _valid_networks(cls, v: list[str]) -> list[str]:
        for cidr in v:
            ipaddress.ip_network(cidr, strict=False)  # ValueError -> config error
        return v

    @field_validator("max_aspect_ratio")
    @classmethod
    def _aspect(cls, v: float) -> float:
        if 0 < v < 1:  # long side / short side is never below 1
            raise ValueError(
                f"max_aspect_ratio is long side / short side (>= 1, 0 = off): {v} would drop "
                f"every image (for 1:{1 / v:g} write {1 / v:g})"
            )
        return v

    @model_validator(mode="after")
    def _sizes(self) -> IngestConfig:
        if (
            self.min_image_size
            and self.max_image_size
            and self.min_image_size > self.max_image_size
        ):
            raise ValueError(
                f"min_image_size {self.min_image_size} > max_image_size {self.max_image_size}: "
                "every image would be dropped (0 turns either bound off)"
            )
        return self
