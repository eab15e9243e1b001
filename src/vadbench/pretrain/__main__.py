"""``python -m vadbench.pretrain JOB.json``: run pretraining from a JSON job (torchrun-friendly entry point).

JOB keys: fractal_dir, out_dir, metrics_path, log_path, work_root, params (the `pretrain:` mapping), seed,
device, and optionally stop_after_epoch (test hook). Used by tests and for ad-hoc runs outside DVC;
the DVC stage is stages/pretrain.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vadbench.pretrain.params import PretrainParams
from vadbench.pretrain.stage import run_pretrain
from vadbench.pretrain.train import StopRequested


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m vadbench.pretrain JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    params = PretrainParams.model_validate_json(json.dumps(job["params"]))
    try:
        run_pretrain(
            job["fractal_dir"],
            job["out_dir"],
            job["metrics_path"],
            job["log_path"],
            job["work_root"],
            params,
            seed=int(job["seed"]),
            device=job.get("device", "auto"),
            stop_after_epoch=job.get("stop_after_epoch"),
        )
    except StopRequested as stop:
        print(stop, file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
