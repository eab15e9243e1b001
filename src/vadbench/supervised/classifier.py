"""Transfer-learning defect classifier (the semiconductor report's recipe), for the supervised track.

A timm backbone from the cell's weight source (``data/backbones/<name>``: random, fractal, imagenet, file)
gets a new head (dropout + one logit). Training, through the shared loop (`components.trainer.train`):

* **stage 1**: the body frozen (BatchNorm statistics too), only the head learns (AdamW, `stage1_lr`);
* **stage 2**: everything unfrozen, with **discriminative learning rates**: one optimiser param group per
  top-level stage of the body (resnet: conv1, bn1, layer1…layer4), learning rates spread geometrically from
  `stage2_lr · body_lr_ratio` (stem) to `stage2_lr` (last stage), the head at `stage2_lr`; cosine decay.
* the minority class is **oversampled** to balance the classes (a seeded, fixed multiset of indices that the
  loop reshuffles every epoch), and every training image gets a random dihedral view + contrast/brightness
  jitter (seeded);
* the epoch kept is the one with the lowest validation BCE (validation normals + the validation fold's
  anomalies, never test).

Scoring: `tta` none (identity view), `mean` (mean probability over the 8 dihedral views) or `vote` (the
fraction of the 8 views whose probability reaches the per-view threshold, chosen by F1 on the validation
data after training; "anomalous" = a strict majority, ≥ 5 of 8). `predict_variants` returns all three.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from vadbench.backbones.weights import WEIGHTS, read_card
from vadbench.data.source import as_source, loader, to_float
from vadbench.io import atomic_file, load_tensors
from vadbench.models.components.resize import resize_square
from vadbench.models.components.trainer import LoopSettings
from vadbench.models.components.trainer import train as train_loop
from vadbench.schema import StrictModel
from vadbench.supervised.augment import DIHEDRAL, augment, dihedral
from vadbench.supervised.params import ClassifierParams
from vadbench.supervised.thresholds import f1_max_threshold

#: the vote variant calls an image anomalous when this fraction of views or more does (5 of 8)
MAJORITY = 5 / 8
TTA_VARIANTS = ("none", "mean", "vote")


class _Balanced(Dataset):
    """`source` with the minority class repeated (a fixed, seeded multiset) until both classes are equal."""

    def __init__(self, source: Any, generator: torch.Generator) -> None:
        self.source = source
        labels = np.asarray(source.labels)
        major, minor = (0, 1) if (labels == 0).sum() >= (labels == 1).sum() else (1, 0)
        idx_minor = np.flatnonzero(labels == minor)
        extra = int((labels == major).sum() - len(idx_minor))
        order = list(range(len(labels)))
        if len(idx_minor) and extra > 0:
            reps = np.tile(idx_minor, extra // len(idx_minor))
            rest = idx_minor[torch.randperm(len(idx_minor), generator=generator).numpy()[: extra % len(idx_minor)]]
            order += reps.tolist() + rest.tolist()
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> Any:
        return self.source[self.order[i]]


class StageClassifier(nn.Module):
    """A timm body up to `stage` (``features_only``) → global pooling → dropout → one logit.

    The head may sit on an earlier stage than the last (`ClassifierParams.stage`): on the weak backbones of
    this benchmark (random init, fractal weights pretrained at 56 px) the last stage's pooled features are
    near chance even for obvious defects, while layer3's are not (docs/MODELS.md)."""

    def __init__(self, body: nn.Module, channels: int, pool: str, dropout: float) -> None:
        super().__init__()
        from timm.layers import SelectAdaptivePool2d

        self.body = body
        self.pool = SelectAdaptivePool2d(pool_type=pool, flatten=True)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * self.pool.feat_mult(), 1)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(self.body(x)[-1])))


def body_stages(net: StageClassifier) -> list[nn.Module]:
    """The body's top-level children that hold parameters, in network order (resnet: conv1, bn1, layer1…)."""
    return [m for m in net.body.children() if any(True for _ in m.parameters())]


