"""Generator options: multi-fractal collages, backgrounds and colour renders (`composition`, `background`,
`colour` in FractalsParams). Plain params (single, black, grey) never come here: build.run_class keeps
FractalDB's own path for them.

Every random choice comes from `SeedSequence([seed, class, TAG, instance])` with the TAGs below (they continue
instances.py's), so an image depends only on (seed, params, the class systems), never on the process, the order
or the worker count:
  _TAG_MULTI       image i's collage: number of pastes, then per paste the instance, side and centre
  _TAG_BACKGROUND  image i's background: plasma seed, or other class + render seed; then the tint (colour)
  _TAG_COLOUR      instance j's map colours (one per map, the same wherever instance j is drawn)
"""

from __future__ import annotations

import colorsys
import json
from collections.abc import Callable

import numpy as np

from vadbench.fractals import ifs, kernels
from vadbench.fractals.instances import Instance, Renderer, derive_seed
from vadbench.fractals.params import FractalsParams

_TAG_MULTI, _TAG_BACKGROUND, _TAG_COLOUR = 5, 6, 7
_CACHE_ENTRIES = 4096  # per-instance caches (colours, probabilities + patch) are cleared at this size


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(keys)))


def _hsv_u8(h: float, s: float, v: float) -> np.ndarray:
    return np.array([int(x * 255.0 + 0.5) for x in colorsys.hsv_to_rgb(h, s, v)], np.uint8)


def map_colours(seed: int, cls: int, instance: int, n_maps: int) -> np.ndarray:
    """Lookup table (1 + n_maps, 3) uint8: row 0 black (empty), row 1 + k the colour of map k of the instance:
    hue ~ U(0, 1), saturation ~ U(0.5, 1), value ~ U(0.7, 1) (bright: never mistaken for the background)."""
    rng = _rng(seed, cls, _TAG_COLOUR, instance)
    hsv = rng.uniform((0.0, 0.5, 0.7), (1.0, 1.0, 1.0), (n_maps, 3))
    return np.vstack([np.zeros((1, 3), np.uint8), *(_hsv_u8(*row)[None] for row in hsv)])


def box_blur(img: np.ndarray, radius: int, passes: int = 2) -> np.ndarray:
    """(H, W) → int64 (H, W): `passes` box filters of side 2·radius + 1 along each axis (edge-replicated),
    in integer arithmetic (exact, so byte-reproducible anywhere). Unnormalised window sums."""
    a = img.astype(np.int64)
    for _ in range(passes):
        for axis in (0, 1):
            pad = [(0, 0), (0, 0)]
            pad[axis] = (radius + 1, radius)
            c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis)
            n = a.shape[axis]
            hi = np.take(c, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis=axis)
            lo = np.take(c, np.arange(0, n), axis=axis)
            a = hi - lo
    return a


