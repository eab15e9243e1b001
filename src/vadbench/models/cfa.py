"""CFA (Lee, Lee & Song, IEEE Access 2022, "CFA: Coupled-Hypersphere-Based Feature Adaptation for
Target-Oriented Anomaly Localization").

A frozen backbone gives patch features: each of `layers` (resnet18 layer1–3) is 3×3-averaged, brought to
the first layer's grid (bilinear) and concatenated (448 channels for resnet18, as the official code). A
trainable 1×1 CoordConv "descriptor" (two coordinate channels in [−1, 1] appended to the input, as the
official `CoordConv2d`) maps them to target-oriented features φ(p) of ΣC / γ_d channels. The memory bank
holds normal-feature centroids: the mean over all train images of φ at each grid position (h·w centroids,
computed once with the initial descriptor, then frozen), reduced to h·w / γ_c centroids by k-means when
γ_c > 1. Training pulls every φ(p) within the radius r of its K nearest centroids and pushes the next J
("hard negatives") out to r² − α (squared distances, as the official code and anomalib):

    L_att = mean_{t,k≤K} max(0, ‖φ(p_t) − c_k‖² − r²)
    L_rep = mean_{t,K<j≤K+J} max(0, r² − ‖φ(p_t) − c_j‖² − α)
    L = (L_att + L_rep) / ν,    ν = 1e-3;  r a trained parameter, initialised at 1e-5 (official code)

Score of a patch: with d_1 ≤ … ≤ d_K its K smallest Euclidean distances, softmin(d_1..d_K)_1 · d_1
(the official code); the (h, w) map is upsampled bilinearly to the input and Gaussian-smoothed (σ = 4),
image score = its maximum. Memory: the bank is (h·w / γ_c) × D whatever N (it is accumulated as a running
float64 sum over a stream of images); frozen features are cached under `feature_cache_gb` as FastFlow does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from vadbench.backbones import FeatureExtractor, pick
from vadbench.data.source import as_source, loader
from vadbench.models.base import AnomalyModel, register_model
from vadbench.models.components.feature_cache import cache_modes, cache_splits, feature_cache_field
from vadbench.models.components.map_normalization import MapNormalization, PositionalMapNorm
from vadbench.models.components.patch_features import locally_aware_embedding, module_device
from vadbench.models.components.smoothing import upsample_and_smooth
from vadbench.models.components.trainer import LoopSettings, predict_maps
from vadbench.models.components.trainer import train as train_loop
from vadbench.schema import StrictModel


def add_coords(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, C + 2, h, w): row and column coordinates in [−1, 1] appended (CoordConv)."""
    b, _, h, w = x.shape
    rows = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    cols = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([x, rows, cols], dim=1)


