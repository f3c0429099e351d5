"""Settings of the latent diffusion trainer ([train] in the pipeline TOML)."""

from __future__ import annotations

from ccurate.configbase import Section


class TrainConfig(Section):
    """Model preset, data, optimisation and checkpointing."""

    enabled: bool = True
    preset: str = "tiny"
    steps: int = 10