class Composer:
    """Builds the images of one process: scratch buffers plus the class systems it needed so far.

    `system_of(cls)` returns a class's accepted system (the background `fractal` draws other classes').
    """

    def __init__(self, p: FractalsParams, seed: int, system_of: Callable[[int], ifs.System]) -> None:
        self.p, self.seed, self._system_of = p, seed, system_of
        self.size = p.image_size
        self.renderer = Renderer(p.image_size, p.points, p.pad)
        self.top = int(p.background_level * 255.0 + 0.5)  # brightest background value
        n = 1 << max(1, (self.size - 1).bit_length())  # plasma grid side N ≥ size − 1, a power of two
        self._grid = np.empty((n + 1, n + 1), np.float64) if p.background == "diamond_square" else None
        self._bg_pts = np.empty((p.points, 2), np.float64) if p.background == "fractal" else None
        if p.composition == "multi":  # collage scratch: full-size render (+ labels) before scaling down
            self._pts = np.empty((p.points, 2), np.float64)
            self._full = np.empty((self.size, self.size, 1 if p.colour == "grey" else 4), np.uint8)
            self._grey = self._full.reshape(self.size, self.size) if p.colour == "grey" else None
            self._labels = np.empty(p.points, np.uint8)
            self._label_img = np.empty((self.size, self.size), np.uint8)
            self._prep: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._systems: dict[int, ifs.System] = {}
        self._colours: dict[tuple[int, int], np.ndarray] = {}

    def system(self, cls: int) -> ifs.System:
        if cls not in self._systems:
            self._systems[cls] = self._system_of(cls)
        return self._systems[cls]

    def _lut(self, cls: int, inst: Instance) -> np.ndarray:
        key = (cls, inst.instance)
        if key not in self._colours:
            if len(self._colours) >= _CACHE_ENTRIES:
                self._colours.clear()
            self._colours[key] = map_colours(self.seed, cls, inst.instance, len(inst.maps))
        return self._colours[key]

    # --- foreground: (premultiplied image, coverage) ----------------------------------------------------
    def _render(self, cls: int, inst: Instance) -> tuple[np.ndarray, np.ndarray]:
        """Instance `inst` as its single image: grey {0, 255} (its own coverage), or RGB + coverage."""
        if self.p.colour == "grey":
            img = self.renderer.render(inst.maps, inst.render_seed, inst.flip)
            return img, img
        labels = self.renderer.render_labels(inst.maps, inst.render_seed, inst.flip)
        return self._lut(cls, inst)[labels], np.where(labels > 0, np.uint8(255), np.uint8(0))

    def _tile(self, cls: int, inst: Instance, side: int) -> tuple[np.ndarray, np.ndarray]:
        """Instance `inst`'s single image area-averaged down to (side, side): (image, coverage), grey or RGB."""
        key = (cls, inst.instance)
        if key not in self._prep:  # per instance: map probabilities and 3×3 patch (as Renderer draws it)
            if len(self._prep) >= _CACHE_ENTRIES:
                self._prep.clear()
            patch = ifs.random_patch(np.random.default_rng([inst.render_seed, 1]))
            self._prep[key] = ifs.cumulative(inst.maps), patch
        cum, patch = self._prep[key]
        seed, full = np.uint64(inst.render_seed), self._full
        if self.p.colour == "grey":
            kernels.render_into(inst.maps, cum, self.p.points, self.p.pad, patch, seed, self._pts, self._grey)
        else:
            labels = self._label_img
            kernels.render_labels_into(
                inst.maps, cum, self.p.points, self.p.pad, patch, seed, self._pts, self._labels, labels
            )
            full[..., :3] = self._lut(cls, inst)[labels]
            full[..., 3] = np.where(labels > 0, np.uint8(255), np.uint8(0))
        tile = np.empty((side, side, full.shape[2]), np.uint8)
        kernels.area_downscale(full, tile)  # commutes with flips: scale, then flip the small tile
        if "h" in inst.flip:
            tile = tile[:, ::-1]
        if "v" in inst.flip:
            tile = tile[::-1]
        return (tile[..., 0], tile[..., 0]) if self.p.colour == "grey" else (tile[..., :3], tile[..., 3])

    def _multi(self, cls: int, plan: list[Instance], i: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Collage of image i: (image, coverage, number of pastes, collage seed). Each paste is a plan
        instance's single image area-averaged down to its side, so strokes keep their look and edges get
        partial coverage; pastes combine by maximum (per channel), as does coverage."""
        comp_seed = derive_seed(self.seed, cls, _TAG_MULTI, i)
        rng = np.random.default_rng(comp_seed)
        size, colour = self.size, self.p.colour == "colour"
        canvas = np.zeros((size, size, 3) if colour else (size, size), np.uint8)
        cover = np.zeros((size, size), np.uint8) if colour else canvas
        lo, hi = self.p.multi_count
        s_lo, s_hi = self.p.multi_scale
        count = int(rng.integers(lo, hi + 1))
        for _ in range(count):
            inst = plan[int(rng.integers(len(plan)))]
            side = min(size, max(2, int(rng.uniform(s_lo, s_hi) * size + 0.5)))
            cy, cx = (int(v) for v in rng.integers(0, size, 2))  # centre anywhere: pastes overhang the border
            img, alpha = self._tile(cls, inst, side)
            top, left = cy - side // 2, cx - side // 2
            r0, c0, r1, c1 = max(0, top), max(0, left), min(size, top + side), min(size, left + side)
            src = np.s_[r0 - top : r1 - top, c0 - left : c1 - left]
            np.maximum(canvas[r0:r1, c0:c1], img[src], out=canvas[r0:r1, c0:c1])
            if colour:
                np.maximum(cover[r0:r1, c0:c1], alpha[src], out=cover[r0:r1, c0:c1])
        return canvas, cover, count, comp_seed

    # --- background ------------------------------------------------------------------------------------
    def background(self, cls: int, i: int) -> np.ndarray | None:
        """Image i's background: None (black), or (size, size) uint8 in [0, top] — (size, size, 3) tinted
        for colour."""
        if self.p.background == "black":
            return None
        rng = _rng(self.seed, cls, _TAG_BACKGROUND, i)
        out = np.empty((self.size, self.size), np.uint8)
        if self.p.background == "diamond_square":
            kernels.plasma_into(np.uint64(rng.integers(0, 2**63)), float(self.top), self._grid, out)
        else:
            other = (cls + 1 + int(rng.integers(self.p.num_classes - 1))) % self.p.num_classes
            maps = self.system(other).maps
            render_seed = int(rng.integers(0, 2**63))
            patch = ifs.random_patch(np.random.default_rng([render_seed, 1]))
            kernels.render_into(
                maps, ifs.cumulative(maps), self.p.points, 0, patch, np.uint64(render_seed), self._bg_pts, out
            )
            blurred = box_blur(out, max(1, self.size // 32))
            peak = int(blurred.max())
            out[:] = blurred * self.top // peak if peak else 0
        if self.p.colour == "grey":
            return out
        tint = _hsv_u8(rng.uniform(), rng.uniform(0.3, 0.8), 1.0).astype(np.uint16)
        return ((out[..., None].astype(np.uint16) * tint + 127) // 255).astype(np.uint8)

    # --- the image -------------------------------------------------------------------------------------
    def image(self, cls: int, plan: list[Instance], i: int) -> tuple[np.ndarray, dict]:
        """Image i of class `cls` ((size, size) uint8 grey or (size, size, 3) RGB) and its manifest fields.

        single: instance i of the plan; multi: a collage of plan instances (fields: instance_params
        {"count": n, "kind": "multi"}, patch −1, flip none, render_seed = the collage's seed). The fractals lie
        over the background by their coverage a: out = fg + bg·(255 − a)/255 (fg premultiplied; binary
        coverage, as in single renders, simply replaces the background under the fractal).
        """
        inst = plan[i]
        if self.p.composition == "single":
            (fg, cover), row = self._render(cls, inst), inst.row(cls)
        else:
            fg, cover, count, comp_seed = self._multi(cls, plan, i)
            row = {
                "class": cls,
                "instance": i,
                "instance_params": json.dumps({"count": count, "kind": "multi"}, sort_keys=True),
                "patch": -1,
                "flip": "none",
                "render_seed": comp_seed,
            }
        bg = self.background(cls, i)
        if bg is None:
            return fg, row
        keep = 255 - cover.astype(np.uint16)
        if bg.ndim == 3:
            keep = keep[..., None]
        out = fg.astype(np.uint16) + (bg.astype(np.uint16) * keep + 127) // 255
        return np.minimum(out, 255).astype(np.uint8), row
