"""``heatmap.tif``: the score grid as a tiled, pyramidal TIFF that GDAL, QGIS and QuPath open.

One page holds every selected class as a float32 sample (band), stored plane by plane
(planar configuration "separate", so reading one class reads only its plane); NaN marks
cells that were not computed and is declared as GDAL's nodata. Reduced-resolution levels
(each half the previous, NaN-aware 2x2 means) follow in the main IFD chain as
reduced-resolution pages, the layout GDAL (overviews), tifffile (series levels) and
OpenSlide read. One raster pixel is one cell (stride x stride level-0 pixels), placed by the
convention of `worker.outputs.cell_geometry`. Resolution tags come from the source's microns per
pixel; for a georeferenced source the file is a GeoTIFF whose geotransform maps each raster
pixel centre to its window centre's map coordinates, with the source's CRS in the
GeoKeyDirectory as an EPSG code (a CRS without one leaves the geotransform alone in the
file; summary.json and regions_map.geojson then carry its WKT).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pyproj
import tifffile

from shared.storage import RASTER_FILE
from worker.grid import ScoreGrid
from worker.outputs.cell_geometry import (
    Geotransform,
    cell_geotransform,
    cell_origin,
    check_geotransform,
    crs_epsg,
    resolve_crs,
)

QUOTES = {'"': "&quot;"}
TILE = 256  # TIFF tile side (a multiple of 16); levels are added until one tile holds a level
CLASSIC_TIFF_LIMIT = 2**31  # above this many bytes of data (all levels) the file is a BigTIFF


def halve(planes: np.ndarray) -> np.ndarray:
    """Next pyramid level of (bands, h, w): the mean of each 2x2 block's computed cells
    (NaN where none was computed); odd sides keep their last row/column alone."""
    bands, height, width = planes.shape
    padded = np.full((bands, height + height % 2, width + width % 2), np.nan, dtype=np.float32)
    padded[:, :height, :width] = planes
    blocks = padded.reshape(bands, padded.shape[1] // 2, 2, padded.shape[2] // 2, 2)
    finite = np.isfinite(blocks)
    total = np.where(finite, blocks, 0.0).sum(axis=(2, 4), dtype=np.float64)
    count = finite.sum(axis=(2, 4))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def pyramid(planes: np.ndarray, tile: int = TILE) -> list[np.ndarray]:
    """Level 0 and halvings until a level fits in one tile."""
    levels = [planes]
    while max(levels[-1].shape[1:]) > tile:
        levels.append(halve(levels[-1]))
    return levels


def geotiff_tags(crs: pyproj.CRS | None, geotransform: Geotransform) -> list[tuple]:
    """tifffile extratags: ModelPixelScale + ModelTiepoint (north-up) or ModelTransformation
    (rotated), and a GeoKeyDirectory (PixelIsArea) naming the CRS."""
    x0, a, b, y0, d, e = geotransform
    if b == 0 and d == 0 and a > 0 and e < 0:
        tags = [(33550, 12, 3, (a, -e, 0.0), True), (33922, 12, 6, (0.0, 0.0, 0.0, x0, y0, 0.0), True)]
    else:
        matrix = (a, b, 0.0, x0, d, e, 0.0, y0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
        tags = [(34264, 12, 16, matrix, True)]
    if crs is None:
        return tags
    code = crs_epsg(crs)
    if code is None:  # GDAL reads no user-defined CRS short of the full set of projection keys
        return tags
    geographic = crs.is_geographic
    keys = [(1024, 0, 1, 2 if geographic else 1), (1025, 0, 1, 1), (2048 if geographic else 3072, 0, 1, code)]
    directory = [1, 1, 0, len(keys)] + [value for key in keys for value in key]  # model type, PixelIsArea, CRS
    tags.append((34735, 3, len(directory), tuple(directory), True))
    return tags


def _gdal_tags(class_names: list[str]) -> list[tuple]:
    """GDAL metadata (band names, as QGIS shows them) and nodata = NaN. GDAL escapes item
    values once more inside the XML (and unescapes twice on reading), so do as it does."""
    items = "".join(
        f'<Item name="DESCRIPTION" sample="{k}" role="description">{escape(escape(name, QUOTES), QUOTES)}</Item>'
        for k, name in enumerate(class_names)
    )
    return [(42112, 2, 0, f"<GDALMetadata>{items}</GDALMetadata>", True), (42113, 2, 0, "nan", True)]


def _resolution(mpp: tuple[float, float] | None, stride: tuple[int, int], factor: int) -> dict:
    """Resolution tags of one level: pixels per centimetre (a raster pixel is a cell)."""
    if mpp is None:
        return {}
    mpp_x, mpp_y = (float(v) for v in mpp)
    return {
        "resolution": (1e4 / (mpp_x * stride[1] * factor), 1e4 / (mpp_y * stride[0] * factor)),
        "resolutionunit": "CENTIMETER",
    }


def write_raster(
    out_dir: Path,
    grid: ScoreGrid,
    class_names: list[str],
    *,
    geotransform: Geotransform | None = None,
    crs_wkt: str | None = None,
    epsg: int | None = None,
    mpp: tuple[float, float] | None = None,
) -> dict:
    """Write ``heatmap.tif`` (temp file, then rename); returns what summary.json says of it."""
    geotransform = check_geotransform(geotransform)
    crs = resolve_crs(crs_wkt, epsg)
    planes = np.ascontiguousarray(np.moveaxis(grid.scores, 2, 0), dtype=np.float32)
    levels = pyramid(planes)
    origin_y, origin_x = cell_origin(grid)
    description = {
        "classes": class_names,
        "cell": "raster pixel (i, j) = the score of the window centred at level-0 pixel"
        " (origin_x + (j + 0.5) * stride_x, origin_y + (i + 0.5) * stride_y)",
        "origin": {"x": origin_x, "y": origin_y},
        "stride": {"y": int(grid.stride[0]), "x": int(grid.stride[1])},
        "window": {"height": int(grid.window[0]), "width": int(grid.window[1])},
    }
    base_tags = _gdal_tags(class_names)
    raster_transform = None
    if geotransform is not None:
        raster_transform = cell_geotransform(grid, geotransform)
        base_tags += geotiff_tags(crs, raster_transform)
    path = out_dir / RASTER_FILE
    temp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    bigtiff = sum(level.nbytes for level in levels) > CLASSIC_TIFF_LIMIT
    try:
        _write_levels(temp, levels, bigtiff, json.dumps(description), base_tags, (mpp, grid.stride))
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()
    return {
        "file": RASTER_FILE,
        "bands": class_names,
        "levels": [{"height": int(level.shape[1]), "width": int(level.shape[2])} for level in levels],
        "bigtiff": bigtiff,
        "geotransform": list(raster_transform) if raster_transform else None,
        "crs": (f"EPSG:{crs_epsg(crs)}" if crs_epsg(crs) else crs.to_wkt()) if crs is not None else None,
    }


def _write_levels(path: Path, levels: list[np.ndarray], bigtiff: bool, description: str, tags, resolution) -> None:
    mpp, stride = resolution
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for number, level in enumerate(levels):
            tif.write(
                level if len(level) > 1 else level[0],
                photometric="minisblack",
                planarconfig="separate" if len(level) > 1 else None,
                tile=(TILE, TILE),
                compression="zlib",
                predictor=3,  # floating-point predictor: better compression of smooth maps
                subfiletype=1 if number else 0,
                description=description if number == 0 else None,
                extratags=tags if number == 0 else (),
                metadata=None,
                **_resolution(mpp, stride, 2**number),
            )
    with open(path, "rb+") as handle:  # on disk before the rename makes it visible
        os.fsync(handle.fileno())
