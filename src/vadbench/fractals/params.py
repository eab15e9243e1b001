"""Typed `fractals:` section of params.yaml.

Defaults are the quick CPU profile (16 classes × 32 images at 64 px). Paper scale (FractalDB-1k):
num_classes 1000, instances_per_class 1000, image_size 362, points 200000 — noted per field.

Generator options (`composition`, `multi_*`, `background*`, `colour`) default to FractalDB's single grey
fractal on black; at those defaults the output is byte-identical to the generator without them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from vadbench.schema import StrictModel


class FractalsParams(StrictModel):
    sampler: Literal["fractaldb", "sigma"] = Field(
        "fractaldb",
        description="fractaldb: six params ~ U(-1,1), filling-rate search; sigma: Anderson & Farrell σ-factor systems",
    )
    num_classes: int = Field(16, ge=1, description="accepted IFS categories (paper: 1000)")
    instances_per_class: int = Field(
        32,
        ge=1,
        description="images per category (paper: 1000 = 25 weight variants × 10 patch renders × 4 flips). "
        "For fractaldb, fewer than the full product takes a seeded random subset of the variant×patch×flip grid",
    )
    image_size: int = Field(64, ge=8, le=4096, description="rendered side in px (paper: 362)")
    points: int = Field(6_000, ge=100, description="chaos-game points per image (paper: 200000; ~1.5 per pixel)")
    pad: int = Field(2, ge=0, description="empty border in px around the fractal's bounding box")
    min_maps: int = Field(2, ge=1, le=16, description="fractaldb: fewest affine maps per system (paper: 2)")
    max_maps: int = Field(7, ge=1, le=16, description="fractaldb: most affine maps per system (paper: 7)")
    sigma_min_maps: int = Field(2, ge=1, le=16, description="sigma: fewest maps (paper: 2)")
    sigma_max_maps: int = Field(4, ge=1, le=16, description="sigma: most maps (paper: 4)")
    filling_threshold: float = Field(
        0.2,
        gt=0.0,
        le=1.0,
        description="accept a system when non-zero/all pixels of its search render ≥ this (paper: 0.2)",
    )
    search_size: int = Field(512, ge=8, le=4096, description="search render side in px (paper: 512)")
    search_points: int = Field(100_000, ge=100, description="points in a search render (paper: 100000)")
    search_pad: int = Field(6, ge=0, description="padding of the search render (paper: 6)")
    search_max_tries: int = Field(100_000, ge=1, description="candidates per category before giving up with an error")
    weight_factors: tuple[float, ...] = Field(
        (0.2, 0.6, 1.4, 1.8),
        description="fractaldb: each of the six parameters is scaled by each factor in turn; with the "
        "unchanged system that gives 1 + 6·len variants (paper: 0.2, 0.6, 1.4, 1.8 → 25)",
    )
    patch_renders: int = Field(
        10, ge=1, description="fractaldb: renders per variant, each with its own random 3×3 patch (paper: 10)"
    )
    flips: bool = Field(True, description="each render also as its horizontal, vertical and double flip (paper: true)")
    sigma_jitter: tuple[float, float] = Field(
        (0.8, 1.1), description="sigma: per image one map is scaled by U(lo, hi) (contractive jitters only)"
    )
    composition: Literal["single", "multi"] = Field(
        "single",
        description="single: one fractal per image (FractalDB); multi: every image pastes fractals.multi_count "
        "renders of its class's instances at random sizes and positions (Ugwu et al.'s MultiFractal sets)",
    )
    multi_count: tuple[int, int] = Field(
        (4, 10), description="multi: fractals per image ~ U{lo..hi} (renders of the image's own class)"
    )
    multi_scale: tuple[float, float] = Field(
        (0.15, 0.60), description="multi: side of each pasted render ~ U(lo, hi) × image_size (clipped at the border)"
    )
    background: Literal["black", "diamond_square", "fractal"] = Field(
        "black",
        description="black; diamond_square: seeded plasma noise in [0, background_level]; fractal: a blurred "
        "render of another (seeded) class's system filling the image, scaled to [0, background_level]",
    )
    background_level: float = Field(
        0.5, gt=0.0, le=1.0, description="brightest background value, as a fraction of full scale (255)"
    )
    colour: Literal["grey", "colour"] = Field(
        "grey",
        description="grey: 8-bit grey PNGs; colour: RGB PNGs, each map of an instance drawn in its own seeded "
        "colour (points coloured by the map that produced them), backgrounds tinted",
    )
    workers: int = Field(2, ge=1, description="processes; classes are spread over them")

    @property
    def n_flips(self) -> int:
        return 4 if self.flips else 1

    @property
    def n_variants(self) -> int:
        return 1 + 6 * len(self.weight_factors)

    @property
    def plain(self) -> bool:
        """FractalDB's own output: one grey fractal per image on black (the generator options' defaults)."""
        return self.composition == "single" and self.background == "black" and self.colour == "grey"

    def content_dump(self) -> dict:
        """The params that determine the output bytes, JSON-able (info.json, the work-dir hash): all but
        `workers`, and each generator option only where it acts (composition/multi_* when multi, background*
        when not black, colour when colour). An absent option means its default, so plain output keeps
        the info.json of the generator before these options existed."""
        drop = {"workers"}
        if self.composition == "single":
            drop |= {"composition", "multi_count", "multi_scale"}
        if self.background == "black":
            drop |= {"background", "background_level"}
        if self.colour == "grey":
            drop.add("colour")
        return self.model_dump(mode="json", exclude=drop)

    @property
    def grid_size(self) -> int:
        """fractaldb: distinct (variant, patch render, flip) combinations per class."""
        return self.n_variants * self.patch_renders * self.n_flips

    @model_validator(mode="after")
    def _consistent(self) -> FractalsParams:
        # messages name fractals.<key>: config.parse_params reports them under `fractals`
        if self.min_maps > self.max_maps:
            raise ValueError(f"fractals.min_maps ({self.min_maps}) must be ≤ fractals.max_maps ({self.max_maps})")
        if self.sigma_min_maps > self.sigma_max_maps:
            raise ValueError(
                f"fractals.sigma_min_maps ({self.sigma_min_maps}) must be ≤ "
                f"fractals.sigma_max_maps ({self.sigma_max_maps})"
            )
        if self.image_size <= 2 * self.pad + 2:
            raise ValueError(
                f"fractals.image_size ({self.image_size}) must exceed 2·fractals.pad + 2 ({2 * self.pad + 2})"
            )
        if self.search_size <= 2 * self.search_pad + 2:
            raise ValueError(
                f"fractals.search_size ({self.search_size}) must exceed "
                f"2·fractals.search_pad + 2 ({2 * self.search_pad + 2})"
            )
        bad = [f for f in self.weight_factors if not f > 0 or f == 1.0]
        if bad or len(set(self.weight_factors)) != len(self.weight_factors):
            raise ValueError(
                f"fractals.weight_factors {list(self.weight_factors)}: expected distinct positive factors ≠ 1 "
                "(the unchanged system is always included)"
            )
        lo, hi = self.sigma_jitter
        if not 0 < lo <= hi:
            raise ValueError(f"fractals.sigma_jitter {[lo, hi]}: expected 0 < lo ≤ hi")
        lo, hi = self.multi_count
        if not 1 <= lo <= hi:
            raise ValueError(f"fractals.multi_count {[lo, hi]}: expected 1 ≤ lo ≤ hi")
        lo, hi = self.multi_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"fractals.multi_scale {[lo, hi]}: expected 0 < lo ≤ hi ≤ 1 (fractions of image_size)")
        if self.composition == "multi" and round(lo * self.image_size) < 2:
            raise ValueError(f"fractals.multi_scale lo ({lo}) × fractals.image_size ({self.image_size}) must be ≥ 2 px")
        if self.background == "fractal" and self.num_classes < 2:
            raise ValueError(
                "fractals.background 'fractal' draws another class's system: needs fractals.num_classes ≥ 2"
            )
        if self.sampler == "fractaldb" and self.instances_per_class > self.grid_size:
            raise ValueError(
                f"fractals.instances_per_class ({self.instances_per_class}) exceeds the {self.grid_size} distinct "
                f"fractaldb instances ({self.n_variants} variants × fractals.patch_renders {self.patch_renders} × "
                f"{self.n_flips} flips); raise fractals.patch_renders"
            )
        return self
