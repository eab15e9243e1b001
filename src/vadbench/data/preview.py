"""Preview grid of any prepared dataset: one row per image type (normals first), mask outlines in red.

Written as a DVC plot (`reports/<dataset>/preview.png`), so the bytes must depend only on the
dataset: images are picked in manifest order, matplotlib is driven without pyplot (no global
state) and the PNG carries no software/version metadata.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from vadbench.data.manifest import ManifestRow, read_manifest
from vadbench.io import atomic_path

THUMB = 192  # px per cell: large sources (MVTec is 700-1024 px) would make the plot heavy


def _pick(rows: list[ManifestRow], per_type: int) -> dict[str, list[ManifestRow]]:
    """{'good': normals (test first, else train), <defect>: ...}, at most `per_type` each, evenly spread."""
    normals = [r for r in rows if r.label == 0 and r.split == "test"] or [r for r in rows if r.label == 0]
    groups: dict[str, list[ManifestRow]] = {"good": normals} if normals else {}
    for t in sorted({r.defect_type for r in rows if r.label == 1}):
        groups[t] = [r for r in rows if r.label == 1 and r.defect_type == t]
    picked = {}
    for t, rs in groups.items():
        idx = np.unique(np.linspace(0, len(rs) - 1, min(per_type, len(rs))).round().astype(int))
        picked[t] = [rs[i] for i in idx]
    return picked


def _thumb(root: Path, row: ManifestRow) -> tuple[np.ndarray, np.ndarray | None]:
    """(image (h, w) or (h, w, 3) uint8, mask (h, w) bool or None), longest side ≤ THUMB."""
    with Image.open(root / row.path) as im:
        im = im.convert("L") if im.mode in ("L", "I", "I;16", "1", "F") else im.convert("RGB")
        scale = min(1.0, THUMB / max(im.size))  # shrink big sources, never enlarge small ones
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        img = np.asarray(im.resize(size, Image.Resampling.LANCZOS))
    mask = None
    if row.mask_path:
        with Image.open(root / row.mask_path) as m:
            mask = np.asarray(m.convert("L").resize(size, Image.Resampling.NEAREST)) >= 128
    return img, mask


def render_preview(dataset_dir: Path, out_png: Path, per_type: int = 2) -> None:
    """Write a grid PNG: rows = 'good' then each defect type; `per_type` images per row, masks outlined."""
    if per_type < 1:
        raise ValueError(f"per_type must be ≥ 1, got {per_type}")
    root = Path(dataset_dir)
    picked = _pick(read_manifest(root), per_type)
    if not picked:
        raise ValueError(f"{root}/manifest.csv lists no images to preview")
    n_rows = len(picked)
    fig = Figure(figsize=(2.0 * per_type + 0.5, 2.0 * n_rows + 0.3), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, per_type, squeeze=False)
    for r, (kind, rows) in enumerate(picked.items()):
        for c in range(per_type):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if c == 0:
                ax.set_ylabel(kind, fontsize=9)
            if c >= len(rows):
                continue
            img, mask = _thumb(root, rows[c])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
            if mask is not None and mask.any():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors="red", linewidths=0.7)
            ax.set_title(Path(rows[c].path).name, fontsize=6)
    fig.suptitle(root.name, fontsize=10)
    fig.tight_layout()
    with atomic_path(Path(out_png)) as tmp:
        # no Software/version chunk: identical bytes for identical datasets across matplotlib builds
        fig.savefig(tmp, format="png", metadata={"Software": None})
