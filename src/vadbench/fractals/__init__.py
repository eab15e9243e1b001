"""FractalDB-style synthetic classification data from random Iterated Function Systems.

The heavy parts (numba kernels) load lazily: `vadbench.config` imports `fractals.params` only.
"""

from __future__ import annotations

from typing import Any

from vadbench.fractals.params import FractalsParams

__all__ = ["FractalsParams", "generate", "read_manifest", "regenerate", "write_preview"]


def __getattr__(name: str) -> Any:
    if name in ("generate", "read_manifest", "regenerate", "write_preview"):
        from vadbench.fractals import build as _build

        return getattr(_build, name)
    raise AttributeError(f"module 'vadbench.fractals' has no attribute {name!r}")
