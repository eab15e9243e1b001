"""The committed dvc.lock holds exactly the stages dvc.yaml defines (scripts/prune_lock.py says why)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_committed_lock_has_no_entries_of_stages_outside_the_grid():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "prune_lock.py"), "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, f"run `make prune-lock` and commit dvc.lock:\n{result.stdout}{result.stderr}"