def discriminative_groups(net: StageClassifier, lr: float, ratio: float, weight_decay: float) -> list[dict[str, Any]]:
    """One AdamW param group per body stage, lr geometric from lr·ratio (first) to lr (last); head at lr."""
    stages = body_stages(net)
    n = len(stages)
    groups = [
        {
            "params": list(m.parameters()),
            "lr": lr * ratio ** ((n - 1 - i) / max(n - 1, 1)),
            "weight_decay": weight_decay,
        }
        for i, m in enumerate(stages)
    ]
    groups.append({"params": list(net.get_classifier().parameters()), "lr": lr, "weight_decay": weight_decay})
    return groups


def build_net(arch: str, stage: str, dropout: float, pool: str = "avg", weights: Path | None = None) -> StageClassifier:
    """timm `arch` up to `stage` with a fresh one-logit head; `weights` (a body state dict file) loaded into the
    body (the weight source's classifier is dropped by timm's features_only loading)."""
    from vadbench.backbones import build_feature_net

    body = build_feature_net(arch, [stage], weights)
    return StageClassifier(body, body.feature_info.channels()[-1], pool, dropout)


class TransferClassifier(nn.Module):
    """Fine-tuned timm classifier: images (B, C, H, W) in [0, 1] → anomaly probability (B,)."""

    name: ClassVar[str] = "classifier"
    Params: ClassVar[type[StrictModel]] = ClassifierParams
    needs_masks: ClassVar[bool] = False
    #: the vote variant's decision is a strict majority of the 8 views, not a threshold from validation
    fixed_thresholds: ClassVar[dict[str, float]] = {"vote": MAJORITY}

    def __init__(self, arch: str, mean: Any, std: Any, weights: Path | None = None, **params: Any) -> None:
        super().__init__()
        self.p = ClassifierParams.model_validate(params)
        self.hparams = self.p.model_dump(mode="json")
        self.arch = arch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.p.seed)  # the new head's init
            self.net = build_net(arch, self.p.stage, self.p.dropout, self.p.pool, weights)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("view_threshold", torch.tensor(0.5))

    @classmethod
    def from_backbone(cls, backbone_dir: Path, **params: Any) -> TransferClassifier:
        card = read_card(backbone_dir)
        return cls(card.arch, card.mean, card.std, Path(backbone_dir) / WEIGHTS, **params)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 1 or 3, H, W) in [0, 1] → logits (B,)."""
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        if self.p.input_size is not None:
            x = resize_square(x, self.p.input_size)
        return self.net((x - self.mean) / self.std)[:, 0]

    # -- training ---------------------------------------------------------------------------
    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.binary_cross_entropy_with_logits(self.logits(x).float(), y)

    def fit(self, train: Dataset, val: Dataset | None = None) -> dict[str, Any]:
        """Train on labelled `train` items (uint8 image, float label); `val` (same form) picks the epoch and
        the per-view threshold. Returns the loop's reports of both stages."""
        p, device = self.p, self.device
        labels = np.asarray(train.labels)
        if not (labels == 0).any() or not (labels == 1).any():
            raise ValueError("the supervised classifier needs normal and anomalous training images")
        gen = torch.Generator().manual_seed(p.seed)
        data = _Balanced(train, gen) if p.oversample else train
        aug_gen = torch.Generator().manual_seed(p.seed + 1)

        def to_device(batch: Any, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = to_float(batch[0], dev), batch[1].to(dev, torch.float32)
            return (augment(x, aug_gen, p.jitter) if p.augment and self.net.training else x), y

        has_val = val is not None and len(val) > 0

        def val_loss() -> float:
            total, n = 0.0, 0
            with torch.no_grad():
                for batch in loader(val, p.batch_size):
                    x, y = to_float(batch[0], device), batch[1].to(device, torch.float32)
                    total += float(F.binary_cross_entropy_with_logits(self.logits(x), y, reduction="sum"))
                    n += len(y)
            return total / n

        body = [prm for m in body_stages(self.net) for prm in m.parameters()]
        head = list(self.net.get_classifier().parameters())
        reports: dict[str, Any] = {"n_train": len(train), "n_train_anomalous": int(labels.sum())}
        reports["n_oversampled"] = len(data)
        steps = math.ceil(len(data) / p.batch_size)

        def frozen_body_mode() -> None:
            self.net.train()
            for m in body_stages(self.net):
                m.eval()  # stage 1: BatchNorm statistics stay those of the weight source

        common = dict(
            loss_fn=self._loss,
            train=data,
            val=None,
            generator=gen,
            device=device,
            batch_fn=to_device,
            val_loss=val_loss if has_val else None,
        )
        if p.stage1_epochs:
            for prm in body:
                prm.requires_grad_(False)
            opt = torch.optim.AdamW(head, lr=p.stage1_lr, weight_decay=p.weight_decay)
            reports["stage1"] = train_loop(
                trainable=self.net,
                optimizer=opt,
                settings=LoopSettings(epochs=p.stage1_epochs, batch_size=p.batch_size, min_batch=2),
                desc="classifier stage 1",
                train_mode=frozen_body_mode,
                **common,
            )
            for prm in body:
                prm.requires_grad_(True)
        if p.stage2_epochs:
            opt = torch.optim.AdamW(discriminative_groups(self.net, p.stage2_lr, p.body_lr_ratio, p.weight_decay))
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(p.stage2_epochs * steps, 1))
            reports["stage2"] = train_loop(
                trainable=self.net,
                optimizer=opt,
                settings=LoopSettings(
                    epochs=p.stage2_epochs, batch_size=p.batch_size, patience=p.patience, min_batch=2
                ),
                desc="classifier stage 2",
                scheduler=sched,
                **common,
            )
        self.eval()
        if has_val:
            views = self.view_probabilities_stream(val)[:, 0]
            self.view_threshold.fill_(f1_max_threshold(views, np.asarray(val.labels)))
        reports["view_threshold"] = round(float(self.view_threshold), 6)
        return reports

    # -- scoring ----------------------------------------------------------------------------
    @torch.no_grad()
    def view_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [0, 1] → probabilities (B, 8) of the 8 dihedral views (view 0: identity)."""
        self.eval()
        x = images.to(self.device, torch.float32)
        return torch.stack([torch.sigmoid(self.logits(dihedral(x, v))) for v in range(len(DIHEDRAL))], 1).cpu()

    @torch.no_grad()
    def view_probabilities_stream(self, source: Dataset) -> np.ndarray:
        """(N, 8) view probabilities of a source whose items are images or (image, ..., label) tuples."""
        out = []
        for batch in loader(as_source(source), self.p.batch_size):
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            out.append(self.view_probabilities(to_float(images, self.device)))
        return torch.cat(out).numpy()

    def variants_from_views(self, views: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """(N, 8) view probabilities → {none, mean, vote} scores (N,)."""
        v = torch.as_tensor(views, dtype=torch.float32)
        votes = (v >= self.view_threshold.cpu()).float().mean(1)
        return {"none": v[:, 0].numpy(), "mean": v.mean(1).numpy(), "vote": votes.numpy()}

    @property
    def primary_variant(self) -> str:
        return self.p.tta

    def score_variants(self, source: Dataset) -> dict[str, np.ndarray]:
        """Every variant's scores (N,) of a source, from one pass of its 8 views."""
        return self.variants_from_views(self.view_probabilities_stream(source))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [0, 1] → scores (B,) of the configured `tta`, float32 on CPU."""
        if self.p.tta == "none":
            self.eval()
            return torch.sigmoid(self.logits(images.to(self.device, torch.float32))).float().cpu()
        return torch.from_numpy(self.variants_from_views(self.view_probabilities(images))[self.p.tta])

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        payload = {
            "name": self.name,
            "arch": self.arch,
            "hparams": self.hparams,
            "state": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
        buf = io.BytesIO()  # through a buffer: the zip's inner folder name is the file's, keep bytes stable
        torch.save(payload, buf)
        with atomic_file(Path(path), "wb") as fh:
            fh.write(buf.getvalue())

    @classmethod
    def load(cls, path: Path, map_location: str | torch.device = "cpu") -> TransferClassifier:
        payload = load_tensors(Path(path), map_location)
        state = payload["state"]
        model = cls(
            payload["arch"],
            state["mean"].flatten().tolist(),
            state["std"].flatten().tolist(),
            None,
            **payload["hparams"],
        )
        model.load_state_dict(state)
        return model.to(map_location).eval()


def build_classifier(backbone_dir: Path | None, hparams: dict[str, Any], device: torch.device) -> TransferClassifier:
    if backbone_dir is None:
        raise ValueError("the supervised classifier needs a backbone (its weight source)")
    return TransferClassifier.from_backbone(Path(backbone_dir), **hparams).to(device)
