"""Input hygiene: every source image and mask passes through here before it is stored.

Policy (docs/DATASETS.md):
- the pixel count is read from the header and checked against `max_pixels` BEFORE decoding;
- unreadable, truncated or corrupt files raise BadImageError naming the file;
- 16-bit (I;16*, I) images are scaled to 8 bits by a fixed 255 / (2**bit_depth − 1), floored (not stretched
  per image, so intensities stay comparable between images); bit_depth is the dataset's (16: /257; 12 for
  12-bit camera or SEM data stored in 16-bit files); a value above 2**bit_depth − 1 is an error naming the
  file; float (F) images are rejected;
- alpha is dropped (LA → L, RGBA/P → RGB): anomaly datasets do not use transparency;
- masks must have their image's size; they are binarised at half range (>= 128 of 255, or
  >= 32768 of 65535), or at > 0 for datasets whose masks hold class indices (VisA, MVTec LOCO);
  several masks for one image (MVTec LOCO) are OR-ed.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
SIXTEEN_BIT = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


class BadImageError(ValueError):
    """A source image or mask cannot be used; the message names the file and why."""


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Make PIL's own decompression-bomb guard agree with `max_pixels` (restored afterwards)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x the limit; we reject those ourselves, with the file named
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _open(path: Path, data: bytes | None, max_pixels: int) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data) if data is not None else path)
    except Image.DecompressionBombError as err:
        raise BadImageError(f"{path}: rejected before decoding: {err} (max_pixels={max_pixels})") from None
    except Exception as err:  # noqa: BLE001 — PIL raises many types for garbage input
        raise BadImageError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise BadImageError(
            f"{path}: {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}; rejected before decoding"
        )
    if w == 0 or h == 0:
        im.close()
        raise BadImageError(f"{path}: empty image ({w}x{h})")
    return im


def header(path: Path, data: bytes | None, max_pixels: int) -> tuple[tuple[int, int], str]:
    """(size (w, h), mode) from the header only; raises BadImageError for unreadable/oversized files."""
    with _open(path, data, max_pixels) as im:
        return im.size, im.mode


def _to_8bit(path: Path, im: Image.Image, bit_depth: int) -> tuple[Image.Image, int | None]:
    """(8-bit image, the brightest source value when the source is 16-bit, else None)."""
    mode = im.mode
    if mode in SIXTEEN_BIT:
        arr = np.asarray(im, dtype=np.int64)
        top, peak = 2**bit_depth - 1, int(arr.max(initial=0))
        if arr.min(initial=0) < 0 or peak > 65535:
            raise BadImageError(f"{path}: mode {mode} values outside 0..65535; expected 8- or 16-bit data")
        if peak > top:
            raise BadImageError(
                f"{path}: value {peak} exceeds the dataset's bit_depth {bit_depth} (at most {top}); "
                f"set bit_depth to {max(peak.bit_length(), 9)} or more"
            )
        # floor(v · 255 / top): exactly v // 257 at 16 bits
        return Image.fromarray((arr * 255 // top).astype(np.uint8), "L"), peak
    if mode == "F":
        raise BadImageError(f"{path}: floating-point image (mode F); convert it to 8- or 16-bit first")
    if mode in ("1", "L", "LA"):
        return im.convert("L"), None
    return im.convert("RGB"), None  # RGB, RGBA (alpha dropped), P, CMYK, YCbCr, ...


def load_image(
    path: Path,
    *,
    max_pixels: int,
    draft_size: int | None = None,
    data: bytes | None = None,
    bit_depth: int = 16,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode `path` fully into an 8-bit 'L' or 'RGB' image; BadImageError if truncated/corrupt.

    Returns (image, the file's own (w, h)). `draft_size`: let the JPEG decoder downscale by a power
    of two while staying >= that size (same pixels every run, much faster for large JPEGs like VisA's).
    `bit_depth`: significant bits of 16-bit sources (module docstring).
    """
    im, source_size, _ = load_image_peak(
        path, max_pixels=max_pixels, draft_size=draft_size, data=data, bit_depth=bit_depth
    )
    return im, source_size


