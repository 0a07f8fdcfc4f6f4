"""Region-of-interest masks: which windows are worth computing.

Slides are mostly empty glass; computing windows there costs time and says nothing. A mask
is a small boolean picture of the whole image (any size; it is stretched over level 0):

* ``auto``: a tissue mask from a low-resolution view, as WSInfer and TIAToolbox do: Otsu's
  threshold on grey (tissue is darker than glass), then an opening and a closing (Pillow's
  min/max filters) to drop specks and fill pinholes;
* an uploaded mask image: non-black (grey > 127) pixels are inside.

A window is computed when the fraction of its area inside the mask is at least a threshold
(``MASK_MIN_FRACTION``); the engine leaves the others NaN and says so in ``computed``.
numpy and Pillow only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from shared.image_sources.pillow_decoder import load_rgb
from shared.image_sources.source_types import ImageSource

#: Longest side of the low-resolution view the automatic mask is computed on.
AUTO_MASK_SIDE = 2048
#: Longest side an uploaded mask is reduced to (box filter) before use.
UPLOADED_MASK_SIDE = 4096
#: Bytes of one band read while building the view (bounds memory on unpyramided images).
_BAND_BYTES = 64 * 2**20


@dataclass(frozen=True)
class CoverageMask:
    """``inside`` (mask rows x mask cols) stretched over a level-0 image of ``size`` (h, w)."""

    inside: np.ndarray
    size: tuple[int, int]

    @property
    def fraction(self) -> float:
        return float(self.inside.mean()) if self.inside.size else 0.0

    def window_fractions(self, rows, cols, window, scale) -> np.ndarray:
        """Fraction of each window inside the mask: ``(len(rows), len(cols))``.

        rows/cols/window are analysis pixels; scale (y, x) converts them to level 0."""
        mh, mw = self.inside.shape
        integral = np.zeros((mh + 1, mw + 1), dtype=np.int64)
        integral[1:, 1:] = self.inside.astype(np.int64).cumsum(0).cumsum(1)
        y0, y1 = _mask_bounds(np.asarray(rows), window[0], scale[0] * mh / self.size[0], mh)
        x0, x1 = _mask_bounds(np.asarray(cols), window[1], scale[1] * mw / self.size[1], mw)
        total = (
            integral[y1[:, None], x1[None, :]]
            - integral[y0[:, None], x1[None, :]]
            - integral[y1[:, None], x0[None, :]]
            + integral[y0[:, None], x0[None, :]]
        )
        area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
        return total / np.maximum(area, 1)


def _mask_bounds(origins: np.ndarray, length: int, factor: float, limit: int) -> tuple[np.ndarray, np.ndarray]:
    start = np.clip(np.floor(origins * factor).astype(np.int64), 0, limit - 1)
    stop = np.clip(np.ceil((origins + length) * factor).astype(np.int64), start + 1, limit)
    return start, stop


def overview(source: ImageSource, max_side: int = AUTO_MASK_SIDE) -> np.ndarray:
    """The whole image at about `max_side` pixels (at least that where the file allows),
    from the coarsest level that is still large enough, read band by band."""
    levels = source.info.levels
    fitting = [i for i, lv in enumerate(levels) if max(lv.width, lv.height) >= max_side]
    level = max(fitting, key=lambda i: levels[i].downsample) if fitting else 0
    lw, lh = levels[level].width, levels[level].height
    step = max(1, math.floor(max(lw, lh) / max_side))
    band = max(step, (_BAND_BYTES // max(1, lw * 3)) // step * step)
    parts = []
    for y in range(0, lh, band):
        rows = min(band, lh - y)
        region = Image.fromarray(source.read_region(level, 0, y, lw, rows))
        parts.append(np.asarray(region.reduce(step) if step > 1 else region))
    return np.concatenate(parts, axis=0)


def otsu_threshold(grey: np.ndarray) -> int:
    """Otsu's threshold of a uint8 picture (the level that best splits it into two classes)."""
    hist = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    weight = hist.cumsum()
    total = weight[-1]
    means = (hist * np.arange(256)).cumsum()
    background = weight[:-1]
    foreground = total - background
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (means[-1] * background / total - means[:-1]) ** 2 / (background * foreground / total)
    between = np.nan_to_num(between, nan=-1.0, posinf=-1.0)
    return int(np.argmax(between))


def tissue_from_rgb(rgb: np.ndarray, *, smooth: int = 5) -> np.ndarray:
    """Tissue (True) versus glass in an overview picture: Otsu on grey, then clean-up."""
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    low, high = np.percentile(grey, [1, 99])
    if high - low < 16:  # one flat colour: all tissue if dark, none if bright
        return np.full(grey.shape, bool(grey.mean() < 200))
    inside = Image.fromarray(((grey <= otsu_threshold(grey)) * 255).astype(np.uint8))
    inside = inside.filter(ImageFilter.MinFilter(smooth)).filter(ImageFilter.MaxFilter(smooth))  # opening
    inside = inside.filter(ImageFilter.MaxFilter(smooth)).filter(ImageFilter.MinFilter(smooth))  # closing
    return np.asarray(inside) > 127


def auto_mask(source: ImageSource) -> CoverageMask:
    info = source.info
    return CoverageMask(tissue_from_rgb(overview(source)), (info.height, info.width))


def uploaded_mask(path, size: tuple[int, int], *, max_pixels: int) -> CoverageMask:
    """A mask picture (any size and format the service reads): grey > 127 is inside."""
    rgb = load_rgb(path, max_pixels=max_pixels)
    picture = Image.fromarray(rgb).convert("L")
    del rgb
    if max(picture.size) > UPLOADED_MASK_SIDE:  # bounds the integral image of the window fractions
        scale = UPLOADED_MASK_SIDE / max(picture.size)
        picture = picture.resize(
            (max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), Image.Resampling.BOX
        )
    return CoverageMask(np.asarray(picture) > 127, size)
