"""vadbench: reproducible benchmarking of visual anomaly detection with fractal-pretrained backbones."""

import os as _os

# Set before torch loads OpenMP. Spinning idle OpenMP threads made 2-thread training 5-10x slower
# whenever anything else ran on the 2-core reference machine (benchmarks/results/pretrain.md).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Weights are never downloaded at run time: timm/huggingface_hub fail at once instead of retrying.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
