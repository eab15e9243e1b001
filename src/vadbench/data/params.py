"""Typed `datasets.<name>:` entries of params.yaml, one class per dataset kind (field `kind`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from vadbench.schema import StrictModel

SEM_DEFECTS = ("particle", "bridge", "open", "scratch", "stain", "missing")


class InputPolicy(StrictModel):
    """How images reach the models: resize to `image_size`; center-crop only when asked (reported)."""

    image_size: int = Field(128, ge=16, le=2048)
    center_crop: int | None = Field(None, ge=16, description="crop after resize; recorded in the leaderboard")


class SyntheticSemParams(InputPolicy):
    """Embedded SEM-like metal-layer images (`data/synthetic_sem.py`), generated from the global seed."""

    kind: Literal["synthetic_sem"] = "synthetic_sem"
    # below 64 px the narrowest lines and vias fall under 2 px and defects stop being visible
    image_size: int = Field(128, ge=64, le=1024, description="side of the written grey PNGs in px")
    supersample: int = Field(2, ge=1, le=4, description="render at supersample × image_size, then box-downsample")
    n_train: int = Field(100, ge=1)
    n_val: int = Field(20, ge=1)
    n_test_normal: int = Field(30, ge=1)
    n_test_per_defect: int = Field(8, ge=1)
    defect_types: list[Literal["particle", "bridge", "open", "scratch", "stain", "missing"]] = Field(
        default_factory=lambda: list(SEM_DEFECTS), min_length=1
    )
    defect_scale: float = Field(
        1.0, ge=0.5, le=3.0, description="multiplies every defect's size (1.0: realistic sizes at 128 px)"
    )
    # design variation between normal images; the default is one product layer (see SemLayout)
    pitches: list[Annotated[float, Field(ge=6.0, le=40.0)]] = Field(
        default_factory=lambda: [12.0], min_length=1, description="line pitches the layer uses (px at 128 px)"
    )
    via_fraction: float = Field(1.0, ge=0, le=1, description="share of images with a via array")
    pad_fraction: float = Field(0.0, ge=0, le=1, description="share of images with a pad")
    horizontal_fraction: float = Field(0.0, ge=0, le=1, description="share of images with horizontal lines")

    @model_validator(mode="after")
    def _unique_defects(self) -> SyntheticSemParams:
        if len(set(self.defect_types)) != len(self.defect_types):
            raise ValueError(f"defect_types lists a type twice: {self.defect_types}")
        return self


# ---- real datasets (issue 5) ----------------------------------------------------------------------
MVTEC_AD_CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
VISA_CATEGORIES = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)
MVTEC_LOCO_CATEGORIES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")
MPDD_CATEGORIES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")
BTAD_CATEGORIES = ("01", "02", "03")


class RealDatasetParams(InputPolicy):
    """Shared by every real-dataset kind: where the data comes from and how images are checked."""

    val_fraction: float = Field(0.1, ge=0, lt=1, description="normals carved from train into val (seeded)")
    channels: Literal["auto", "grey", "rgb"] = Field("auto", description="auto: grey iff every image is grey")
    data_dir: str | None = Field(None, description="an already-extracted tree; skips download")
    url: str | None = Field(None, description="override the registry URL (mirrors, tests)")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="the archive checksum you trust")
    archive: str | None = Field(None, description="override the archive file name under data/raw")
    on_bad_image: Literal["error", "skip"] = Field("error", description="corrupt/oversized files: stop or skip+report")
    max_pixels: int = Field(100_000_000, ge=1, description="reject larger images from their header, before decoding")
    bit_depth: int = Field(
        16,
        ge=9,
        le=16,
        description="significant bits of 16-bit sources (12 for 12-bit camera/SEM data in 16-bit files): "
        "stored as floor(v · 255 / (2**bit_depth − 1)); 8-bit sources are unaffected",
    )
    max_extract_bytes: int = Field(32 * 2**30, ge=1, description="cap on the total size an archive may extract to")
    connect_timeout: float = Field(10.0, gt=0, le=120)
    check_counts: bool = Field(True, description="compare source counts with the registry's published counts")


class MvtecAdParams(RealDatasetParams):
    """MVTec AD (15 categories, pixel masks): downloaded and sha256-checked; or your own category via data_dir."""

    kind: Literal["mvtec_ad"] = "mvtec_ad"
    category: str = Field(
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$",
        description="one of the 15 published categories; with data_dir any MVTec-format category folder",
    )

    @field_validator("category")
    @classmethod
    def _official_unless_local(cls, category: str, info: ValidationInfo) -> str:
        if category not in MVTEC_AD_CATEGORIES and not info.data.get("data_dir"):
            raise ValueError(
                f"{category!r} is not an MVTec AD category ({', '.join(MVTEC_AD_CATEGORIES)}); "
                "for your own MVTec-format category set data_dir to the folder that holds it"
            )
        return category


class VisaParams(RealDatasetParams):
    """VisA (12 categories, pixel masks): download with the archive sha256 you trust."""

    kind: Literal["visa"] = "visa"
    category: Literal[VISA_CATEGORIES]  # type: ignore[valid-type]


class MvtecLocoParams(RealDatasetParams):
    """MVTec LOCO AD (logical + structural anomalies, OR-ed masks): downloaded."""

    kind: Literal["mvtec_loco"] = "mvtec_loco"
    category: Literal[MVTEC_LOCO_CATEGORIES]  # type: ignore[valid-type]


class MpddParams(RealDatasetParams):
    """MPDD (metal parts, pixel masks): downloaded."""

    kind: Literal["mpdd"] = "mpdd"
    category: Literal[MPDD_CATEGORIES]  # type: ignore[valid-type]


class BtadParams(RealDatasetParams):
    """BTAD (3 industrial products, pixel masks): downloaded."""

    kind: Literal["btad"] = "btad"
    category: Literal[BTAD_CATEGORIES]  # type: ignore[valid-type]


class MiicParams(RealDatasetParams):
    """MIIC: SEM images of IC metal layers; manual download, verified."""

    kind: Literal["miic"] = "miic"


class ElpvParams(RealDatasetParams):
    """ELPV: real electroluminescence images of solar cells (pip package elpv-dataset), image level."""

    kind: Literal["elpv"] = "elpv"
    category: Literal["mono", "poly"]
    uncertain: Literal["drop", "normal", "defective"] = Field(
        "drop", description="cells with defect probability strictly between 0 and 1"
    )
    test_normal_fraction: float = Field(0.2, gt=0, lt=1, description="normals held out for test (seeded)")


DirList = str | Annotated[list[str], Field(min_length=1)]
"""One directory or several (their images are pooled)."""


class FolderParams(RealDatasetParams):
    """Any user tree: an MVTec-style `root`, or normal/abnormal dirs (sub-dirs = defect types), optional masks."""

    kind: Literal["folder"] = "folder"
    category: str = Field("folder", pattern=r"^[A-Za-z0-9_]+$")
    root: str | None = Field(
        None, description="an MVTec-style tree used as it is: train/good, test/good, test/<type>, ground_truth/<type>"
    )
    normal_dir: DirList | None = Field(None, description="normal images (recursive); one dir or a list")
    abnormal_dir: DirList | None = Field(
        None, description="sub-dirs = defect types; a good/ sub-dir holds test normals; one dir or a list"
    )
    mask_dir: DirList | None = Field(None, description="masks mirror abnormal_dir; name = image stem + mask_suffix")
    mask_suffix: str | None = Field(None, description="default: none; with root '_mask', falling back to the bare stem")
    test_normal_dir: DirList | None = Field(
        None, description="the tree's own test normals; else carved from normal_dir"
    )
    test_normal_fraction: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_layout(self) -> FolderParams:
        dir_fields = ("normal_dir", "abnormal_dir", "mask_dir", "test_normal_dir")
        if self.root:
            given = [f for f in dir_fields if getattr(self, f)]
            if given:
                raise ValueError(
                    f"root and {', '.join(given)} are given; use either root (an MVTec-style tree) "
                    "or normal_dir + abnormal_dir, not both"
                )
            return self
        missing = [f for f in ("normal_dir", "abnormal_dir") if not getattr(self, f)]
        if missing:
            raise ValueError(
                f"{' and '.join(missing)} missing: give either root (an MVTec-style tree: train/good, "
                "test/<type>, ground_truth/<type>) or both normal_dir and abnormal_dir"
            )
        return self


DatasetSpec = Annotated[
    SyntheticSemParams
    | MvtecAdParams
    | VisaParams
    | MvtecLocoParams
    | MpddParams
    | BtadParams
    | MiicParams
    | ElpvParams
    | FolderParams,
    Field(discriminator="kind"),
]
