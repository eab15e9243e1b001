"""Typed `fractals:` section of params.yaml."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from vadbench.schema import StrictModel


class FractalsParams(StrictModel):
    sampler: Literal["fractaldb", "sigma"] = "fractaldb"
    num_classes: int = Field(16, ge=1, description="accepted IFS categories")
    instances_per_class: int = Field(32, ge=1, description="images rendered per category")
    image_size: int = Field(64, ge=8, le=4096)
    points: int = Field(20_000, ge=100, description="chaos-game points per image")
    pad: int = Field(2, ge=0)
    min_maps: int = Field(2, ge=1)
    max_maps: int = Field(7, ge=1)
    filling_threshold: float = Field(0.2, gt=0.0, le=1.0)
    workers: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> FractalsParams:
        if self.min_maps > self.max_maps:
            raise ValueError(f"min_maps ({self.min_maps}) > max_maps ({self.max_maps})")
        if self.image_size <= 2 * self.pad:
            raise ValueError(f"image_size ({self.image_size}) must exceed 2*pad ({2 * self.pad})")
        return self
