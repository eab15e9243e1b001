"""Shared matplotlib setup: headless, and byte-identical PNGs for identical inputs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vadbench.io import atomic_path  # noqa: E402

# No software/version/date metadata: the same figure must give the same bytes (DVC hashes it).
PNG_METADATA = {"Software": None}


def save_figure(fig: plt.Figure, path: Path, dpi: int = 100) -> None:
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata=PNG_METADATA)
    plt.close(fig)
