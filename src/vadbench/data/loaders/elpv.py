"""ELPV solar cells (pip package `elpv-dataset`): image-level labels, mono/poly as categories.

labels.csv rows: `images/cellNNNN.png <defect probability> <mono|poly>`. Probability 1 → defective,
0 → normal; 1/3 and 2/3 follow `uncertain` (drop | normal | defective). ELPV has no split: the
defective cells all go to test, `test_normal_fraction` of the normals too (seeded, data.split).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from vadbench.data.download import ManualDownloadError, registry_entry
from vadbench.data.loaders import Source


def package_data_dir() -> Path:
    """The installed package's data folder, found without importing it (it imports numpy/PIL only)."""
    found = importlib.util.find_spec("elpv_dataset")
    if found is None or not found.submodule_search_locations:
        raise ManualDownloadError(f"elpv: package elpv-dataset is not installed. {registry_entry('elpv')['manual']}")
    return Path(next(iter(found.submodule_search_locations))) / "data"


def load(spec: Any, root: Path | None) -> list[Source]:
    root = root or package_data_dir()
    table = root / "labels.csv"
    if not table.is_file():
        raise FileNotFoundError(f"{table} not found; expected ELPV's labels.csv beside its images/ folder")
    sources = []
    for n, line in enumerate(table.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ValueError(f"{table}:{n}: expected 'path probability type', got {line!r}")
        rel, prob_s, cell_type = parts
        prob = float(prob_s)
        if not 0.0 <= prob <= 1.0 or cell_type not in ("mono", "poly"):
            raise ValueError(f"{table}:{n}: probability {prob_s} / type {cell_type!r} out of range")
        if cell_type != spec.category:
            continue
        if prob == 0.0 or (0 < prob < 1 and spec.uncertain == "normal"):
            sources.append(Source(root / rel, "pool", 0, "good"))
        elif prob == 1.0 or spec.uncertain == "defective":
            sources.append(Source(root / rel, "test", 1, "defect"))
    return sources
