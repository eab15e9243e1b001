"""Base class for every typed parameter block: unknown keys and wrong types are errors."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A params.yaml section. Unknown keys are rejected; values are never silently coerced."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
