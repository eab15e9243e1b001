"""Anomaly-detection models, one self-contained file per method, registered by name.

Adding a method: write ``models/<name>.py`` with a ``@register_model`` class and import it here.
"""

import importlib

from vadbench.models.base import AnomalyModel, create_model, load_model, model_class, model_names, register_model

# Importing each file registers its model (@register_model).
_BUILTIN = (
    "patchcore",
    "padim",
    "stfpm",
    "reverse_distillation",
    "fastflow",
    "cflow",
    "panda",
    "cutpaste",
    "sparse_ae",
    "deep_ae",
    "gaussian_ad",
    "simplenet",
    "supersimplenet",
    "efficientad_s",
    "efficientad_m",
    "cfa",
    "draem",
    "riad",
    "ganomaly",
    "fanogan",
    "iad_inpaint",
)
for _mod in _BUILTIN:
    importlib.import_module(f"vadbench.models.{_mod}")

__all__ = ["AnomalyModel", "create_model", "load_model", "model_class", "model_names", "register_model"]
