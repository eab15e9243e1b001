"""DVC stage prepare@<dataset>: raw data (or the synthetic generator) → data/prepared/<dataset>/.

Writes images + manifest.csv + info.json (atomically) and reports/<dataset>/preview.png, then prints
per-split/per-defect-type counts (and whether they match the published counts, when known).
"""

from pathlib import Path
from typing import Any

from vadbench.cli import require_in_grid, stage_main
from vadbench.config import Params
from vadbench.data.prepare import prepare_dataset


def format_counts(info: dict[str, Any]) -> str:
    lines = [
        f"prepared {info['name']} ({info['kind']}, category {info['category']}): {info['n_images']} images, "
        f"{info['channels']} channel(s), {info['image_size']} px, center_crop {info['center_crop']}"
    ]
    for split, types in info["counts"].items():
        detail = ", ".join(f"{t} {n}" for t, n in types.items())
        lines.append(f"  {split:5s} {sum(types.values()):6d}  ({detail})")
    check = info.get("published_check")
    if check:
        verdict = "match" if check["match"] else "DIFFER from"
        lines.append(f"  source counts {check['found']} {verdict} the published {check['published']}")
    dups = (info.get("duplicates") or {}).get("dropped_duplicates") or []
    if dups:
        lines.append(f"  dropped {len(dups)} exact duplicate(s) of images in another split (see info.json)")
    if info.get("skipped"):
        lines.append(f"  skipped {len(info['skipped'])} unusable file(s) (see info.json)")
    return "\n".join(lines)


def run(params: Params, dataset: str) -> None:
    require_in_grid(params, dataset)
    info = prepare_dataset(
        dataset,
        params.datasets[dataset],
        out_dir=Path("data/prepared") / dataset,
        seed=params.seed,
        preview_png=Path("reports") / dataset / "preview.png",
        raw_dir=Path("data/raw"),
    )
    print(format_counts(info))


if __name__ == "__main__":
    stage_main(run, n_args=1)
