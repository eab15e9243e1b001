"""f-AnoGAN (Schlegl et al., Medical Image Analysis 2019): a WGAN-GP of normals + an izi_f encoder; score = izi_f loss.

Phase 1 — WGAN-GP on normal images (grey, resized to `image_size` = S, a power of two, rescaled to [−1, 1]):
G: z ~ N(0, I) (N, nz) → Linear → (N, w·S/8, 4, 4) → log2(S) − 2 × [ConvT k4 s2, BN, ReLU] … → Tanh (N, 1, S, S);
C (critic): Conv(1→w, k4 s2) LReLU, then Conv(c→2c, k4 s2) LReLU down to 4×4 (no normalisation: the gradient
penalty is per sample) → features f(x) (N, w·S/8·16) → Linear → one value.
Critic loss C(G(z)) − C(x) + λ_GP (‖∇C(x̃)‖ − 1)², x̃ on random segments between x and G(z); one generator
step −C(G(z)) after every `n_critic` critic steps (each critic step on a fresh real batch, as the reference).
Phase 2 — izi_f encoder E: x → z (the critic's conv pyramid with BatchNorm, then Linear → nz), G and C frozen:
L(x) = mean (x − G(E(x)))² + κ · mean (f(x) − f(G(E(x))))² (means over pixels / features); the image score is
that loss per image (the paper's A(x) = A_R(x) + κ·A_D(x)). Map: the method has none; the map returned is the
pixel residual (x − G(E(x)))² in [0, 1] units, Gaussian-smoothed by `smooth_sigma`, labelled so in docs/MODELS.md.

Training: two calls of the shared loop (`components.trainer.train`). Phase 1 drives the critic through the
loop's optimiser with its `step_fn` hook and steps the generator with this model's second `OptimizerStep`;
it has no validation criterion (a WGAN's losses do not tell a better generator), so it runs all `gan_epochs`
with no early stopping. Phase 2 keeps the encoder of the epoch with the lowest izi_f loss on the validation
normals (early stopping after `patience` epochs, 0 = never).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from torch.utils.data import Dataset

from vadbench.data.source import as_source
from vadbench.models.base import register_model
from vadbench.models.components.pixel_autoencoder import PixelAutoencoderModel
from vadbench.models.components.smoothing import gaussian_blur
from vadbench.models.components.trainer import LoopSettings, OptimizerStep, mean_loss
from vadbench.models.components.trainer import train as train_loop
from vadbench.schema import StrictModel


def conv_pyramid(size: int, width: int, batch_norm: bool) -> tuple[nn.Sequential, int]:
    """(N, 1, size, size) → (N, c, 4, 4) by stride-2 k4 convs with LeakyReLU(0.2); returns (module, c)."""
    layers: list[nn.Module] = [nn.Conv2d(1, width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
    c, s = width, size // 2
    while s > 4:
        layers += [nn.Conv2d(c, 2 * c, 4, 2, 1), *([nn.BatchNorm2d(2 * c)] if batch_norm else [])]
        layers.append(nn.LeakyReLU(0.2, inplace=True))
        c, s = 2 * c, s // 2
    return nn.Sequential(*layers), c


class Generator(nn.Module):
    """z (N, nz) → image (N, 1, S, S) in [−1, 1]."""

    def __init__(self, size: int, width: int, nz: int) -> None:
        super().__init__()
        c = width * size // 8  # the critic's channels at 4×4
        self.c = c
        self.project = nn.Linear(nz, c * 16)
        layers: list[nn.Module] = [nn.BatchNorm2d(c), nn.ReLU(True)]
        s = 4
        while s < size // 2:
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1), nn.BatchNorm2d(c // 2), nn.ReLU(True)]
            c, s = c // 2, 2 * s
        layers += [nn.ConvTranspose2d(c, 1, 4, 2, 1), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).view(-1, self.c, 4, 4))


class Critic(nn.Module):
    """x (N, 1, S, S) → (value (N,), penultimate features f(x) (N, w·S/8·16))."""

    def __init__(self, size: int, width: int) -> None:
        super().__init__()
        self.body, c = conv_pyramid(size, width, batch_norm=False)
        self.head = nn.Linear(c * 16, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x).flatten(1)
        return self.head(f).flatten(), f


class Encoder(nn.Module):
    """x (N, 1, S, S) → z (N, nz) (unbounded, as the reference's default: no tanh or clipping)."""

    def __init__(self, size: int, width: int, nz: int) -> None:
        super().__init__()
        self.body, c = conv_pyramid(size, width, batch_norm=True)
        self.head = nn.Linear(c * 16, nz)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


class FAnoGANNet(nn.Module):
    def __init__(self, size: int, width: int, nz: int) -> None:
        super().__init__()
        self.generator, self.critic = Generator(size, width, nz), Critic(size, width)
        self.encoder = Encoder(size, width, nz)


@register_model
class FAnoGAN(PixelAutoencoderModel):
    """f-AnoGAN: WGAN-GP + izi_f encoder; image score = image + critic-feature residual (pixel input)."""

    name = "fanogan"

    class Params(StrictModel):
        """Defaults sized for 2 CPU cores: 32 px, width 16, lr 5e-4, ~1200 critic steps on 100 normals (~70 s).
        At 64 px or with the paper's lr 1e-4 the generator does not converge in a CPU budget (docs/MODELS.md).

        Paper / reference (tSchlegl/f-AnoGAN): 64×64 grey, ResNet G / critic / encoder of width 64, nz 128,
        z ~ N(0, I), batch 64, WGAN-GP with λ 10, n_critic 5, Adam lr 1e-4 β (0, 0.9); encoder: RMSProp lr 5e-5
        for 50k iterations, κ 1. Here the DCGAN convolutions of the WGAN-GP codebase and Adam for the encoder.
        Paper-scale profile: 64 px, width 64, batch 64, lr 1e-4, gan_epochs / enc_epochs for ~10⁴ generator steps.
        """

        image_size: int = Field(32, ge=16, le=512, description="side S of the grey input, a power of two (paper 64)")
        width: int = Field(16, ge=4, le=256, description="channels of the first conv (paper 64)")
        nz: int = Field(128, ge=1, le=4096, description="latent size (paper 128)")
        batch_size: int = Field(16, ge=2, le=4096, description="both phases (paper 64)")
        gan_epochs: int = Field(170, ge=1, le=100000, description="phase 1 passes over train (critic steps / batch)")
        lr: float = Field(5e-4, gt=0, le=1, description="Adam, generator and critic (paper 1e-4)")
        beta1: float = Field(0.0, ge=0, lt=1, description="Adam β1 of both GAN optimisers (paper 0; β2 0.9)")
        beta2: float = Field(0.9, ge=0, lt=1, description="Adam β2 of both GAN optimisers (paper 0.9)")
        n_critic: int = Field(5, ge=1, le=100, description="critic steps per generator step (paper 5)")
        gp_weight: float = Field(10.0, ge=0, le=1000, description="λ_GP of the gradient penalty (paper 10)")
        enc_epochs: int = Field(40, ge=1, le=100000, description="phase 2 passes over train")
        enc_lr: float = Field(1e-3, gt=0, le=1, description="Adam lr of the encoder (paper: RMSProp 5e-5)")
        kappa: float = Field(1.0, ge=0, le=1000, description="weight κ of the critic-feature residual (paper 1)")
        patience: int = Field(
            0, ge=0, description="encoder phase: epochs without val izi_f improvement before stopping; 0 = never"
        )
        smooth_sigma: float = Field(2.0, ge=0, le=32, description="Gaussian σ (pixels at S) of the residual map")
        seed: int = Field(0, ge=0, description="seeds weight init, noise, penalty mixing and batch order")

        @field_validator("image_size")
        @classmethod
        def _power_of_two(cls, v: int) -> int:
            if v & (v - 1):
                raise ValueError(f"image_size must be a power of two, got {v}")
            return v

    @property
    def input_size(self) -> int:  # type: ignore[override]
        return self.p.image_size

    def build_net(self) -> nn.Module:
        p = self.p
        return FAnoGANNet(p.image_size, p.width, p.nz)  # torch default init, seeded by the base's fork_rng

    # -- losses --------------------------------------------------------------------------------
    def critic_loss(self, real: torch.Tensor, fake: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """C(G(z)) − C(x) + λ_GP · (‖∇C(x̃)‖₂ − 1)², batch means; real / fake (N, 1, S, S) in [−1, 1]."""
        critic = self.net.critic
        eps = torch.rand(len(real), 1, 1, 1, generator=gen).to(real.device)
        mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
        grad = torch.autograd.grad(critic(mixed)[0].sum(), mixed, create_graph=True)[0]
        penalty = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
        return critic(fake)[0].mean() - critic(real)[0].mean() + self.p.gp_weight * penalty

    def izif_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, 1, S, S) in [0, 1] → (per-image izi_f loss (N,), G(E(x)) in [−1, 1]); [−1, 1] units as the paper."""
        net = self.net
        real = x * 2 - 1
        recon = net.generator(net.encoder(real))
        f_real, f_recon = net.critic(real)[1], net.critic(recon)[1]
        image = ((real - recon) ** 2).flatten(1).mean(1)
        return image + self.p.kappa * ((f_real - f_recon) ** 2).mean(1), recon

    def _mean_izif(self, x: torch.Tensor) -> torch.Tensor:
        return self.izif_loss(x)[0].mean()

    # -- fit / predict ---------------------------------------------------------------------------
    def fit(self, train: Dataset | torch.Tensor, val: Dataset | torch.Tensor | None = None) -> dict[str, Any]:
        """Phase 1: WGAN-GP on normals; phase 2: the izi_f encoder with G and C frozen. Returns both reports."""
        p, net, device = self.p, self.net, self.device
        net.requires_grad_(True)  # a second fit: phase 2 of the first one froze G and C
        noise = torch.Generator().manual_seed(p.seed + 1)  # z and penalty mixing: own stream, never the global RNG
        settings = LoopSettings(epochs=p.gan_epochs, batch_size=p.batch_size, patience=0, min_batch=2)
        g_step = OptimizerStep(
            torch.optim.Adam(net.generator.parameters(), p.lr, betas=(p.beta1, p.beta2)), device, False
        )
        critic_steps = 0

        def sample(n: int) -> torch.Tensor:
            return net.generator(torch.randn(n, p.nz, generator=noise).to(device))

        def gan_step(x: torch.Tensor, c_step: OptimizerStep) -> tuple[float, int]:
            nonlocal critic_steps
            real = x * 2 - 1
            with torch.no_grad():
                fake = sample(len(x))
            loss = c_step(self.critic_loss(real, fake, noise))
            critic_steps += 1
            if critic_steps % p.n_critic == 0:
                net.critic.requires_grad_(False)  # the generator step needs ∂C/∂x only
                g_step(-net.critic(sample(p.batch_size))[0].mean())
                net.critic.requires_grad_(True)
            return loss * len(x), len(x)

        gan = train_loop(
            trainable=net.critic,
            optimizer=torch.optim.Adam(net.critic.parameters(), p.lr, betas=(p.beta1, p.beta2)),
            loss_fn=self._mean_izif,  # unused: step_fn takes every step, and there is no validation in phase 1
            train=train,
            val=None,
            settings=settings,
            generator=torch.Generator().manual_seed(p.seed),
            device=device,
            desc=f"{self.name} gan",
            batch_fn=self._batch_input,
            train_mode=lambda: (net.generator.train(), net.critic.train()),
            step_fn=gan_step,
        )
        net.generator.eval()
        net.generator.requires_grad_(False)
        net.critic.requires_grad_(False)
        enc = train_loop(
            trainable=net.encoder,
            optimizer=torch.optim.Adam(net.encoder.parameters(), p.enc_lr),
            loss_fn=self._mean_izif,
            train=train,
            val=val,
            settings=LoopSettings(epochs=p.enc_epochs, batch_size=p.batch_size, patience=p.patience, min_batch=2),
            generator=torch.Generator().manual_seed(p.seed + 2),
            device=device,
            desc=f"{self.name} encoder",
            batch_fn=self._batch_input,
            train_mode=lambda: (net.eval(), net.encoder.train()),  # G's BatchNorm keeps its phase-1 statistics
            eval_mode=lambda: net.eval(),
        )
        self.eval()
        return {"gan": {**gan, "critic_steps": critic_steps}, "encoder": enc}

    @torch.no_grad()
    def izif_val_loss(self, images: Dataset | torch.Tensor) -> float:
        """Mean izi_f loss over an image source (eval mode): the encoder phase's early-stopping criterion."""
        self.net.eval()
        return mean_loss(self._mean_izif, as_source(images), self.p.batch_size, self.device, self._batch_input)

    @torch.no_grad()
    def score_and_residual(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) in [0, 1] → (izi_f scores (N,), smoothed (x − G(E(x)))² maps (N, S, S)), in sub-batches."""
        self.net.eval()
        scores, maps = [], []
        step = max(self.p.batch_size, 32)
        for start in range(0, len(images), step):
            x = self.to_input(images[start : start + step])
            score, recon = self.izif_loss(x)
            scores.append(score)
            maps.append(gaussian_blur(((x - (recon + 1) / 2) ** 2)[:, 0], self.p.smooth_sigma))
        return torch.cat(scores), torch.cat(maps)

    @torch.no_grad()
    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The residual maps (N, 1, S, S) alone (the pixel autoencoders' hook)."""
        return self.score_and_residual(images)[1][:, None]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (B, C, H, W) in [0, 1] → (izi_f scores (B,), residual maps (B, H, W)) float32 on CPU."""
        scores, maps = self.score_and_residual(images)
        full = F.interpolate(maps[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return scores.float().cpu(), full.float().cpu()
