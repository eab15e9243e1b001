"""EfficientAD, shared by EfficientAD-S and EfficientAD-M (Batzner, Heckler & König, WACV 2024, "EfficientAD: Accurate
Visual Anomaly Detection at Millisecond-Level Latencies").

A frozen teacher PDN (patch description network, 384 channels, 33×33 receptive field, no padding;
`components.pdn`) was distilled from a backbone's features (`components.teacher_distill`, the DVC stage
``distill``). A student PDN with 768 channels learns, on normal images, to reproduce the teacher (first
384 channels: the hard feature loss — only the squared differences at or above their 0.999 quantile
count — plus a penalty pushing its outputs to zero on images outside the training distribution) and to
predict a convolutional autoencoder's reconstruction of the teacher features (last 384 channels; the
autoencoder sees brightness / contrast / saturation-augmented images). Anomaly maps: the channel mean of
(teacher − student)² (local anomalies) and of (autoencoder − student)² (logical anomalies), each mapped
linearly so that its 0.9 and 0.995 quantiles over the *validation* normals' maps become 0 and 0.1,
averaged, padded to the input grid and upsampled; the image score is the map maximum.

Departures, all documented in docs/MODELS.md: the teacher is distilled from the cell's backbone on
fractal images (paper: WideResNet-101 on ImageNet), the penalty images are those fractals (paper:
ImageNet), training is counted in steps through the shared epoch loop (epochs = ⌈steps / batches per
epoch⌉), and the default budget is a small CPU one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from torch.utils.data import Dataset

from vadbench.backbones import FeatureExtractor
from vadbench.data.source import as_source, loader, to_float
from vadbench.models.base import AnomalyModel
from vadbench.models.components import trainer
from vadbench.models.components.patch_features import module_device
from vadbench.models.components.pdn import TEACHER_CHANNELS, Autoencoder, PdnSize, pdn, pdn_out_size
from vadbench.models.components.resize import resize_square
from vadbench.models.components.teacher_distill import TeacherMissingError, load_teacher
from vadbench.models.components.trainer import LoopSettings, predict_maps
from vadbench.schema import StrictModel

C = TEACHER_CHANNELS


def hard_feature_loss(teacher: torch.Tensor, student: torch.Tensor, quantile: float) -> torch.Tensor:
    """Mean of the squared differences (B, C, h, w) at or above their `quantile` (the paper's L_hard)."""
    d = (teacher - student).pow(2)
    flat = d.detach().flatten().float()
    if flat.numel() <= 1 << 24:
        threshold = torch.quantile(flat, quantile)
    else:  # torch.quantile refuses > 2^24 values (256 px at batch ≥ 14): the order statistic just below it
        threshold = torch.kthvalue(flat, int(quantile * (flat.numel() - 1)) + 1).values
    return d[d >= threshold].mean()


def quantile_normalize(maps: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """maps → 0.1 · (maps − q_a) / (q_b − q_a): q_a ↦ 0, q_b ↦ 0.1 (the paper's map normalisation)."""
    return 0.1 * (maps - q_a) / (q_b - q_a).clamp_min(1e-12)


def augment_ae(x: torch.Tensor, generator: torch.Generator, strength: float = 0.2) -> torch.Tensor:
    """The paper's autoencoder augmentation: per image one of brightness, contrast or saturation, with a
    factor drawn from [1 − strength, 1 + strength] (torchvision's definitions; grey images: saturation is a
    no-op). x (B, C, H, W) in [0, 1]."""
    b = len(x)
    kind = torch.randint(0, 3, (b,), generator=generator)
    factor = (1 + (torch.rand(b, generator=generator) * 2 - 1) * strength).to(x.device).view(-1, 1, 1, 1)
    kind = kind.to(x.device).view(-1, 1, 1, 1)
    grey = x if x.shape[1] == 1 else (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    bright = x * factor
    contrast = factor * x + (1 - factor) * grey.mean((1, 2, 3), keepdim=True)
    saturation = factor * x + (1 - factor) * grey
    out = torch.where(kind == 0, bright, torch.where(kind == 1, contrast, saturation))
    return out.clamp(0, 1)


class EfficientAD(AnomalyModel):
    """Shared by both sizes (registered as `efficientad_s` / `efficientad_m`: models/efficientad_s.py, _m.py). Learned state: teacher (frozen, copied from the distilled file so a fit is
    self-contained), its channel statistics, student, autoencoder and the four map quantiles."""

    size: ClassVar[PdnSize] = "small"

    class Params(StrictModel):
        """Defaults are a 2-core CPU budget; the paper (and profiles/paper.yaml): 256 px, 70,000 steps at
        batch 1, Adam lr 1e-4, weight decay 1e-5, lr × 0.1 after 95 % of the steps, hard-loss quantile 0.999,
        penalty on ImageNet images, map quantiles 0.9 / 0.995 of validation maps."""

        layers: list[str] = Field(
            ["layer2", "layer3"],
            min_length=1,
            description="backbone layers the teacher was distilled from (must equal distill.layers; checked)",
        )
        teacher: Literal["distilled", "random"] = Field(
            "distilled",
            description="distilled: the distill stage's PDN (the method); random: a seeded random PDN (tests, ablation)",
        )
        image_size: int = Field(128, ge=64, le=2048, description="side the networks see (paper: 256); multiple of 32")
        steps: int = Field(100, ge=1, le=10_000_000, description="optimiser steps (paper: 70,000)")
        batch_size: int = Field(4, ge=1, description="images per step (paper: 1)")
        lr: float = Field(1e-4, gt=0, le=1, description="Adam, as the paper (anomalib: AdamW cost a point)")
        weight_decay: float = Field(1e-5, ge=0)
        lr_drop_at: float = Field(0.95, gt=0, le=1, description="fraction of steps after which lr × 0.1 (paper: 0.95)")
        hard_quantile: float = Field(0.999, ge=0, lt=1, description="hard feature loss quantile (paper: 0.999)")
        penalty_weight: float = Field(1.0, ge=0, description="weight of the out-of-distribution penalty (paper: 1)")
        ae_augment: float = Field(0.2, ge=0, lt=1, description="brightness/contrast/saturation strength (paper: 0.2)")
        q_low: float = Field(0.9, gt=0, lt=1, description="validation-map quantile mapped to 0 (paper: 0.9)")
        q_high: float = Field(0.995, gt=0, lt=1, description="validation-map quantile mapped to 0.1 (paper: 0.995)")
        patience: int = Field(0, ge=0, description="epochs without val-loss improvement before stopping; 0 = never")
        amp: bool = Field(False, description="fp16 autocast on CUDA")
        seed: int = Field(0, ge=0)

        @field_validator("image_size")
        @classmethod
        def _multiple_of_32(cls, v: int) -> int:
            if v % 32:
                raise ValueError(f"image_size must be a multiple of 32, got {v}")
            return v

    def __init__(self, backbone: FeatureExtractor, **params: Any) -> None:
        super().__init__(**params)
        p = self.p
        if p.q_high <= p.q_low:
            raise ValueError(f"models.{self.name}: q_high ({p.q_high}) must exceed q_low ({p.q_low})")
        backbone.require(p.layers)
        self.backbone = backbone
        self.out_size = pdn_out_size(p.image_size)
        with torch.random.fork_rng(devices=[]):  # seeded inits that leave the global RNG alone
            torch.manual_seed(p.seed)
            self.teacher = pdn(self.size)
            self.student = pdn(self.size, out_channels=2 * C)
            self.ae = Autoencoder(p.image_size, self.out_size)
        for q in self.teacher.parameters():
            q.requires_grad_(False)
        self.register_buffer("teacher_mean", torch.zeros(1, C, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, C, 1, 1))
        self.register_buffer("quantiles", torch.zeros(4))  # q_st_low, q_st_high, q_ae_low, q_ae_high
        self._penalty: torch.Tensor | None = None  # uint8 (N, 3, h, w) from the teacher file; not saved
        self._teacher_loaded = False
        self.to(module_device(backbone))

    # -- teacher ---------------------------------------------------------------------------
    def use_teacher(self, teacher_dir: Path) -> dict[str, Any]:
        """Load the distill stage's teacher (and penalty images) from `teacher_dir`; its meta is returned."""
        if self.p.teacher == "random":
            return {}
        got = load_teacher(Path(teacher_dir), self.size)
        meta = got["meta"]
        if meta.get("layers") != list(self.p.layers):
            raise ValueError(
                f"{teacher_dir}: teacher distilled from layers {meta.get('layers')}, models.{self.name}.layers is "
                f"{list(self.p.layers)}: make them equal (distill.layers)"
            )
        if meta.get("arch") and self.backbone.arch and meta["arch"] != self.backbone.arch:
            raise ValueError(f"{teacher_dir}: teacher distilled from {meta['arch']}, backbone is {self.backbone.arch}")
        self.teacher.load_state_dict(got["state"])
        self._penalty = got["penalty"]
        self._teacher_loaded = True
        return meta

    # -- networks --------------------------------------------------------------------------
    def _input(self, images: torch.Tensor) -> torch.Tensor:
        return resize_square(images.float(), self.p.image_size)

    @torch.no_grad()
    def _teacher(self, xn: torch.Tensor) -> torch.Tensor:
        return (self.teacher(xn) - self.teacher_mean) / self.teacher_std

    def _penalty_batch(self, n: int, device: torch.device) -> torch.Tensor | None:
        if self._penalty is None or len(self._penalty) == 0 or self.p.penalty_weight == 0:
            return None
        idx = torch.randint(0, len(self._penalty), (n,), generator=self._gen)
        x = self._input(to_float(self._penalty[idx], device))
        grey = torch.rand(n, generator=self._gen) < 0.3  # the authors' penalty transform: random grayscale 0.3
        if grey.any():
            g = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1).expand_as(x)
            x = torch.where(grey.view(-1, 1, 1, 1).to(device), g, x)
        return self.backbone.normalize(x)

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """L_ST (hard loss + penalty) + L_AE + L_STAE on a float batch (B, C, H, W) in [0, 1]."""
        p = self.p
        x = self._input(images)
        xn = self.backbone.normalize(x)
        t = self._teacher(xn)
        loss = hard_feature_loss(t, self.student(xn)[:, :C], p.hard_quantile)
        pen = self._penalty_batch(1, x.device)  # one penalty image per step, as the paper's batch-1 training
        if pen is not None:
            loss = loss + p.penalty_weight * self.student(pen)[:, :C].pow(2).mean()
        a = self.backbone.normalize(augment_ae(x, self._gen, p.ae_augment) if p.ae_augment > 0 else x)
        ta, ae = self._teacher(a), self.ae(a)
        return loss + (ta - ae).pow(2).mean() + (ae - self.student(a)[:, C:]).pow(2).mean()

    def val_loss(self, images: torch.Tensor) -> torch.Tensor:
        """The deterministic part of `loss` (no augmentation, no penalty): the early-stopping criterion."""
        xn = self.backbone.normalize(self._input(images))
        t, s, ae = self._teacher(xn), self.student(xn), self.ae(xn)
        return (
            hard_feature_loss(t, s[:, :C], self.p.hard_quantile)
            + (t - ae).pow(2).mean()
            + (ae - s[:, C:]).pow(2).mean()
        )

    @torch.no_grad()
    def raw_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) → (student–teacher map, student–autoencoder map), each (B, m, m), m = out_size."""
        xn = self.backbone.normalize(self._input(images))
        t, s, ae = self._teacher(xn), self.student(xn), self.ae(xn)
        return (t - s[:, :C]).pow(2).mean(1), (ae - s[:, C:]).pow(2).mean(1)

    @torch.no_grad()
    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → maps (B, H, W): mean of the two quantile-normalised maps, padded, upsampled."""
        st, ae = self.raw_maps(images)
        q = self.quantiles
        m = 0.5 * quantile_normalize(st, q[0], q[1]) + 0.5 * quantile_normalize(ae, q[2], q[3])
        pad = (self.p.image_size // 4 - self.out_size) // 2  # the PDN's valid region inside the stride-4 grid
        m = F.pad(m.unsqueeze(1), (pad, pad, pad, pad))
        return F.interpolate(m, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]

    # -- fitting ---------------------------------------------------------------------------
    @torch.no_grad()
    def _fit_teacher_stats(self, train: Dataset, device: torch.device) -> None:
        """Per-channel mean / std of the teacher's outputs over the train normals (float64 sums, streamed)."""
        s1 = torch.zeros(C, dtype=torch.float64, device=device)
        s2 = torch.zeros_like(s1)
        n = 0
        for batch in loader(train, self.p.batch_size, pin_memory=device.type == "cuda"):
            t = self.teacher(self.backbone.normalize(self._input(to_float(batch, device)))).double()
            s1 += t.sum((0, 2, 3))
            s2 += t.pow(2).sum((0, 2, 3))
            n += t.shape[0] * t.shape[2] * t.shape[3]
        mean = s1 / n
        std = (s2 / n - mean.pow(2)).clamp_min(1e-12).sqrt()
        self.teacher_mean = mean.float().view(1, C, 1, 1)
        self.teacher_std = std.float().view(1, C, 1, 1)

    @torch.no_grad()
    def _fit_quantiles(self, val: Dataset, device: torch.device) -> None:
        """The 0.9 / 0.995 quantiles of each raw map over every validation-normal map value (never test).
        Values are held (N · m² floats: 2.3 KB per image at 128 px) since exact quantiles need them all."""
        st_vals, ae_vals = [], []
        for batch in loader(val, self.p.batch_size, pin_memory=device.type == "cuda"):
            st, ae = self.raw_maps(to_float(batch, device))
            st_vals.append(st.flatten().cpu().numpy())
            ae_vals.append(ae.flatten().cpu().numpy())
        st_all, ae_all = np.concatenate(st_vals).astype(np.float64), np.concatenate(ae_vals).astype(np.float64)
        qs = [self.p.q_low, self.p.q_high]
        values = [*np.quantile(st_all, qs), *np.quantile(ae_all, qs)]
        self.quantiles = torch.tensor(values, dtype=torch.float32, device=device)

    def fit(self, train: Dataset | torch.Tensor, val: Dataset | torch.Tensor | None = None) -> dict[str, Any]:
        """Teacher statistics on train normals, then `steps` Adam steps on student + autoencoder (the
        shared loop: epochs = ⌈steps / batches per epoch⌉, lr × 0.1 after `lr_drop_at` of them), then the
        map quantiles on the validation normals."""
        p, device = self.p, module_device(self.backbone)
        train, val = as_source(train), as_source(val) if val is not None else None
        if val is None or len(val) == 0:
            raise ValueError(f"models.{self.name}: the map normalisation needs validation normals, got none")
        if p.teacher == "distilled" and not self._teacher_loaded:
            raise TeacherMissingError(
                f"models.{self.name}: no distilled teacher loaded; the fit stage passes data/teachers/"
                f"{self.name}-<backbone> (stage distill), or call use_teacher(dir) first, or set teacher: random"
            )
        self.to(device)
        self._gen = torch.Generator().manual_seed(p.seed + 1)  # augmentation and penalty draws
        self._fit_teacher_stats(train, device)
        per_epoch = math.ceil(len(train) / p.batch_size)
        epochs = math.ceil(p.steps / per_epoch)
        total = epochs * per_epoch
        drop = math.ceil(p.lr_drop_at * total)
        trainable = nn.ModuleList([self.student, self.ae])
        optimizer = torch.optim.Adam(trainable.parameters(), lr=p.lr, weight_decay=p.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.1 if step >= drop else 1.0)
        report = trainer.train(
            trainable=trainable,
            optimizer=optimizer,
            loss_fn=self.loss,
            train=train,
            val=val if p.patience > 0 else None,  # the paper keeps the last weights; validation only to stop early
            settings=LoopSettings(epochs=epochs, batch_size=p.batch_size, patience=p.patience, amp=p.amp),
            generator=torch.Generator().manual_seed(p.seed),
            device=device,
            desc=self.name,
            val_loss_fn=self.val_loss,
            scheduler=scheduler,
        )
        self.eval()
        self._fit_quantiles(val, device)
        report.update(
            steps=report["epochs_run"] * per_epoch,
            lr_drop_step=drop,
            teacher=p.teacher,
            penalty_images=0 if self._penalty is None else len(self._penalty),
            quantiles=[round(float(v), 6) for v in self.quantiles],
        )
        return report

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (B, C, H, W) in [0, 1] → (scores (B,), maps (B, H, W)), float32 on CPU."""
        self.eval()
        x = images.to(module_device(self.backbone), torch.float32)
        return predict_maps(self.anomaly_maps, x, 16)
