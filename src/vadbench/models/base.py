"""The one small interface every anomaly-detection method implements, and the name registry.

A model is a plain ``torch.nn.Module``. It is fitted on normal images only, from streams::

    model = create_model("patchcore", backbone=feature_extractor, **params)
    report = model.fit(train_source, val_source)      # sized, indexable sources of uint8 (C, H, W) images
    scores, maps = model.predict(batch)               # one batch (B, C, H, W) float in [0, 1] → (B,), (B, H, W)
    model.save(path); model = load_model(path, backbone=feature_extractor)

The data contract (``vadbench.data.source``): `fit` receives image sources (`ImageSource` for a prepared
split, `TensorSource` around a tensor — a tensor passed to `fit` is wrapped so), never a whole split as
one float tensor. A model iterates them batch by batch (`float_batches`, or the shared training loop
`components.trainer.train`), so its memory does not grow with the number of images unless the method
itself needs it (a PatchCore bank, under its memory budget). `predict` sees one batch already on the
model's device; the score stage streams the test split through it and writes maps incrementally.
The feature extractor returns ``{layer name: map}``: models pick their layers by name.

Validation images are normals carved from train: a model may use them for early stopping or
normalisation, never the test split. Saved files hold only what the model itself learned (the
frozen backbone lives in ``data/backbones``) and load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from vadbench.io import atomic_file, load_tensors
from vadbench.schema import StrictModel

_REGISTRY: dict[str, type[AnomalyModel]] = {}


class AnomalyModel(nn.Module):
    """Base class: subclasses set `name`, implement `fit` and `predict`.

    `hparams` must hold every constructor keyword (JSON-serialisable) so `load_model` can rebuild
    the module before loading its state. `needs_backbone` False → the model ignores the backbone
    (autoencoders trained from pixels). `seed` (when the Params has one) is set per run seed by the
    fit stage, never from params.yaml.
    """

    name: ClassVar[str] = ""
    #: the typed `models.<name>:` section of params.yaml; constructor keywords = its fields
    Params: ClassVar[type[StrictModel]] = StrictModel
    needs_backbone: ClassVar[bool] = True
    #: False for image-level methods: their maps are the score broadcast, pixel metrics are "n/a"
    has_pixel_maps: ClassVar[bool] = True
    #: state-dict prefixes not saved (the frozen backbone is reloaded from its own artifact)
    frozen_prefixes: ClassVar[tuple[str, ...]] = ("backbone.",)

    def __init__(self, **hparams: Any) -> None:
        super().__init__()
        # one validation for every model: `p` is the typed view, `hparams` the saved JSON-able one
        self.p = self.Params.model_validate_json(json.dumps(hparams))
        self.hparams = self.p.model_dump(mode="json")

    def fit(self, train: Dataset | torch.Tensor, val: Dataset | torch.Tensor | None = None) -> dict[str, Any]:
        """Learn from normal image sources (uint8 (C, H, W) items); return a small JSON-able report."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (B, C, H, W) float in [0, 1] → (scores (B,), maps (B, H, W)), both float32 on CPU."""
        raise NotImplementedError

    # -- persistence -----------------------------------------------------------------------
    def learned_state(self) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().cpu()
            for k, v in self.state_dict().items()
            if not any(k.startswith(p) for p in self.frozen_prefixes)
        }

    def save(self, path: Path) -> None:
        payload = {"name": self.name, "hparams": self.hparams, "state": self.learned_state()}
        # through a buffer: torch.save names the zip's inner folder after the file it writes, and a temp
        # file's random name would make every save's bytes (and dvc.lock) differ
        buf = io.BytesIO()
        torch.save(payload, buf)
        with atomic_file(Path(path), "wb") as fh:
            fh.write(buf.getvalue())

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set every saved tensor, replacing buffers whose size was only known after `fit`."""
        for key, value in state.items():
            owner_name, _, attr = key.rpartition(".")
            owner = self.get_submodule(owner_name) if owner_name else self
            current = getattr(owner, attr, None)
            if isinstance(current, nn.Parameter):
                if current.shape == value.shape:
                    with torch.no_grad():
                        current.copy_(value)
                else:
                    setattr(owner, attr, nn.Parameter(value.clone(), requires_grad=current.requires_grad))
            elif attr in owner._buffers or current is None or isinstance(current, torch.Tensor):
                device = current.device if isinstance(current, torch.Tensor) else value.device
                owner.register_buffer(attr, value.clone().to(device))
            else:
                raise KeyError(f"saved tensor {key!r} has no place in {type(self).__name__}")


def register_model(cls: type[AnomalyModel]) -> type[AnomalyModel]:
    """Class decorator: make `cls` constructible by its `name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"model name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def model_names() -> list[str]:
    _import_builtin_models()
    return sorted(_REGISTRY)


def model_class(name: str) -> type[AnomalyModel]:
    _import_builtin_models()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(_REGISTRY)}") from None


def create_model(name: str, backbone: nn.Module | None = None, **hparams: Any) -> AnomalyModel:
    """Build model `name`; `hparams` are validated by its `Params` (defaults filled in) in __init__."""
    cls = model_class(name)
    if cls.needs_backbone and backbone is None:
        raise ValueError(f"model {name!r} needs a backbone")
    return cls(backbone=backbone, **hparams) if cls.needs_backbone else cls(**hparams)


def load_model(path: Path, backbone: nn.Module | None = None, map_location: str | torch.device = "cpu") -> AnomalyModel:
    payload = load_tensors(Path(path), map_location)
    model = create_model(payload["name"], backbone=backbone, **payload["hparams"])
    model.load_learned_state(payload["state"])
    return model.eval()


_builtin_loaded = False


def _import_builtin_models() -> None:
    # Importing the package registers every built-in model file (each calls @register_model).
    global _builtin_loaded
    if not _builtin_loaded:
        _builtin_loaded = True
        import vadbench.models  # noqa: F401


ModelFactory = Callable[..., AnomalyModel]
