"""Reverse Distillation (Deng & Li, CVPR 2022, "Anomaly Detection via Reverse Distillation from One-Class Embedding").

The frozen teacher encoder gives three feature maps (layer1–3). A trainable one-class bottleneck
(OCBE) fuses them — layer1 and layer2 are brought to layer3's grid by strided 3×3 convs, concatenated
with layer3 and squeezed by residual blocks into a compact embedding at half layer3's resolution —
and a student *decoder* mirroring the encoder (transposed-conv residual blocks) reconstructs the
three teacher maps from that embedding. Trained on normals to maximise the cosine similarity of
each scale's teacher and student maps — by default of the whole flattened (C·H·W) maps, as the
official code (hq-deng/RD4AD `loss_fucntion`) and anomalib do, not per position as the paper's
eq. 2 reads (`loss: per_position`); at test time 1 − cos per position, upsampled and summed over
scales, Gaussian σ=4, is the anomaly map; the image score is its maximum.

Convolutions of the bottleneck and decoder start from Kaiming-normal (fan-out) weights, as the
official code's ResNet layers do (transposed convolutions keep PyTorch's default, as there).
Measured against anomalib 2.7 on equal weights and epochs (docs/MODELS.md): the per-position loss
with PyTorch's default init trained a far weaker student in a short budget.

Architecture for a BasicBlock ResNet (ResNet-18/34): teacher channels (c1, c2, c3) = (64, 128, 256),
embedding 2·c3 = 512 channels; the decoder maps 512 → c3 → c2 → c1, each stage doubling resolution.
The paper uses WideResNet-50 (Bottleneck blocks); here BasicBlocks are used for any teacher width.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from vadbench.backbones import FeatureExtractor, pick
from vadbench.data.source import as_source
from vadbench.models.base import AnomalyModel, register_model
from vadbench.models.components import trainer
from vadbench.models.components.map_normalization import MapNormalization, PositionalMapNorm
from vadbench.models.components.patch_features import module_device
from vadbench.models.components.smoothing import gaussian_blur
from vadbench.models.components.trainer import LoopSettings, predict_maps
from vadbench.schema import StrictModel


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ResBlock(nn.Module):
    """ResNet BasicBlock: (B, c_in, h, w) → (B, c_out, h/stride, w/stride)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class UpBlock(nn.Module):
    """The decoder's mirrored BasicBlock: (B, c_in, h, w) → (B, c_out, 2h, 2w) when `up`, via 2×2 transposed convs."""

    def __init__(self, c_in: int, c_out: int, up: bool) -> None:
        super().__init__()
        first = nn.ConvTranspose2d(c_in, c_out, 2, 2, bias=False) if up else nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False)
        self.conv1, self.bn1 = first, nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        if up:
            self.shortcut = nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 2, 2, bias=False), nn.BatchNorm2d(c_out))
        elif c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class OneClassBottleneck(nn.Module):
    """OCBE: teacher maps [(B,c1,4h,4w), (B,c2,2h,2w), (B,c3,h,w)] → embedding (B, 2·c3, h/2, w/2)."""

    def __init__(self, channels: list[int], blocks: int) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.down1 = nn.Sequential(_conv_bn_relu(c1, c2, 2), _conv_bn_relu(c2, c3, 2))  # layer1: two halvings
        self.down2 = _conv_bn_relu(c2, c3, 2)  # layer2: one halving
        fuse = [ResBlock(3 * c3, 2 * c3, stride=2)] + [ResBlock(2 * c3, 2 * c3) for _ in range(blocks - 1)]
        self.fuse = nn.Sequential(*fuse)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3 = feats
        return self.fuse(torch.cat([self.down1(f1), self.down2(f2), f3], dim=1))


class ReverseDecoder(nn.Module):
    """Student decoder: embedding (B, 2·c3, h/2, w/2) → [(B,c1,4h,4w), (B,c2,2h,2w), (B,c3,h,w)]."""

    def __init__(self, channels: list[int], blocks: int) -> None:
        super().__init__()
        c1, c2, c3 = channels

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                UpBlock(c_in, c_out, up=True), *[UpBlock(c_out, c_out, up=False) for _ in range(blocks - 1)]
            )

        self.stage3, self.stage2, self.stage1 = stage(2 * c3, c3), stage(c3, c2), stage(c2, c1)

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        d3 = self.stage3(z)
        d2 = self.stage2(d3)
        d1 = self.stage1(d2)
        return [d1, d2, d3]


