"""DVC stage `fractals`: params `seed` + `fractals:` → data/fractals + reports/fractals_preview.png."""

from pathlib import Path

from vadbench.cli import stage_main
from vadbench.config import Params
from vadbench.fractals import generate, write_preview


def run(params: Params) -> None:
    out = Path("data/fractals")
    generate(out, params.fractals, params.seed)
    write_preview(out, Path("reports/fractals_preview.png"))


if __name__ == "__main__":
    stage_main(run)
