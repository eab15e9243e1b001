"""Training augmentations of fractal images: `basic` (random crop + flip) and `strong` (OFDB / SimCLR-style).

Both take an image as a (C, H, W) uint8 tensor, C = 1 (grey) or 3, already resized to `input_size`, and
a `torch.Generator` seeded from (seed, epoch, sample index, view) by the caller; they return a float
(C, out, out) tensor in [0, 1]. Every random number comes from that generator (no global RNG, no
torchvision randomness), so a view is a pure function of its seed: the same on every process, after a
resume, and for any number of DataLoader workers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# strong augmentation constants (SimCLR's, Chen et al. 2020, without hue/saturation: fractals are grey)
JITTER_P = 0.8  # probability of the brightness/contrast jitter
JITTER = 0.4  # brightness and contrast factors uniform in [1 - JITTER, 1 + JITTER]
BLUR_P = 0.5  # probability of the Gaussian blur
BLUR_SIGMA = (0.1, 2.0)  # blur sigma in output pixels
ASPECT = (3 / 4, 4 / 3)  # random-resized-crop aspect ratio range (log-uniform), torchvision's default


def as_chw(img: torch.Tensor) -> torch.Tensor:
    """(H, W) → (1, H, W); (C, H, W) unchanged; (H, W, C) with C in {1, 3} → (C, H, W)."""
    if img.ndim == 2:
        return img.unsqueeze(0)
    if img.ndim == 3 and img.shape[0] not in (1, 3) and img.shape[-1] in (1, 3):
        return img.permute(2, 0, 1)
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(
            f"expected an image of shape (H, W), (C, H, W) or (H, W, C) with C 1 or 3, got {tuple(img.shape)}"
        )
    return img


def basic_view(img: torch.Tensor, crop_size: int, hflip: bool, g: torch.Generator | None) -> torch.Tensor:
    """Random `crop_size` crop + optional horizontal flip; `g` None: centre crop, no flip (validation).

    Draws exactly what the pre-`augment` code drew (2 offsets, then a flip bit only when `hflip`): the
    default recipe's crops, and so its weights, are unchanged.
    """
    img = as_chw(img)
    room_h, room_w = img.shape[-2] - crop_size, img.shape[-1] - crop_size
    if g is not None:
        top, left = (int(v) for v in torch.randint(0, min(room_h, room_w) + 1, (2,), generator=g))
        flip = hflip and bool(torch.randint(0, 2, (1,), generator=g))
    else:
        top, left, flip = room_h // 2, room_w // 2, False
    img = img[:, top : top + crop_size, left : left + crop_size]
    if flip:
        img = img.flip(-1)
    return img.float().div_(255.0)


def _uniform(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (C, H, W), radius ceil(3 sigma) (capped by the image), reflect padding."""
    c, h, w = x.shape
    radius = max(1, min(math.ceil(3 * sigma), h - 1, w - 1))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    x = x.unsqueeze(0)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x.squeeze(0)


def strong_view(
    img: torch.Tensor, out_size: int, scale: tuple[float, float], flips: bool, g: torch.Generator
) -> torch.Tensor:
    """Random-resized crop → one of the 8 symmetries of the square → brightness/contrast jitter → blur.

    - crop: area fraction uniform in `scale`, aspect ratio log-uniform in 3/4..4/3 (side lengths clamped
      to the image), position uniform; resized to `out_size` (bilinear, antialiased when shrinking);
    - symmetry: 0–3 quarter turns, then a horizontal flip when `flips` (h and v flips and 90° rotations
      together); `flips` False: rotations only;
    - with probability 0.8 brightness × b, then contrast (x − mean) × c + mean, b and c uniform in
      [0.6, 1.4], the same factors for every channel, clipped to [0, 1];
    - with probability 0.5 a Gaussian blur, sigma uniform in [0.1, 2.0] output pixels.
    A fixed number of draws in a fixed order, whether or not an operation is applied.
    """
    img = as_chw(img)
    h, w = img.shape[-2:]
    area = _uniform(g, *scale) * h * w
    aspect = math.exp(_uniform(g, math.log(ASPECT[0]), math.log(ASPECT[1])))
    ch = min(h, max(1, round(math.sqrt(area / aspect))))
    cw = min(w, max(1, round(math.sqrt(area * aspect))))
    top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
    left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
    quarter_turns = int(torch.randint(0, 4, (1,), generator=g))
    hflip = bool(torch.randint(0, 2, (1,), generator=g))
    jitter = _uniform(g) < JITTER_P
    brightness = _uniform(g, 1 - JITTER, 1 + JITTER)
    contrast = _uniform(g, 1 - JITTER, 1 + JITTER)
    blur = _uniform(g) < BLUR_P
    sigma = _uniform(g, *BLUR_SIGMA)

    x = img[:, top : top + ch, left : left + cw].float().div_(255.0)
    if (ch, cw) != (out_size, out_size):
        shrink = ch > out_size or cw > out_size
        x = F.interpolate(x.unsqueeze(0), size=(out_size, out_size), mode="bilinear", antialias=shrink).squeeze(0)
    x = torch.rot90(x, quarter_turns, dims=(-2, -1))
    if flips and hflip:
        x = x.flip(-1)
    if jitter:
        x = x * brightness
        mean = x.mean()
        x = ((x - mean) * contrast + mean).clamp_(0.0, 1.0)
    if blur:
        x = _gaussian_blur(x, sigma)
    return x.clamp_(0.0, 1.0).contiguous()
