"""Anomaly-map gallery: image, ground truth and heat-map overlay for the cases people look at."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vadbench.io import read_rows
from vadbench.report.figures import plt, save_figure


def pick_gallery_cases(scores: np.ndarray, labels: np.ndarray, per_group: int) -> list[tuple[str, list[int]]]:
    """Indices to show: highest-scored normals (false alarms), lowest-scored defects (misses), typical hits.

    Typical hits are the defects closest to the median defect score. Ties break by index (stable).
    """
    normals = np.flatnonzero(labels == 0)
    defects = np.flatnonzero(labels == 1)
    groups = []
    if len(normals):
        order = normals[np.argsort(-scores[normals], kind="stable")]
        groups.append(("highest-scored normals", order[:per_group].tolist()))
    if len(defects):
        order = defects[np.argsort(scores[defects], kind="stable")]
        groups.append(("lowest-scored defects", order[:per_group].tolist()))
        median = np.median(scores[defects])
        typical = defects[np.argsort(np.abs(scores[defects] - median), kind="stable")]
        shown = set(groups[-1][1])
        groups.append(("typical defects", [int(i) for i in typical if i not in shown][:per_group]))
    return [(name, idx) for name, idx in groups if idx]


def render_gallery(
    images: np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray | None,
    scores: np.ndarray,
    labels: np.ndarray,
    out_png: Path,
    *,
    per_group: int = 4,
    title: str = "",
) -> None:
    """images (N,C,H,W) in [0,1], masks (N,H,W), maps (N,H,W) or None (image-level model).

    Any of them may be lazy (indexable per image) or memory-mapped: only the shown cases are read.

    One column per case: image with ground-truth outline / heat-map overlay. One colour scale for
    the whole figure (the 1st–99.5th percentile of all maps) so heat is comparable across cases.
    """
    groups = pick_gallery_cases(scores, labels, per_group)
    cases = [(name, i) for name, idx in groups for i in idx]
    ncol = max(1, len(cases))
    fig, axes = plt.subplots(2, ncol, figsize=(1.9 * ncol, 4.3), squeeze=False)
    if maps is not None and len(maps):
        # the colour scale from at most ~256 maps, evenly spaced, read row by row: a memory-mapped test split
        # is never made resident as a whole (io.read_rows says why a strided view would)
        sample = read_rows(maps, range(0, len(maps), -(-len(maps) // 256))).astype(np.float32, copy=False)
        lo, hi = np.percentile(sample, [1.0, 99.5], overwrite_input=True)  # sample is our own copy
        hi = hi if hi > lo else lo + 1e-6
        shown_maps = read_rows(maps, [i for _, i in cases])
    for col, (group, i) in enumerate(cases):
        img = images[i].transpose(1, 2, 0)
        img = img[..., 0] if img.shape[-1] == 1 else img
        cmap = "gray" if img.ndim == 2 else None
        top, bottom = axes[0, col], axes[1, col]
        top.imshow(img, cmap=cmap, vmin=0, vmax=1)
        if masks[i].any():
            top.contour(masks[i], levels=[0.5], colors="red", linewidths=0.8)
        top.set_title(f"{group.split()[0]} {group.split()[-1]}\nscore {scores[i]:.3g}", fontsize=7)
        bottom.imshow(img, cmap=cmap, vmin=0, vmax=1)
        if maps is not None:
            bottom.imshow(shown_maps[col], cmap="jet", alpha=0.45, vmin=lo, vmax=hi)
        else:
            bottom.text(
                0.5, 0.5, "no map\n(image-level)", ha="center", va="center", fontsize=7, transform=bottom.transAxes
            )
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("image + ground truth", fontsize=7)
    axes[1, 0].set_ylabel("anomaly map", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, out_png)
