"""Deep Zoom pyramids (worker/outputs/deepzoom.py): the layout OpenSeadragon reads, built tile by
tile from a region reader, and the viewer's copy of the score grid."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from worker.grid import ScoreGrid
from worker.outputs.deepzoom import (
    TILE_SIZE,
    array_region_reader,
    level_count,
    min_level,
    viewer_grid,
    write_dzi,
    write_viewer,
)

RNG = np.random.default_rng(3)


def _level(folder, name, level, size, fmt):
    """Stitch one level back from its tiles."""
    width, height = size
    canvas = Image.new("RGBA" if fmt == "png" else "RGB", size)
    for row in range(math.ceil(height / TILE_SIZE)):
        for col in range(math.ceil(width / TILE_SIZE)):
            with Image.open(folder / f"{name}_files/{level}/{col}_{row}.{fmt}") as tile:
                expected = (min(TILE_SIZE, width - col * TILE_SIZE), min(TILE_SIZE, height - row * TILE_SIZE))
                assert tile.size == expected, (level, col, row)
                canvas.paste(tile, (col * TILE_SIZE, row * TILE_SIZE))
    return np.asarray(canvas)


@pytest.mark.parametrize("size", [(1, 1), (64, 200), (300, 17), (700, 513), (1024, 256)])
def test_pyramid_layout_and_content(tmp_path, size):
    width, height = size
    image = RNG.integers(0, 255, (height, width, 4), dtype=np.uint8)
    image[..., 3] = 255  # opaque: Pillow averages colour weighted by alpha, plain means here
    regions = []

    def read_region(x, y, w, h):
        regions.append((x, y, w, h))
        return array_region_reader(image)(x, y, w, h)

    descriptor = write_dzi(tmp_path, "layer", size, read_region, "png")
    levels = level_count(width, height)
    assert descriptor["width"] == width and descriptor["height"] == height
    root = ET.parse(tmp_path / "layer.dzi").getroot()
    assert root.tag == "{http://schemas.microsoft.com/deepzoom/2008}Image"
    assert root.get("TileSize") == str(TILE_SIZE) and root.get("Format") == "png" and root.get("Overlap") == "0"
    coarsest = min_level(width, height)
    assert (descriptor["min_level"], descriptor["max_level"]) == (coarsest, levels - 1)
    # Levels from the first that fits one tile up to the full size.
    assert sorted(int(p.name) for p in (tmp_path / "layer_files").iterdir()) == list(range(coarsest, levels))
    # Read tile by tile: never more than one tile's pixels at a time, every pixel once.
    assert max(w * h for _, _, w, h in regions) <= TILE_SIZE**2
    assert sum(w * h for _, _, w, h in regions) == width * height
    # The finest level is the image (PNG: lossless); each coarser one halves it (ceil).
    assert np.array_equal(_level(tmp_path, "layer", levels - 1, size, "png"), image)
    current = size
    for level in range(levels - 2, coarsest - 1, -1):
        finer = _level(tmp_path, "layer", level + 1, current, "png").astype(np.float64)
        current = (math.ceil(current[0] / 2), math.ceil(current[1] / 2))
        coarse = _level(tmp_path, "layer", level, current, "png").astype(np.float64)
        # Box filter: a coarse pixel is the mean of the 2x2 finer pixels it covers.
        rows, cols = max(1, finer.shape[0] // 2), max(1, finer.shape[1] // 2)  # whole blocks (or the 1-px edge)
        finer = np.pad(finer, ((0, finer.shape[0] % 2), (0, finer.shape[1] % 2), (0, 0)), mode="edge")
        interior = coarse[:rows, :cols]
        block = finer[: 2 * rows, : 2 * cols].reshape(rows, 2, cols, 2, -1).mean(axis=(1, 3))
        assert np.abs(interior - block).max() <= 1.0, level
    assert max(current) <= TILE_SIZE and (coarsest == 0 or max(current) > TILE_SIZE // 2)


def _grid(rows, cols, classes=2, stride=16, window=64):
    scores = RNG.random((rows, cols, classes)).astype(np.float32)
    return ScoreGrid(
        scores,
        np.arange(rows) * stride,
        np.arange(cols) * stride,
        (window, window),
        (stride, stride),
        np.arange(classes),
    )


def test_viewer_grid_keeps_every_cell_or_pools_the_maximum(monkeypatch):
    grid = _grid(30, 40)
    small = viewer_grid(grid)
    assert small["step"] == 1 and len(small["rows"]) == 30 and len(small["cols"]) == 40
    assert np.allclose(np.array(small["scores"]), np.round(grid.scores.transpose(2, 0, 1), 4))

    monkeypatch.setattr("worker.outputs.deepzoom.VIEWER_GRID_MAX_CELLS", 100)
    pooled = viewer_grid(grid)
    step = pooled["step"]
    scores = np.array(pooled["scores"])
    assert step == 4 and scores.shape == (2, 8, 10) and len(pooled["rows"]) == 8
    assert np.isclose(scores.max(axis=(1, 2)), grid.scores.max(axis=(0, 1)), atol=1e-4).all()
    assert np.isclose(scores[0, 1, 2], grid.scores[4:8, 8:12, 0].max(), atol=1e-4)
    assert pooled["span"]["height"] == 64 + 3 * 16


def test_write_viewer_heat_is_bright_where_the_class_scores(tmp_path):
    grid = _grid(17, 27)
    grid.scores[:] = 0.0
    grid.scores[5, 20, 1] = 0.9  # one hot window for class 1, class 0 found nowhere
    manifest = write_viewer(tmp_path, (480, 320), grid, ["a", "b"], "mean")
    assert manifest == json.loads((tmp_path / "viewer.json").read_text())
    # The image layer is described (the API serves it from the input) but not written.
    assert manifest["image"] | {} == {
        "name": "image",
        "width": 480,
        "height": 320,
        "tile_size": TILE_SIZE,
        "overlap": 0,
        "format": "jpeg",
        "min_level": min_level(480, 320),
        "max_level": level_count(480, 320) - 1,
    }
    assert not (tmp_path / "image.dzi").exists() and not (tmp_path / "image_files").exists()
    heat = manifest["classes"][1]["layer"]
    assert (heat["width"], heat["height"]) == (120, 80)  # 4 px per 16-px stride
    levels = level_count(heat["width"], heat["height"])
    rgba = _level(tmp_path, heat["name"], levels - 1, (120, 80), "png")
    # The hot window covers image pixels x 320..384, y 80..144: heat pixels x 80..96, y 20..36.
    hot = rgba[20:36, 80:96, 3]
    assert hot.min() == rgba[..., 3].max() > 100 and rgba[:, :60, 3].max() == 0
    absent = _level(tmp_path, manifest["classes"][0]["layer"]["name"], levels - 1, (120, 80), "png")
    assert absent[..., 3].max() == 0  # a class found nowhere stays transparent
    assert manifest["classes"][1]["peak"] == {"x": 20 * 16 + 32, "y": 5 * 16 + 32}
    assert manifest["classes"][1]["max"] == pytest.approx(0.9)
