"""Overview figures written by aggregate: AUROC bars per cell and ROC/PR overlays per dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from vadbench.report.figures import plt, save_figure


def plot_auroc_bars(quality: pd.DataFrame, out_png: Path) -> None:
    """One panel per dataset: image and pixel AUROC for each model × backbone."""
    datasets = sorted(quality["dataset"].unique())
    fig, axes = plt.subplots(
        len(datasets),
        1,
        figsize=(max(6, 0.9 * quality.groupby("dataset").size().max() + 2), 3.2 * len(datasets)),
        squeeze=False,
    )
    for ax, dataset in zip(axes[:, 0], datasets):
        q = quality[quality["dataset"] == dataset].sort_values(["model", "backbone"], kind="stable")
        # long names (reverse_distillation) break at "_" so neighbouring tick labels do not overlap
        labels = ["\n".join([*m.split("_"), b]) for m, b in zip(q["model"], q["backbone"])]
        x = np.arange(len(q))
        img = q["image_auroc"].astype(float).fillna(0).to_numpy()
        pix = q["pixel_auroc"].astype(float).fillna(0).to_numpy()
        ax.bar(x - 0.2, img, 0.4, label="image AUROC")
        ax.bar(x + 0.2, pix, 0.4, label="pixel AUROC")
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylim(0.0, 1.0)
        ax.axhline(0.5, color="grey", lw=0.6, ls="--")
        ax.set_title(dataset, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, out_png)


def plot_curves(curves: dict[str, dict[str, pd.DataFrame]], datasets: dict[str, str], out_png: Path) -> None:
    """ROC (left) and PR (right) per dataset, one line per cell.

    curves: cell name → {"roc": DataFrame(fpr, tpr), "pr": DataFrame(recall, precision)};
    datasets: cell name → dataset.
    """
    names = sorted(set(datasets.values()))
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 4 * len(names)), squeeze=False)
    for row, dataset in enumerate(names):
        roc_ax, pr_ax = axes[row]
        for cell in sorted(c for c, d in datasets.items() if d == dataset):
            label = cell[len(dataset) + 1 :]
            roc_ax.plot(curves[cell]["roc"]["fpr"], curves[cell]["roc"]["tpr"], lw=1, label=label)
            pr_ax.plot(curves[cell]["pr"]["recall"], curves[cell]["pr"]["precision"], lw=1, label=label)
        roc_ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
        roc_ax.set(xlabel="FPR", ylabel="TPR", title=f"{dataset}: image ROC", xlim=(0, 1), ylim=(0, 1.02))
        pr_ax.set(xlabel="recall", ylabel="precision", title=f"{dataset}: image PR", xlim=(0, 1), ylim=(0, 1.02))
        roc_ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    save_figure(fig, out_png)
