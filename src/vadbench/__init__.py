"""vadbench: reproducible benchmarking of visual anomaly detection with fractal-pretrained backbones."""

__version__ = "0.1.0"
