"""VisA, re-laid out from its own `split_csv/1cls.csv` (object,split,label,image,mask).

Masks store class indices (0 background, 1..k defects), so they are binarised at > 0 — a
half-range threshold would erase every defect. Anomalies get defect type `bad` (1cls.csv has
no finer types).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from vadbench.data.loaders import Source


def load(spec: Any, root: Path | None) -> list[Source]:
    assert root is not None
    # the tar may unpack into the root or into one sub-folder (VisA_20220922/)
    candidates = [root, *sorted(d for d in root.iterdir() if d.is_dir())]
    base = next((d for d in candidates if (d / "split_csv" / "1cls.csv").is_file()), None)
    if base is None:
        raise FileNotFoundError(f"{root}: no split_csv/1cls.csv (expected the extracted VisA_20220922.tar)")
    table = base / "split_csv" / "1cls.csv"
    sources = []
    with open(table, newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"object", "split", "label", "image", "mask"}
        if not need <= set(reader.fieldnames or ()):
            raise ValueError(f"{table}: columns {reader.fieldnames}; expected {sorted(need)}")
        for row in reader:
            if row["object"] != spec.category:
                continue
            if row["split"] not in ("train", "test") or row["label"] not in ("normal", "anomaly"):
                raise ValueError(f"{table}: row {row['image']!r} has split {row['split']!r}, label {row['label']!r}")
            img = base / row["image"]
            if not img.is_file():
                raise FileNotFoundError(f"{table} lists {row['image']!r}, which is missing under {base}")
            if row["label"] == "normal":
                sources.append(Source(img, row["split"], 0, "good"))
            else:
                if row["split"] == "train":
                    raise ValueError(f"{table}: anomalous image {row['image']!r} is in the train split")
                mask = base / row["mask"] if row["mask"] else None
                if mask is not None and not mask.is_file():
                    raise FileNotFoundError(f"{table} lists mask {row['mask']!r}, which is missing")
                sources.append(Source(img, "test", 1, "bad", (mask,) if mask else (), "nonzero"))
    if not sources:
        raise ValueError(f"{table}: no rows for object {spec.category!r}")
    return sources