def load_image_peak(
    path: Path, *, max_pixels: int, draft_size: int | None = None, data: bytes | None = None, bit_depth: int = 16
) -> tuple[Image.Image, tuple[int, int], int | None]:
    """`load_image`, plus the brightest source value of a 16-bit file (None for other files)."""
    with _open(path, data, max_pixels) as im:
        source_size = im.size
        try:
            if draft_size and im.format == "JPEG":
                im.draft(im.mode, (draft_size, draft_size))
            im.load()
            out, peak = _to_8bit(path, im, bit_depth)
            return out, source_size, peak
        except BadImageError:
            raise
        except Exception as err:  # noqa: BLE001
            raise BadImageError(f"{path}: truncated or corrupt image data ({type(err).__name__}: {err})") from None


def load_mask(
    paths: tuple[Path, ...],
    image_size: tuple[int, int],
    image_path: Path,
    *,
    mode: str,
    max_pixels: int,
    notes: list[str] | None = None,
) -> np.ndarray:
    """Union of the binarised masks, (H, W) bool at the source image's size.

    A mask whose values are present but all below half range (a 0/1 mask saved as 8-bit) would binarise
    to nothing: it is binarised at > 0 instead, and a line saying so goes to `notes`.
    """
    out = np.zeros(image_size[::-1], dtype=bool)
    for p in paths:
        with _open(p, None, max_pixels) as im:
            if im.size != image_size:
                raise BadImageError(
                    f"mask {p} is {im.size[0]}x{im.size[1]} but its image {image_path} is "
                    f"{image_size[0]}x{image_size[1]}; masks must match their image"
                )
            try:
                im.load()
                arr = np.asarray(im if im.mode in SIXTEEN_BIT or im.mode in ("1", "L") else im.convert("L"))
            except Exception as err:  # noqa: BLE001
                raise BadImageError(f"mask {p}: truncated or corrupt ({type(err).__name__}: {err})") from None
        if mode == "nonzero":
            out |= arr > 0
        else:
            half = 32768 if im.mode in SIXTEEN_BIT else (1 if im.mode == "1" else 128)
            top = int(arr.max()) if arr.size else 0
            if 0 < top < half:
                if notes is not None:
                    notes.append(f"mask {p}: values 0..{top}, all below {half}: read as a 0/1 mask (> 0 = defect)")
                out |= arr > 0
            else:
                out |= arr >= half
    return out


def resize_image(im: Image.Image, size: int) -> Image.Image:
    """Square resize to `size` (aspect ratio not kept, as in the MVTec/VisA protocols)."""
    return im if im.size == (size, size) else im.resize((size, size), Image.Resampling.BILINEAR)


def resize_mask(mask: np.ndarray, size: int) -> Image.Image:
    im = Image.fromarray(mask.astype(np.uint8) * 255, "L")
    return im if im.size == (size, size) else im.resize((size, size), Image.Resampling.NEAREST)


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


RenderJob = tuple[str, tuple[str, ...], str, bool, int, int, int]
"""path, masks, mask_mode, grey, size, max_pixels, bit_depth"""


class Rendered(NamedTuple):
    """What `render` makes of one source: the PNGs to store, or the error that rejects it."""

    png: bytes | None
    mask_png: bytes | None
    error: str | None
    notes: list[str]  # conversions worth telling the user (0/1 masks read at > 0; an empty defect mask)
    peak16: int | None  # the brightest source value of a 16-bit file (bit_depth advice), else None


def render(job: RenderJob) -> Rendered:
    """One source → its stored image (and mask) PNGs, or the error that rejects it. Runs in workers."""
    path, masks, mask_mode, grey, size, max_pixels, bit_depth = job
    notes: list[str] = []
    try:
        with pixel_limit(max_pixels):
            im, source_size, peak = load_image_peak(
                Path(path), max_pixels=max_pixels, draft_size=size, bit_depth=bit_depth
            )
            mask_paths = tuple(map(Path, masks))
            mask = (
                load_mask(mask_paths, source_size, Path(path), mode=mask_mode, max_pixels=max_pixels, notes=notes)
                if masks
                else None
            )
    except BadImageError as err:
        return Rendered(None, None, str(err), notes, None)
    if mask is not None and not mask.any():
        notes.append(f"{path}: its mask {', '.join(masks)} is empty: no defect pixel for an anomalous image")
    im = resize_image(im.convert("L" if grey else "RGB"), size)
    return Rendered(_png(im), (_png(resize_mask(mask, size)) if mask is not None else None), None, notes, peak)
