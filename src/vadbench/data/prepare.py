"""prepare_dataset: raw data (any kind) → data/prepared/<name>/ (images + manifest.csv + info.json).

Storage decision: images are stored RESIZED to `image_size` × `image_size` (8-bit PNG, grey or RGB
for the whole dataset), masks as 0/255 PNG at the same size. Downstream stages then decode small
files only (MVTec/VisA originals are 700–1500 px), the prepared dir is ~10–50× smaller, and every
model sees exactly the same pixels. `center_crop` is NOT applied here: it is recorded in info.json
and applied by `manifest.load_split` (so the crop is one switch, visible in the leaderboard).

Flow: locate raw tree (download/extract or manual) → loader lists sources → published-count check
→ hash + header pass (rejects oversized/unreadable files before decoding) → split plan (pool,
duplicates, val) → decode/resize/write into a temp dir → manifest + info.json → atomic rename.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from vadbench.data import hygiene
from vadbench.data.download import ManualDownloadError, fetch_and_extract, registry
from vadbench.data.loaders import Source, load_sources
from vadbench.data.manifest import SPLITS, ManifestRow, read_manifest, write_manifest
from vadbench.data.split import plan_splits
from vadbench.io import atomic_dir, sha256_file, write_json

INFO = "info.json"


def prepare_dataset(
    name: str,
    spec: Any,
    *,
    out_dir: Path,
    seed: int,
    preview_png: Path | None,
    raw_dir: Path = Path("data/raw"),
    progress: bool = True,
    workers: int | None = None,
) -> dict[str, Any]:
    """Prepare dataset `name` (dispatch on `spec.kind`); return the info dict written to info.json.

    `workers`: decode/encode processes (None: the usable CPUs, at most 8); the output is identical
    for any value.
    """
    out_dir = Path(out_dir)
    if spec.center_crop is not None and spec.center_crop > spec.image_size:
        raise ValueError(f"datasets.{name}.center_crop ({spec.center_crop}) must be <= image_size ({spec.image_size})")
    if spec.kind == "synthetic_sem":
        from vadbench.data.synthetic_sem import generate_synthetic_sem

        generate_synthetic_sem(out_dir, spec, seed)
        rows = read_manifest(out_dir)
        info = _info(name, spec, rows, channels=_stored_channels(out_dir, rows), source_sha256=None)
        write_json(out_dir / INFO, info)
    else:
        info = prepare_real(name, spec, out_dir=out_dir, seed=seed, raw_dir=raw_dir, progress=progress, workers=workers)
    if preview_png is not None:
        from vadbench.data.preview import render_preview

        render_preview(out_dir, Path(preview_png))
    return info


def _stored_channels(root: Path, rows: list[ManifestRow]) -> int:
    with Image.open(root / rows[0].path) as im:
        return 1 if im.mode in hygiene.GREY_MODES else 3


def _counts(rows: list[ManifestRow]) -> dict[str, dict[str, int]]:
    c = Counter((r.split, r.defect_type) for r in rows)
    out: dict[str, dict[str, int]] = {}
    for (split, defect), n in sorted(c.items(), key=lambda kv: (SPLITS.index(kv[0][0]), kv[0][1])):
        out.setdefault(split, {})[defect] = n
    return out


def _info(name: str, spec: Any, rows: list[ManifestRow], *, channels: int, source_sha256: str | None) -> dict[str, Any]:
    return {
        "name": name,
        "kind": spec.kind,
        "category": getattr(spec, "category", None),
        "counts": _counts(rows),
        "n_images": len(rows),
        "n_masks": sum(bool(r.mask_path) for r in rows),
        "image_size": spec.image_size,
        "center_crop": spec.center_crop,
        "channels": channels,
        "stored": "resized",  # images on disk are image_size x image_size; crop happens in load_split
        "source_archive_sha256": source_sha256,
    }


def published_check(kind: str, spec: Any, sources: list[Source]) -> dict[str, Any] | None:
    """Compare source counts with the registry's published counts; raise on mismatch if asked to."""
    published = (registry().get(kind, {}).get("published") or {}).get(getattr(spec, "category", ""))
    if not published:
        return None
    found = {
        "train": sum(s.label == 0 and s.split in ("train", "val") for s in sources),
        "test_good": sum(s.label == 0 and s.split == "test" for s in sources),
        "test_bad": sum(s.label == 1 and s.split == "test" for s in sources),
    }
    match = found == published
    if not match and spec.check_counts:
        raise ValueError(
            f"{kind}/{spec.category}: found {found} but the published counts are {published} "
            f"(src/vadbench/data/registry.yaml); the raw copy may be incomplete or modified. "
            f"Set datasets.<name>.check_counts: false to accept it anyway."
        )
    return {"published": published, "found": found, "match": match}


