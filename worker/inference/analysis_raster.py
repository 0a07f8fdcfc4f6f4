"""The pixel plane the engine analyses: one level of an image source, optionally resampled.

Why a separate notion from the source: the engine works in *analysis pixels* (the chosen
pyramid level, or the level nearest a requested microns-per-pixel, resampled), while every
output is reported in *level-0 pixels*. A raster knows both: ``read`` returns analysis
pixels of any rectangle, and ``scale`` converts analysis coordinates to level 0.
An in-memory array is a raster too, so the engine has one code path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from shared.exceptions import InputError
from shared.image_sources.source_types import ImageSource


class Raster:
    """``height`` x ``width`` analysis pixels; ``scale`` level-0 pixels per analysis pixel."""

    height: int
    width: int
    scale: tuple[float, float] = (1.0, 1.0)  # (y, x)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """``(y1 - y0, x1 - x0, 3)`` uint8 RGB."""
        raise NotImplementedError


class ArrayRaster(Raster):
    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels
        self.height, self.width = pixels.shape[:2]

    def read(self, y0, y1, x0, x1):
        return self.pixels[y0:y1, x0:x1]


class LevelRaster(Raster):
    """One pyramid level as it is stored."""

    def __init__(self, source: ImageSource, level: int) -> None:
        self.source, self.level = source, level
        lv = source.info.levels[level]
        self.width, self.height = lv.width, lv.height
        info = source.info
        self.scale = (info.height / lv.height, info.width / lv.width)

    def read(self, y0, y1, x0, x1):
        return self.source.read_region(self.level, x0, y0, x1 - x0, y1 - y0)


class ResampledRaster(Raster):
    """A level shrunk by ``factor`` (< 1). Each read takes a margin of source pixels around
    its box so the resampling filter sees the same neighbours as a whole-level resize."""

    def __init__(self, source: ImageSource, level: int, factor: float) -> None:
        self.source, self.level, self.factor = source, level, factor
        lv = source.info.levels[level]
        self.level_size = (lv.height, lv.width)
        self.height, self.width = max(1, math.floor(lv.height * factor)), max(1, math.floor(lv.width * factor))
        info = source.info
        self.scale = (info.height / lv.height / factor, info.width / lv.width / factor)

    def read(self, y0, y1, x0, x1):
        inv = 1.0 / self.factor
        margin = math.ceil(2 * inv) + 2
        sy0, sx0 = max(0, math.floor(y0 * inv) - margin), max(0, math.floor(x0 * inv) - margin)
        sy1 = min(self.level_size[0], math.ceil(y1 * inv) + margin)
        sx1 = min(self.level_size[1], math.ceil(x1 * inv) + margin)
        region = self.source.read_region(self.level, sx0, sy0, sx1 - sx0, sy1 - sy0)
        box = (x0 * inv - sx0, y0 * inv - sy0, x1 * inv - sx0, y1 * inv - sy0)
        resized = Image.fromarray(region).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR, box=box)
        return np.asarray(resized, dtype=np.uint8)


def as_raster(image: np.ndarray | Raster) -> Raster:
    return image if isinstance(image, Raster) else ArrayRaster(image)


@dataclass(frozen=True)
class Resolution:
    """Which level to analyse and how much to shrink it (1.0: as stored)."""

    level: int
    factor: float = 1.0


def choose_resolution(source: ImageSource, level: int | None, mpp: float | None) -> Resolution:
    """`level` as given, or the level nearest `mpp` at or finer than it, resampled to `mpp`."""
    info = source.info
    if level is not None:
        if level >= len(info.levels):
            raise InputError(
                "invalid_parameter", f"level {level} does not exist; the image has {len(info.levels)} level(s)"
            )
        return Resolution(level)
    if mpp is None:
        return Resolution(0)
    if info.mpp is None:
        raise InputError(
            "no_resolution", "the image file states no microns per pixel; give a pyramid level instead of mpp"
        )
    base = min(info.mpp)
    if mpp < base * 0.999:
        raise InputError("invalid_parameter", f"mpp {mpp:g} is finer than the image's level 0 ({base:.4g} um/px)")
    finer = [i for i, lv in enumerate(info.levels) if base * lv.downsample <= mpp * 1.001]
    chosen = max(finer, key=lambda i: info.levels[i].downsample)
    factor = base * info.levels[chosen].downsample / mpp
    return Resolution(chosen, 1.0 if factor > 0.999 else factor)


def open_raster(source: ImageSource, resolution: Resolution) -> Raster:
    """The raster for `resolution`; a Pillow source's level 0 is served from its decoded array."""
    if resolution.factor < 1.0:
        return ResampledRaster(source, resolution.level, resolution.factor)
    pixels = getattr(source, "pixels", None)
    if resolution.level == 0 and callable(pixels):
        return ArrayRaster(pixels())
    return LevelRaster(source, resolution.level)
