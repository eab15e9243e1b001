"""Drop dvc.lock entries of stages that dvc.yaml no longer defines (`make prune-lock`).

    python scripts/prune_lock.py [--check]

DVC keeps a stage's lock entry after the stage leaves the grid (e.g. after `make profile-full`, a run,
and a switch back to the default), and every stage of a `dvc repro` rereads and rewrites the whole lock
with a round-trip YAML parser: a lock twice the needed size cost ~1 s per stage here (stop 21:
56 entries for 32 stages, 137 kB → 70 kB). Nothing is lost by pruning: outputs stay in the DVC cache and
its run-cache restores a stage that returns with the same inputs. `--check` only reports (exit 1 when
something would be dropped); tests/test_dvc_lock.py runs it on the committed lock.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DVC = Path(sys.executable).parent / "dvc"


def defined_stages(project: Path) -> set[str]:
    """Names of every stage dvc.yaml defines (matrix and foreach expanded), as DVC itself lists them."""
    out = subprocess.run(
        [str(DVC), "stage", "list", "--name-only"], cwd=project, capture_output=True, text=True, check=True
    ).stdout
    return set(out.split())


def stale_stages(project: Path) -> list[str]:
    """Stages recorded in dvc.lock that dvc.yaml does not define, in lock order."""
    from dvc.utils.serialize import load_yaml

    recorded = load_yaml(project / "dvc.lock").get("stages", {})
    keep = defined_stages(project)
    return [name for name in recorded if name not in keep]


def prune(project: Path) -> list[str]:
    """Remove the stale entries, written back the way DVC writes the lock; return their names."""
    from dvc.utils.serialize import modify_yaml

    stale = stale_stages(project)
    if stale:
        with modify_yaml(project / "dvc.lock") as lock:
            for name in stale:
                del lock["stages"][name]
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only list stale entries; exit 1 if there are any")
    ns = parser.parse_args()
    stale = stale_stages(ROOT) if ns.check else prune(ROOT)
    verb = "stale" if ns.check else "removed"
    print(f"dvc.lock: {len(stale)} {verb} entr{'y' if len(stale) == 1 else 'ies'}" + "".join(f"\n  {s}" for s in stale))
    return 1 if ns.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
