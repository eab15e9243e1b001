"""Shared fixtures: a tiny line-pattern dataset with pixel-masked defects, and a random backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import vadbench  # noqa: E402,F401  (sets HF_HUB_OFFLINE and OMP_WAIT_POLICY before torch loads)


def _line_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey vertical metal lines with small jitter: a stand-in texture for fast unit tests."""
    pitch = 8
    x = np.arange(size)
    offset = rng.integers(0, pitch)
    lines = (((x + offset) % pitch) < pitch // 2).astype(np.float32)
    img = 0.25 + 0.5 * np.tile(lines, (size, 1))
    img += rng.normal(0, 0.03, (size, size)).astype(np.float32)
    # 8-bit, as every prepared dataset is: the streaming sources carry uint8, so tensors and streams agree
    return np.round(np.clip(img, 0, 1) * 255) / 255


def make_toy_defect_data(n_train: int = 24, n_test: int = 16, size: int = 64, seed: int = 0):
    """(train (N,1,H,W), test (M,1,H,W), labels (M,), masks (M,H,W)); half the test images have a bright blob."""
    rng = np.random.default_rng(seed)
    train = np.stack([_line_image(rng, size) for _ in range(n_train)])[:, None]
    test, labels, masks = [], [], []
    yy, xx = np.mgrid[:size, :size]
    for i in range(n_test):
        img = _line_image(rng, size)
        mask = np.zeros((size, size), np.uint8)
        if i % 2:
            cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
            r = rng.integers(4, 8)
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)
            img = np.where(mask > 0, 242 / 255, img)  # 8-bit, as the rest
        test.append(img)
        labels.append(i % 2)
        masks.append(mask)
    return (
        torch.from_numpy(train).float(),
        torch.from_numpy(np.stack(test)[:, None]).float(),
        np.array(labels),
        np.stack(masks),
    )


@pytest.fixture(scope="session")
def toy_defect_data():
    return make_toy_defect_data()


@pytest.fixture(scope="session")
def random_backbone_dir(tmp_path_factory) -> Path:
    from vadbench.backbones import materialize_backbone

    out = tmp_path_factory.mktemp("backbones") / "random"
    materialize_backbone(out, arch="resnet18", init="random", seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_sem(tmp_path_factory) -> Path:
    """A tiny `synthetic_sem` (64 px, 30 train / 6 val normals, 12 normal + 24 defective test images) on disk."""
    from vadbench.data.params import SyntheticSemParams
    from vadbench.data.synthetic_sem import generate_synthetic_sem

    out = tmp_path_factory.mktemp("sem") / "synthetic_sem"
    # defects twice the default size: at 64 px a random backbone's 16×16 grid barely sees the default ones
    params = SyntheticSemParams(
        image_size=64, n_train=30, n_val=6, n_test_normal=12, n_test_per_defect=4, defect_scale=2.0
    )
    generate_synthetic_sem(out, params, seed=0)
    return out
