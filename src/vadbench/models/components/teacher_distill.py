"""EfficientAD's teacher: a PDN distilled from a backbone's features, and how a model gets it.

The paper distils WideResNet-101 (ImageNet) layer2 + layer3 features into the PDN on ImageNet. Here the
cell's backbone takes that role and FractalDB-style images (``data/fractals``) stand in for ImageNet, so
fractal / random / ImageNet weight sources compare on equal terms (no ImageNet image is ever used).

Targets, as the authors' pretraining script: the backbone sees the image at 2·D px, each of layer2 and
layer3 is unfolded into 3×3 neighbourhoods (C·9 values per position), layer3's grid is bilinearly resized
to layer2's (stride 8 → D/4 × D/4), each layer's vector is average-pooled to 1024 values, the two are
concatenated and average-pooled to 384 channels, then standardised per channel with mean/std over the
distillation images. The PDN (with padding, so its D/4 grid matches) sees the same image at D px and
is trained on the mean squared error with Adam (lr 1e-4, weight decay 1e-5; random grayscale p = 0.1).

`distill_teacher` is deterministic for a fixed seed and thread count: the image order, the grayscale draws
and the PDN init all come from one generator. The result is saved with `save_teacher` (atomic, bytes
independent of the file name) and read back with `load_teacher` (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vadbench.backbones import FeatureExtractor, pick
from vadbench.io import atomic_file, load_tensors
from vadbench.models.components.pdn import TEACHER_CHANNELS, PdnSize, pdn
from vadbench.models.components.resize import resize_square

TEACHER_FILE = "teacher.pt"
CARD_FILE = "card.json"


class TeacherMissingError(FileNotFoundError):
    """The distilled teacher an EfficientAD fit needs is not where the distill stage writes it."""


class FractalImages(Dataset):
    """The fractal images of ``data/fractals`` (``manifest.csv`` order) → uint8 (3, size, size)."""

    def __init__(self, root: Path, size: int, limit: int | None = None) -> None:
        self.root, self.size = Path(root), size
        manifest = self.root / "manifest.csv"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest}: no fractal manifest (run the `fractals` stage first)")
        with open(manifest, newline="") as fh:
            self.paths = [row["path"] for row in csv.DictReader(fh)]
        if limit is not None:
            self.paths = self.paths[:limit]
        if not self.paths:
            raise ValueError(f"{manifest}: lists no images")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.root / self.paths[i]) as im:
            im = im.convert("RGB")
            if im.size != (self.size, self.size):
                im = im.resize((self.size, self.size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class DistillTarget(nn.Module):
    """Backbone features → the paper's 384-channel targets: images (B, C, 2D, 2D) in [0, 1] → (B, 384, D/4, D/4)
    (the first layer's grid; D/4 when it is a stride-8 layer such as resnet layer2)."""

    def __init__(self, backbone: FeatureExtractor, layers: Sequence[str], out_channels: int = TEACHER_CHANNELS) -> None:
        super().__init__()
        backbone.require(layers)
        self.backbone, self.layers, self.out_channels = backbone, list(layers), out_channels

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = pick(self.backbone(images), self.layers)
        b, (h, w) = images.shape[0], feats[0].shape[-2:]
        pooled = []
        for f in feats:
            c = f.shape[1]
            u = F.unfold(f.float(), 3, padding=1).view(b, c * 9, *f.shape[-2:])  # 3×3 neighbourhoods, (C, 3, 3) order
            if u.shape[-2:] != (h, w):
                u = F.interpolate(u, size=(h, w), mode="bilinear", align_corners=False)
            u = u.permute(0, 2, 3, 1).reshape(-1, 1, c * 9)
            pooled.append(F.adaptive_avg_pool1d(u, 1024))
        x = F.adaptive_avg_pool1d(torch.cat(pooled, -1), self.out_channels)  # (B·h·w, 1, 384)
        return x.view(b, h, w, self.out_channels).permute(0, 3, 1, 2).contiguous()


def _grayscale(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Each image of (B, 3, H, W) becomes its luminance (3 equal channels) with probability p."""
    pick_ = torch.rand(len(x), generator=generator) < p
    if not pick_.any():
        return x
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1).expand_as(x)
    return torch.where(pick_.view(-1, 1, 1, 1).to(x.device), grey, x)


@torch.no_grad()
def target_moments(
    target: DistillTarget, images: Dataset, size: int, batch_size: int, device: torch.device, limit: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (each (384,)) of the targets of the first `limit` images, in float64 sums."""
    s1 = s2 = None
    n = 0
    for start in range(0, min(limit, len(images)), batch_size):
        idx = range(start, min(start + batch_size, limit, len(images)))
        x = torch.stack([images[i] for i in idx]).to(device).float().div_(255)
        t = target(resize_square(x, 2 * size)).double()
        s1 = t.sum((0, 2, 3)) if s1 is None else s1 + t.sum((0, 2, 3))
        s2 = t.pow(2).sum((0, 2, 3)) if s2 is None else s2 + t.pow(2).sum((0, 2, 3))
        n += t.shape[0] * t.shape[2] * t.shape[3]
    mean = s1 / n
    std = (s2 / n - mean.pow(2)).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()


def distill_teacher(
    backbone: FeatureExtractor,
    images: Dataset,
    *,
    size: PdnSize,
    layers: Sequence[str],
    image_size: int,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    grayscale: float,
    norm_images: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Distil `backbone`'s layer features into a PDN of `size` on `images` (uint8 (3, D, D) items, D = image_size).

    Returns (PDN state dict on CPU, report: per-step-block losses, the target statistics' summary).
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the global RNG alone
        torch.manual_seed(seed)
        net = pdn(size, padding=True).to(device)
    target = DistillTarget(backbone, layers).to(device)
    mean, std = target_moments(target, images, image_size, batch_size, device, norm_images)
    mean_, std_ = mean.view(1, -1, 1, 1).to(device), std.view(1, -1, 1, 1).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    net.train()
    losses: list[float] = []
    block, order, pos = [], torch.randperm(len(images), generator=gen), 0
    for _ in tqdm(range(steps), desc=f"distill pdn-{size}", leave=False):
        if pos + batch_size > len(order):  # a fresh permutation per pass over the images
            order, pos = torch.randperm(len(images), generator=gen), 0
        idx = order[pos : pos + batch_size].tolist()
        pos += batch_size
        x = torch.stack([images[i] for i in idx]).to(device).float().div_(255)
        x = _grayscale(x, grayscale, gen)
        with torch.no_grad():
            t = (target(resize_square(x, 2 * image_size)) - mean_) / std_
        pred = net(backbone.normalize(resize_square(x, image_size)))
        loss = (pred - t).pow(2).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"distillation loss became {loss.item()}: lower distill.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        block.append(float(loss.detach()))
        if len(block) == max(1, steps // 20):
            losses.append(round(sum(block) / len(block), 6))
            block = []
    if block:
        losses.append(round(sum(block) / len(block), 6))
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    report = {"loss_curve": losses, "final_loss": losses[-1] if losses else math.nan, "steps": steps}
    return state, report


def penalty_subset(fractals: Dataset, count: int, seed: int) -> torch.Tensor:
    """The penalty images: `count` fractals in a seeded random order → uint8 (N, 3, h, w), N = min(count, len);
    (0, 3, 1, 1) when none (the model resizes them to its input)."""
    order = torch.randperm(len(fractals), generator=torch.Generator().manual_seed(seed))[:count]
    if not len(order):
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    return torch.stack([fractals[int(i)] for i in order])


def save_teacher(
    path: Path, size: PdnSize, state: dict[str, torch.Tensor], penalty: torch.Tensor, meta: dict[str, Any]
) -> None:
    """One file: the PDN weights, the penalty images (uint8 (N, 3, h, w)) and a JSON string of `meta`."""
    payload = {"size": size, "state": state, "penalty": penalty.contiguous(), "meta": json.dumps(meta, sort_keys=True)}
    buf = io.BytesIO()  # as AnomalyModel.save: bytes do not depend on the temp file's name
    torch.save(payload, buf)
    with atomic_file(Path(path), "wb") as fh:
        fh.write(buf.getvalue())


def load_teacher(teacher_dir: Path, size: PdnSize) -> dict[str, Any]:
    """The distill stage's output for one model × backbone → {"state", "penalty", "meta"}; named errors."""
    path = Path(teacher_dir) / TEACHER_FILE
    if not path.is_file():
        raise TeacherMissingError(
            f"{path}: no distilled teacher; run the `distill` stage for this model and backbone "
            "(dvc repro distill) or fit with teacher: random"
        )
    payload = load_tensors(path)
    if payload.get("size") != size:
        raise ValueError(f"{path}: holds a PDN-{payload.get('size')} teacher, the model needs PDN-{size}")
    return {"state": payload["state"], "penalty": payload["penalty"], "meta": json.loads(payload["meta"])}
