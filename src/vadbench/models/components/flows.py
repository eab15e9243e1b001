"""Affine coupling blocks for normalizing flows (FastFlow's 2-D flows, CFlow's conditional flows).

One block is what FrEIA's ``AllInOneBlock`` does in the reference code, written out here (FrEIA is not
a dependency): split the channels, transform the second half with a soft-clamped affine map whose
coefficients a subnet computes from the first half (plus an optional condition vector), apply a
learned per-channel scale and offset (ActNorm-like, scale = 0.1·softplus_β=0.5, initialised to 1),
then a fixed channel permutation (a hard permutation, or a random rotation when ``soft``).
Only the forward direction (data → latent z) is implemented: anomaly detection needs densities,
never samples. Each block returns z and log|det ∂z/∂x| per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SubnetFactory = Callable[[int, int], nn.Module]
"""(in_channels, out_channels) → subnet computing the coupling coefficients."""


def conv_subnet(kernel_size: int, hidden_ratio: float) -> SubnetFactory:
    """FastFlow's subnet: conv k×k → ReLU → conv k×k, 'same' padding, hidden = ratio·in channels."""

    def make(c_in: int, c_out: int) -> nn.Module:
        hidden = max(1, int(round(c_in * hidden_ratio)))
        pad = kernel_size // 2
        return nn.Sequential(
            nn.Conv2d(c_in, hidden, kernel_size, padding=pad),
            nn.ReLU(),
            nn.Conv2d(hidden, c_out, kernel_size, padding=pad),
        )

    return make


def fc_subnet(hidden_ratio: float) -> SubnetFactory:
    """CFlow's subnet: linear → ReLU → linear, hidden = ratio·in features (the paper uses 2)."""

    def make(c_in: int, c_out: int) -> nn.Module:
        hidden = max(1, int(round(c_in * hidden_ratio)))
        return nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, c_out))

    return make


def _softplus_inverse_scale(scale: float) -> float:
    # raw value a with 0.1·softplus_{β=0.5}(a) == scale, so the global affine starts as the identity
    return 2.0 * math.log(math.expm1(0.5 * 10.0 * scale))


class AffineCouplingBlock(nn.Module):
    """x (N, C) or (N, C, H, W) [+ condition (N, P[, H, W])] → (z same shape, log|det J| (N,)).

    Coupling: x = [x1 | x2] with |x1| = C − C//2; a = 0.1·subnet([x1, cond]);
    s = clamp·tanh(a_s) (soft clamp keeps exp(s) in [e^−clamp, e^clamp]); x2' = x2·exp(s) + a_t.
    Then y = P(g ⊙ [x1 | x2'] + b) with g, b per channel and P a fixed orthogonal matrix.
    """

    def __init__(
        self,
        channels: int,
        subnet: SubnetFactory,
        *,
        clamp: float,
        cond_channels: int = 0,
        soft_permutation: bool = False,
        rng: np.random.Generator,
    ) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling block needs at least 2 channels, got {channels}")
        self.channels = channels
        self.split = channels - channels // 2
        self.clamp = float(clamp)
        self.cond_channels = cond_channels
        self.subnet = subnet(self.split + cond_channels, 2 * (channels // 2))
        self.global_scale = nn.Parameter(torch.full((channels,), _softplus_inverse_scale(1.0)))
        self.global_offset = nn.Parameter(torch.zeros(channels))
        if soft_permutation:
            # random rotation (det +1): mixes all channels, log|det| = 0
            from scipy.stats import special_ortho_group

            w = special_ortho_group.rvs(channels, random_state=rng)
        else:
            w = np.eye(channels)[rng.permutation(channels)]
        # a buffer, not a parameter: fixed, but saved so a loaded model never depends on the RNG
        self.register_buffer("permutation", torch.as_tensor(w, dtype=torch.float32))

    def _per_channel(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        return v.view(1, -1, *([1] * (ndim - 2)))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[1] != self.channels:
            raise ValueError(f"coupling block expects {self.channels} channels, got {tuple(x.shape)}")
        sum_dims = tuple(range(1, x.ndim))
        x1, x2 = x[:, : self.split], x[:, self.split :]
        inp = x1 if cond is None else torch.cat([x1, cond], dim=1)
        a = 0.1 * self.subnet(inp)  # small start: every block begins close to the identity
        a_s, a_t = a.chunk(2, dim=1)
        s = self.clamp * torch.tanh(a_s)
        y = torch.cat([x1, x2 * torch.exp(s) + a_t], dim=1)
        log_det = s.sum(dim=sum_dims)
        scale = 0.1 * F.softplus(self.global_scale, beta=0.5)
        y = y * self._per_channel(scale, x.ndim) + self._per_channel(self.global_offset, x.ndim)
        n_positions = x[0, 0].numel()  # the per-channel scale acts at every spatial position
        log_det = log_det + n_positions * torch.log(scale).sum()
        if x.ndim == 2:
            y = y @ self.permutation.T
        else:
            y = F.conv2d(y, self.permutation[:, :, None, None])
        return y, log_det


class SequentialFlow(nn.Module):
    """A chain of coupling blocks: x → (z, Σ log|det J|); the same condition feeds every block."""

    def __init__(self, blocks: list[AffineCouplingBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for block in self.blocks:
            x, ld = block(x, cond)
            log_det = log_det + ld
        return x, log_det


def gaussian_log_likelihood(z: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
    """log p(x) under a standard-normal latent: z (N, D…), log_det (N,) → (N,)."""
    dims = z[0].numel()
    return -0.5 * z.pow(2).flatten(1).sum(1) - 0.5 * dims * math.log(2 * math.pi) + log_det
