"""Settings of the filter steps: [filters.*] (one sub-section per filter) and [dedup].

Each filter's settings live beside its code; this module only composes them,
in the order the filter step applies them: licence first (the cheapest and
the most important), then quality, then the model-backed filters.
"""

from __future__ import annotations

from pydantic import Field

from ccurate.configbase import Section
from ccurate.filters.dedup import DedupConfig
from ccurate.filters.license_filter import LicenseConfig
from ccurate.filters.quality import AestheticConfig, ClipScoreConfig, QualityConfig
from ccurate.filters.safety import SafetyConfig
from ccurate.filters.watermark import WatermarkConfig

__all__ = ["DedupConfig", "FiltersConfig"]


class FiltersConfig(Section):
    """One sub-section per filter; each can be switched off (`enabled = false`) and tuned."""

    license: LicenseConfig = Field(default_factory=lambda: LicenseConfig())
    quality: QualityConfig = Field(default_factory=lambda: QualityConfig())
    watermark: WatermarkConfig = Field(default_factory=lambda: WatermarkConfig())
    safety: SafetyConfig = Field(default_factory=lambda: SafetyConfig())
    clip_score: ClipScoreConfig = Field(default_factory=lambda: ClipScoreConfig())
    aesthetic: AestheticConfig = Field(default_factory=lambda: AestheticConfig())