def squared_distances(phi: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """phi (B, D, h, w), bank (M, D) → ‖φ(p_t) − c_m‖² (B, h·w, M), ≥ 0 (the official expansion, clamped)."""
    rows = phi.flatten(2).transpose(1, 2)  # (B, T, D)
    d2 = rows.pow(2).sum(-1, keepdim=True) + bank.pow(2).sum(-1) - 2.0 * rows @ bank.T
    return d2.clamp_min(0)


def coupled_hypersphere_loss(
    d2: torch.Tensor, radius: torch.Tensor, k: int, j: int, alpha: float, nu: float
) -> torch.Tensor:
    """d2 (B, T, M) squared distances → (L_att + L_rep) / ν over the K nearest and the J after them."""
    nearest = d2.topk(k + j, dim=-1, largest=False).values  # ascending
    r2 = radius.pow(2)
    att = F.relu(nearest[..., :k] - r2).mean()
    rep = F.relu(r2 - nearest[..., k:] - alpha).mean() if j > 0 else d2.new_zeros(())
    return (att + rep) / nu


def softmin_score(d2: torch.Tensor, k: int) -> torch.Tensor:
    """d2 (B, T, M) → patch scores (B, T): softmin over the K smallest distances, its first weight × d_1."""
    d = d2.topk(k, dim=-1, largest=False).values.sqrt()
    return F.softmin(d, dim=-1)[..., 0] * d[..., 0]


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """x (N, D) → k centroids (k, D): k-means++ seeding from `generator`, then Lloyd steps until stable."""
    n = len(x)
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x[first]]
    d2 = (x - x[first]).pow(2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        probs = d2 / total if total > 0 else torch.full_like(d2, 1.0 / n)
        idx = int(torch.multinomial(probs.cpu().double(), 1, generator=generator))
        centers.append(x[idx])
        d2 = torch.minimum(d2, (x - x[idx]).pow(2).sum(1))
    c = torch.stack(centers)
    assign = None
    for _ in range(iters):
        new_assign = torch.cdist(x, c).argmin(1)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        filled = counts > 0  # an empty cluster keeps its previous centroid
        c = torch.where(filled[:, None], sums / counts.clamp_min(1)[:, None], c)
    return c


class CFAHead(nn.Module):
    """What CFA learns: the 1×1 CoordConv descriptor, the radius r and the (frozen) centroid bank."""

    def __init__(self, in_channels: int, out_channels: int, radius: float) -> None:
        super().__init__()
        self.descriptor = nn.Conv2d(in_channels + 2, out_channels, kernel_size=1)
        self.radius = nn.Parameter(torch.tensor([float(radius)]))
        self.register_buffer("bank", torch.empty(0, out_channels))  # (M, D), set by `CFA.init_bank`

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """patch features (B, ΣC, h, w) → φ (B, D, h, w)."""
        return self.descriptor(add_coords(emb))


@register_model
class CFA(AnomalyModel):
    """Coupled-hypersphere feature adaptation. Learned state: ``head.*`` (descriptor, radius, bank)."""

    name = "cfa"

    class Params(StrictModel):
        """Defaults are a 2-core CPU budget. The paper / official code: WideResNet-50 (also ResNet-18:
        layer1–3, 448 channels), 256→224 px, γ_d = γ_c = 1 (their main results), K = 3, J = 3, α = 0.1,
        ν = 1e-3, r initialised at 1e-5 and trained, AdamW with AMSGrad lr 1e-3 wd 5e-4, batch 4, 30 epochs
        (the official script reports the best test epoch; here validation normals pick the epoch), σ = 4."""

        layers: list[str] = Field(
            ["layer1", "layer2", "layer3"],
            min_length=1,
            description="backbone layers, distinct, in network order: the first sets the patch grid",
        )
        gamma_d: int = Field(1, ge=1, le=64, description="descriptor channels = ΣC / gamma_d (paper: 1)")
        gamma_c: int = Field(1, ge=1, le=1024, description="bank = h·w / gamma_c k-means centroids (paper: 1)")
        k: int = Field(3, ge=1, le=64, description="nearest centroids pulled in and scored (paper: 3)")
        j: int = Field(3, ge=0, le=64, description="hard-negative centroids pushed out (paper: 3)")
        alpha: float = Field(0.1, ge=0, le=100, description="repulsion margin: negatives beyond r² − α (paper: 0.1)")
        nu: float = Field(1e-3, gt=0, le=1, description="loss scale 1/ν (official code: 1e-3)")
        radius: float = Field(1e-5, ge=0, le=100, description="initial hypersphere radius r (official: 1e-5)")
        learn_radius: bool = Field(True, description="train r with the descriptor (official code: yes)")
        kmeans_iters: int = Field(300, ge=1, le=10_000, description="Lloyd steps when gamma_c > 1 (official: 3000)")
        epochs: int = Field(20, ge=1, le=10_000, description="maximum epochs (paper: 30)")
        batch_size: int = Field(4, ge=1, description="paper: 4")
        lr: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate (paper: 1e-3)")
        weight_decay: float = Field(5e-4, ge=0, le=1, description="AdamW decoupled weight decay (paper: 5e-4)")
        amsgrad: bool = Field(True, description="AMSGrad variant (paper: yes)")
        patience: int = Field(5, ge=0, description="stop after this many epochs without val improvement; 0 = never")
        sigma: float = Field(4.0, ge=0, le=64, description="Gaussian smoothing of the upsampled map, pixels (paper: 4)")
        map_normalization: MapNormalization = Field(
            "none",
            description="per_position: standardise each map position with validation normals' mean/std (not in the "
            "paper); none: the paper's maps",
        )
        feature_cache_gb: float = feature_cache_field()
        seed: int = Field(0, ge=0)

    def __init__(self, backbone: FeatureExtractor, **params: Any) -> None:
        super().__init__(**params)
        p = self.p
        _check_layers(backbone, p.layers)
        self.backbone = backbone
        in_channels = sum(backbone.channels_of(p.layers))
        out_channels = max(1, in_channels // p.gamma_d)
        with torch.random.fork_rng(devices=[]):  # a seeded descriptor init that leaves the global RNG alone
            torch.manual_seed(p.seed)
            self.head = CFAHead(in_channels, out_channels, p.radius)
        self.head.radius.requires_grad_(p.learn_radius)
        self.map_norm = PositionalMapNorm(p.map_normalization)
        self.to(module_device(backbone))

    # -- features ----------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [0, 1] → frozen patch features (B, ΣC, h, w): 3×3 average, first grid."""
        feats = pick(self.backbone(images.float()), self.p.layers)
        return locally_aware_embedding([f.float() for f in feats], neighborhood=3)

    def _cached_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.embed(images)]

    @property
    def bank(self) -> torch.Tensor:
        return self.head.bank

    # -- memory bank -------------------------------------------------------------------------
    @torch.no_grad()
    def init_bank(self, embeddings: Iterable[torch.Tensor]) -> dict[str, Any]:
        """Set the bank from a stream of patch-feature batches (B, ΣC, h, w) of the train normals.

        φ is accumulated as a float64 running sum over images (memory (D, h, w) whatever N, and the same
        bank for any batching), averaged per position → h·w centroids; k-means to h·w / γ_c when γ_c > 1."""
        p = self.p
        total, n = None, 0
        for emb in embeddings:
            phi = self.head(emb.float()).double().sum(0)
            total = phi if total is None else total + phi
            n += len(emb)
        if total is None or n == 0:
            raise ValueError("cfa: cannot initialise the memory bank from an empty train split")
        centroids = (total / n).flatten(1).T.float().contiguous()  # (h·w, D), row-major positions
        if p.gamma_c > 1:
            m = len(centroids) // p.gamma_c
            if m < 1:
                raise ValueError(
                    f"models.cfa.gamma_c={p.gamma_c} leaves no centroid of the {len(centroids)} grid positions"
                )
            gen = torch.Generator().manual_seed(p.seed)
            centroids = kmeans(centroids.cpu().double(), m, p.kmeans_iters, gen).float().to(centroids.device)
        if len(centroids) < p.k + p.j:
            raise ValueError(
                f"models.cfa: the bank has {len(centroids)} centroids, k + j = {p.k + p.j} need as many: "
                "lower gamma_c, k or j, or use a larger image"
            )
        self.head.bank = centroids
        return {"bank_centroids": len(centroids), "n_train": n}

    def _require_bank(self) -> torch.Tensor:
        if self.head.bank.numel() == 0:
            raise RuntimeError("cfa: predict called before fit (empty memory bank)")
        return self.head.bank

    # -- loss and maps -----------------------------------------------------------------------
    def loss(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """cached patch features [(B, ΣC, h, w)] → the coupled-hypersphere loss (scalar)."""
        p = self.p
        d2 = squared_distances(self.head(feats[0]), self._require_bank())
        return coupled_hypersphere_loss(d2, self.head.radius, p.k, p.j, p.alpha, p.nu)

    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → softmin patch scores on the feature grid (B, h, w)."""
        phi = self.head(self.embed(images))
        scores = softmin_score(squared_distances(phi, self._require_bank()), self.p.k)
        return scores.view(len(images), *phi.shape[-2:])

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → (B, H, W): patch scores upsampled bilinearly, then Gaussian-smoothed (σ)."""
        return upsample_and_smooth(self.patch_scores(images), tuple(images.shape[-2:]), self.p.sigma)

    def normalized_maps(self, images: torch.Tensor) -> torch.Tensor:
        """`anomaly_maps` after the validation-fitted normalisation (identity for ``none``)."""
        return self.map_norm(self.anomaly_maps(images))

    # -- fit / predict -----------------------------------------------------------------------
    def fit(self, train: Dataset | torch.Tensor, val: Dataset | torch.Tensor | None = None) -> dict[str, Any]:
        """Bank from the train normals' initial φ, then the descriptor (and r) trained with the shared loop;
        validation normals pick the epoch (and fit the map normalisation when one is set)."""
        p, device = self.p, module_device(self.backbone)
        train, val = as_source(train), (as_source(val) if val is not None and len(val) > 0 else None)
        self.map_norm.check_val(val, self.name)  # fail before training, not after
        self.to(device)
        # frozen backbone, no augmentation: its features are extracted once, not every epoch
        with cache_splits(self._cached_features, train, val, p.batch_size, device, p.feature_cache_gb) as caches:
            train_feats, val_feats = caches
            self.head.eval()
            bank_report = self.init_bank(train_feats.to_device(b, device)[0] for b in loader(train_feats, p.batch_size))
            params = [q for q in self.head.parameters() if q.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay, amsgrad=p.amsgrad)
            report = train_loop(
                trainable=self.head,
                optimizer=optimizer,
                loss_fn=self.loss,
                train=train_feats,
                val=val_feats,
                settings=LoopSettings(epochs=p.epochs, batch_size=p.batch_size, patience=p.patience),
                generator=torch.Generator().manual_seed(p.seed),
                device=device,
                desc=self.name,
                batch_fn=train_feats.to_device,
            )
        self.eval()
        self.map_norm.calibrate(self.anomaly_maps, val, p.batch_size, device, self.name)  # streamed, no_grad
        report.update(bank_report)
        report["radius"] = float(self.head.radius.detach())
        report["feature_cache"] = cache_modes(train_feats, val_feats)
        return report

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (B, C, H, W) float in [0, 1] → (scores (B,) = map maxima, maps (B, H, W)), float32 on CPU."""
        self.eval()
        x = images.to(module_device(self.backbone), torch.float32)
        return predict_maps(self.normalized_maps, x, self.p.batch_size)


def _check_layers(backbone: FeatureExtractor, layers: list[str]) -> None:
    """Named errors for layers CFA cannot use: missing, repeated, or not in network order."""
    if len(set(layers)) != len(layers):
        raise ValueError(f"models.cfa.layers has repeated names: {layers}")
    backbone.require(layers)
    order = [backbone.layers.index(name) for name in layers]
    if order != sorted(order):
        raise ValueError(
            f"models.cfa.layers must be in network order (the first, finest, sets the patch grid): got {layers}, "
            f"the backbone's order is {backbone.layers}"
        )
