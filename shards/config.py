"""Settings of the release writer ([shards] in the pipeline TOML)."""

from __future__ import annotations

from ccurate.configbase import Section


class ShardsConfig(Section):
    """Release layout: shard size, splits, image format, caption policy."""

    samples_per_shard: int = 1000
