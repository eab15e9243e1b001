"""The shared square resize: antialiased when shrinking, plain bilinear when enlarging, identity at size."""

import torch
import torch.nn.functional as F

from vadbench.models.components.resize import resize_square


def _bilinear(x: torch.Tensor, side: int, antialias: bool) -> torch.Tensor:
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=antialias)


def test_shrink_is_antialiased_and_enlarge_is_not():
    x = torch.rand(2, 3, 96, 80, generator=torch.Generator().manual_seed(0))
    assert torch.equal(resize_square(x, 64), _bilinear(x, 64, antialias=True))
    assert not torch.equal(resize_square(x, 64), _bilinear(x, 64, antialias=False))
    assert torch.equal(resize_square(x, 128), _bilinear(x, 128, antialias=False))
    # one side longer than the target, one shorter: still a shrink along the longer one
    assert torch.equal(resize_square(x, 88), _bilinear(x, 88, antialias=True))


def test_same_size_returns_the_input():
    x = torch.rand(1, 1, 32, 32)
    assert resize_square(x, 32) is x
