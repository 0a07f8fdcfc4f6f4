"""Deep Zoom (DZI) pyramids for the web viewer: each class's heat layer, and the manifest.

OpenSeadragon shows an image of any size by fetching only the 256-px tiles on screen, so the
job page works the same for a 1-megapixel photo and a gigapixel slide. The image layer itself
is not written: the API reads its tiles from the job's input on demand (api.tile_server, with
the geometry of shared.image_sources.dzi_geometry), so the worker writes only what it computed,
and a job's files grow with its score grid, not with the slide (issue 17). A pyramid is built
from a `read_region(x, y, w, h)` callable (level-0 pixels), one tile at a time: the finest
level is read tile by tile, every coarser tile is made from the four finer tiles below it.
Memory is a few tiles, whatever the image size, so a region-readable source (a tiled TIFF or
a slide) never has to be decoded whole. Pillow writes the tiles (plain JPEG/PNG files in
Deep Zoom's own layout, `<name>_files/<level>/<col>_<row>.<ext>`, down to the first level
that fits in one tile), and the descriptor
`<name>.dzi` is written last, atomically, so a descriptor always has all its tiles.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from shared.image_sources.dzi_geometry import (
    IMAGE_FORMAT,
    TILE_SIZE,
    descriptor_xml,
    layer_descriptor,
    level_count,
    min_level,
)
from shared.storage import (
    IMAGE_LAYER,
    VIEWER_FILE,
    dzi_descriptor_name,
    dzi_tile_name,
    heat_layer_name,
)
from worker.grid import ScoreGrid
from worker.outputs.artifacts import colormap, write_atomic
from worker.outputs.blend import ColourScale, blend, colour_scales, heat_canvas, scaled

#: The viewer's copy of the score grid (score under the cursor) keeps at most this many
#: cells per class; larger grids are max-pooled in square blocks so that no peak is lost.
VIEWER_GRID_MAX_CELLS = 256 * 1024


ReadRegion = Callable[[int, int, int, int], np.ndarray]  # (x, y, w, h) -> (h, w, 3|4) uint8


def _save_tile(path: Path, tile: Image.Image, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jpeg":
        tile.convert("RGB").save(path, format="JPEG", quality=88)
    else:
        tile.save(path, format="PNG", compress_level=1)  # smooth heat: level 1 is near as small, much faster


def _finest_level(folder: Path, name: str, size: tuple[int, int], read_region: ReadRegion, fmt: str) -> int:
    width, height = size
    level = level_count(width, height) - 1
    for row in range(math.ceil(height / TILE_SIZE)):
        for col in range(math.ceil(width / TILE_SIZE)):
            x, y = col * TILE_SIZE, row * TILE_SIZE
            pixels = np.ascontiguousarray(read_region(x, y, min(TILE_SIZE, width - x), min(TILE_SIZE, height - y)))
            _save_tile(folder / dzi_tile_name(name, level, col, row, fmt), Image.fromarray(pixels), fmt)
    return level


def _coarser_level(folder: Path, name: str, level: int, size: tuple[int, int], fmt: str, mode: str) -> tuple:
    """Level `level` from level `level + 1` of size `size`: each tile from the 2x2 below."""
    width, height = math.ceil(size[0] / 2), math.ceil(size[1] / 2)
    for row in range(math.ceil(height / TILE_SIZE)):
        for col in range(math.ceil(width / TILE_SIZE)):
            x0, y0 = 2 * col * TILE_SIZE, 2 * row * TILE_SIZE
            span_w, span_h = min(2 * TILE_SIZE, size[0] - x0), min(2 * TILE_SIZE, size[1] - y0)
            canvas = Image.new(mode, (span_w, span_h))
            for dy in (0, 1):
                for dx in (0, 1):
                    source = folder / dzi_tile_name(name, level + 1, 2 * col + dx, 2 * row + dy, fmt)
                    if source.is_file():
                        with Image.open(source) as finer:
                            canvas.paste(finer.convert(mode), (dx * TILE_SIZE, dy * TILE_SIZE))
            tile = canvas.reduce(2)  # exact 2x2 means; a last odd row/column averages what it has
            _save_tile(folder / dzi_tile_name(name, level, col, row, fmt), tile, fmt)
    return width, height


def write_dzi(folder: Path, name: str, size: tuple[int, int], read_region: ReadRegion, fmt: str = "jpeg") -> dict:
    """Write the Deep Zoom pyramid `name` of an image of `size` = (width, height) into
    `folder`; returns its descriptor as a dict (also the JSON form OpenSeadragon accepts).
    `fmt`: "jpeg" for photographs, "png" for layers with transparency (RGBA)."""
    folder = Path(folder)
    mode = "RGB" if fmt == "jpeg" else "RGBA"
    level = _finest_level(folder, name, size, read_region, fmt)
    current = size
    for coarser in range(level - 1, min_level(*size) - 1, -1):
        current = _coarser_level(folder, name, coarser, current, fmt, mode)
    write_atomic(folder / dzi_descriptor_name(name), descriptor_xml(*size, fmt).encode())
    return layer_descriptor(name, *size, fmt)


_COLOUR_TABLE = colormap(np.linspace(0.0, 1.0, 256))


def heat_size(size: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a heat layer for an image of `size` = (width, height): the heat
    canvas the colour scales are measured on (`worker.outputs.blend.heat_canvas`)."""
    return heat_canvas((size[1], size[0]), stride)


