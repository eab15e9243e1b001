"""`synthetic_sem`: procedural SEM-like images of an IC metal layer, with pixel-masked defects.

Each image is a patch of a Manhattan metal layer as a top-down SEM sees it (cf. the MIIC dataset):
parallel lines (vertical or horizontal, pitch/width/phase drawn per image), an optional regular via
array and an occasional pad, bright line edges (SEM edge effect), beam blur, a low-frequency
shading/charging field, shot noise and scan-line jitter. Defects (`SEM_DEFECTS`) alter the geometry
(bridge, open, missing via/segment) or lie on top of it (particle, scratch, stain).

How an image is made (all randomness from one `SeedSequence` per image, split in three independent
streams: layout, defect, noise — so the same image can be rendered with and without its defect):

1. draw the layout at R = `supersample × image_size` (internal px) and render its noise-free yield;
2. box-downsample to `image_size` (antialiasing), beam blur, orient, shade;
3. for a defect image, do 1-2 for the altered layout too: the mask is where the two noise-free
   renders differ by more than `MASK_THRESHOLD` (so it is exactly the region the defect changed);
4. add shot and scan-line noise (the same draws with or without the defect) and quantise to 8 bits.

Geometry is drawn in a frame with vertical lines and transposed for horizontal images. Sizes are in
"nominal px" (px of a 128-px image) times `k = R / 128`, so the field of view is the same at any size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from vadbench.data.manifest import mvtec_layout_rows, write_manifest
from vadbench.data.params import SEM_DEFECTS, SyntheticSemParams
from vadbench.io import atomic_dir, write_json

MASK_THRESHOLD = 0.05  # noise-free intensity change (of 1.0) that counts as "altered" (~13 grey levels)
MIN_MASK_PX = 4  # a defect that changes fewer final px is redrawn
_MAX_TRIES = 20
_WIDTH_FRACTIONS = (0.42, 0.5)  # line width / pitch
# spawn_key[0] per group: fixed codes, so adding a defect type or changing a count moves no other image
_GROUP_CODE = {"train": 0, "val": 1, "test/good": 2} | {f"test/{d}": 3 + i for i, d in enumerate(SEM_DEFECTS)}

Array = np.ndarray
Overlay = Callable[[Array], Array]


@dataclass(frozen=True)
class SemLayout:
    """How much the design varies between normal images.

    The default is one product layer as a fab inspects it: one pitch, one orientation, a via array
    on every image. Widening it (several pitches, optional vias and pads, both orientations) makes
    structural defects ambiguous for local methods — a bridge resembles a pad edge, a missing via a
    via-free image — which turns the task into a harder, partly logical one.
    """

    pitches: tuple[float, ...] = (12.0,)  # nominal px at 128 px
    via_fraction: float = 1.0  # share of images with a via array
    pad_fraction: float = 0.0  # share of images with a pad
    horizontal_fraction: float = 0.0  # share of images with horizontal lines

    @classmethod
    def from_params(cls, p: SyntheticSemParams) -> SemLayout:
        return cls(tuple(p.pitches), p.via_fraction, p.pad_fraction, p.horizontal_fraction)


class _Retry(Exception):
    """This defect placement does not fit (pad in the way, off-image): draw another."""


@dataclass(frozen=True)
class _Layout:
    """One image's geometry (internal px, vertical-line frame) and its imaging conditions."""

    size: int  # final side S
    ss: int  # supersample factor; internal side R = S * ss
    metal: Array  # (R, R) float32 in {0, 1}: lines and pads
    vias: Array  # (R, R) float32 in {0, 1}
    pad: Array  # (R, R) bool: pad area (defects keep out of it)
    x0: Array  # (L,) int: first column of each line (may lie outside the image)
    x1: Array  # (L,) int: one past its last column
    via_boxes: list[tuple[int, int, int, int]]  # (line, cy, cx, half) of each via outside pads
    width: float  # line width, internal px
    pitch: float
    bg: float
    metal_level: float
    via_level: float
    edge_gain: float
    edge_sigma: float
    blur: float
    transpose: bool
    shade: Array  # (S, S) multiplicative shading, final orientation
    offset: float
    noise_sigma: float
    scan_sigma: float

    @property
    def R(self) -> int:  # noqa: N802 - the internal side, as in the docstrings
        return self.size * self.ss

    @property
    def k(self) -> float:
        """Internal px per nominal px (a px of a 128-px image)."""
        return self.R / 128.0


