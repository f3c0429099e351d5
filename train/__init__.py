"""ccurate.train: a latent diffusion trainer that streams release shards.

`train(cfg, data, out_dir)` and `precompute(cfg, release, out_dir)` are imported
lazily, so reading the `[train]` config section does not import torch or diffusers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["precompute", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from ccurate.train.loop import train

        return train
    if name == "precompute":
        from ccurate.train.precompute import precompute

        return precompute
    raise AttributeError(name)
