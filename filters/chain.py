"""Build the filter step from its config: the enabled filters, cheapest and surest first."""

from __future__ import annotations

from ccurate.filters.config import FiltersConfig
from ccurate.filters.license_filter import LicenseFilter
from ccurate.filters.quality import AestheticFilter, ClipScoreFilter, QualityFilter
from ccurate.filters.safety import SafetyFilter
from ccurate.filters.watermark import WatermarkFilter
from ccurate.stage import Filter, FilterStage


def build_filters(cfg: FiltersConfig) -> list[Filter]:
    """Licence, quality, watermark, safety, CLIP score, aesthetic — those enabled.

    Licence goes first: it needs no pixels and drops the most. Model-backed
    filters decide for themselves, in `setup`, whether their weights are
    configured, and say so once when they are off.
    """
    chain: list[Filter] = []
    if cfg.license.enabled:
        chain.append(LicenseFilter(cfg.license))
    if cfg.quality.enabled:
        chain.append(QualityFilter(cfg.quality))
    if cfg.watermark.enabled:
        chain.append(WatermarkFilter(cfg.watermark))
    if cfg.safety.enabled:
        chain.append(SafetyFilter(cfg.safety))
    if cfg.clip_score.enabled:
        chain.append(ClipScoreFilter(cfg.clip_score))
    if cfg.aesthetic.enabled:
        chain.append(AestheticFilter(cfg.aesthetic))
    return chain


def build_filter_stage(cfg: FiltersConfig) -> FilterStage:
    return FilterStage(build_filters(cfg))
