"""Settings of the captioning stage ([caption] in the pipeline TOML)."""

from __future__ import annotations

from ccurate.configbase import Section


class CaptionConfig(Section):
    """Which BLIP-2 weights to use and how to decode. No model -> the stage is skipped, loudly."""

    model: str | None = None