def heat_rgba(values: np.ndarray) -> np.ndarray:
    """A class map scaled to 0..1 as RGBA: the colormap's colour, opacity growing with the
    score, so that the image shows through where the class is absent."""
    rgba = np.empty((*values.shape, 4), dtype=np.uint8)
    levels = np.round(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)
    rgba[..., :3] = _COLOUR_TABLE[levels]  # a 256-entry table: one lookup per pixel
    rgba[..., 3] = np.round(np.clip(values, 0.0, 1.0) * 230).astype(np.uint8)
    return rgba


def viewer_grid(grid: ScoreGrid) -> dict:
    """The score grid as the browser reads it (score under the cursor), max-pooled in
    `step` x `step` blocks when it has more than VIEWER_GRID_MAX_CELLS cells."""
    rows, cols = grid.scores.shape[:2]
    step = max(1, math.ceil(math.sqrt(rows * cols / VIEWER_GRID_MAX_CELLS)))
    out_rows, out_cols = math.ceil(rows / step), math.ceil(cols / step)
    padded = np.full((out_rows * step, out_cols * step, grid.scores.shape[2]), -np.inf, dtype=np.float32)
    padded[:rows, :cols] = grid.scores
    pooled = padded.reshape(out_rows, step, out_cols, step, -1).max(axis=(1, 3))
    return {
        "step": step,
        "rows": [int(v) for v in grid.rows[::step]],
        "cols": [int(v) for v in grid.cols[::step]],
        "window": {"height": int(grid.window[0]), "width": int(grid.window[1])},
        "span": {
            "height": int(grid.window[0] + (step - 1) * grid.stride[0]),
            "width": int(grid.window[1] + (step - 1) * grid.stride[1]),
        },
        "scores": [np.round(pooled[:, :, k], 4).tolist() for k in range(pooled.shape[2])],
    }


def write_viewer(
    folder: Path,
    size: tuple[int, int],
    grid: ScoreGrid,
    names: list[str],
    weighting: str,
    scales: list[ColourScale] | None = None,
) -> dict:
    """The viewer's files: one heat pyramid per selected class (on the class's colour scale,
    the overlay PNG's too: `scales`, computed when not given) and `viewer.json` (layers - the
    image layer as the API serves it from the input -, score ranges, near-chance flags, peaks
    and the grid for the score under the cursor). Returns the manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    image = layer_descriptor(IMAGE_LAYER, width, height, IMAGE_FORMAT)
    heat_h, heat_w = heat_size(size, grid.stride)
    maps = blend(grid, (height, width), (heat_h, heat_w), weighting=weighting)
    scales = scales if scales is not None else colour_scales(grid, (height, width), weighting)
    classes = []
    for channel, (name, index, scale) in enumerate(zip(names, grid.class_indices, scales, strict=True)):
        values = np.nan_to_num(scaled(maps[:, :, channel], scale), nan=0.0)
        layer = write_dzi(
            folder, heat_layer_name(index), (heat_w, heat_h), array_region_reader(heat_rgba(values)), "png"
        )
        y, x, best = grid.peak(channel)
        classes.append(
            {"name": name, "index": int(index), "low": scale.low, "high": scale.high, "max": best}
            | {"near_chance": scale.near_chance, "peak": {"x": x, "y": y}, "layer": layer}
        )
    manifest = {"image": image, "classes": classes, "grid": viewer_grid(grid), "weighting": weighting}
    write_atomic(folder / VIEWER_FILE, json.dumps(manifest).encode())
    return manifest


def array_region_reader(array: np.ndarray) -> ReadRegion:
    """`read_region` over an array already in memory: a heat map, or the engine's decoded
    image (until image sources read regions themselves)."""
    return lambda x, y, w, h: array[y : y + h, x : x + w]
