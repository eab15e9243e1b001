"""Turn a backbone spec into ``<dir>/weights.safetensors`` + ``<dir>/card.json``.

Every weight source ends in the same two files, so the AD stages never care where weights came
from, and DVC hashes exactly what they use. The card records the input normalisation the weights
were trained with; the feature extractor applies exactly that (never ImageNet stats on fractal
weights, the mistake the fractal-AD paper's code makes).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vadbench.io import atomic_dir, load_tensors, sha256_file

WEIGHTS = "weights.safetensors"
CARD = "card.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INITS = ("random", "fractal", "imagenet", "file")


@dataclass
class BackboneCard:
    """What a stage needs to know about a weights file (written as ``card.json``)."""

    arch: str
    init: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_sha256: str = ""
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


def read_card(backbone_dir: Path) -> BackboneCard:
    path = Path(backbone_dir) / CARD
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the backbones stage first")
    d = json.loads(path.read_text())
    return BackboneCard(
        arch=d["arch"],
        init=d["init"],
        mean=tuple(d["mean"]),
        std=tuple(d["std"]),
        weights_sha256=d.get("weights_sha256", ""),
        source=d.get("source", ""),
        extra=d.get("extra", {}),
    )


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = load_tensors(path)
    # accept raw state dicts and the usual {"state_dict": ...} / {"model": ...} wrappers
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _check_loads(arch: str, state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Raise a clear error unless `state` fits `arch`'s body; returns it without the classifier.

    The classifier is dropped first: feature extraction never uses it and a fractal or user checkpoint
    has a different number of classes.
    """
    import timm

    model = timm.create_model(arch, pretrained=False)
    head = model.default_cfg.get("classifier", "fc")
    body = {k: v for k, v in state.items() if not k.startswith(f"{head}.")}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(f"{head}.")}
    missing = sorted(set(expected) - set(body))
    unexpected = sorted(set(body) - set(expected))
    wrong_shape = [
        f"{k} {tuple(body[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in body and body[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{source}: weights do not fit timm architecture {arch!r} (is the file for another arch?): "
            f"missing {missing[:3]} ({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)}), "
            f"wrong shape {wrong_shape[:3]} ({len(wrong_shape)})"
        )
    return state


def hf_cached_weights(arch: str, cache_dir: Path | None = None) -> Path | None:
    """The timm/Hugging Face cache file of `arch`'s pretrained tag, if already downloaded; never downloads."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    try:
        hub_id = timm.models.get_pretrained_cfg(arch).hf_hub_id
    except (RuntimeError, AttributeError, KeyError):
        return None
    if not hub_id:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename, cache_dir=str(cache_dir) if cache_dir else None)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _find_weights_file(arch: str, init: str, file: Path | None, hf_cache_dir: Path | None) -> Path:
    """The local file, else (imagenet only) the hub cache; a missing file fails at once, naming the path."""
    if file is not None and Path(file).is_file():
        return Path(file)
    if init == "imagenet":
        cached = hf_cached_weights(arch, hf_cache_dir)
        if cached is not None:
            return cached
        wanted = file or Path("weights") / f"{arch}.safetensors"
        raise FileNotFoundError(
            f"backbone weights file {wanted} not found (init imagenet, arch {arch!r}) and no copy in the "
            f"timm/Hugging Face cache: on a machine with internet save the weights for {arch!r} "
            f"(weights/README.md) to {wanted}. Nothing is downloaded."
        )
    if file is None:
        raise ValueError(f"init {init!r} needs a local weights file")
    raise FileNotFoundError(f"backbone weights file {file} not found (init {init}): put your checkpoint there")


def materialize_backbone(
    out_dir: Path,
    *,
    arch: str,
    init: str,
    seed: int = 0,
    pretrain_dir: Path | None = None,
    file: Path | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    hf_cache_dir: Path | None = None,
) -> BackboneCard:
    """Write weights + card for one backbone into `out_dir` (atomically).

    init ``random``: seeded timm init; ``fractal``: the pretrain stage's ``pretrain_dir``;
    ``imagenet``: the local `file`, else the timm/Hugging Face cache (`hf_cache_dir`, default the hub's)
    for the arch's tag; ``file``: a local checkpoint. Nothing is ever downloaded. `mean`/`std` override
    the normalisation (set them for ``file`` checkpoints not trained with ImageNet statistics).
    """
    import timm

    if init not in INITS:
        raise ValueError(f"backbone init must be one of {INITS}, got {init!r}")
    extra: dict[str, Any] = {}
    if init == "random":
        torch.manual_seed(seed)
        state = timm.create_model(arch, pretrained=False).state_dict()
        # timm zero-initialises the last BN of every residual block (zero_init_last): untrained, the
        # residual branches output zero and the net acts as stem + projections. Kept on purpose: it is
        # what "untrained timm model" means, and scored above a torchvision-style init on synthetic_sem.
        source = f"timm default init (zero_init_last: residual branches start at zero), seed {seed}"
        default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
    elif init == "fractal":
        if pretrain_dir is None:
            raise ValueError("init 'fractal' needs pretrain_dir (the pretrain stage output)")
        if not (Path(pretrain_dir) / CARD).is_file():
            raise FileNotFoundError(f"{Path(pretrain_dir) / CARD} not found: run the pretrain stage first")
        pre_card = read_card(pretrain_dir)
        if pre_card.arch.split(".")[0] != arch.split(".")[0]:
            raise ValueError(
                f"backbone arch {arch!r} differs from the fractal-pretrained arch {pre_card.arch!r} "
                f"in {pretrain_dir}: set pretrain.arch to match"
            )
        weights = Path(pretrain_dir) / WEIGHTS
        if pre_card.weights_sha256 and sha256_file(weights) != pre_card.weights_sha256:
            raise ValueError(f"{weights} does not match the sha256 in {Path(pretrain_dir) / CARD}: rerun pretrain")
        state = load_file(str(weights))
        source = "fractal pretraining (pretrain stage)"
        default_mean, default_std = pre_card.mean, pre_card.std
        extra = pre_card.extra
    else:
        path = _find_weights_file(arch, init, file, hf_cache_dir)
        state = _check_loads(arch, _load_state_dict_file(path), path)
        source = f"{init} file {path.name} (sha256 {sha256_file(path)})"
        # the tag ("resnet18.tv_in1k") selects the normalisation those weights were trained with
        pcfg = timm.create_model(arch, pretrained=False).pretrained_cfg
        default_mean, default_std = tuple(pcfg.get("mean", IMAGENET_MEAN)), tuple(pcfg.get("std", IMAGENET_STD))
    card = BackboneCard(
        arch=arch,
        init=init,
        mean=tuple(float(x) for x in (mean or default_mean)),
        std=tuple(float(x) for x in (std or default_std)),
        source=source,
        extra=extra,
    )
    with atomic_dir(Path(out_dir)) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS))
        card.weights_sha256 = sha256_file(tmp / WEIGHTS)
        (tmp / CARD).write_text(json.dumps(card.to_json(), indent=2, sort_keys=True) + "\n")
    return card


def copy_backbone(src: Path, dst: Path) -> None:
    """Copy a materialized backbone dir (weights + card) atomically."""
    with atomic_dir(Path(dst)) as tmp:
        for name in (WEIGHTS, CARD):
            shutil.copy2(Path(src) / name, tmp / name)
