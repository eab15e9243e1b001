"""Typed `datasets.<name>:` entries of params.yaml, one class per dataset kind (field `kind`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from vadbench.schema import StrictModel

SEM_DEFECTS = ("particle", "bridge", "open", "scratch", "stain", "missing")


class InputPolicy(StrictModel):
    """How images reach the models: resize to `image_size`; center-crop only when asked (reported)."""

    image_size: int = Field(128, ge=16, le=2048)
    center_crop: int | None = Field(None, ge=16, description="crop after resize; recorded in the leaderboard")


class SyntheticSemParams(InputPolicy):
    kind: Literal["synthetic_sem"] = "synthetic_sem"
    n_train: int = Field(100, ge=1)
    n_val: int = Field(20, ge=1)
    n_test_normal: int = Field(30, ge=1)
    n_test_per_defect: int = Field(10, ge=1)
    defect_types: list[Literal["particle", "bridge", "open", "scratch", "stain", "missing"]] = Field(
        default_factory=lambda: list(SEM_DEFECTS), min_length=1
    )


DatasetSpec = Annotated[SyntheticSemParams, Field(discriminator="kind")]
