"""fractals dataset build: determinism, layout, regeneration, resumability, spawn workers, numba cache, and
the default output pinned to its hashes from before the generator options (composition/background/colour)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from vadbench.fractals import FractalsParams, build, kernels, read_manifest, regenerate, write_preview
from vadbench.io import sha256_file, sha256_tree

TINY = dict(
    num_classes=3,
    instances_per_class=8,
    image_size=32,
    points=1500,
    pad=1,
    search_size=96,
    search_points=4000,
    search_pad=2,
    filling_threshold=0.15,
    workers=1,
)


ROOT = Path(__file__).resolve().parents[1]

# Output hashes of the generator before the generator options existed: computed at commit baf76a5 (branch
# frac-gen) by building params.yaml's `fractals:` section (seed 0, workers 1) and TINY (seed 0) with that code,
# then sha256 of manifest.csv (it holds every PNG's sha256), systems.json, info.json and
# vadbench.io.sha256_tree of the output. They pin plain params (single, black, grey) to FractalDB's
# bytes. PNG bytes depend on Pillow/zlib: recompute them with a checkout of baf76a5 if those change.
DEFAULT_HASHES = {
    "manifest.csv": "7fe71e8dbdff5522ccf9a9bc69fe91cf27f9b0aae4494cfff3d1fed4becaee18",
    "systems.json": "ed8034bd11e42258a6bd38c081d34e85cc09fd20a92f6b590e9961ffdbfddf54",
    "info.json": "e4827a4539731e36ad29ade2bd60985e354982b955e84f32674125aa92082281",
    "tree": "5659253a9c05645aa0da45efb997fa04c698ee7051b794e2ee91795e07fbaa58",
}
TINY_TREE = "1b22d2b43fb7c74292912ae65b1db2346c4a91430c403bc650a0e119971342d8"


def _build(tmp: Path, name: str, seed: int = 0, **over) -> Path:
    out = tmp / name / "fractals"
    build.generate(out, FractalsParams(**{**TINY, **over}), seed, progress=False)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("fr"), "a")


def test_layout_manifest_and_info(built: Path) -> None:
    rows = read_manifest(built)
    assert len(rows) == 24 and {"path", "class", "instance", "sha256"} <= set(rows[0])
    assert [r["path"] for r in rows[:2]] == ["images/0000/0000.png", "images/0000/0001.png"]
    assert sorted(p.name for p in built.iterdir()) == ["images", "info.json", "manifest.csv", "systems.json"]
    assert len(list(built.rglob("*.png"))) == 24 and not list(built.rglob(".*"))  # no temp files left
    for r in rows[:5]:
        img = Image.open(built / r["path"])
        assert img.mode == "L" and img.size == (32, 32)
        assert sha256_file(built / r["path"]) == r["sha256"]
    info = json.loads((built / "info.json").read_text())
    assert info["manifest_sha256"] == sha256_file(built / "manifest.csv") and info["num_images"] == 24
    assert not (built.parent / build.WORK_DIRNAME).exists()  # work dir moved into place


def test_same_seed_identical_bytes_different_seed_differs(built: Path, tmp_path: Path) -> None:
    again = _build(tmp_path, "b")
    assert sha256_tree(again) == sha256_tree(built)
    other = _build(tmp_path, "c", seed=1)
    assert sha256_tree(other) != sha256_tree(built)
    a, b = read_manifest(built), read_manifest(other)
    assert sum(x["sha256"] == y["sha256"] for x, y in zip(a, b)) == 0


def test_every_image_regenerates_from_the_manifest(built: Path) -> None:
    for r in read_manifest(built):
        img = regenerate(built, r)
        assert np.array_equal(img, np.asarray(Image.open(built / r["path"])))
        assert hashlib.sha256(build.encode_png(img)).hexdigest() == r["sha256"]


def test_sigma_build_and_preview(tmp_path: Path) -> None:
    out = _build(tmp_path, "s", sampler="sigma", num_classes=2)
    assert json.loads((out / "info.json").read_text())["params"]["sampler"] == "sigma"
    write_preview(out, tmp_path / "preview.png", columns=8)
    grid = Image.open(tmp_path / "preview.png")
    assert grid.size == (8 * 34 + 2, 34 + 2)  # 2 classes → one row of 32 px tiles with 2 px gaps
    assert np.asarray(grid)[2:34, 2:34].tolist() == np.asarray(Image.open(out / "images/0000/0000.png")).tolist()


def test_interrupted_run_resumes_keeping_finished_classes(built: Path, tmp_path: Path, monkeypatch) -> None:
    real = build.run_class
    calls: list[int] = []

    def flaky(work, p, seed, cls):
        if cls == 2:
            (work / "images" / "0002").mkdir(parents=True, exist_ok=True)
            (work / "images" / "0002" / ".0000.png.tmp").write_bytes(b"half")  # as if killed mid-write
            raise KeyboardInterrupt
        calls.append(cls)
        return real(work, p, seed, cls)

    monkeypatch.setattr(build, "run_class", flaky)
    out = tmp_path / "r" / "fractals"
    with pytest.raises(KeyboardInterrupt):
        build.generate(out, FractalsParams(**TINY), 0, progress=False)
    assert not out.exists() and calls == [0, 1]
    calls.clear()
    monkeypatch.setattr(build, "run_class", lambda *a: (calls.append(a[3]), real(*a))[1])
    build.generate(out, FractalsParams(**TINY), 0, progress=False)
    assert calls == [2]  # finished classes were kept
    assert sha256_tree(out) == sha256_tree(built)


def test_stale_output_is_replaced_and_other_work_dirs_removed(built: Path, tmp_path: Path) -> None:
    out = tmp_path / "x" / "fractals"
    (out / "junk").mkdir(parents=True)
    stale = out.parent / build.WORK_DIRNAME / "0123456789abcdef"
    stale.mkdir(parents=True)
    build.generate(out, FractalsParams(**TINY), 0, progress=False)
    assert not (out / "junk").exists() and not stale.exists()
    assert sha256_tree(out) == sha256_tree(built)


def test_a_live_run_s_work_dir_survives_another_run_finishing(built: Path, tmp_path: Path) -> None:
    """Two params generated side by side into sibling folders: the first to finish removed the other's work
    in progress (seed 2 of a study crashed on a vanished temp file). A locked work dir is left alone now."""
    out = tmp_path / "y" / "fractals"
    root = out.parent / build.WORK_DIRNAME
    live = root / "0123456789abcdef"
    (live / "rows").mkdir(parents=True)
    held = open(root / f"{live.name}.lock", "a")  # what a running generate holds
    fcntl.flock(held, fcntl.LOCK_EX)
    build.generate(out, FractalsParams(**TINY), 0, progress=False)
    assert (live / "rows").is_dir() and sha256_tree(out) == sha256_tree(built)
    held.close()  # that run ends (or dies: the kernel drops its lock)
    build.generate(out, FractalsParams(**TINY), 0, progress=False)
    assert not root.exists()  # its leftovers are now idle, so removed


def test_spawn_workers_give_the_same_bytes(built: Path, tmp_path: Path) -> None:
    out = _build(tmp_path, "w", workers=2)
    assert sha256_tree(out) == sha256_tree(built)


def test_numba_cache_dir_choice(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "given"))
    assert kernels.numba_cache_dir() == tmp_path / "given"
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # a file: nothing can be created under it, even as root
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    chosen = kernels.numba_cache_dir()
    assert chosen is not None and blocker not in chosen.parents and chosen.is_dir()


def test_fresh_cache_dir_compiles_caches_and_reuses(tmp_path: Path) -> None:
    code = "import numpy as np; from vadbench.fractals import kernels as k; print(k.uniform_stream(np.uint64(3), 2)[1])"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert list((tmp_path / "cache").rglob("*.nbi"))  # the cache was written outside the source tree
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert second.stdout == first.stdout


def test_default_params_output_is_unchanged(built: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    p = FractalsParams.model_validate_json(json.dumps({**raw["fractals"], "workers": 1}))
    assert p.plain and raw["seed"] == 0
    out = tmp_path / "d" / "fractals"
    build.generate(out, p, raw["seed"], progress=False)
    got = {name: sha256_file(out / name) for name in ("manifest.csv", "systems.json", "info.json")}
    assert {**got, "tree": sha256_tree(out)} == DEFAULT_HASHES
    assert sha256_tree(built) == TINY_TREE
