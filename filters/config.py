"""Settings of the filter stages ([filters.*] and [dedup] in the pipeline TOML)."""

from __future__ import annotations

from ccurate.configbase import Section


class FiltersConfig(Section):
    """One sub-section per filter; each can be switched off and tuned."""


class DedupConfig(Section):
    """Exact, near and semantic dedup settings."""

    enabled: bool = True
