"""`folder`: any user tree — normal_dir, abnormal_dir (sub-folders = defect types), optional mask_dir.

Masks mirror abnormal_dir: the mask of abnormal_dir/<type>/x.png is mask_dir/<type>/x<mask_suffix>.<ext>.
An abnormal image without a mask is kept as image-level only (has_mask False). With `test_normal_dir`
the tree brings its own test normals and all of normal_dir trains; without it, `test_normal_fraction`
of normal_dir is held out for test (seeded, data.split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vadbench.data.loaders import Source, find_mask, list_images


def _dir(value: str, key: str) -> Path:
    p = Path(value)
    if not p.is_dir():
        raise FileNotFoundError(f"datasets.<name>.{key}: {p} is not a directory")
    return p


def load(spec: Any, root: Path | None) -> list[Source]:
    normal = _dir(spec.normal_dir, "normal_dir")
    abnormal = _dir(spec.abnormal_dir, "abnormal_dir")
    mask_root = _dir(spec.mask_dir, "mask_dir") if spec.mask_dir else None
    split = "train" if spec.test_normal_dir else "pool"
    sources = [Source(p, split, 0, "good") for p in list_images(normal, recursive=True)]
    if spec.test_normal_dir:
        test_dir = _dir(spec.test_normal_dir, "test_normal_dir")
        sources += [Source(p, "test", 0, "good") for p in list_images(test_dir, recursive=True)]
    for p in list_images(abnormal, recursive=True):
        rel = p.relative_to(abnormal)
        defect = rel.parts[0] if len(rel.parts) > 1 else "anomaly"
        mask = find_mask(mask_root / rel.parent, p.stem, (spec.mask_suffix,)) if mask_root else None
        sources.append(Source(p, "test", 1, defect, (mask,) if mask else ()))
    return sources
