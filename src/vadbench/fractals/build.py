"""Build the fractal dataset: search categories, render instances, write PNGs + manifest, resumably.

Output (`out`, e.g. data/fractals):
    images/<class:04d>/<instance:04d>.png   8-bit grey, values {0, 255} (generator options: grey levels, or RGB)
    manifest.csv   path,class,instance,instance_params,patch,flip,render_seed,sha256
    systems.json   {"<class>": {"maps": [[a,b,c,d,e,f], ...], "fill": .., "tries": ..}}
    info.json      seed, params, counts, manifest_sha256
Any image is regenerated from systems.json + its manifest row + info.json (`regenerate`). The generator
options (multi-fractal collages, backgrounds, colour; compose.py) leave plain params on FractalDB's own path.

Work happens in `<out.parent>/.fractals-work/<params hash>/` (DVC deletes `out` before a rerun, so
progress must live elsewhere). A class is finished once its rows file exists; an interrupted run,
rerun with the same params, skips finished classes. Files are written under a temp name and renamed,
so no half-written PNG is ever visible, and `out` appears in one rename at the very end. A run holds an
exclusive lock on `<params hash>.lock` beside its work dir: a second run with the same params waits for it,
and the removal of other params' leftovers skips work dirs whose run is alive (two seeds generated side by
side into sibling folders once deleted each other's work).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image
from tqdm import tqdm

from vadbench.fractals import ifs
from vadbench.fractals.compose import Composer
from vadbench.fractals.instances import Instance, Renderer, plan_class, search_rng
from vadbench.fractals.params import FractalsParams
from vadbench.io import atomic_path, sha256_file, write_json

COLUMNS = ("path", "class", "instance", "instance_params", "patch", "flip", "render_seed", "sha256")
PNG_COMPRESS_LEVEL = 1  # binary images: level 1 is ~as small as 6 and several times faster to encode
WORK_DIRNAME = ".fractals-work"


def params_hash(seed: int, p: FractalsParams) -> str:
    """Identifies the content: the params that can change a byte (FractalsParams.content_dump: not `workers`,
    nor generator options that do not act)."""
    blob = json.dumps({"seed": seed, **p.content_dump()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes of a (H, W) grey or (H, W, 3) RGB uint8 image (deterministic for a given Pillow/zlib)."""
    buf = io.BytesIO()
    Image.fromarray(img, mode="RGB" if img.ndim == 3 else "L").save(
        buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL
    )
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    # temp name + rename: an interrupted run never leaves a truncated file at `path`. No fsync per
    # image (it would cost more than the render); a crash loses at most unfinished classes.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _class_system(work: Path, p: FractalsParams, seed: int, cls: int, write: bool = True) -> ifs.System:
    path = work / "systems" / f"{cls:04d}.json"
    if path.exists():
        return ifs.System.from_json(json.loads(path.read_text()))
    system = ifs.search_system(p, search_rng(seed, cls))
    if write:
        _write_bytes(path, json.dumps(system.to_json()).encode())
    return system


def _search_worker(args: tuple[str, str, int, int]) -> int:
    work, p_json, seed, cls = args
    _class_system(Path(work), FractalsParams.model_validate_json(p_json), seed, cls)
    return cls


def run_class(work: Path, p: FractalsParams, seed: int, cls: int) -> int:
    """Search class `cls`'s system (or reuse it), render its instances into work/images, and
    finally write work/rows/<cls>.csv, which marks the class finished. Returns the image count."""
    system = _class_system(work, p, seed, cls)
    folder = work / "images" / f"{cls:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob(".*.tmp"):  # from an interrupted run of this class
        leftover.unlink()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    plan = plan_class(p, seed, cls, system)
    if p.plain:  # FractalDB's single grey fractal on black
        renderer = Renderer(p.image_size, p.points, p.pad)
        inst: Instance
        for inst in plan:
            data = encode_png(renderer.render(inst.maps, inst.render_seed, inst.flip))
            rel = f"images/{cls:04d}/{inst.instance:04d}.png"
            _write_bytes(work / rel, data)
            writer.writerow({"path": rel, **inst.row(cls), "sha256": hashlib.sha256(data).hexdigest()})
    else:
        # other classes' systems (background `fractal`) were searched before any class rendered (generate);
        # should one be missing (run_class called directly) it is searched here, without writing it
        composer = Composer(p, seed, lambda c: system if c == cls else _class_system(work, p, seed, c, write=False))
        for i in range(len(plan)):
            img, row = composer.image(cls, plan, i)
            data = encode_png(img)
            rel = f"images/{cls:04d}/{i:04d}.png"
            _write_bytes(work / rel, data)
            writer.writerow({"path": rel, **row, "sha256": hashlib.sha256(data).hexdigest()})
    (work / "rows").mkdir(exist_ok=True)
    _write_bytes(work / "rows" / f"{cls:04d}.csv", buf.getvalue().encode())
    return p.instances_per_class


