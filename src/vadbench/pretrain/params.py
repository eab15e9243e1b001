"""Typed `pretrain:` section of params.yaml."""

from __future__ import annotations

from pydantic import Field

from vadbench.schema import StrictModel


class PretrainParams(StrictModel):
    arch: str = "resnet18"
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    milestones: list[int] = Field(default_factory=list, description="epochs at which lr drops by gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of fractal instances held out for top-1")
    mean: tuple[float, float, float] = (0.2, 0.2, 0.2)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    nproc_per_node: int = Field(1, ge=1)
