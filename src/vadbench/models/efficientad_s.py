"""EfficientAD-S (Batzner et al., WACV 2024): PDN-S teacher and student (4 convolutions each).

The method lives in `components.efficientad_base`, shared by both sizes (and, under models/components/,
a dependency of every fit stage, so editing it reruns these cells); this file fixes the PDN size and
registers the name (a model's file is named after it: dvc.yaml's fit stage depends on models/<name>.py).
"""

from vadbench.models.base import register_model
from vadbench.models.components.efficientad_base import EfficientAD


@register_model
class EfficientADS(EfficientAD):
    """EfficientAD-S: PDN-S teacher and student (4 convolutions each). Params: `EfficientAD.Params`."""

    name = "efficientad_s"
    size = "small"
