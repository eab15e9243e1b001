"""MIIC (SEM images of IC metal layers), downloaded by hand from the NTU data repository.

Raw layout: Anomaly_train/ (normal training images, named *_normal_*), Anomaly_test/{normal_img,
abnormal_img, abnormal_mask}/. Anomaly_test is a subset of Anomaly_train, so we build a clean split:
every Anomaly_test image is test; Anomaly_train images that are abnormal (name or hash) never reach
train — those not already in test join it as anomalies without a mask; the normal ones go to train,
and the hash de-duplication in data.split drops any train copy of a test image (reported).
Masks are paired with their abnormal image by file stem, else by the image's numeric id.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vadbench.data.download import ManualDownloadError, registry_entry
from vadbench.data.loaders import Source, list_images

_ID = re.compile(r"(\d+)$")


def _layout_error(root: Path, missing: Path) -> ManualDownloadError:
    return ManualDownloadError(f"{missing} not found under {root}. {registry_entry('miic')['manual']}")


def _pair_masks(images: list[Path], masks: list[Path]) -> dict[Path, Path]:
    by_stem = {m.stem: m for m in masks}
    by_id = {}
    for m in masks:
        if match := _ID.search(m.stem):
            by_id.setdefault(int(match.group(1)), m)
    out = {}
    for p in images:
        m = by_stem.get(p.stem)
        if m is None and (match := _ID.search(p.stem)):
            m = by_id.get(int(match.group(1)))
        if m is not None:
            out[p] = m
    return out


def load(spec: Any, root: Path | None) -> list[Source]:
    assert root is not None
    if not (root / "Anomaly_train").is_dir() and (sub := [d for d in root.iterdir() if (d / "Anomaly_train").is_dir()]):
        root = sub[0]  # unpacked one level down
    for need in ("Anomaly_train", "Anomaly_test/normal_img", "Anomaly_test/abnormal_img"):
        if not (root / need).is_dir():
            raise _layout_error(root, root / need)
    test_normal = list_images(root / "Anomaly_test" / "normal_img", recursive=True)
    test_bad = list_images(root / "Anomaly_test" / "abnormal_img", recursive=True)
    mask_dir = root / "Anomaly_test" / "abnormal_mask"
    masks = _pair_masks(test_bad, list_images(mask_dir, recursive=True) if mask_dir.is_dir() else [])
    sources = [Source(p, "test", 0, "good") for p in test_normal]
    sources += [Source(p, "test", 1, "bad", (masks[p],) if p in masks else ()) for p in test_bad]
    for p in list_images(root / "Anomaly_train", recursive=True):
        # anomalous files in the train folder are test-only; data.split drops hash duplicates of test
        if "abnormal" in p.stem.lower() or "abnormal" in p.parent.name.lower():
            sources.append(Source(p, "test", 1, "bad"))
        else:
            sources.append(Source(p, "train", 0, "good"))
    return sources
