"""Base class for every config section: unknown keys are errors, every field has a default."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A validated config section. Wrong keys or values fail before any work starts."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
