"""Deep Zoom geometry and the image tile read from a source: which level-0 box a tile covers,
which pyramid level of the file to read it from, resized to the tile.

Why in ``shared``: the worker writes the heat pyramids with this geometry, and the API serves
the image layer's tiles on demand from the job's own input with it (issue 17), so that a job's
files grow with its score grid, not with the slide. No TensorFlow here: Pillow and numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from shared.image_sources.source_types import ImageSource, SourceInfo

TILE_SIZE = 256
#: The image layer's encoding (as the worker's pyramids were, so the viewer looks the same).
IMAGE_FORMAT = "jpeg"
JPEG_QUALITY = 88


def level_count(width: int, height: int) -> int:
    """Deep Zoom levels: level 0 is 1x1 pixel, the last one is the full size."""
    return math.ceil(math.log2(max(width, height, 1))) + 1


def min_level(width: int, height: int) -> int:
    """The coarsest level offered: the first that fits in one tile. The levels below it (2x2
    px, 1x1 px...) are views nobody zooms out to; the viewer is told (OpenSeadragon's
    `minLevel`), and another Deep Zoom viewer gets 404 for them."""
    halvings = max(0, math.ceil(math.log2(max(width, height, 1) / TILE_SIZE)))
    return level_count(width, height) - 1 - halvings


def layer_descriptor(name: str, width: int, height: int, fmt: str) -> dict:
    """A layer as the viewer's manifest states it (also the JSON form OpenSeadragon accepts)."""
    return {
        "name": name,
        "width": width,
        "height": height,
        "tile_size": TILE_SIZE,
        "overlap": 0,
        "format": fmt,
        "min_level": min_level(width, height),
        "max_level": level_count(width, height) - 1,
    }


def descriptor_xml(width: int, height: int, fmt: str) -> str:
    """The `.dzi` descriptor of a layer of `width` x `height` pixels."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" TileSize="{TILE_SIZE}" Overlap="0" '
        f'Format="{fmt}"><Size Width="{width}" Height="{height}"/></Image>\n'
    )


@dataclass(frozen=True)
class TileBox:
    """One tile: its size in pixels, the level-0 box it covers and the level's scale."""

    width: int
    height: int
    x0: int
    y0: int
    x1: int
    y1: int
    scale: int  # level-0 pixels per pixel of the Deep Zoom level


def tile_box(width: int, height: int, level: int, col: int, row: int) -> TileBox | None:
    """The tile (`level`, `col`, `row`) of an image of `width` x `height`; None when the image
    has no such tile (a level below `min_level`, past the last, or a column/row outside)."""
    top = level_count(width, height) - 1
    if not min_level(width, height) <= level <= top or col < 0 or row < 0:
        return None
    scale = 2 ** (top - level)
    level_w, level_h = math.ceil(width / scale), math.ceil(height / scale)
    if col * TILE_SIZE >= level_w or row * TILE_SIZE >= level_h:
        return None
    tile_w, tile_h = min(TILE_SIZE, level_w - col * TILE_SIZE), min(TILE_SIZE, level_h - row * TILE_SIZE)
    x0, y0 = col * TILE_SIZE * scale, row * TILE_SIZE * scale
    return TileBox(tile_w, tile_h, x0, y0, min(width, x0 + tile_w * scale), min(height, y0 + tile_h * scale), scale)


def best_level(info: SourceInfo, scale: float) -> int:
    """The coarsest pyramid level of the file that is still at least as fine as `scale`
    (level-0 pixels per output pixel): the fewest pixels to decode without upsampling."""
    best = 0
    for index, level in enumerate(info.levels):
        if info.width / level.width <= scale * 1.0001 and info.height / level.height <= scale * 1.0001:
            best = index
    return best


def read_tile(source: ImageSource, box: TileBox) -> np.ndarray:
    """(height, width, 3) uint8: the box read from the best level of `source`, resized to the
    tile by area averaging (Pillow's box filter: the mean of the pixels each output covers)."""
    info = source.info
    index = best_level(info, box.scale)
    level = info.levels[index]
    fx, fy = info.width / level.width, info.height / level.height
    sx0, sy0 = math.floor(box.x0 / fx), math.floor(box.y0 / fy)
    sx1 = min(level.width, max(sx0 + 1, math.ceil(box.x1 / fx)))
    sy1 = min(level.height, max(sy0 + 1, math.ceil(box.y1 / fy)))
    pixels = source.read_region(index, sx0, sy0, sx1 - sx0, sy1 - sy0)
    if pixels.shape[:2] == (box.height, box.width):
        return pixels
    resized = Image.fromarray(pixels).resize((box.width, box.height), Image.Resampling.BOX)
    return np.asarray(resized)
