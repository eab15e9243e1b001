"""Deterministic split planning: pool → train/test, exact-duplicate removal, val carve.

Given the same sources, hashes and seed, the plan is identical (sources are sorted by path first;
each random step has its own seeded generator). Rules, in this order:
1. Exact duplicates (same sha256 of the source file): a test image never moves to train, so every
   train/val copy of a test image is dropped; among train/val copies only the first (by path) is
   kept; copies inside test collapse to one (the first with a mask, else the first by path) so no
   image is scored twice. `pool` copies count as train copies. Every drop is reported.
2. `pool` normals (datasets without a split: ELPV, folder, ...) — `test_fraction` go to test.
3. val: `val_fraction` of the train normals (at least 1 when val_fraction > 0 and train has >= 2),
   unless the loader already provided a val split (MVTec LOCO's own validation set).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np

from vadbench.data.loaders import Source

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2, "pool": 3}


@dataclass
class SplitReport:
    dropped_duplicates: list[dict[str, str]] = field(default_factory=list)
    test_duplicates: list[list[str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"dropped_duplicates": self.dropped_duplicates, "test_duplicates": self.test_duplicates}


def _rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])


def plan_splits(
    sources: list[Source],
    hashes: dict[str, str],
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float = 0.2,
) -> tuple[list[Source], SplitReport]:
    """Return the sources with final splits (train/val/test) and a report of what was dropped.

    `hashes` maps str(source.path) → sha256 of the file's bytes.
    """
    for s in sources:
        if s.label == 1 and s.split in ("train", "val"):
            raise ValueError(f"{s.path}: an anomalous image may not be placed in {s.split}")
    report = SplitReport()
    # de-duplicate before the pool is divided: a pool copy of a test image must not reach train
    ordered = _dedup(sorted(sources, key=lambda s: (SPLIT_ORDER[s.split], str(s.path))), hashes, report)
    pool = [s for s in ordered if s.split == "pool"]
    kept = [s for s in ordered if s.split != "pool"]
    if pool:
        n_test = int(round(test_fraction * len(pool)))
        n_test = min(max(n_test, 1), len(pool) - 1) if len(pool) >= 2 else 0
        to_test = set(_rng(seed, 1).permutation(len(pool))[:n_test].tolist())
        kept += [replace(s, split="test" if i in to_test else "train") for i, s in enumerate(pool)]
    if not any(s.split == "val" for s in kept):
        kept = _carve_val(kept, seed, val_fraction)
    return sorted(kept, key=lambda s: (SPLIT_ORDER[s.split], str(s.path))), report


def _dedup(sources: list[Source], hashes: dict[str, str], report: SplitReport) -> list[Source]:
    groups: dict[str, list[Source]] = defaultdict(list)
    for s in sources:
        groups[hashes[str(s.path)]].append(s)
    drop: set[str] = set()
    for digest, group in groups.items():
        if len(group) < 2:
            continue
        group = sorted(group, key=lambda s: (SPLIT_ORDER[s.split], str(s.path)))
        tests = [s for s in group if s.split == "test"]
        if len(tests) > 1:
            report.test_duplicates.append([str(s.path) for s in tests])
            if len({s.label for s in tests}) > 1:
                raise ValueError(f"identical files with different labels in test: {[str(s.path) for s in tests]}")
        keeper = next((s for s in tests if s.masks), tests[0]) if tests else group[0]
        for s in group:
            if s is keeper:
                continue
            drop.add(str(s.path))
            report.dropped_duplicates.append(
                {
                    "dropped": str(s.path),
                    "split": s.split,
                    "duplicate_of": str(keeper.path),
                    "kept_in": keeper.split,
                    "sha256": digest,
                }
            )
    return [s for s in sources if str(s.path) not in drop]


def _carve_val(sources: list[Source], seed: int, val_fraction: float) -> list[Source]:
    train = [s for s in sources if s.split == "train"]
    n_val = int(round(val_fraction * len(train)))
    if val_fraction > 0 and len(train) >= 2:
        n_val = min(max(n_val, 1), len(train) - 1)  # train keeps at least one image
    else:
        n_val = 0
    to_val = {str(train[i].path) for i in _rng(seed, 2).permutation(len(train))[:n_val].tolist()}
    return [replace(s, split="val") if str(s.path) in to_val else s for s in sources]
