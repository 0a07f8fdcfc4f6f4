"""Writing a job's outputs: ``heatmap.npz``, ``summary.json`` and one overlay PNG per class.

Every file is written under a temporary name in the target folder and renamed into place,
so a reader (or a crash) never leaves a half-written artifact behind.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from shared.storage import HEATMAP_FILE, SUMMARY_FILE, overlay_filename
from worker.blend import blend
from worker.grid import ScoreGrid

# A perceptually ordered dark-to-bright colormap (anchor colours of matplotlib's "inferno").
_ANCHORS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float64,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to uint8 RGB."""
    positions = np.clip(values, 0.0, 1.0) * (len(_ANCHORS) - 1)
    low = np.floor(positions).astype(int)
    high = np.minimum(low + 1, len(_ANCHORS) - 1)
    frac = (positions - low)[..., None]
    return (_ANCHORS[low] * (1 - frac) + _ANCHORS[high] * frac).round().astype(np.uint8)


def write_atomic(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()


def overlay_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def write_heatmap(out_dir: Path, grid: ScoreGrid, class_names: list[str], mode: str, model: str) -> Path:
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        scores=grid.scores.astype(np.float32),
        classes=np.asarray(class_names, dtype=str),
        class_indices=grid.class_indices.astype(np.int64),
        computed=np.ones(grid.scores.shape[:2], dtype=bool) if grid.computed is None else grid.computed,
        rows=grid.rows.astype(np.int64),
        cols=grid.cols.astype(np.int64),
        window=np.asarray(grid.window, dtype=np.int64),
        stride=np.asarray(grid.stride, dtype=np.int64),
        mode=np.asarray(mode),
        model=np.asarray(model),
    )
    path = out_dir / HEATMAP_FILE
    write_atomic(path, buffer.getvalue())
    return path


def write_overlays(
    out_dir: Path,
    grid: ScoreGrid,
    image: np.ndarray,
    *,
    max_side: int = 1024,
    weighting: str = "mean",
    alpha: tuple[float, float] = (0.15, 0.85),
    image_size: tuple[int, int] | None = None,
) -> tuple[list[str], tuple[int, int]]:
    """One PNG per score channel: the blended class map in colour over the downscaled image.

    Probabilities (all scores within [0, 1]) are drawn on an absolute scale, so a class
    that is absent stays dark; other scores are stretched to their own min..max.
    `image_size` (h, w) is the grid's coordinate frame when `image` is a smaller picture of it.
    """
    height, width = image_size or image.shape[:2]
    size = overlay_size(height, width, max_side)
    base = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.float32)
    maps = blend(grid, (height, width), size, weighting=weighting)
    probabilities = float(grid.scores.min(initial=0.0)) >= 0.0 and float(grid.scores.max(initial=0.0)) <= 1.0
    names = []
    for channel, class_index in enumerate(grid.class_indices):
        values = maps[:, :, channel]
        if not probabilities:
            low, high = float(values.min()), float(values.max())
            values = (values - low) / (high - low) if high > low else np.zeros_like(values)
        coloured = colormap(values).astype(np.float32)
        # Opacity grows with the score: the image stays readable, hot spots stand out.
        opacity = (alpha[0] + (alpha[1] - alpha[0]) * values)[:, :, None]
        mixed = (1 - opacity) * base + opacity * coloured
        buffer = io.BytesIO()
        Image.fromarray(mixed.round().astype(np.uint8)).save(buffer, format="PNG")
        name = overlay_filename(class_index)
        write_atomic(out_dir / name, buffer.getvalue())
        names.append(name)
    return names, size


def write_summary(out_dir: Path, summary: dict) -> Path:
    path = out_dir / SUMMARY_FILE
    write_atomic(path, json.dumps(summary, indent=2, sort_keys=False).encode())
    return path
