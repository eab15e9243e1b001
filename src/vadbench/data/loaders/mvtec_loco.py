"""MVTec LOCO AD: train/good, validation/good (used as our val split; val_fraction is ignored),
test/{good,logical_anomalies,structural_anomalies}, ground_truth/<type>/<stem>/NNN.png.

One image may have several masks (one per defect region); they are OR-ed. Mask pixels hold
per-defect values, so they are binarised at > 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vadbench.data.loaders import Source, find_dir, list_images


def load(spec: Any, root: Path | None) -> list[Source]:
    assert root is not None
    cat = find_dir(root, spec.category, "validation")
    sources = [Source(p, "train", 0, "good") for p in list_images(cat / "train" / "good")]
    sources += [Source(p, "val", 0, "good") for p in list_images(cat / "validation" / "good")]
    for type_dir in sorted(d for d in (cat / "test").iterdir() if d.is_dir()):
        for p in list_images(type_dir):
            if type_dir.name == "good":
                sources.append(Source(p, "test", 0, "good"))
                continue
            gt = cat / "ground_truth" / type_dir.name / p.stem
            masks = tuple(list_images(gt)) if gt.is_dir() else ()
            if not masks:
                raise FileNotFoundError(f"{p}: no masks in {gt}/")
            sources.append(Source(p, "test", 1, type_dir.name, masks, "nonzero"))
    return sources
