"""Typed `pretrain:` section of params.yaml.

Default profile: a few-minute CPU run on the 64 px default fractals. Paper-scale profile (FractalDB's
recipe): epochs 90, lr 0.1, milestones [30, 60], batch_size 256, input_size 256, crop_size 224
(docs/PRETRAINING.md). `objective` and `augment` select the recipe (classification | simclr, basic | strong);
their defaults are the original classification recipe, bit for bit.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from vadbench.schema import StrictModel


class PretrainParams(StrictModel):
    arch: str = Field("resnet18", description="any timm architecture name, trained from scratch")
    objective: Literal["classification", "simclr"] = Field(
        "classification",
        description="classification: cross-entropy on the fractal classes; simclr: NT-Xent between two views "
        "of each image (labels unused), projection head dropped from the saved weights",
    )
    simclr_proj_dim: int = Field(128, ge=1, description="simclr: output width of the 2-layer projection MLP")
    simclr_temperature: float = Field(0.2, gt=0, description="simclr: NT-Xent temperature")
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1, description="global batch: split evenly over all processes")
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    milestones: list[int] = Field(default_factory=lambda: [14], description="epochs at which lr drops by gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: int = Field(1, ge=0, description="linear lr warm-up (per step) over the first epochs")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of fractal instances held out for top-1")
    input_size: int = Field(64, ge=8, description="fractal images are resized to this square size first")
    crop_size: int = Field(56, ge=8, description="random crop (train) / centre crop (val) after the resize")
    hflip: bool = Field(True, description="random horizontal flips while training")
    augment: Literal["basic", "strong"] = Field(
        "basic",
        description="basic: random crop + hflip; strong: random-resized crop, flips, 90° rotations, "
        "brightness/contrast jitter, blur (pretrain/augment.py)",
    )
    crop_scale: tuple[float, float] = Field(
        (0.25, 1.0), description="augment strong: area fraction range of the random-resized crop"
    )
    mean: tuple[float, float, float] = (0.2, 0.2, 0.2)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    amp: bool = Field(True, description="mixed precision on CUDA (bf16, else fp16 + loss scaling); no-op on CPU")
    channels_last: bool = Field(True, description="channels_last memory format on CUDA; no-op on CPU")
    workers: int = Field(0, ge=0, description="DataLoader worker processes (0 on small CPU machines)")
    nproc_per_node: int = Field(1, ge=1, description=">1: the stage relaunches itself with torchrun")
    dist_timeout_s: int = Field(600, ge=10, description="collective timeout: a dead peer fails the run, never hangs it")

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError("must be [lo, hi] with 0 < lo <= hi <= 1")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PretrainParams:
        if self.objective == "simclr" and self.batch_size < 2:
            raise ValueError(
                f"pretrain.batch_size ({self.batch_size}) must be >= 2 for pretrain.objective simclr: "
                "the other images of the batch are the negatives"
            )
        if self.crop_size > self.input_size:
            raise ValueError(f"crop_size ({self.crop_size}) must not exceed input_size ({self.input_size})")
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {self.milestones}")
        if any(m < 1 or m > self.epochs for m in self.milestones):
            raise ValueError(f"milestones {self.milestones} must lie in [1, epochs={self.epochs}]")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be < epochs ({self.epochs})")
        if self.batch_size % self.nproc_per_node:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by nproc_per_node ({self.nproc_per_node})"
            )
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        return self
