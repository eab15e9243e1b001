"""MVTec layout (MVTec AD, MPDD, BTAD): <cat>/train/good, <cat>/test/<type>, <cat>/ground_truth/<type>.

BTAD names the normal folder `ok` (and `ko` for defects) and its masks `<stem>.png`; MVTec AD and
MPDD use `good` and `<stem>_mask.png`. Normal test images are stored under defect type `good`.
`layout_sources` reads one such category folder; `folder` with `root:` uses it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vadbench.data.loaders import Source, find_dir, find_mask, list_images

NORMAL_DIRS = ("good", "ok")


def layout_sources(
    cat: Path, *, mask_suffixes: tuple[str, ...] = ("_mask", ""), require_masks: bool = True
) -> list[Source]:
    """Sources of one MVTec-layout category folder `cat`: train/<good|ok> → train, test/<good|ok> →
    test normals, test/<type> → anomalies with masks ground_truth/<type>/<stem><suffix>.<ext>.

    `require_masks`: a defect type with a ground_truth folder must have a mask for every image (the
    published datasets); False keeps an image without a mask as image-level (a user's own tree).
    """
    normal = next((n for n in NORMAL_DIRS if (cat / "train" / n).is_dir()), None)
    if normal is None:
        raise FileNotFoundError(f"{cat}/train: expected a 'good' or 'ok' folder of normal training images")
    sources = [Source(p, "train", 0, "good") for p in list_images(cat / "train" / normal)]
    test = cat / "test"
    if not test.is_dir():
        raise FileNotFoundError(f"{cat}: no test/ folder")
    for type_dir in sorted(d for d in test.iterdir() if d.is_dir() and not d.name.startswith(".")):
        is_normal = type_dir.name in NORMAL_DIRS
        gt = cat / "ground_truth" / type_dir.name
        for p in list_images(type_dir):
            if is_normal:
                sources.append(Source(p, "test", 0, "good"))
                continue
            mask = find_mask(gt, p.stem, mask_suffixes) if gt.is_dir() else None
            if require_masks and gt.is_dir() and mask is None:
                raise FileNotFoundError(f"{p}: no mask {gt}/{p.stem}_mask.png (or {p.stem}.png)")
            sources.append(Source(p, "test", 1, type_dir.name, (mask,) if mask else ()))
    return sources


def load(spec: Any, root: Path | None) -> list[Source]:
    assert root is not None
    return layout_sources(find_dir(root, spec.category, "train"))
