"""Base class for every config section: unknown keys are errors, every field has a default."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


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
