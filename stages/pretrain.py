"""DVC stage `pretrain`: data/fractals + params `seed`, `device`, `pretrain:` → data/pretrain + metrics.

`pretrain.nproc_per_node` > 1: the stage relaunches itself under torchrun on this node. Multi-node:
start `torchrun --nnodes ... stages/pretrain.py` on every node yourself (docs/PRETRAINING.md); under
torchrun the stage never relaunches. Interrupted runs resume from data/.pretrain-work/<run key>/last.pt.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Before torch loads libgomp: idle OpenMP threads sleep instead of spinning. On this shared 2-core
# machine spinning made 2 threads ~8x slower than 1 (benchmarks/results/pretrain.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from vadbench.config import load_params
from vadbench.pretrain.dist import torchrun_command, under_torchrun
from vadbench.pretrain.stage import run_pretrain


def main() -> int:
    params = load_params()
    p = params.pretrain
    if p.nproc_per_node > 1 and not under_torchrun():
        return subprocess.run(torchrun_command(p.nproc_per_node, [str(Path(__file__).resolve())]), check=False).returncode
    run_pretrain(Path("data/fractals"), Path("data/pretrain"), Path("metrics/pretrain.json"),
                 Path("metrics/pretrain_log.csv"), Path("data/.pretrain-work"), p, seed=params.seed,
                 device=params.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
