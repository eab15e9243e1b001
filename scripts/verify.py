"""Reproducibility check (`make verify`): a small grid run twice from a clean state must be byte-identical.

    python scripts/verify.py [--params FILE] [--lock FILE] [--update-lock]

Two fresh copies of the project's tracked files (``git ls-files``: what a clone has) each get a small
grid — params.yaml with the `small_grid` overrides below, or `--params` — and run ``dvc repro`` from
nothing. Then:
  1. both ``dvc.lock`` files are identical, and so is every cached output under data/ and every metrics /
     plots file (measurements in metrics/measured/ are excluded: they are the one thing allowed to vary);
  2. a third ``dvc repro`` in the first copy reruns nothing but the `check` stage (its time is printed;
     target ≤ 5 s, warned about, not failed: wall-clock time on a shared machine is no verdict);
  3. its ``dvc.lock`` agrees with the lock committed for this machine kind,
     ``profiles/verify-locks/<kind>.lock`` (kind: `vadbench.machine.machine_kind`, CPU architecture, vendor,
     torch's CPU capability such as AVX2 or AVX512, torch version: float kernels differ between kinds, so outputs
     may too). Stage by stage: every stage whose command, dependencies and params equal the recorded ones must
     have the recorded outputs;
     a stage whose inputs changed since the recording (a deliberate code or param change) is listed as
     not comparable, not failed. `--update-lock` rewrites the lock of this kind — commit it.
Exit 0 when all hold, 1 with the differing files listed otherwise. Runs in a few minutes on 2 CPU cores.
A machine kind without a committed lock gets checks 1 and 2 and a warning.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: never compared: measurements (and reports/index.html, which shows them), DVC's own state, local caches
SKIP = re.compile(r"^(metrics/measured/|reports/index\.html$|\.dvc/(tmp|cache)/|data/\.sources-cache/|\.git/)")


def small_grid() -> dict:
    """params.yaml, shrunk to a minutes-long grid that still runs every stage kind."""
    import yaml

    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["run"].update(
        {
            "datasets": ["synthetic_sem"],
            "models": ["patchcore", "padim", "stfpm"],
            "pixel_models": ["sparse_ae"],
            "backbones": ["random", "fractal"],
            "seeds": [0],
        }
    )  # other run keys (supervised_models, ...) as params.yaml has them
    p["models"]["stfpm"].update(epochs=2)
    p["models"]["sparse_ae"].update(epochs=2)
    p["fractals"].update(num_classes=4, instances_per_class=8, image_size=32, points=2000, pad=1, workers=1)
    p["pretrain"].update(epochs=2, batch_size=16, milestones=[], warmup_epochs=0)
    p["datasets"]["synthetic_sem"].update(image_size=64, n_train=16, n_val=6, n_test_normal=6, n_test_per_defect=2)
    p["score"].update(latency_repeats=2, latency_warmup=1)
    return p


def copy_tracked(dst: Path, params: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for raw in filter(None, files):
        rel = raw.decode()
        src = ROOT / rel
        if not src.is_file() or rel.startswith(("metrics/", "reports/")) or rel == "dvc.lock":
            continue  # results are produced, not copied: a clean state
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / rel)
    shutil.copy2(params, dst / "params.yaml")
    env = _env()
    for args in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=v", "-c", "user.email=v@v", "commit", "-qm", "verify"],
    ):
        subprocess.run(args, cwd=dst, check=True, env=env, capture_output=True)


def compare_locks(recorded: str, current: str) -> tuple[list[str], list[str]]:
    """(problems, not comparable): stages whose cmd, deps and params match the recording must match its outs."""
    import yaml

    old, new = yaml.safe_load(recorded)["stages"], yaml.safe_load(current)["stages"]
    problems, stale = [], []
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        if a is None or b is None:
            stale.append(f"{name} (only in the {'current' if a is None else 'recorded'} lock)")
        elif any(a.get(k) != b.get(k) for k in ("cmd", "deps", "params")):
            stale.append(name)
        elif a.get("outs") != b.get("outs"):
            differing = [o["path"] for o, p in zip(a.get("outs", []), b.get("outs", [])) if o != p]
            problems.append(f"stage {name}: same inputs as recorded, other outputs: {', '.join(differing) or 'outs'}")
    return problems, stale


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}


def repro(project: Path) -> tuple[float, set[str]]:
    t0 = time.perf_counter()
    # the copy's own src/ first: the editable install points at this checkout, which must not leak in
    env = {**_env(), "PYTHONPATH": str(project / "src")}
    res = subprocess.run(["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"dvc repro failed in {project}:\n{(res.stdout + res.stderr)[-4000:]}")
    return time.perf_counter() - t0, set(re.findall(r"Running stage '([^']+)'", res.stdout + res.stderr))


def files_of(project: Path) -> set[str]:
    out = set()
    for path in project.rglob("*"):
        rel = path.relative_to(project).as_posix()
        if path.is_file() and not SKIP.match(rel):
            out.add(rel)
    return out


def compare(a: Path, b: Path) -> list[str]:
    fa, fb = files_of(a), files_of(b)
    problems = [f"only in one run: {rel}" for rel in sorted(fa ^ fb)]
    problems += [f"differs: {rel}" for rel in sorted(fa & fb) if not filecmp.cmp(a / rel, b / rel, shallow=False)]
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=None, help="params file of the grid (default: small_grid())")
    ap.add_argument("--lock", type=Path, default=None, help="default: profiles/verify-locks/<machine kind>.lock")
    ap.add_argument("--update-lock", action="store_true", help="write the first run's dvc.lock to --lock")
    ap.add_argument("--keep", action="store_true", help="keep the two project copies (printed)")
    args = ap.parse_args()
    from vadbench.machine import machine_kind

    kind = machine_kind()
    if args.lock is None:
        args.lock = ROOT / "profiles" / "verify-locks" / f"{kind}.lock"
    print(
        f"verify: machine kind {kind}; lock {args.lock.relative_to(ROOT) if args.lock.is_relative_to(ROOT) else args.lock}"
    )
    work = Path(tempfile.mkdtemp(prefix="vadbench-verify-"))
    a, b = work / "a", work / "b"
    params = args.params
    if params is None:
        import yaml

        params = work / "params.yaml"
        params.write_text(yaml.safe_dump(small_grid(), sort_keys=False))
    problems: list[str] = []
    try:
        for project in (a, b):
            copy_tracked(project, params)
            seconds, ran = repro(project)
            print(f"verify: {project.name}: dvc repro ran {len(ran)} stages in {seconds:.0f} s", flush=True)
        problems += compare(a, b)
        seconds, ran = repro(a)
        print(f"verify: third dvc repro: {seconds:.1f} s, ran {sorted(ran)}")
        if ran - {"check"}:
            problems.append(f"third dvc repro reran {sorted(ran - {'check'})}")
        if seconds > 5:  # reported, not failed: wall-clock time on a shared CI machine is no verdict
            print(f"verify: WARNING third dvc repro took {seconds:.1f} s (target ≤ 5 s; was the machine busy?)")
        lock = (a / "dvc.lock").read_text()
        if args.update_lock:
            args.lock.parent.mkdir(parents=True, exist_ok=True)
            args.lock.write_text(lock)
            print(f"verify: wrote {args.lock}")
        elif not args.lock.is_file():
            print(
                f"verify: WARNING no lock recorded for machine kind {kind} ({args.lock} missing): the two runs "
                "were compared with each other only; record it with --update-lock and commit it"
            )
        elif args.lock.read_text() != lock:
            lock_problems, stale = compare_locks(args.lock.read_text(), lock)
            problems += lock_problems
            if stale:
                print(
                    f"verify: {len(stale)} stage(s) not comparable with {args.lock.name} (inputs changed since it "
                    f"was recorded; --update-lock after a deliberate change): {', '.join(stale)}"
                )
    finally:
        if args.keep:
            print(f"verify: kept {a} and {b}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    for p in problems:
        print(f"verify: FAIL {p}")
    if not problems:
        print(
            "verify: OK — two clean runs byte-identical, third run a no-op, every stage with the recorded inputs "
            "has the recorded outputs"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
