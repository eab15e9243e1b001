"""One small module per dataset kind: each turns a raw tree into a list of `Source` records.

Loaders only describe (path, split, label, defect type, masks); decoding, checking, resizing,
de-duplication and the val carve happen once, for every kind, in `data.prepare`/`data.split`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Source:
    """One raw image. split: train | val | test | pool (normals the splitter divides train/test)."""

    path: Path
    split: str
    label: int
    defect_type: str
    masks: tuple[Path, ...] = ()
    mask_mode: str = "half"  # half | nonzero (class-index masks)


def list_images(folder: Path, *, recursive: bool = False) -> list[Path]:
    """Image files under `folder`, sorted (hidden files such as ._foo.png from macOS are ignored)."""
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def find_mask(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    for suffix in suffixes:
        for ext in IMAGE_EXTS:
            for cand in (folder / f"{stem}{suffix}{ext}", folder / f"{stem}{suffix}{ext.upper()}"):
                if cand.is_file():
                    return cand
    return None


def find_dir(root: Path, name: str, must_have: str, depth: int = 3) -> Path:
    """The first dir called `name` holding `must_have`, searching `root` down to `depth` levels."""
    frontier = [root]
    for _ in range(depth + 1):
        for d in frontier:
            if d.name == name and (d / must_have).exists():
                return d
        frontier = sorted(c for d in frontier for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
    raise FileNotFoundError(f"{root}: no folder {name!r} containing {must_have!r} (searched {depth} levels deep)")


def load_sources(kind: str, spec: Any, root: Path | None) -> list[Source]:
    from vadbench.data.loaders import elpv, folder, miic, mvtec, mvtec_loco, visa

    table: dict[str, Callable[[Any, Path | None], list[Source]]] = {
        "mvtec_ad": mvtec.load,
        "mpdd": mvtec.load,
        "btad": mvtec.load,
        "mvtec_loco": mvtec_loco.load,
        "visa": visa.load,
        "miic": miic.load,
        "elpv": elpv.load,
        "folder": folder.load,
    }
    if kind not in table:
        raise ValueError(f"no loader for dataset kind {kind!r}; known: {sorted(table)}")
    return table[kind](spec, root)
