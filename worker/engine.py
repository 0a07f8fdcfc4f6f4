"""One inference run, start to finish: image -> scores -> class selection -> artifacts.

The CLI and the Celery task both call `run_inference`; nothing here knows about HTTP,
queues or databases.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from shared.image_sources.source_opener import open_image_source
from shared.image_sources.source_types import DEFAULT_MAX_REGION_PIXELS, ImageSource
from shared.jobs.job_status import JobPhase
from shared.jobspec import JobParams
from shared.storage import VIEWER_DIR
from worker.grid import KeepFn, ProgressFn, ScoreGrid
from worker.inference.analysis_raster import ArrayRaster, Raster, choose_resolution, open_raster
from worker.inference.direct import direct_inference, resolve_scheme
from worker.inference.inference_plan import (
    build_mask,
    check_analysis_size,
    check_grid_memory,
    mask_summary,
    source_summary,
    window_keeper,
)
from worker.inference.model_registry import LoadedModel, ModelRegistry
from worker.inference.shard_bands import Band, GridGeometry, assemble, compute_band, plan_bands
from worker.inference.tiled import tiled_inference
from worker.inference.tissue_mask import overview
from worker.outputs.artifacts import write_heatmap, write_overlays, write_summary
from worker.outputs.blend import colour_scales
from worker.outputs.deepzoom import write_viewer
from worker.outputs.raster_output import write_raster
from worker.outputs.regions_output import write_regions

#: phase(phase, fraction of it done): called as a job moves from reading to inference to
#: writing (and between writers), so that a caller can report what the job does now.
PhaseFn = Callable[[JobPhase, float], None]


def _no_phase(phase: JobPhase, fraction: float) -> None:
    return None


class WriteSteps:
    """The writers of one job, run one after the other: each is timed (``write_<name>_s`` in
    the summary's timings) and reported as a fraction of the writing phase."""

    def __init__(self, total: int, phase: PhaseFn, timings: dict):
        self.total, self.done, self.phase, self.timings = total, 0, phase, timings

    def run(self, name: str, writer: Callable, *args, **kwargs):
        self.phase(JobPhase.writing, self.done / self.total)
        clock = time.perf_counter()
        out = writer(*args, **kwargs)
        self.timings[f"write_{name}_s"] = time.perf_counter() - clock
        self.done += 1
        return out


def select_classes(grid: ScoreGrid, params: JobParams, background: Sequence[int] = ()) -> ScoreGrid:
    """Explicit classes as given; otherwise the top-k classes by their maximum score
    (over computed windows; masked windows are NaN), never a `background` class (the
    model's "nothing here": it would win on every image and hide the objects)."""
    if params.class_indices is not None:
        return grid.select(params.class_indices)
    flat = grid.scores.reshape(-1, grid.scores.shape[2])
    best = np.full(flat.shape[1], -np.inf) if not np.isfinite(flat).any() else np.nanmax(flat, axis=0)
    candidates = ~np.isin(grid.class_indices, np.asarray(background, dtype=np.int64))
    order = np.argsort(-np.nan_to_num(best, nan=-np.inf), kind="stable")
    order = order[candidates[order]][: params.top_k]
    return grid.select(grid.class_indices[order])


def compute_grid(
    image: np.ndarray | Raster,
    params: JobParams,
    loaded: LoadedModel,
    progress: ProgressFn | None = None,
    keep: KeepFn | None = None,
) -> ScoreGrid:
    """Scores in analysis pixels; `image` is read tile by tile (or batch by batch)."""
    if params.mode == "direct":
        return direct_inference(
            loaded.fcn_at(params.stride),
            image,
            loaded.preprocess,
            memory_budget_mb=params.memory_budget_mb,
            class_indices=params.class_indices,
            progress=progress,
            keep=keep,
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
        keep=keep,
    )


@dataclass
class OpenJob:
    """A job's input, opened and checked: the model, the source, the analysis raster and
    the mask. What the whole run, a shard and the assembly of shards all start from."""

    params: JobParams
    loaded: LoadedModel
    source: ImageSource
    raster: Raster
    mask: Any
    mask_mode: str
    keep: KeepFn | None
    timings: dict
    started: float

    def geometry(self) -> GridGeometry:
        """The job's grid of windows (analysis pixels)."""
        raster, params, loaded = self.raster, self.params, self.loaded
        if params.mode == "direct":
            return GridGeometry.direct(loaded.fcn_at(params.stride), raster.height, raster.width)
        return GridGeometry.tiled(loaded.window, self.tiled_stride(), raster.height, raster.width)

    def tiled_stride(self) -> tuple[int, int]:
        """Tiled mode's stride: the job's, or half the window (as `tiled_inference` defaults)."""
        if self.params.stride:
            return (self.params.stride, self.params.stride)
        window = self.loaded.window
        return (max(1, window[0] // 2), max(1, window[1] // 2))

    def computed(self, geometry: GridGeometry) -> np.ndarray | None:
        """The windows the mask keeps (None: every window)."""
        if self.keep is None:
            return None
        return np.asarray(self.keep(geometry.rows, geometry.cols, geometry.window), dtype=bool)

    def mode_options(self, geometry: GridGeometry) -> dict:
        """What `shard_bands.compute_band` needs besides the band: the scheme the whole image
        would run (so that every shard runs the same one), or the tiled-mode knobs."""
        params = self.params
        if geometry.fcn is not None:
            scheme = resolve_scheme(
                geometry.fcn, self.raster.height, self.raster.width, params.memory_budget_mb, self.keep is not None
            )
            return {"scheme": scheme, "memory_budget_mb": params.memory_budget_mb}
        return {"classifier": self.loaded.classifier, "stride": self.tiled_stride(), "batch_size": params.batch_size}


@contextmanager
def open_job(
    image_source: str | Path | BinaryIO,
    params: JobParams,
    registry: ModelRegistry,
    *,
    max_pixels: int,
    max_region_pixels: int = DEFAULT_MAX_REGION_PIXELS,
    mask_image: str | Path | None = None,
    phase: PhaseFn = _no_phase,
) -> Iterator[OpenJob]:
    """Load the model, open the source, choose the resolution, build the mask and run the
    checks (``model_load_s``, ``decode_s``); the source stays open inside the block."""
    started = time.perf_counter()
    phase(JobPhase.reading, 0.0)
    loaded = registry.load(params.model, params.precision)
    timings = {"model_load_s": time.perf_counter() - started}
    with open_image_source(
        image_source, max_pixels=max_pixels, max_region_pixels=max_region_pixels, min_size=loaded.window
    ) as source:
        clock = time.perf_counter()
        raster = open_raster(source, choose_resolution(source, params.level, params.mpp))
        check_analysis_size(raster, loaded.window)
        mask, mask_mode = build_mask(source, params, mask_image, max_pixels)
        keep = None if mask is None else window_keeper(mask, raster.scale, params.mask_min_fraction)
        check_grid_memory(raster, params, loaded)
        timings["decode_s"] = time.perf_counter() - clock
        yield OpenJob(params, loaded, source, raster, mask, mask_mode, keep, timings, started)


def run_inference(
    image_source: str | Path | BinaryIO,
    params: JobParams,
    registry: ModelRegistry,
    out_dir: str | Path,
    *,
    max_pixels: int,
    max_region_pixels: int = DEFAULT_MAX_REGION_PIXELS,
    mask_image: str | Path | None = None,
    progress: ProgressFn | None = None,
    viewer: bool = False,
    georeference: Mapping[str, Any] | None = None,
    phase: PhaseFn = _no_phase,
    shards: int = 1,
) -> dict:
    """Compute heatmaps for one image and write them to `out_dir`; returns the summary.
    `viewer`: also write the web viewer's Deep Zoom pyramids (`viewer/`; the service does).

    `image_source` is a path, an fsspec URL or a binary stream; it is opened as an
    ImageSource and read region by region. `mask_image` is an uploaded mask (params.mask
    "image"). `georeference` (keys ``geotransform``, ``crs_wkt``, ``epsg``, ``mpp``: level-0
    pixels) overrides what the source states; it places ``heatmap.tif`` and the regions on the
    map. `phase` is told when the job moves on (reading, inference, writing and each writer).
    `shards` > 1 computes the grid as that many bands one after the other and assembles them,
    as the service's workers do in parallel (``worker.inference.shard_bands``; same grid).
    Raises ``shared.image_sources.pillow_decoder.ImageError`` for bad images, ``shared.catalog.CatalogError``
    for unknown models, and whatever `progress` raises (e.g. a cancellation).
    """
    with open_job(
        image_source,
        params,
        registry,
        max_pixels=max_pixels,
        max_region_pixels=max_region_pixels,
        mask_image=mask_image,
        phase=phase,
    ) as job:
        grid, extra = infer(job, progress, phase, shards)
        return write_results(job, grid, out_dir, viewer=viewer, georeference=georeference, phase=phase, extra=extra)


def infer(job: OpenJob, progress: ProgressFn | None = None, phase: PhaseFn = _no_phase, shards: int = 1):
    """The job's grid (analysis pixels) in one run, or as `shards` bands one after the other
    (assembled: the same grid); returns (grid, what the summary adds: the shards)."""
    phase(JobPhase.inference, 0.0)
    clock = time.perf_counter()
    extra = {}
    if shards > 1:
        geometry = job.geometry()
        bands = plan_bands(geometry, shards, job.computed(geometry))
        parts = [compute_shard(job, geometry, band, progress) for band in bands]
        grid = assemble(geometry, parts, bands, masked=job.keep is not None)
        extra = {"shards": {"count": len(bands), "done": len(bands), "workers": [], "recomputed": 0}}
    else:
        grid = compute_grid(job.raster, job.params, job.loaded, progress, job.keep)
    job.timings["inference_s"] = time.perf_counter() - clock
    return grid, extra


def compute_shard(job: OpenJob, geometry: GridGeometry, band: Band, progress: ProgressFn | None = None) -> ScoreGrid:
    """One band of the job's grid (analysis pixels, every class or the explicit ones)."""
    return compute_band(
        geometry,
        band,
        job.raster,
        job.loaded.preprocess,
        mode_options=job.mode_options(geometry),
        class_indices=job.params.class_indices,
        keep=job.keep,
        progress=progress,
    )


def write_results(
    job: OpenJob,
    grid: ScoreGrid,
    out_dir: str | Path,
    *,
    viewer: bool = False,
    georeference: Mapping[str, Any] | None = None,
    phase: PhaseFn = _no_phase,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """Select the classes of the job's grid (analysis pixels), write every output to
    `out_dir` and return the summary (`extra` joins it, e.g. the shards)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params, loaded, source, raster, timings = job.params, job.loaded, job.source, job.raster, job.timings
    grid = select_classes(grid, params, loaded.info.background_indices()).in_level0(raster.scale)
    clock = time.perf_counter()
    info = source.info
    summary = {
        "image": {"width": info.width, "height": info.height},
        "source": source_summary(info, raster),
        "model": loaded.name,
        "mode": params.mode,
        "precision": loaded.precision,
        "device": loaded.device,
        "parameters": params.to_json(),
        "grid": _grid_summary(grid),
        "mask": mask_summary(grid, job.mask, job.mask_mode, params.mask_min_fraction),
        **(extra or {}),
    }
    place = dict(georeference) if georeference is not None else georeference_of(info)
    steps = WriteSteps(6 if viewer else 5, phase, timings)
    summary |= _write_outputs(out_dir, grid, source, raster, params, loaded, viewer, steps)
    summary |= _write_map_outputs(out_dir, grid, loaded, params, place, steps)
    timings["write_s"] = time.perf_counter() - clock
    timings["total_s"] = time.perf_counter() - job.started
    summary["timings"] = {key: round(value, 4) for key, value in timings.items()}
    write_summary(out_dir, summary)
    return summary


def georeference_of(info) -> dict:
    """Where the source lies, as the map writers take it: GeoTIFF placement and microns per pixel."""
    geo = info.georeference
    return {
        "geotransform": geo.geotransform if geo is not None else None,
        "crs_wkt": geo.wkt if geo is not None else None,
        "epsg": geo.epsg if geo is not None else None,
        "mpp": info.mpp,
    }


def _write_map_outputs(
    out_dir: Path, grid: ScoreGrid, loaded: LoadedModel, params: JobParams, place: dict, steps: WriteSteps
) -> dict:
    """heatmap.tif and regions.geojson (plus regions_map.geojson for a georeferenced source)."""
    names = [loaded.info.classes[int(i)] for i in grid.class_indices]
    return {
        "raster": steps.run("raster", write_raster, out_dir, grid, names, **place),
        "regions": steps.run("regions", write_regions, out_dir, grid, names, params.threshold, **place),
    }


def _write_outputs(
    out_dir: Path,
    grid: ScoreGrid,
    source: ImageSource,
    raster: Raster,
    params: JobParams,
    loaded: LoadedModel,
    viewer: bool,
    steps: WriteSteps,
) -> dict:
    """The viewer's heat layers, heatmap.npz and the overlays; returns what the summary says
    about them. The overlays draw over the analysed pixels when they are in memory, else over
    an overview; the viewer's image layer is not written (the API reads it from the input)."""
    info = source.info
    if isinstance(raster, ArrayRaster):
        picture = raster.pixels
    else:
        picture = steps.run("overview", overview, source, params.overlay_max_side)
    names = [loaded.info.classes[int(i)] for i in grid.class_indices]
    shown = grid.without_nan()
    scales = colour_scales(shown, (info.height, info.width), params.weighting)  # one per class: PNG = viewer
    size = (info.width, info.height)
    if viewer:
        steps.run("viewer", write_viewer, out_dir / VIEWER_DIR, size, shown, names, params.weighting, scales)
    steps.run("heatmap", write_heatmap, out_dir, grid, names, params.mode, loaded.name)
    overlays = steps.run(
        "overlays",
        write_overlays,
        out_dir,
        shown,
        picture,
        names,
        max_side=params.overlay_max_side,
        weighting=params.weighting,
        image_size=(info.height, info.width),
        scales=scales,
    )
    return {
        "overlay_size": {"width": overlays.size[1], "height": overlays.size[0]},
        "overlay": overlays.legend,
        "classes": [
            entry | extra
            for entry, extra in zip(_class_summaries(grid, names, overlays.files), overlays.classes, strict=True)
        ],
    }


def _grid_summary(grid: ScoreGrid) -> dict:
    return {
        "rows": int(grid.scores.shape[0]),
        "cols": int(grid.scores.shape[1]),
        "window": {"height": grid.window[0], "width": grid.window[1]},
        "stride": {"y": int(grid.stride[0]), "x": int(grid.stride[1])},
        # Direct mode: how the trunk ran ("rows": streamed, no halo; "tiles": with halos).
        **({"direct_scheme": grid.scheme} if grid.scheme is not None else {}),
        **(_direct_summary(grid) if grid.scheme is not None else {}),
    }


def _direct_summary(grid: ScoreGrid) -> dict:
    """How much of the trunk's work was halo, and whether the tiles outgrew the budget for it."""
    overhead = None if grid.halo_overhead is None else round(grid.halo_overhead, 4)
    return {"halo_overhead": overhead, "tile_raised_for_halo": grid.tile_raised_for_halo}


def _class_summaries(grid: ScoreGrid, names: list[str], overlays: list[str]) -> list[dict]:
    """Per selected class: maximum, mean, peak (image pixels, centre of the best window)."""
    classes = []
    for channel, (name, overlay) in enumerate(zip(names, overlays, strict=True)):
        y, x, best = grid.peak(channel)
        classes.append(
            {
                "name": name,
                "index": int(grid.class_indices[channel]),
                "max": None if math.isnan(best) else best,
                "mean": _nan_mean(grid.scores[:, :, channel]),
                "peak": None if math.isnan(best) else {"x": x, "y": y},
                "overlay": overlay,
            }
        )
    return classes


def _nan_mean(plane: np.ndarray) -> float | None:
    """Mean over computed windows (None when the mask left none)."""
    finite = plane[np.isfinite(plane)]
    return float(finite.mean()) if finite.size else None