def image_seed(seed: int, group: str, index: int) -> np.random.SeedSequence:
    """The SeedSequence of image `index` of `group` ('train', 'val', 'test/good', 'test/<defect>')."""
    if group not in _GROUP_CODE:
        raise ValueError(f"unknown image group {group!r}; expected one of {sorted(_GROUP_CODE)}")
    return np.random.SeedSequence(entropy=seed, spawn_key=(_GROUP_CODE[group], index))


def _streams(ss: np.random.SeedSequence) -> tuple[np.random.Generator, ...]:
    # built from (entropy, spawn_key) rather than ss.spawn(): spawn() mutates ss, so a second call
    # with the same object would give other streams and break "same image with/without defect"
    return tuple(
        np.random.default_rng(np.random.SeedSequence(entropy=ss.entropy, spawn_key=(*ss.spawn_key, i)))
        for i in range(3)
    )


def _disc(radius: float) -> Array:
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy**2 + xx**2 <= radius**2 + 0.25).astype(np.float32)


def _stamp(arr: Array, cy: int, cx: int, stamp: Array, value: float) -> None:
    """Write `value` where `stamp` > 0, centred at (cy, cx), clipped to `arr`."""
    h, w = stamp.shape
    y0, x0 = cy - h // 2, cx - w // 2
    ys, xs = slice(max(y0, 0), min(y0 + h, arr.shape[0])), slice(max(x0, 0), min(x0 + w, arr.shape[1]))
    if ys.start >= ys.stop or xs.start >= xs.stop:
        return  # wholly off-image
    sub = stamp[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    arr[ys, xs] = np.where(sub > 0, value, arr[ys, xs])


def _shading(rng: np.random.Generator, size: int) -> Array:
    """(S, S) smooth multiplicative field: a tilt plus coarse random bumps (detector / charging)."""
    t = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    gy, gx = rng.uniform(-0.1, 0.1, 2)
    # smooth bumps: a few low-order cosine modes (separable, so cheap at any size)
    c = rng.normal(0.0, 0.015, (3, 3))
    c[0, 0] = 0.0
    basis = np.cos(np.pi * np.arange(3)[:, None] * (t[None, :] + 0.5))  # (3, S)
    bumps = basis.T @ c @ basis
    return (1.0 + gy * t[:, None] + gx * t[None, :] + bumps).astype(np.float32)


def _draw_layout(rng: np.random.Generator, size: int, ss: int, design: SemLayout) -> _Layout:
    """Lines (+ optional pad and via array) at R = size·ss, and the imaging conditions of one image."""
    R = size * ss
    k = R / 128.0
    # a metal layer routes on design-rule pitches; CD (width) varies a little around its target
    pitch = float(design.pitches[int(rng.integers(len(design.pitches)))]) * k
    width = pitch * float(rng.choice(_WIDTH_FRACTIONS)) * rng.uniform(0.96, 1.04)
    phase = rng.uniform(0, pitch)
    starts = phase + pitch * np.arange(-1, int(R / pitch) + 2)
    x0 = np.rint(starts).astype(int)
    x1 = np.rint(starts + width).astype(int)
    metal = np.zeros((R, R), np.float32)
    for a, b in zip(x0, x1, strict=True):
        metal[:, max(a, 0) : max(b, 0)] = 1.0

    pad = np.zeros((R, R), bool)
    if rng.random() < design.pad_fraction:  # a bond/probe pad over a few lines, partly off-image
        ph, pw = rng.uniform(24, 44, 2) * k
        cy, cx = rng.uniform(0, R, 2)
        ys = slice(max(int(cy - ph / 2), 0), max(int(cy + ph / 2), 0))
        xs = slice(max(int(cx - pw / 2), 0), max(int(cx + pw / 2), 0))
        metal[ys, xs] = 1.0
        pad[ys, xs] = True

    vias = np.zeros((R, R), np.float32)
    via_boxes: list[tuple[int, int, int, int]] = []
    if rng.random() < design.via_fraction:  # a regular via array on every line, staggered between neighbours
        side = float(np.clip(0.75 * width, 3.0 * k, width - 1.0 * k))
        stamp = _disc(side / 2)  # square in the layout, rounded by lithography and the beam
        along = 2.0 * pitch
        vphase = rng.uniform(0, along)
        for li, (a, b) in enumerate(zip(x0, x1, strict=True)):
            cx = int(round((a + b - 1) / 2))
            for cy in np.arange(vphase + (li % 2) * along / 2 - along, R + along, along):
                cy = int(round(cy))
                on_image = -side < cy < R + side and -side < cx < R + side
                if on_image and not pad[np.clip(cy, 0, R - 1), np.clip(cx, 0, R - 1)]:
                    _stamp(vias, cy, cx, stamp, 1.0)
                    via_boxes.append((li, cy, cx, int(np.ceil(side / 2))))
    vias *= metal  # vias land on metal only
    vias[pad] = 0.0

    # one tool, one recipe: imaging levels vary little between images
    bg = rng.uniform(0.22, 0.27)
    metal_level = bg + rng.uniform(0.23, 0.28)
    return _Layout(
        size=size,
        ss=ss,
        metal=metal,
        vias=vias,
        pad=pad,
        x0=x0,
        x1=x1,
        via_boxes=via_boxes,
        width=width,
        pitch=pitch,
        bg=bg,
        metal_level=metal_level,
        via_level=metal_level + rng.uniform(0.17, 0.22),
        edge_gain=rng.uniform(0.24, 0.3),
        edge_sigma=rng.uniform(0.8, 1.1) * k,
        blur=rng.uniform(0.6, 0.8) * k,
        transpose=bool(rng.random() < design.horizontal_fraction),
        shade=_shading(rng, size),
        offset=rng.uniform(-0.02, 0.02),
        noise_sigma=rng.uniform(0.035, 0.045),
        scan_sigma=rng.uniform(0.0, 0.006),
    )


def _intensity(lay: _Layout) -> Array:
    """(R, R) noise-free secondary-electron yield before the beam blur."""
    m, v = lay.metal, lay.vias
    img = lay.bg + (lay.metal_level - lay.bg) * m + (lay.via_level - lay.metal_level) * v
    # SEM edge effect: more electrons escape near topography, so raised edges glow (upper side,
    # decaying inward); vias stand a little higher than the line they sit on
    height = m + 0.6 * v
    rim = height - ndimage.gaussian_filter(height, lay.edge_sigma, truncate=3.0)
    img += 2.0 * lay.edge_gain * np.clip(rim, 0.0, None)
    return img


def _finish(lay: _Layout, img: Array) -> Array:
    """Box-downsample (R → S, antialiasing), beam blur, orientation and shading: (S, S) noise-free."""
    s, f = lay.size, lay.ss
    img = img.reshape(s, f, s, f).mean(axis=(1, 3))
    img = ndimage.gaussian_filter(img, lay.blur / f, truncate=3.0)  # at S: 4× cheaper than at R
    if lay.transpose:
        img = img.T
    return img * lay.shade + lay.offset


def _add_noise(lay: _Layout, img: Array, rng: np.random.Generator) -> Array:
    """Shot noise (std ∝ √signal) and per-scan-line offsets; draws are independent of `img`."""
    z = rng.standard_normal(img.shape).astype(np.float32)
    rows = rng.normal(0.0, lay.scan_sigma, (img.shape[0], 1)).astype(np.float32)
    return img + lay.noise_sigma * np.sqrt(np.clip(img, 0.02, None) / 0.5) * z + rows


# ----- defects: each returns the altered layout and an optional overlay on the (R, R) intensity -----


def _inner_lines(lay: _Layout) -> Array:
    """Indices of lines lying wholly inside the image."""
    return np.flatnonzero((lay.x0 >= 0) & (lay.x1 <= lay.R))


def _clear_of_pad(lay: _Layout, ys: slice, xs: slice, grow: int) -> bool:
    y, x = slice(max(ys.start - grow, 0), ys.stop + grow), slice(max(xs.start - grow, 0), xs.stop + grow)
    return not lay.pad[y, x].any()


def _bridge(lay: _Layout, rng: np.random.Generator, scale: float) -> tuple[_Layout, Overlay | None]:
    """A metal short across the space between two neighbouring lines."""
    lines = [i for i in _inner_lines(lay) if i + 1 < len(lay.x0) and lay.x0[i + 1] <= lay.R]
    i = int(rng.choice(lines))
    h = max(rng.uniform(1.0, 1.8) * lay.width, 4.5 * lay.k) * scale
    cy = rng.uniform(0.1, 0.9) * lay.R
    ys, xs = slice(int(cy - h / 2), int(cy + h / 2)), slice(int(lay.x1[i]), int(lay.x0[i + 1]))
    if not _clear_of_pad(lay, ys, xs, int(lay.pitch)):
        raise _Retry
    metal = lay.metal.copy()
    metal[ys, xs] = 1.0
    return replace(lay, metal=metal), None


def _open(lay: _Layout, rng: np.random.Generator, scale: float) -> tuple[_Layout, Overlay | None]:
    """A break across one line (metal and any via there removed)."""
    i = int(rng.choice(_inner_lines(lay)))
    g = rng.uniform(4.5, 8.0) * lay.k * scale
    y0 = rng.uniform(0.08, 0.92) * lay.R - g / 2
    ys, xs = slice(int(y0), int(y0 + g)), slice(int(lay.x0[i]), int(lay.x1[i]))
    if not _clear_of_pad(lay, ys, xs, int(lay.pitch)):
        raise _Retry
    metal, vias = lay.metal.copy(), lay.vias.copy()
    metal[ys, xs] = 0.0
    vias[ys, xs] = 0.0
    return replace(lay, metal=metal, vias=vias), None


def _missing(lay: _Layout, rng: np.random.Generator, scale: float) -> tuple[_Layout, Overlay | None]:
    """Missing pattern: 1-3 neighbouring vias of one line absent, or a long segment of a line absent."""
    inside = [b for b in lay.via_boxes if min(b[1], b[2]) - b[3] >= 0 and max(b[1], b[2]) + b[3] < lay.R]
    if inside and rng.random() < 0.4:
        first = int(rng.integers(len(inside)))
        line, cy, cx, half = inside[first]
        vias = lay.vias.copy()
        for b in inside[first : first + int(rng.integers(1, 4))]:
            if b[0] == line:  # neighbours along the same line only
                vias[b[1] - half - 1 : b[1] + half + 2, b[2] - half - 1 : b[2] + half + 2] = 0.0
        return replace(lay, vias=vias), None
    i = int(rng.choice(_inner_lines(lay)))
    length = min(rng.uniform(16.0, 36.0) * lay.k * scale, 0.9 * lay.R)
    y0 = rng.uniform(0.0, lay.R - length)
    ys, xs = slice(int(y0), int(y0 + length)), slice(int(lay.x0[i]), int(lay.x1[i]))
    if not _clear_of_pad(lay, ys, xs, int(lay.pitch)):
        raise _Retry
    metal, vias = lay.metal.copy(), lay.vias.copy()
    metal[ys, xs] = 0.0
    vias[ys, xs] = 0.0
    return replace(lay, metal=metal, vias=vias), None


def _blend(alpha: Array, value: float) -> Overlay:
    return lambda img: img * (1.0 - alpha) + value * alpha


def _particle(lay: _Layout, rng: np.random.Generator, scale: float) -> tuple[_Layout, Overlay | None]:
    """A foreign particle: a small irregular blob, bright (charging) or dark, a few px across."""
    R, k = lay.R, lay.k
    cy, cx = rng.uniform(0.06, 0.94, 2) * R
    yy, xx = (g.astype(np.float32) for g in np.ogrid[:R, :R])  # (R, 1), (1, R): broadcast
    blob = np.zeros((R, R), np.float32)
    for _ in range(int(rng.integers(1, 4))):  # 1-3 overlapping ellipses: irregular outline
        ry, rx = rng.uniform(1.8, 4.0, 2) * k * scale
        oy, ox = rng.normal(0, 1.2 * k * scale, 2)
        blob = np.maximum(blob, (((yy - cy - oy) / ry) ** 2 + ((xx - cx - ox) / rx) ** 2 <= 1).astype(np.float32))
    alpha = np.clip(ndimage.gaussian_filter(blob, 0.5 * k) * 1.3, 0, 1)
    bright = rng.random() < 0.6
    value = rng.uniform(0.88, 1.0) if bright else rng.uniform(0.0, 0.06)

    def overlay(img: Array) -> Array:
        # a bright particle on bright metal/via would hide: flip to dark there (and vice versa)
        local = float(img[blob > 0].mean())
        v = value if abs(value - local) > 0.3 else (1.0 - value)
        return img * (1.0 - alpha) + v * alpha

    return lay, overlay


def _scratch(lay: _Layout, rng: np.random.Generator, scale: float) -> tuple[_Layout, Overlay | None]:
    """A long thin scratch across the pattern, slightly curved, at an angle to the lines."""
    R, k = lay.R, lay.k
    theta = rng.choice([-1, 1]) * rng.uniform(np.deg2rad(20), np.deg2rad(90))  # from the line direction
    length = rng.uniform(0.45, 0.9) * R
    c = rng.uniform(0.25, 0.75, 2) * R
    t = np.linspace(-0.5, 0.5, 4 * R)
    d = np.array([np.cos(theta), np.sin(theta)])
    n = np.array([-d[1], d[0]])
    sag = rng.uniform(-0.06, 0.06) * length * (1 - (2 * t) ** 2)  # a gentle bow
    pts = c + np.outer(t * length, d) + np.outer(sag, n)
    pts = np.rint(pts).astype(int)
    pts = pts[(pts >= 0).all(1) & (pts < R).all(1)]
    if len(pts) < R // 4:
        raise _Retry
    path = np.ones((R, R), bool)
    path[pts[:, 0], pts[:, 1]] = False
    dist = ndimage.distance_transform_edt(path).astype(np.float32)
    w = rng.uniform(0.8, 1.6) * k * scale  # half-width
    alpha = np.clip(w + 0.5 - dist, 0, 1)
    value = rng.uniform(0.0, 0.08) if rng.random() < 0.6 else rng.uniform(0.85, 0.95)
    return lay, _blend(alpha, value)


def _stain(lay: _Layout, rng: np.random.Generator, scale: float) -> tuple[_Layout, Overlay | None]:
    """A large, low-contrast discolouration (residue / watermark) with a soft rim."""
    R, k = lay.R, lay.k
    cy, cx = rng.uniform(0.2, 0.8, 2) * R
    ry, rx = np.minimum(rng.uniform(10.0, 24.0, 2) * k * scale, 0.4 * R)
    a = rng.uniform(0, np.pi)
    yy, xx = (g.astype(np.float32) for g in np.ogrid[:R, :R])  # (R, 1), (1, R): broadcast
    u = (yy - cy) * np.cos(a) + (xx - cx) * np.sin(a)
    v = -(yy - cy) * np.sin(a) + (xx - cx) * np.cos(a)
    w = ndimage.gaussian_filter(((u / ry) ** 2 + (v / rx) ** 2 <= 1).astype(np.float32), 2.5 * k)
    shift = rng.choice([-1.0, 1.0]) * rng.uniform(0.09, 0.15)
    return lay, lambda img: img + shift * w


# each takes (layout, defect stream, size scale) and returns (altered layout, overlay or None)
_DEFECTS: dict[str, Callable[[_Layout, np.random.Generator, float], tuple[_Layout, Overlay | None]]] = {
    "particle": _particle,
    "bridge": _bridge,
    "open": _open,
    "scratch": _scratch,
    "stain": _stain,
    "missing": _missing,
}
assert set(_DEFECTS) == set(SEM_DEFECTS)


def render_sample(
    seed: np.random.SeedSequence,
    size: int = 128,
    defect: str | None = None,
    supersample: int = 2,
    defect_scale: float = 1.0,
    design: SemLayout = SemLayout(),
) -> tuple[Array, Array]:
    """Render one image: (image (S, S) uint8, mask (S, S) uint8 in {0, 255}; all-zero for defect None).

    The layout and noise depend only on `seed`, so `defect=None` gives the same image without the defect.
    `defect_scale` multiplies every defect's size (1.0: the sizes a fab engineer would expect at 128 px).
    """
    if defect is not None and defect not in _DEFECTS:
        raise ValueError(f"unknown defect type {defect!r}; expected one of {list(SEM_DEFECTS)}")
    if size < 16 or supersample < 1 or defect_scale <= 0:
        raise ValueError(
            f"need size ≥ 16, supersample ≥ 1, defect_scale > 0; got {size}, {supersample}, {defect_scale}"
        )
    rl, rd, rn = _streams(seed)
    lay = _draw_layout(rl, size, supersample, design)
    clean = _finish(lay, _intensity(lay))
    img, mask = clean, np.zeros((size, size), bool)
    if defect is not None:
        for _ in range(_MAX_TRIES):
            try:
                bad, overlay = _DEFECTS[defect](lay, rd, defect_scale)
            except _Retry:
                continue
            raw = _intensity(bad)
            img = _finish(bad, overlay(raw) if overlay else raw)
            mask = np.abs(img - clean) > MASK_THRESHOLD
            if mask.sum() >= MIN_MASK_PX:
                break
        else:
            raise RuntimeError(f"could not place a visible {defect!r} defect in {_MAX_TRIES} tries (seed {seed})")
    out = np.clip(np.rint(_add_noise(lay, img, rn) * 255.0), 0, 255).astype(np.uint8)
    return out, mask.astype(np.uint8) * 255


def _save_png(path: Path, arr: Array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # (H, W) uint8 → mode L; PIL writes no timestamps, so the bytes depend on the pixels only
    Image.fromarray(arr).save(path, format="PNG")


def generate_synthetic_sem(out_dir: Path, params: SyntheticSemParams, seed: int) -> dict[str, dict[str, int]]:
    """Write the dataset to `out_dir` (MVTec layout + manifest.csv + info.json), replacing it atomically.

    Returns the image counts per split and type, e.g.
    {"train": {"good": 100}, "val": {"good": 20}, "test": {"good": 30, "bridge": 8, ...}}.
    """
    if not isinstance(params, SyntheticSemParams):
        raise TypeError(f"params must be SyntheticSemParams, got {type(params).__name__}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    plan = [
        ("train", "train/good", params.n_train),
        ("val", "val/good", params.n_val),
        ("test/good", "test/good", params.n_test_normal),
    ]
    plan += [(f"test/{d}", f"test/{d}", params.n_test_per_defect) for d in params.defect_types]
    jobs = [(group, folder, i) for group, folder, n in plan for i in range(n)]
    digits = max(3, len(str(max(n for *_, n in plan) - 1)))
    design = SemLayout.from_params(params)
    with atomic_dir(Path(out_dir)) as root:
        for group, folder, i in tqdm(jobs, desc="synthetic_sem", unit="img", disable=None):
            defect = group.split("/", 1)[1] if group.startswith("test/") else None
            defect = None if defect == "good" else defect
            img, mask = render_sample(
                image_seed(seed, group, i), params.image_size, defect, params.supersample, params.defect_scale, design
            )
            stem = f"{i:0{digits}d}"
            _save_png(root / folder / f"{stem}.png", img)
            if defect is not None:
                _save_png(root / "ground_truth" / defect / f"{stem}_mask.png", mask)
        write_manifest(root, mvtec_layout_rows(root))
        counts: dict[str, dict[str, int]] = {
            "train": {"good": params.n_train},
            "val": {"good": params.n_val},
            "test": {"good": params.n_test_normal},
        }
        counts["test"] |= {d: params.n_test_per_defect for d in params.defect_types}
        write_json(
            root / "info.json",
            {"kind": "synthetic_sem", "seed": seed, "params": params.model_dump(mode="json"), "counts": counts},
        )
    return counts
