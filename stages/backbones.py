"""DVC stage `backbones`: params `seed`, `run.backbones`, `backbones:` (+ data/pretrain, weights/) → data/backbones.

Every backbone named in `run.backbones` becomes data/backbones/<name>/{weights.safetensors,card.json};
the whole folder is replaced in one rename, so a failure leaves the previous one intact.
"""

from pathlib import Path

from tqdm import tqdm

from vadbench.backbones import materialize_backbone
from vadbench.cli import stage_main
from vadbench.config import Params
from vadbench.io import atomic_dir


def run(params: Params) -> None:
    with atomic_dir(Path("data/backbones")) as tmp:
        for name in tqdm(params.run.backbones, desc="backbones"):
            spec = params.backbones[name]
            card = materialize_backbone(
                tmp / name,
                arch=spec.arch,
                init=spec.init,
                seed=params.seed,
                pretrain_dir=Path("data/pretrain"),
                file=Path(spec.file) if spec.file else None,
                mean=spec.mean,
                std=spec.std,
            )
            tqdm.write(f"{name}: {card.arch} ({card.init}) mean {card.mean} std {card.std}")


if __name__ == "__main__":
    stage_main(run)