@register_model
class ReverseDistillation(AnomalyModel):
    """RD4AD. Learned state: ``bottleneck.*`` (OCBE) and ``decoder.*`` (the student)."""

    name = "reverse_distillation"

    class Params(StrictModel):
        """Defaults are a 2-core CPU budget; the paper: WideResNet-50 teacher, 200 epochs, batch 16,
        256×256 inputs, Adam lr 0.005 β=(0.5, 0.999), 3 residual blocks per decoder stage (ResNet-50
        mirror), σ=4 smoothing of the summed (1 − cos) maps. The default lr is 0.001: at 0.005 the
        validation loss of short CPU runs oscillated (toy data, random teacher) and detection was worse."""

        layers: list[str] = Field(["layer1", "layer2", "layer3"], min_length=3, max_length=3)
        epochs: int = Field(25, ge=1, le=10_000, description="maximum epochs (paper: 200)")
        batch_size: int = Field(16, ge=1)
        lr: float = Field(0.001, gt=0, le=1, description="Adam learning rate (paper: 0.005, noisy in short runs)")
        beta1: float = Field(0.5, ge=0, lt=1, description="Adam β1 (paper: 0.5)")
        beta2: float = Field(0.999, ge=0, lt=1)
        blocks: int = Field(2, ge=1, le=4, description="residual blocks per decoder stage and in the OCBE")
        loss: Literal["flattened", "per_position"] = Field(
            "flattened",
            description="flattened: 1 − cos of each scale's whole map per image (official code, anomalib); "
            "per_position: 1 − cos along channels at every position, averaged (the paper's eq. 2)",
        )
        sigma: float = Field(4.0, ge=0, description="Gaussian smoothing of the map in input pixels (0 = none)")
        patience: int = Field(5, ge=0, description="stop after this many epochs without val improvement; 0 = never")
        amp: bool = Field(False, description="fp16 autocast on CUDA (the paper trains in fp32)")
        map_normalization: MapNormalization = Field(
            "per_position",
            description="per_position: standardise each map position with validation normals' mean/std (not in the paper; "
            "undoes border artefacts of short training); none: the paper's raw maps",
        )
        seed: int = Field(0, ge=0)

    def __init__(self, backbone: FeatureExtractor, **params: Any) -> None:
        super().__init__(**params)
        p = self.p
        channels = backbone.channels_of(p.layers)  # the teacher must return all three scales (by name)
        strides = [backbone.reductions[name] for name in p.layers]
        if [b / a for a, b in zip(strides, strides[1:])] != [2, 2]:
            raise ValueError(
                f"reverse_distillation: layers {p.layers} have strides {strides}; each must be twice the "
                "previous (e.g. ResNet layer1–3)"
            )
        self.backbone = backbone
        with torch.random.fork_rng(devices=[]):  # seeded init that leaves the global RNG alone
            torch.manual_seed(p.seed)
            self.bottleneck = OneClassBottleneck(channels, p.blocks)
            self.decoder = ReverseDecoder(channels, p.blocks)
            for conv in [m for m in self._trainable().modules() if type(m) is nn.Conv2d]:
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        self.map_norm = PositionalMapNorm(p.map_normalization)
        self.to(module_device(backbone))

    def _pairs(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """images (B, C, H, W) → per scale (teacher (B, c_l, h_l, w_l), student reconstruction of it)."""
        teacher = pick(self.backbone(images), self.p.layers)
        student = self.decoder(self.bottleneck(teacher))
        return [(t.float(), s.float()) for t, s in zip(teacher, student)]

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Σ_scales mean over the batch of 1 − cos(t, s): of the flattened maps, or per position (`loss`)."""
        if self.p.loss == "flattened":
            return sum(
                (1 - F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1)).mean() for t, s in self._pairs(images)
            )
        return sum((1 - F.cosine_similarity(t, s, dim=1)).mean() for t, s in self._pairs(images))

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → (B, H, W): Σ_scales upsampled (1 − cos), then Gaussian-smoothed."""
        size = images.shape[-2:]
        total = torch.zeros(images.shape[0], *size, device=images.device)
        for t, s in self._pairs(images):
            d = (1 - F.cosine_similarity(t, s, dim=1)).unsqueeze(1)
            total += F.interpolate(d, size=size, mode="bilinear", align_corners=True)[:, 0]
        return gaussian_blur(total, self.p.sigma)

    def _trainable(self) -> nn.ModuleDict:
        return nn.ModuleDict({"bottleneck": self.bottleneck, "decoder": self.decoder})

    def fit(self, train: Dataset | torch.Tensor, val: Dataset | torch.Tensor | None = None) -> dict[str, Any]:
        """Train OCBE + decoder on a stream of normal images (the shared loop: seeded order, early stopping on
        the validation loss, best epoch kept), then fit the map normalisation on the validation stream."""
        p, device = self.p, module_device(self.backbone)
        train, val = as_source(train), as_source(val) if val is not None else None
        self.map_norm.check_val(val, self.name)  # fail before training, not after
        self.to(device)
        student = self._trainable()
        report = trainer.train(
            trainable=student,
            optimizer=torch.optim.Adam(student.parameters(), lr=p.lr, betas=(p.beta1, p.beta2)),
            loss_fn=self.loss,
            train=train,
            val=val,
            settings=LoopSettings(epochs=p.epochs, batch_size=p.batch_size, patience=p.patience, amp=p.amp),
            generator=torch.Generator().manual_seed(p.seed),
            device=device,
            desc=self.name,
        )
        self.eval()
        self.map_norm.calibrate(self.anomaly_maps, val, p.batch_size, device, self.name)  # streamed, no_grad
        return report

    def normalized_maps(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → `anomaly_maps` after the validation-fitted normalisation (B, H, W)."""
        return self.map_norm(self.anomaly_maps(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (B, C, H, W) in [0, 1] → (scores (B,), maps (B, H, W)), float32 on CPU."""
        self.eval()
        x = images.to(module_device(self.backbone), torch.float32)
        return predict_maps(self.normalized_maps, x, self.p.batch_size)