def _worker(args: tuple[str, str, int, int]) -> tuple[int, int]:
    work, p_json, seed, cls = args
    return cls, run_class(Path(work), FractalsParams.model_validate_json(p_json), seed, cls)


def _finish(work: Path, p: FractalsParams, seed: int) -> dict:
    """Merge per-class rows/systems into manifest.csv, systems.json and info.json inside `work`."""
    with open(work / "manifest.csv", "w", newline="") as fh:
        fh.write(",".join(COLUMNS) + "\n")
        for cls in range(p.num_classes):
            fh.write((work / "rows" / f"{cls:04d}.csv").read_text())
    systems = {str(c): json.loads((work / "systems" / f"{c:04d}.json").read_text()) for c in range(p.num_classes)}
    write_json(work / "systems.json", systems)
    tries = [s["tries"] for s in systems.values()]
    info = {
        "seed": seed,
        "params": p.content_dump(),
        "num_classes": p.num_classes,
        "num_images": p.num_classes * p.instances_per_class,
        "manifest_sha256": sha256_file(work / "manifest.csv"),
        "systems_sha256": sha256_file(work / "systems.json"),
        "search": {"candidates": int(sum(tries)), "acceptance_rate": len(tries) / sum(tries)},
    }
    write_json(work / "info.json", info)  # from here on the work dir only needs the swap
    return info


def _swap_into_place(work: Path, out: Path) -> None:
    if out.exists():  # rename the old output aside so the swap itself is one rename
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(work, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, out)


def _lock(path: Path, wait: bool) -> IO[str] | None:
    """An exclusive flock on `path` (created if missing), or None when `wait` is False and another process
    holds it. Retries when the file was unlinked while we waited (its holder finished and removed it)."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fh = open(path, "a")
        except FileNotFoundError:  # the folder was removed between mkdir and open
            continue
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.close()
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino:
                return fh
        except FileNotFoundError:
            pass
        fh.close()


@contextlib.contextmanager
def _work_held(root: Path, key: str) -> Iterator[None]:
    """Hold `root/<key>.lock` for the block; the lock file is removed on exit."""
    path = root / f"{key}.lock"
    fh = _lock(path, wait=True)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while held: a waiter notices the unlink and locks a fresh file
        fh.close()  # type: ignore[union-attr]


def _remove_idle_work(root: Path, keep: str) -> None:
    """Delete other params' work dirs (and lock files) under `root` unless their run is alive."""
    try:
        keys = {p.name.removesuffix(".lock") for p in root.iterdir()} - {keep}
    except FileNotFoundError:  # another run removed the emptied folder
        return
    for key in sorted(keys):
        fh = _lock(root / f"{key}.lock", wait=False)
        if fh is None:  # a run of those params is in progress
            continue
        shutil.rmtree(root / key, ignore_errors=True)
        (root / f"{key}.lock").unlink(missing_ok=True)
        fh.close()


def generate(out: Path, p: FractalsParams, seed: int, progress: bool = True) -> dict:
    """Generate the dataset into `out` (see module doc); returns info.json's content.

    Uses p.workers spawn-started processes (one class per task). Work in progress lives in
    `<out.parent>/.fractals-work/<params hash>/`; other hashes' leftovers are removed on success unless a
    run of theirs is in progress.
    """
    out = Path(out)
    root = out.parent / WORK_DIRNAME
    key = params_hash(seed, p)
    with _work_held(root, key):
        info = _generate(out, p, seed, root / key, progress)
    _remove_idle_work(root, keep=key)
    with contextlib.suppress(OSError):  # not empty: another run started meanwhile
        root.rmdir()
    return info


