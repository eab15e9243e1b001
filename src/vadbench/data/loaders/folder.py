"""`folder`: any user tree, read as it is.

Two forms (FolderParams checks that exactly one is given):

* `root`: an MVTec-style tree — train/good → train (val carved by `val_fraction`), test/good → test
  normals, test/<type> → anomalies of that type, masks ground_truth/<type>/<stem><mask_suffix>.<ext>
  (default suffix `_mask`, else `<stem>.<ext>`); an anomaly without a mask file is image-level only.
  The same reader as the `mvtec_ad` loader (`mvtec.layout_sources`).
* `normal_dir` + `abnormal_dir` (each one dir or a list), optional `mask_dir`, `test_normal_dir`.
  Sub-folders of an abnormal dir become defect types, files directly inside get type `anomaly`; a
  sub-folder named `good` holds test normals (label 0), as in MVTec's test/. Masks mirror the
  abnormal dir: the mask of <abnormal>/<type>/x.png is <mask>/<type>/x<mask_suffix>.<ext>; a mask_dir
  list as long as abnormal_dir pairs by position, otherwise every mask dir is searched (a mask found
  in two is an error). An abnormal image without a mask is image-level only (has_mask False).
  When the tree brings its own test normals (`test_normal_dir`, or a `good/` in an abnormal dir) all
  of normal_dir trains; otherwise `test_normal_fraction` of it is held out for test (seeded, data.split).

Equal file names from different dirs do not collide: prepare numbers repeated output names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vadbench.data.loaders import Source, find_mask, list_images
from vadbench.data.loaders.mvtec import layout_sources

#: a sub-folder of an abnormal dir with this name holds normal test images, not a defect type
NORMAL_SUBDIR = "good"


def _dirs(value: str | list[str] | None, key: str) -> list[Path]:
    """The directories of param `key` (a string or a list of them), each checked to exist."""
    if not value:
        return []
    items = [value] if isinstance(value, str) else list(value)
    out = []
    for i, item in enumerate(items):
        p = Path(item)
        if not p.is_dir():
            where = key if isinstance(value, str) else f"{key}[{i}]"
            raise FileNotFoundError(f"datasets.<name>.{where}: {p} is not a directory")
        out.append(p)
    return out


def _mask_of(p: Path, rel: Path, mask_roots: list[Path], suffix: str) -> Path | None:
    found = [m for m in (find_mask(r / rel.parent, p.stem, (suffix,)) for r in mask_roots) if m is not None]
    if len(found) > 1:
        raise ValueError(
            f"{p}: masks in more than one mask_dir ({', '.join(map(str, found))}); "
            "give mask_dir as a list as long as abnormal_dir to pair them by position"
        )
    return found[0] if found else None


def load(spec: Any, root: Path | None) -> list[Source]:
    if spec.root:
        (tree,) = _dirs(spec.root, "root")
        suffixes = (spec.mask_suffix,) if spec.mask_suffix is not None else ("_mask", "")
        return layout_sources(tree, mask_suffixes=suffixes, require_masks=False)
    normals = _dirs(spec.normal_dir, "normal_dir")
    abnormals = _dirs(spec.abnormal_dir, "abnormal_dir")
    mask_roots = _dirs(spec.mask_dir, "mask_dir")
    test_dirs = _dirs(spec.test_normal_dir, "test_normal_dir")
    suffix = spec.mask_suffix or ""
    paired = len(mask_roots) == len(abnormals) > 1
    tests: list[Source] = [Source(p, "test", 0, "good") for d in test_dirs for p in list_images(d, recursive=True)]
    for i, abnormal in enumerate(abnormals):
        for p in list_images(abnormal, recursive=True):
            rel = p.relative_to(abnormal)
            if len(rel.parts) > 1 and rel.parts[0] == NORMAL_SUBDIR:
                tests.append(Source(p, "test", 0, "good"))
                continue
            defect = rel.parts[0] if len(rel.parts) > 1 else "anomaly"
            mask = _mask_of(p, rel, [mask_roots[i]] if paired else mask_roots, suffix)
            tests.append(Source(p, "test", 1, defect, (mask,) if mask else ()))
    own_test_normals = any(s.label == 0 for s in tests)
    split = "train" if test_dirs or own_test_normals else "pool"
    return [Source(p, split, 0, "good") for d in normals for p in list_images(d, recursive=True)] + tests
