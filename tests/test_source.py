"""The streaming data contract: image sources, seeded batches, uint8 → float on the device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vadbench.data.manifest import ManifestRow, load_split, write_manifest
from vadbench.data.source import ImageSource, SeededBatches, TensorSource, as_source, float_batches, loader


def _dataset(root: Path, n_train: int = 5, size: int = 24, rgb: bool = False) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_train):
        arr = rng.integers(0, 256, (size, size, 3) if rgb else (size, size), dtype=np.uint8)
        path = root / "train" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path)
        rows.append(ManifestRow(path.relative_to(root).as_posix(), "train", 0, "good"))
    bad = root / "test" / "hole" / "000.png"
    bad.parent.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(bad)
    m = np.zeros((size, size), np.uint8)
    m[4:10, 4:10] = 255
    mpath = root / "ground_truth" / "hole" / "000_mask.png"
    mpath.parent.mkdir(parents=True)
    Image.fromarray(m).save(mpath)
    rows.append(ManifestRow("test/hole/000.png", "test", 1, "hole", "ground_truth/hole/000_mask.png"))
    write_manifest(root, rows)
    return root


def test_image_source_yields_uint8_equal_to_the_stacked_split(tmp_path):
    root = _dataset(tmp_path)
    src = ImageSource(root, "train", image_size=16)
    assert len(src) == 5 and src.image_shape == (1, 16, 16)
    item = src[2]
    assert item.dtype == torch.uint8 and item.shape == (1, 16, 16)
    whole = load_split(root, "train", image_size=16).images  # the old whole-split loader
    streamed = torch.cat(list(float_batches(src, 2, "cpu")))
    assert torch.equal(streamed, whole)


def test_masks_and_labels_without_decoding_images(tmp_path):
    root = _dataset(tmp_path)
    test = ImageSource(root, "test")
    assert test.labels.tolist() == [1] and test.has_mask.tolist() == [True]
    mask = test.mask(0)
    assert mask.dtype == torch.uint8 and int(mask.sum()) == 36 and set(mask.unique().tolist()) == {0, 1}
    image, m = test.with_masks()[0]
    assert image.shape == (1, 24, 24) and torch.equal(m, mask)


def test_seeded_batches_match_one_randperm_per_pass():
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sampler = SeededBatches(10, 4, gen_a)
    for _ in range(2):  # two epochs: each pass draws one permutation
        expected = torch.randperm(10, generator=gen_b)
        got = [i for batch in sampler for i in batch]
        assert got == expected.tolist()
    assert [len(b) for b in SeededBatches(10, 4)] == [4, 4, 2]


def test_tensor_source_quantises_floats_exactly_for_8bit_images():
    u8 = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    src = TensorSource(u8.float() / 255)
    assert torch.equal(src.images, u8)
    assert torch.equal(torch.cat(list(float_batches(u8, 4, "cpu"))), u8.float() / 255)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        TensorSource(torch.zeros(2, 2, 8, 8))
    with pytest.raises(TypeError, match="sized, indexable"):
        as_source(object())


def test_loader_batches_are_uint8_and_images_of_other_sizes_are_named(tmp_path):
    root = _dataset(tmp_path)
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(root / "train" / "001.png")  # a different size
    src = ImageSource(root, "train")  # no image_size: every image must match the first
    with pytest.raises(ValueError, match=r"001\.png.*set image_size"):
        list(loader(src, 2))
    batch = next(iter(loader(ImageSource(root, "train", image_size=16), 3)))
    assert batch.dtype == torch.uint8 and batch.shape == (3, 1, 16, 16)


def test_undecodable_image_is_named(tmp_path):
    root = _dataset(tmp_path)
    (root / "train" / "003.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"003\.png: cannot decode"):
        ImageSource(root, "train", image_size=16)[3]


def test_decode_workers_give_the_same_batches(tmp_path):
    root = _dataset(tmp_path, n_train=7)
    src = ImageSource(root, "train", image_size=16)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    main = [b.clone() for b in loader(src, 3, generator=gen(), num_workers=0)]
    workers = list(loader(src, 3, generator=gen(), num_workers=2))
    assert len(main) == len(workers) == 3 and all(torch.equal(a, b) for a, b in zip(main, workers))
