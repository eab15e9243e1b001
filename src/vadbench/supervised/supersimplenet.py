"""SuperSimpleNet, supervised mode (Rolih et al., ICPR 2024: the paper's second mode), for the supervised track.

The modules are those of `vadbench.models.supersimplenet` (upscaled locally aware features of a frozen backbone,
feature adaptor, segmentation and classification heads, `target_loss`); what changes here is the data:

* training batches hold normals *and* the training folds' real anomalies with their masks; each real mask is
  brought to the feature grid as the paper's code does (bilinear, then ≥ 0.5);
* an anomaly without a mask file (a dataset labelled per image, such as ELPV) adds only the classification
  loss: an all-zero target would teach the segmentation head that the defect is normal;
* the normal images still get the unsupervised mode's Perlin-masked feature noise (a normal copy and a noisy
  copy of each), so real and synthetic anomalies train the heads together;
* the classification head sees the map with gradients (`stop_grad` off: the paper's supervised setting lets the
  image loss shape the map);
* the epoch kept has the lowest loss on the validation data with its *real* targets (validation normals + the
  validation fold's anomalies; no synthetic noise), never on test images.

Features are computed from the frozen backbone per batch (a labelled set is small; no feature cache).
Score variants: ``cls`` (σ(classification logit), the paper's score) and ``map_max`` (the smoothed map's max).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from vadbench.backbones import load_feature_extractor
from vadbench.data.source import loader, to_float
from vadbench.io import load_tensors
from vadbench.models.components.trainer import LoopSettings
from vadbench.models.components.trainer import train as train_loop
from vadbench.models.supersimplenet import SuperSimpleNet

#: what the supervised mode changes in `models.supersimplenet` defaults (the paper's supervised setting)
SUPERVISED_DEFAULTS = {"stop_grad": False}


def feature_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 masks (B, H, W) → float (B, 1, h, w) in {0, 1}: bilinear to the feature grid, then ≥ 0.5."""
    small = F.interpolate(masks[:, None].float(), size=size, mode="bilinear", align_corners=False)
    return (small >= 0.5).float()


class SupervisedSuperSimpleNet:
    """A `SuperSimpleNet` trained on normals + labelled anomalies (items: image, mask, label)."""

    needs_masks: ClassVar[bool] = True
    fixed_thresholds: ClassVar[dict[str, float]] = {}
    primary_variant: ClassVar[str] = "cls"

    def __init__(self, backbone_dir: Path, **hparams: Any) -> None:
        params = {**SUPERVISED_DEFAULTS, **hparams}
        layers = SuperSimpleNet.Params.model_validate(params).layers
        self.backbone_dir = Path(backbone_dir)
        self.model = SuperSimpleNet(backbone=load_feature_extractor(self.backbone_dir, layers), **params)

    def to(self, device: torch.device) -> SupervisedSuperSimpleNet:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.backbone.device

    def _targets(self, batch: Any, device: torch.device, synthetic: bool) -> tuple[torch.Tensor, ...]:
        """(images, masks, labels, mask_known) → adapted features, mask grid, labels, mask_known; normals get
        synthetic copies if asked (their synthetic masks are known)."""
        m = self.model
        images, masks, labels = to_float(batch[0], device), batch[1].to(device), batch[2].to(device)
        adapted = m.adaptor(m.feature_norm(m._features(images)[0]))
        grid = feature_masks(masks, tuple(adapted.shape[-2:]))
        real = labels > 0.5
        grid = grid * real[:, None, None, None]  # a normal image's target is empty, whatever its mask file says
        known = batch[3].to(device)  # false only for an anomaly without a mask file
        if not synthetic or not (~real).any():
            return adapted, grid, real.float(), known
        noisy, syn_masks, syn_labels = m.synthetic_anomalies(adapted[~real])
        return (
            torch.cat([noisy, adapted[real]]),
            torch.cat([syn_masks, grid[real]]),
            torch.cat([syn_labels, torch.ones(int(real.sum()), device=device)]),
            torch.cat([torch.ones(len(noisy), dtype=torch.bool, device=device), known[real]]),
        )

    def fit(self, train: Dataset, val: Dataset | None = None) -> dict[str, Any]:
        m, p, device = self.model, self.model.p, self.device
        labels = np.asarray(train.labels)
        m._gen = torch.Generator().manual_seed(p.seed)
        normals = np.flatnonzero(labels == 0)
        with torch.no_grad():  # feature standardisation from the train normals only, as the unsupervised mode
            m.feature_norm.fit(
                m._features(to_float(b[0], device))[0] for b in loader(train, p.batch_size, indices=normals)
            )
        trainable, optimizer, scheduler = m.optimization(len(train))

        def loss(batch: Any) -> torch.Tensor:
            return m.target_loss(*self._targets(batch, device, synthetic=True))

        def val_loss() -> float:
            total, n = 0.0, 0
            with torch.no_grad():
                for batch in loader(val, p.batch_size):
                    total += float(m.target_loss(*self._targets(batch, device, synthetic=False))) * len(batch[2])
                    n += len(batch[2])
            return total / n

        report = train_loop(
            trainable=trainable,
            optimizer=optimizer,
            loss_fn=loss,
            train=train,
            val=None,
            settings=LoopSettings(epochs=p.epochs, batch_size=p.batch_size, patience=p.patience, min_batch=2),
            generator=torch.Generator().manual_seed(p.seed),
            device=device,
            desc="supersimplenet (supervised)",
            batch_fn=lambda batch, _dev: batch,  # `loss` moves and featurises the batch itself
            val_loss=val_loss if val is not None and len(val) else None,
            scheduler=scheduler,
        )
        m.eval()
        report["n_train"], report["n_train_anomalous"] = len(train), int(labels.sum())
        return report

    @torch.no_grad()
    def score_variants(self, source: Dataset) -> dict[str, np.ndarray]:
        cls, map_max = [], []
        self.model.eval()
        for batch in loader(source, self.model.p.batch_size):
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            maps, scores = self.model.maps_and_scores(to_float(images, self.device))
            cls.append(scores.float().cpu())
            map_max.append(maps.flatten(1).amax(1).float().cpu())
        return {"cls": torch.cat(cls).numpy(), "map_max": torch.cat(map_max).numpy()}

    def save(self, path: Path) -> None:
        self.model.save(path)

    @classmethod
    def load(cls, path: Path, backbone_dir: Path, map_location: str | torch.device = "cpu") -> SupervisedSuperSimpleNet:
        payload = load_tensors(Path(path), map_location)
        out = cls(backbone_dir, **payload["hparams"])
        out.model.load_learned_state(payload["state"])
        out.model.eval()
        return out


def build_supersimplenet(
    backbone_dir: Path | None, hparams: dict[str, Any], device: torch.device
) -> SupervisedSuperSimpleNet:
    if backbone_dir is None:
        raise ValueError("supervised SuperSimpleNet needs a backbone")
    return SupervisedSuperSimpleNet(Path(backbone_dir), **hparams).to(device)
