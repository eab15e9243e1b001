"""Image- and pixel-level anomaly-detection metrics, defined once, exact, memory-bounded.

- `image_metrics`: AUROC, AP, F1-max, and F1/precision/recall at a threshold from validation normals.
- `pixel_metrics`: AUROC, AP, F1-max and AUPRO (MVTec AD definition) over every test pixel, chunked.
- `roc_points` / `pr_points`: downsampled curves for DVC plots.
- `cost`: wall time, latency/throughput, peak memory, parameter count, artifact size, device.
Every returned metric is a plain float rounded to `DECIMALS`, or None with its reason in ``na_reasons``.
"""

from vadbench.metrics._util import DECIMALS
from vadbench.metrics.image import IMAGE_KEYS, image_metrics, pr_points, roc_points
from vadbench.metrics.pixel import PIXEL_KEYS, PixelCounts, aupro, pixel_counts, pixel_metrics, pro_curve

__all__ = [
    "DECIMALS",
    "IMAGE_KEYS",
    "PIXEL_KEYS",
    "PixelCounts",
    "aupro",
    "image_metrics",
    "pixel_counts",
    "pixel_metrics",
    "pr_points",
    "pro_curve",
    "roc_points",
]
