"""GANomaly (Akçay, Atapour-Abarghouei, Breckon, ACCV 2018): an encoder-decoder-encoder GAN; score = ‖z − ẑ‖².

Generator (DCGAN convolutions, grey input resized to `image_size` = S, a power of two, rescaled to [−1, 1]):
GE: x (N, 1, S, S) → z (N, nz, 1, 1): Conv(1→w, k4 s2) LReLU, then log2(S) − 3 blocks Conv(c→2c, k4 s2) BN LReLU
down to 4×4, then Conv(k4, valid) → 1×1;  GD: z → x̂ (N, 1, S, S): the mirror with ConvT, BN, ReLU, Tanh;
E: x̂ → ẑ, the architecture of GE.  Discriminator D: the architecture of GE ending in one logit; its features
are the (N, w·S/8, 4, 4) map before the last conv.
Generator loss: w_adv · ‖D_f(x) − D_f(x̂)‖² (feature matching, mean) + w_con · |x − x̂|₁ + w_enc · ‖z − ẑ‖²;
discriminator loss: (BCE(D(x), 1) + BCE(D(x̂), 0)) / 2; D is re-initialised when that loss falls below 1e-5,
as the reference code does. Image score: mean (z − ẑ)² over the nz latent units (the paper's A(x)).
Map: the method has none. The map returned is the pixel residual |x − x̂| (in [0, 1] units,
Gaussian-smoothed by `smooth_sigma`), not the method's score; `has_pixel_maps` is True only because this
residual exists, and docs/MODELS.md labels it so.

Training: the shared loop (`components.trainer.train`) with its `step_fn` hook: per batch one generator step
(the loop's optimiser) then one discriminator step (this model's second `OptimizerStep`), the reference's
order. The loop keeps the generator of the epoch with the lowest validation contextual loss |x − x̂|₁ on the
validation normals (the reference selects the epoch by test AUROC, which a benchmark must not do).
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

#: discriminator loss below this → re-initialise D (reference: `if err_d < 1e-5: reinit_d()`)
_D_COLLAPSE = 1e-5


def dcgan_encoder(size: int, width: int, out: int) -> nn.Sequential:
    """(N, 1, size, size) → (N, out, 1, 1): the pyramid of GE / E / D (the last module is the final conv)."""
    layers: list[nn.Module] = [nn.Conv2d(1, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
    c, s = width, size // 2
    while s > 4:  # one stride-2 block per halving down to 4×4
        layers += [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2, inplace=True)]
        c, s = 2 * c, s // 2
    layers.append(nn.Conv2d(c, out, 4, 1, 0, bias=False))
    return nn.Sequential(*layers)


def dcgan_decoder(size: int, width: int, nz: int) -> nn.Sequential:
    """(N, nz, 1, 1) → (N, 1, size, size) in [−1, 1]: GD, the mirror of `dcgan_encoder`."""
    c = width * size // 8  # the encoder's channels at 4×4
    layers: list[nn.Module] = [nn.ConvTranspose2d(nz, c, 4, 1, 0, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]
    s = 4
    while s < size // 2:
        layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(True)]
        c, s = c // 2, 2 * s
    layers += [nn.ConvTranspose2d(c, 1, 4, 2, 1, bias=False), nn.Tanh()]
    return nn.Sequential(*layers)


def dcgan_init(module: nn.Module, generator: torch.Generator) -> None:
    """The reference's weights_init, seeded: conv N(0, 0.02), BatchNorm weight N(1, 0.02), bias 0.

    Drawn on the CPU (`generator` is a CPU generator) and copied, so a model on CUDA gets the same weights."""

    def normal(t: torch.Tensor, mean: float) -> None:
        with torch.no_grad():
            t.copy_(torch.empty(t.shape).normal_(mean, 0.02, generator=generator))

    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            normal(m.weight, 0.0)
        elif isinstance(m, nn.BatchNorm2d):
            normal(m.weight, 1.0)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """x (N, 1, S, S) in [−1, 1] → (x̂ (N, 1, S, S) in [−1, 1], z (N, nz), ẑ (N, nz))."""

    def __init__(self, size: int, width: int, nz: int) -> None:
        super().__init__()
        self.encoder1, self.decoder = dcgan_encoder(size, width, nz), dcgan_decoder(size, width, nz)
        self.encoder2 = dcgan_encoder(size, width, nz)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encoder1(x)
        fake = self.decoder(z)
        return fake, z.flatten(1), self.encoder2(fake).flatten(1)


class Discriminator(nn.Module):
    """x (N, 1, S, S) → (logit (N,), features (N, w·S/8, 4, 4))."""

    def __init__(self, size: int, width: int) -> None:
        super().__init__()
        layers = list(dcgan_encoder(size, width, 1))
        self.features, self.classifier = nn.Sequential(*layers[:-1]), layers[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.classifier(f).flatten(), f


class GanomalyNet(nn.Module):
    def __init__(self, size: int, width: int, nz: int) -> None:
        super().__init__()
        self.generator, self.discriminator = Generator(size, width, nz), Discriminator(size, width)


@register_model
class Ganomaly(PixelAutoencoderModel):
    """GANomaly: adversarially trained encoder-decoder-encoder; image score = latent distance (pixel input)."""

    name = "ganomaly"

    class Params(StrictModel):
        """Defaults sized for 2 CPU cores: the paper's 32 px, width 32, 50 epochs (~60 s on 100 normals; a
        64 px run needed ~2× the steps for the same latent-score AUROC on toy data, docs/MODELS.md).

        Paper / reference (samet-akcay/ganomaly): 32 px (MNIST, CIFAR-10), ndf = ngf = 64, nz 100, batch 64,
        15 epochs, Adam lr 2e-4, β (0.5, 0.999), w_adv 1, w_con 50, w_enc 1, scores min-max normalised over
        the test set (a monotone map per test set: AUROC is unchanged, so it is not done here).
        Paper-scale profile: 128 px (a stride-2 block per doubling), width 64, batch 64, epochs for ~10⁴ steps.
        """

        image_size: int = Field(32, ge=16, le=512, description="side S of the grey input, a power of two")
        width: int = Field(32, ge=4, le=256, description="channels of the first conv (ndf = ngf; paper 64)")
        nz: int = Field(100, ge=1, le=4096, description="latent size (paper 100)")
        epochs: int = Field(50, ge=1, le=10000, description="paper 15 (on 6k–60k images)")
        batch_size: int = Field(16, ge=2, le=4096, description="paper 64")
        lr: float = Field(2e-4, gt=0, le=1, description="Adam, generator and discriminator (paper 2e-4)")
        beta1: float = Field(0.5, ge=0, lt=1, description="Adam β1 (paper 0.5; β2 0.999)")
        w_adv: float = Field(1.0, ge=0, le=1000, description="weight of the feature-matching loss (paper 1)")
        w_con: float = Field(50.0, ge=0, le=1000, description="weight of the L1 contextual loss (paper 50)")
        w_enc: float = Field(1.0, ge=0, le=1000, description="weight of the latent L2 loss (paper 1)")
        patience: int = Field(
            0, ge=0, description="epochs without val contextual-loss improvement before stopping; 0 = never"
        )
        smooth_sigma: float = Field(2.0, ge=0, le=32, description="Gaussian σ (pixels at S) of the residual map")
        seed: int = Field(0, ge=0, description="seeds weight init, D re-inits and batch order")

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
        net = GanomalyNet(p.image_size, p.width, p.nz)
        dcgan_init(net, torch.Generator().manual_seed(p.seed))
        return net

    # -- losses --------------------------------------------------------------------------------
    def generator_losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (N, 1, S, S) in [0, 1] → the three generator terms (scalars), their weighted sum and x̂ in [−1, 1]."""
        net, p = self.net, self.p
        real = x * 2 - 1
        fake, z, z_hat = net.generator(real)
        with torch.no_grad():  # D's features of x do not depend on the generator
            feat_real = net.discriminator(real)[1]
        adv = F.mse_loss(net.discriminator(fake)[1], feat_real)
        con = F.l1_loss(fake, real)
        enc = F.mse_loss(z_hat, z)
        total = p.w_adv * adv + p.w_con * con + p.w_enc * enc
        return {"adv": adv, "con": con, "enc": enc, "total": total, "fake": fake}

    def discriminator_loss(self, x: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """(BCE(D(x), 1) + BCE(D(x̂), 0)) / 2, x in [0, 1], x̂ in [−1, 1] (detached: D's step only)."""
        d = self.net.discriminator
        logit_real, logit_fake = d(x * 2 - 1)[0], d(fake.detach())[0]
        real = F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))
        return (real + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake))) / 2

    def contextual_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The validation criterion: mean |x − x̂| in [−1, 1] units (the paper's L_con), x in [0, 1]."""
        real = x * 2 - 1
        return F.l1_loss(self.net.generator(real)[0], real)

    # -- fit / predict ---------------------------------------------------------------------------
    def fit(self, train: Dataset | torch.Tensor, val: Dataset | torch.Tensor | None = None) -> dict[str, Any]:
        """Alternate generator / discriminator steps on normals; keep the generator with the lowest val L_con."""
        p, net, device = self.p, self.net, self.device
        reinit = torch.Generator().manual_seed(p.seed + 1)  # D re-inits: their own stream, no global RNG

        def adam(module: nn.Module) -> torch.optim.Optimizer:
            return torch.optim.Adam(module.parameters(), lr=p.lr, betas=(p.beta1, 0.999))

        d_step = OptimizerStep(adam(net.discriminator), device, amp=False)
        reinits = 0

        def step(x: torch.Tensor, g_step: OptimizerStep) -> tuple[float, int]:
            nonlocal reinits
            losses = self.generator_losses(x)
            g_loss = g_step(losses["total"])  # zero_grad of G only: D's stray grads are cleared by d_step
            if d_step(self.discriminator_loss(x, losses["fake"])) < _D_COLLAPSE:
                dcgan_init(net.discriminator, reinit)
                reinits += 1
            return g_loss * len(x), len(x)

        report = train_loop(
            trainable=net.generator,
            optimizer=adam(net.generator),
            loss_fn=self.contextual_loss,
            train=train,
            val=val,
            settings=LoopSettings(epochs=p.epochs, batch_size=p.batch_size, patience=p.patience, min_batch=2),
            generator=torch.Generator().manual_seed(p.seed),
            device=device,
            desc=self.name,
            batch_fn=self._batch_input,
            train_mode=lambda: net.train(),
            eval_mode=lambda: net.eval(),
            step_fn=step,
        )
        self.eval()
        return {**report, "d_reinits": reinits}

    @torch.no_grad()
    def reconstruction_loss(self, images: Dataset | torch.Tensor) -> float:
        """Mean validation contextual loss over an image source (eval mode): the early-stopping criterion."""
        self.net.eval()
        return mean_loss(self.contextual_loss, as_source(images), self.p.batch_size, self.device, self._batch_input)

    @torch.no_grad()
    def score_and_residual(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) in [0, 1] → (scores mean (z − ẑ)² (N,), smoothed |x − x̂| maps (N, S, S)), in sub-batches."""
        self.net.eval()
        scores, maps = [], []
        step = max(self.p.batch_size, 32)
        for start in range(0, len(images), step):
            x = self.to_input(images[start : start + step])
            fake, z, z_hat = self.net.generator(x * 2 - 1)
            scores.append(((z - z_hat) ** 2).mean(1))
            maps.append(gaussian_blur((x - (fake + 1) / 2).abs()[:, 0], self.p.smooth_sigma))
        return torch.cat(scores), torch.cat(maps)

    @torch.no_grad()
    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The residual maps (N, 1, S, S) alone (the pixel autoencoders' hook)."""
        return self.score_and_residual(images)[1][:, None]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (B, C, H, W) in [0, 1] → (latent scores (B,), residual maps (B, H, W)) float32 on CPU."""
        scores, maps = self.score_and_residual(images)
        full = F.interpolate(maps[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return scores.float().cpu(), full.float().cpu()