def _generate(out: Path, p: FractalsParams, seed: int, work: Path, progress: bool) -> dict:
    finished = (work / "info.json").exists()  # interrupted between merge and swap: only the swap is left
    if not finished:
        (work / "rows").mkdir(parents=True, exist_ok=True)
        (work / "systems").mkdir(exist_ok=True)
    todo = [] if finished else [c for c in range(p.num_classes) if not (work / "rows" / f"{c:04d}.csv").exists()]
    n_img = p.instances_per_class
    bar = tqdm(
        total=p.num_classes * n_img,
        initial=(p.num_classes - len(todo)) * n_img,
        unit="img",
        desc=f"fractals ({p.sampler})",
        disable=not progress,
    )
    # background `fractal` draws other classes' systems: every system is searched before any class renders
    search = []
    if todo and p.background == "fractal":
        search = [c for c in range(p.num_classes) if not (work / "systems" / f"{c:04d}.json").exists()]
    t0 = time.perf_counter()
    with bar:
        if p.workers == 1 or len(todo) <= 1:
            for cls in search:
                _class_system(work, p, seed, cls)
            for cls in todo:
                bar.update(run_class(work, p, seed, cls))
        else:
            p_json = p.model_dump_json()
            jobs = [(str(work), p_json, seed, c) for c in todo]
            # spawn: workers share no RNG or numba state with the parent; every seed is derived
            with mp.get_context("spawn").Pool(min(p.workers, len(todo))) as pool:
                for _ in pool.imap_unordered(_search_worker, [(str(work), p_json, seed, c) for c in search]):
                    pass
                for _, n in pool.imap_unordered(_worker, jobs):
                    bar.update(n)
    info = json.loads((work / "info.json").read_text()) if finished else _finish(work, p, seed)
    shutil.rmtree(work / "rows", ignore_errors=True)  # per-class parts, merged by _finish
    shutil.rmtree(work / "systems", ignore_errors=True)
    _swap_into_place(work, out)
    if progress:
        print(
            f"fractals: {info['num_images']} images in {time.perf_counter() - t0:.1f}s "
            f"(search acceptance {info['search']['acceptance_rate']:.3f}) → {out}"
        )
    return info


def read_manifest(root: Path) -> list[dict]:
    with open(Path(root) / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def regenerate(root: Path, row: dict) -> np.ndarray:
    """Re-render the image of manifest `row` from root's systems.json and info.json. (S, S) uint8, or
    (S, S, 3) for colour. Plain params: from the row alone; generator options: the class's instance plan
    and image `row["instance"]` are rebuilt from info.json's seed and params."""
    root = Path(root)
    info = json.loads((root / "info.json").read_text())
    p = FractalsParams.model_validate_json(json.dumps(info["params"]))  # absent generator options: defaults
    systems = json.loads((root / "systems.json").read_text())
    cls = int(row["class"])
    system = ifs.System.from_json(systems[str(cls)])
    if p.plain:
        maps = ifs.apply_instance(system.maps, json.loads(row["instance_params"]))
        return Renderer(p.image_size, p.points, p.pad).render(maps, int(row["render_seed"]), row["flip"])
    composer = Composer(p, info["seed"], lambda c: ifs.System.from_json(systems[str(c)]))
    return composer.image(cls, plan_class(p, info["seed"], cls, system), int(row["instance"]))[0]


def write_preview(root: Path, dest: Path, max_classes: int = 64, columns: int = 8, tile: int = 96) -> None:
    """Grid PNG of instance 0 of each of the first `max_classes` classes (tiles ≤ `tile` px; RGB when the
    images are)."""
    rows = [r for r in read_manifest(root) if r["instance"] == "0"][:max_classes]
    with Image.open(Path(root) / rows[0]["path"]) as first:
        t, mode = min(tile, first.width), "RGB" if first.mode == "RGB" else "L"
    n_rows = -(-len(rows) // columns)
    gap = 2
    grid = Image.new(mode, (columns * (t + gap) + gap, n_rows * (t + gap) + gap), (128,) * len(mode))
    for i, r in enumerate(rows):
        im = Image.open(Path(root) / r["path"]).convert(mode)
        if im.width != t:
            im = im.resize((t, t), Image.Resampling.BOX)  # area average keeps thin strokes visible
        grid.paste(im, (gap + (i % columns) * (t + gap), gap + (i // columns) * (t + gap)))
    with atomic_path(Path(dest)) as tmp:
        grid.save(tmp, format="PNG")


__all__ = ["generate", "regenerate", "read_manifest", "write_preview", "params_hash", "run_class", "encode_png"]
