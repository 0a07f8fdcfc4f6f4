"""One inference run, start to finish: image -> scores -> class selection -> artifacts.

The CLI and the Celery task both call `run_inference`; nothing here knows about HTTP,
queues or databases.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import BinaryIO

import numpy as np

from shared.imageio import load_rgb
from shared.jobspec import JobParams
from worker.artifacts import write_heatmap, write_overlays, write_summary
from worker.direct import direct_inference
from worker.grid import ProgressFn, ScoreGrid
from worker.model_registry import LoadedModel, ModelRegistry
from worker.tiled import tiled_inference


def select_classes(grid: ScoreGrid, params: JobParams) -> ScoreGrid:
    """Explicit classes as given; otherwise the top-k classes by their maximum score."""
    if params.class_indices is not None:
        return grid.select(params.class_indices)
    best = grid.scores.reshape(-1, grid.scores.shape[2]).max(axis=0)
    order = np.argsort(-best, kind="stable")[: params.top_k]
    return grid.select(grid.class_indices[order])


def compute_grid(
    image: np.ndarray, params: JobParams, loaded: LoadedModel, progress: ProgressFn | None = None
) -> ScoreGrid:
    if params.mode == "direct":
        return direct_inference(
            loaded.fcn,
            image,
            loaded.preprocess,
            memory_budget_mb=params.memory_budget_mb,
            class_indices=params.class_indices,
            progress=progress,
        )
    return tiled_inference(
        loaded.classifier,
        image,
        loaded.preprocess,
        window=loaded.window,
        stride=params.stride,
        batch_size=params.batch_size,
        class_indices=params.class_indices,
        progress=progress,
    )


def run_inference(
    image_source: str | Path | BinaryIO,
    params: JobParams,
    registry: ModelRegistry,
    out_dir: str | Path,
    *,
    max_pixels: int,
    progress: ProgressFn | None = None,
) -> dict:
    """Compute heatmaps for one image and write them to `out_dir`; returns the summary.

    Raises ``shared.imageio.ImageError`` for bad images, ``shared.catalog.CatalogError``
    for unknown models, and whatever `progress` raises (e.g. a cancellation).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    loaded = registry.load(params.model, params.precision)
    model_seconds = time.perf_counter() - started

    clock = time.perf_counter()
    image = load_rgb(image_source, max_pixels=max_pixels, min_size=loaded.window)
    decode_seconds = time.perf_counter() - clock

    clock = time.perf_counter()
    grid = select_classes(compute_grid(image, params, loaded, progress), params)
    inference_seconds = time.perf_counter() - clock

    clock = time.perf_counter()
    names = [loaded.info.classes[int(i)] for i in grid.class_indices]
    write_heatmap(out_dir, grid, names, params.mode, loaded.name)
    overlays, overlay_shape = write_overlays(
        out_dir, grid, image, max_side=params.overlay_max_side, weighting=params.weighting
    )
    summary = {
        "image": {"width": int(image.shape[1]), "height": int(image.shape[0])},
        "model": loaded.name,
        "mode": params.mode,
        "precision": loaded.precision,
        "device": loaded.device,
        "parameters": params.to_json(),
        "grid": _grid_summary(grid),
        "overlay_size": {"width": overlay_shape[1], "height": overlay_shape[0]},
        "classes": _class_summaries(grid, names, overlays),
        "timings": {
            "model_load_s": round(model_seconds, 4),
            "decode_s": round(decode_seconds, 4),
            "inference_s": round(inference_seconds, 4),
            "write_s": round(time.perf_counter() - clock, 4),
            "total_s": round(time.perf_counter() - started, 4),
        },
    }
    write_summary(out_dir, summary)
    return summary


def _grid_summary(grid: ScoreGrid) -> dict:
    return {
        "rows": int(grid.scores.shape[0]),
        "cols": int(grid.scores.shape[1]),
        "window": {"height": grid.window[0], "width": grid.window[1]},
        "stride": {"y": int(grid.stride[0]), "x": int(grid.stride[1])},
    }


def _class_summaries(grid: ScoreGrid, names: list[str], overlays: list[str]) -> list[dict]:
    """Per selected class: maximum, mean, peak (image pixels, centre of the best window)."""
    classes = []
    for channel, (name, overlay) in enumerate(zip(names, overlays, strict=True)):
        y, x, best = grid.peak(channel)
        classes.append(
            {
                "name": name,
                "index": int(grid.class_indices[channel]),
                "max": best,
                "mean": float(grid.scores[:, :, channel].mean()),
                "peak": {"x": x, "y": y},
                "overlay": overlay,
            }
        )
    return classes
