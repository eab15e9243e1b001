"""DVC stage `fractals`: params.yaml `seed` + `fractals:` → data/fractals + reports/fractals_preview.png."""

from __future__ import annotations

from pathlib import Path

from vadbench.config import load_params
from vadbench.fractals import generate, write_preview


def main() -> None:
    params = load_params()
    out = Path("data/fractals")
    generate(out, params.fractals, params.seed)
    write_preview(out, Path("reports/fractals_preview.png"))


if __name__ == "__main__":
    main()
