"""Decisions taken before a job computes anything: which mask, whether the grid fits,
and the summary sections describing them (kept out of engine.py so it stays a short story).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from shared.image_sources.source_types import ImageError, ImageSource, SourceInfo
from shared.jobspec import JobParams
from worker.grid import KeepFn, ScoreGrid
from worker.inference.analysis_raster import Raster
from worker.inference.model_registry import LoadedModel
from worker.inference.tissue_mask import CoverageMask, auto_mask, uploaded_mask

#: The full score grid (all classes, before top-k) may use this many times the memory budget.
GRID_MEMORY_FACTOR = 2


def build_mask(
    source: ImageSource, params: JobParams, mask_image: str | Path | None, max_pixels: int
) -> tuple[CoverageMask | None, str]:
    """(mask or None, mode): "auto" by default for slides, "none" for ordinary images."""
    mode = params.mask or ("auto" if source.info.is_slide else "none")
    if mode == "none":
        return None, mode
    if mode == "auto":
        return auto_mask(source), mode
    if mask_image is None:
        raise ImageError("invalid_parameter", "mask=image needs a mask picture (the `mask` file field)")
    return uploaded_mask(mask_image, (source.info.height, source.info.width), max_pixels=max_pixels), mode


def window_keeper(mask: CoverageMask, scale: tuple[float, float], min_fraction: float) -> KeepFn:
    """keep(rows, cols, window): windows with at least `min_fraction` of their area in the mask."""

    def keep(rows: np.ndarray, cols: np.ndarray, window: tuple[int, int]) -> np.ndarray:
        fractions = mask.window_fractions(rows, cols, window, scale)
        return fractions >= max(min_fraction, 1e-9)

    return keep


def check_analysis_size(raster: Raster, window: tuple[int, int]) -> None:
    if raster.height < window[0] or raster.width < window[1]:
        raise ImageError(
            "image_too_small",
            f"the analysed level is {raster.width}x{raster.height}; the model window is {window[1]}x{window[0]}: "
            "choose a finer level or mpp",
        )


def check_grid_memory(raster: Raster, params: JobParams, loaded: LoadedModel) -> None:
    """Refuse a job whose all-classes score grid (needed to pick top_k) would not fit."""
    classes = len(params.class_indices) if params.class_indices is not None else len(loaded.info.classes)
    if params.mode == "direct":
        stride = loaded.fcn.stride if params.stride is None else (params.stride, params.stride)
    else:
        stride = (params.stride or max(1, loaded.window[0] // 2), params.stride or max(1, loaded.window[1] // 2))
    cells = math.ceil(raster.height / stride[0]) * math.ceil(raster.width / stride[1])
    needed = cells * classes * 4
    limit = params.memory_budget_mb * 2**20 * GRID_MEMORY_FACTOR
    if needed > limit:
        hint = (
            "select fewer classes with `classes=`"
            if params.class_indices is not None
            else "choose classes with `classes=` instead of top_k"
        )
        raise ImageError(
            "grid_too_large",
            f"{cells} windows x {classes} classes need {needed >> 20} MB of scores (limit {limit >> 20} MB): "
            f"{hint}, or use a coarser level / larger mpp",
        )


def source_summary(info: SourceInfo, raster: Raster) -> dict:
    """What was read: reader, format, pyramid, resolution, and the level analysed."""
    summary = {
        "reader": info.reader,
        "format": info.format,
        "levels": [{"width": lv.width, "height": lv.height, "downsample": lv.downsample} for lv in info.levels],
        "mpp": None if info.mpp is None else {"x": info.mpp[0], "y": info.mpp[1]},
        "analysis": {
            "width": raster.width,
            "height": raster.height,
            "level": getattr(raster, "level", 0),
            "scale": {"y": raster.scale[0], "x": raster.scale[1]},
        },
    }
    if info.georeference is not None:
        summary["georeference"] = {"epsg": info.georeference.epsg, "geotransform": list(info.georeference.geotransform)}
    return summary


def mask_summary(grid: ScoreGrid, mask: CoverageMask | None, mode: str, min_fraction: float) -> dict:
    """Masked fraction of the windows, and the work a mask saved."""
    total = int(grid.scores.shape[0] * grid.scores.shape[1])
    computed = total if grid.computed is None else int(grid.computed.sum())
    return {
        "mode": mode,
        "min_fraction": min_fraction,
        "inside_fraction": None if mask is None else round(mask.fraction, 6),
        "windows": total,
        "windows_computed": computed,
        "masked_fraction": round(1 - computed / total, 6) if total else 0.0,
        "work_units_done": grid.tiles_read,
        "work_units_skipped": grid.tiles_skipped,
    }
