"""CutPaste and CutPaste-Scar augmentations (Li et al., CVPR 2021), seeded, on (C, H, W) tensors in [0, 1].

Both copy a region of the image to another place, with a small brightness/contrast jitter:
CutPaste a rectangle of 2–15 % of the area (aspect ratio 0.3–3.3), Scar a thin rotated
rectangle (paper at 256 px: width 2–16, length 10–25, angle ±45°; here scaled to the image size).
All randomness comes from the caller's `torch.Generator`, so batches are reproducible.

`three_way_batch` draws every CutPaste of a batch, then every Scar: a set split into batches gets the
same draws when all its `cutpaste_batch` calls run first, then its `scar_batch` calls, on one generator.
"""

from __future__ import annotations

import math

import torch


def _u(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _jitter(patch: torch.Tensor, gen: torch.Generator, strength: float) -> torch.Tensor:
    # brightness and contrast jitter, as the paper's ColorJitter(0.1, 0.1, ...) on grey-ish images
    mean = patch.mean()
    contrast = 1 + _u(gen, -strength, strength)
    brightness = _u(gen, -strength, strength)
    return ((patch - mean) * contrast + mean + brightness).clamp(0, 1)


def cutpaste(img: torch.Tensor, gen: torch.Generator, jitter: float = 0.1) -> torch.Tensor:
    """img (C, H, W) → copy with a rectangle cut from one place pasted at another."""
    _, h, w = img.shape
    area = _u(gen, 0.02, 0.15) * h * w
    aspect = math.exp(_u(gen, math.log(0.3), math.log(1 / 0.3)))
    ph = max(1, min(h - 1, round(math.sqrt(area * aspect))))
    pw = max(1, min(w - 1, round(math.sqrt(area / aspect))))
    sy, sx = int(_u(gen, 0, h - ph + 1 - 1e-6)), int(_u(gen, 0, w - pw + 1 - 1e-6))
    dy, dx = int(_u(gen, 0, h - ph + 1 - 1e-6)), int(_u(gen, 0, w - pw + 1 - 1e-6))
    out = img.clone()
    out[:, dy : dy + ph, dx : dx + pw] = _jitter(img[:, sy : sy + ph, sx : sx + pw], gen, jitter)
    return out


def scar(img: torch.Tensor, gen: torch.Generator, jitter: float = 0.1) -> torch.Tensor:
    """img (C, H, W) → copy with a thin rotated strip of shifted image content pasted in."""
    _, h, w = img.shape
    scale = min(h, w) / 256  # the paper's sizes are for 256×256 images
    width = max(1.0, _u(gen, 2, 16) * scale)
    length = max(2.0, _u(gen, 10, 25) * scale)
    angle = math.radians(_u(gen, -45, 45))
    cy, cx = _u(gen, length / 2, h - length / 2), _u(gen, length / 2, w - length / 2)
    # source content: the image shifted by a random offset (a strip "cut" from elsewhere)
    shift = (int(_u(gen, -h / 2, h / 2)), int(_u(gen, -w / 2, w / 2)))
    source = _jitter(torch.roll(img, shifts=shift, dims=(1, 2)), gen, jitter)
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=img.device) - cy,
        torch.arange(w, dtype=torch.float32, device=img.device) - cx,
        indexing="ij",
    )
    # coordinates in the strip's own frame: v along its length, u across
    v = yy * math.cos(angle) + xx * math.sin(angle)
    u = -yy * math.sin(angle) + xx * math.cos(angle)
    mask = (v.abs() <= length / 2) & (u.abs() <= width / 2)
    return torch.where(mask, source, img)


def cutpaste_batch(images: torch.Tensor, gen: torch.Generator, jitter: float = 0.1) -> torch.Tensor:
    """images (B, C, H, W) → their CutPaste versions, drawn image after image from `gen`."""
    return torch.stack([cutpaste(x, gen, jitter) for x in images])


def scar_batch(images: torch.Tensor, gen: torch.Generator, jitter: float = 0.1) -> torch.Tensor:
    """images (B, C, H, W) → their CutPaste-Scar versions, drawn image after image from `gen`."""
    return torch.stack([scar(x, gen, jitter) for x in images])


def three_way_batch(
    images: torch.Tensor, gen: torch.Generator, jitter: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, C, H, W) → (3B images: originals, cutpaste, scar; labels (3B,) 0/1/2)."""
    cp = cutpaste_batch(images, gen, jitter)
    sc = scar_batch(images, gen, jitter)
    labels = torch.arange(3).repeat_interleave(len(images))
    return torch.cat([images, cp, sc]), labels.to(images.device)
