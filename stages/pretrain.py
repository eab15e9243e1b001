"""DVC stage `pretrain`: data/fractals + params `seed`, `device`, `pretrain:` → data/pretrain + metrics.

`pretrain.nproc_per_node` > 1: the stage relaunches itself under torchrun on this node. Multi-node:
start `torchrun --nnodes ... stages/pretrain.py` on every node yourself (docs/PRETRAINING.md); under
torchrun the stage never relaunches. Interrupted runs resume from data/.pretrain-work/<run key>/last.pt.
"""

import subprocess
from pathlib import Path

from vadbench import layout
from vadbench.cli import stage_main
from vadbench.config import Params
from vadbench.pretrain.dist import torchrun_command, under_torchrun
from vadbench.pretrain.stage import run_pretrain


def run(params: Params) -> None:
    p = params.pretrain
    if p.nproc_per_node > 1 and not under_torchrun():
        rc = subprocess.run(torchrun_command(p.nproc_per_node, [str(Path(__file__).resolve())]), check=False).returncode
        if rc:
            raise SystemExit(rc)
        return
    run_pretrain(
        Path("data/fractals"),
        Path("data/pretrain"),
        Path("metrics/pretrain.json"),
        Path("metrics/pretrain_log.csv"),
        Path("data/.pretrain-work"),
        p,
        seed=params.seed,
        device=params.device,
        timing_path=layout.MEASURED_PRETRAIN,
    )


if __name__ == "__main__":
    stage_main(run)