def _locate(kind: str, spec: Any, raw_dir: Path, progress: bool) -> tuple[Path | None, str | None]:
    if kind == "folder":
        return None, None
    if kind == "elpv":
        return (Path(spec.data_dir) if spec.data_dir else None), None
    return fetch_and_extract(kind, spec, raw_dir, progress=progress)


def default_workers() -> int:
    """Processes for decoding/encoding: the CPUs this process may use, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


def prepare_real(
    name: str,
    spec: Any,
    *,
    out_dir: Path,
    seed: int,
    raw_dir: Path = Path("data/raw"),
    progress: bool = True,
    workers: int | None = None,
) -> dict[str, Any]:
    root, archive_sha = _locate(spec.kind, spec, Path(raw_dir), progress)
    try:
        sources = load_sources(spec.kind, spec, root)
    except FileNotFoundError as err:
        manual = registry().get(spec.kind, {}).get("manual")
        if manual and not isinstance(err, ManualDownloadError):
            raise ManualDownloadError(f"{err}. {manual}") from None  # say what to fetch, not just what is missing
        raise
    published = published_check(spec.kind, spec, sources)
    skipped: list[dict[str, str]] = []
    hashes: dict[str, str] = {}
    modes: set[str] = set()
    usable: list[Source] = []
    with hygiene.pixel_limit(spec.max_pixels):
        # pass 1: hash every source and read its header (no decoding) — sizes are checked here
        for s in tqdm(sources, desc=f"{name}: check", unit="img", disable=not progress):
            try:
                _, mode = hygiene.header(s.path, None, spec.max_pixels)
            except hygiene.BadImageError as err:
                _bad(spec, skipped, s, err)
                continue
            hashes[str(s.path)] = sha256_file(s.path)  # streamed: a huge file never sits in memory
            modes.add(mode)
            usable.append(s)
        planned, report = plan_splits(
            usable,
            hashes,
            seed=seed,
            val_fraction=spec.val_fraction,
            test_fraction=getattr(spec, "test_normal_fraction", 0.2),
        )
        where = root or _where(spec)
        _check_not_empty(name, [s.split for s in planned], where)
        grey = spec.channels == "grey" or (spec.channels == "auto" and modes <= hygiene.GREY_MODES)
        with atomic_dir(out_dir) as tmp:
            mask_notes: list[str] = []
            rows = _write_images(
                name, spec, planned, tmp, grey, skipped, progress, workers or default_workers(), mask_notes
            )
            for line in mask_notes[:10]:
                tqdm.write(f"{name}: note: {line}")
            if len(mask_notes) > 10:
                tqdm.write(f"{name}: note: … {len(mask_notes) - 10} more in {out_dir}/{INFO} (mask_notes)")
            _check_not_empty(name, [r.split for r in rows], where)  # again: skipped files may empty a split
            write_manifest(tmp, rows)
            info = _info(name, spec, rows, channels=1 if grey else 3, source_sha256=archive_sha)
            info.update(
                source_root=str(root) if root else None,
                published_check=published,
                skipped=skipped,
                duplicates=report.as_dict(),
                seed=seed,
                val_fraction=spec.val_fraction,
                bit_depth=spec.bit_depth,  # predict decodes new files of 16-bit sources the same way
                mask_notes=mask_notes,
            )
            write_json(tmp / INFO, info)
    return info


def _where(spec: Any) -> Path:
    """The tree an empty-split error names for a dataset read in place (`folder`: root or normal_dir)."""
    value = getattr(spec, "root", None) or getattr(spec, "normal_dir", None) or "."
    return Path(value if isinstance(value, str) else value[0])


def _bad(spec: Any, skipped: list[dict[str, str]], s: Source, err: Exception) -> None:
    if spec.on_bad_image == "error":
        raise err
    skipped.append({"path": str(s.path), "reason": str(err)})


def _check_not_empty(name: str, splits: list[str], root: Path) -> None:
    n_train, n_test = splits.count("train"), splits.count("test")
    if n_train == 0 or n_test == 0:
        raise ValueError(
            f"dataset {name!r} ({root}): {n_train} usable train and {n_test} test images; "
            "need at least one of each (empty or wrongly named category?)"
        )


def _out_name(used: set[str], folder: str, stem: str, suffix: str = ".png") -> str:
    rel, n = f"{folder}/{stem}{suffix}", 1
    while rel in used:  # same stem from different source folders (VisA, folder trees)
        rel, n = f"{folder}/{stem}_{n}{suffix}", n + 1
    used.add(rel)
    return rel


def _render_all(jobs: list[hygiene.RenderJob], workers: int) -> Iterator[hygiene.Rendered]:
    """hygiene.render over `jobs`, in order; `workers` > 1 uses spawned processes (decode + resize +
    PNG encode dominate, and each worker imports only PIL/numpy, not torch)."""
    if workers <= 1 or len(jobs) < 64:
        yield from map(hygiene.render, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(hygiene.render, jobs, chunksize=16)


def _write_images(
    name: str,
    spec: Any,
    planned: list[Source],
    tmp: Path,
    grey: bool,
    skipped: list[dict[str, str]],
    progress: bool,
    workers: int,
    notes: list[str],
) -> list[ManifestRow]:
    size, rows, used = spec.image_size, [], set()
    jobs = [
        (str(s.path), tuple(map(str, s.masks)), s.mask_mode, grey, size, spec.max_pixels, spec.bit_depth)
        for s in planned
    ]
    results = _render_all(jobs, workers)
    peak16: int | None = None
    for s, (png, mask_png, error, found, peak) in tqdm(
        zip(planned, results), total=len(planned), desc=f"{name}: write", unit="img", disable=not progress
    ):
        notes.extend(found)
        if peak is not None:
            peak16 = max(peak, peak16 or 0)
        if error is not None:
            _bad(spec, skipped, s, hygiene.BadImageError(error))
            continue
        rel = _out_name(used, f"{s.split}/{s.defect_type}", s.path.stem)
        _write_bytes(tmp / rel, png)
        mask_rel = ""
        if mask_png is not None:
            mask_rel = _out_name(used, f"ground_truth/{s.defect_type}", Path(rel).stem, "_mask.png")
            _write_bytes(tmp / mask_rel, mask_png)
        # hash the bytes we wrote: write_manifest need not read every file back
        rows.append(ManifestRow(rel, s.split, s.label, s.defect_type, mask_rel, hashlib.sha256(png).hexdigest()))
    advice = bit_depth_advice(peak16, spec.bit_depth)
    if advice:
        notes.insert(0, advice)
    return rows


def bit_depth_advice(peak16: int | None, bit_depth: int) -> str | None:
    """A note when the 16-bit sources use so little of `bit_depth`'s range that the stored 8-bit images keep
    at most 32 grey levels: 12-bit data in 16-bit files read as 16-bit would keep 16."""
    top = 2**bit_depth - 1
    if peak16 is None or peak16 * 255 // top >= 32:
        return None
    fits = max(peak16.bit_length(), 9)
    return (
        f"16-bit sources: the brightest value is {peak16} of {top} (bit_depth {bit_depth}), so the stored images "
        f"keep {peak16 * 255 // top + 1} grey levels; if the files hold {fits}-bit data, set bit_depth: {fits}"
    )


def _write_bytes(path: Path, data: bytes | None) -> None:
    assert data is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)  # inside the atomic temp dir: the whole dir is renamed at the end
