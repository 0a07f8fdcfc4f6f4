"""Where a score cell lies: the one convention `heatmap.tif` and `regions.geojson` share.

Coordinates are continuous level-0 pixel coordinates, ``(0, 0)`` being the top-left corner
of the top-left pixel (as GDAL, QuPath and OpenSeadragon count). A cell's score belongs to
its window's centre, ``(col + window_w / 2, row + window_h / 2)``, and a cell stands for the
stride x stride square centred there: on a regular grid these squares tile the scanned area
without gaps or overlaps, so a cell's square is the area whose nearest window centre it is.
Tiled mode pulls its last row and column flush with the image border; those cells keep their
true centres in the regions (the boundary to the previous cell lies midway between the two
centres: the same nearest-centre rule), while the raster, being a
regular grid, puts them one stride after the previous row or column.

The source's georeference comes as plain values (a GDAL geotransform of level-0 pixels, a
CRS as EPSG code and/or WKT) so that any image source can hand them over.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pyproj

from worker.grid import ScoreGrid

Geotransform = tuple[float, float, float, float, float, float]


def cell_centres(grid: ScoreGrid) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) of every row's and column's window centre, level-0 pixels."""
    centre_y = grid.rows.astype(np.float64) + grid.window[0] / 2
    centre_x = grid.cols.astype(np.float64) + grid.window[1] / 2
    return centre_y, centre_x


def cell_origin(grid: ScoreGrid) -> tuple[float, float]:
    """(y, x) of the top-left corner of cell (0, 0)'s square: the raster's origin."""
    centre_y, centre_x = cell_centres(grid)
    return float(centre_y[0]) - grid.stride[0] / 2, float(centre_x[0]) - grid.stride[1] / 2


def check_geotransform(geotransform: Sequence[float] | None) -> Geotransform | None:
    """Six finite numbers in GDAL order with an invertible linear part, or None."""
    if geotransform is None:
        return None
    values = tuple(float(v) for v in geotransform)
    if len(values) != 6 or not all(math.isfinite(v) for v in values):
        raise ValueError("a geotransform is six finite numbers (GDAL order)")
    if values[1] * values[5] - values[2] * values[4] == 0:
        raise ValueError("the geotransform is degenerate (zero pixel area)")
    return values  # type: ignore[return-value]


def cell_geotransform(grid: ScoreGrid, geotransform: Geotransform) -> Geotransform:
    """GDAL geotransform of the cell raster: level-0 pixel (x, y) maps to the source's map
    coordinates through `geotransform`; a raster pixel is one stride, starting at the first
    cell's square, so raster pixel centres land on window centres."""
    x0, a, b, y0, d, e = geotransform
    origin_y, origin_x = cell_origin(grid)
    stride_y, stride_x = grid.stride
    return (
        x0 + a * origin_x + b * origin_y,
        a * stride_x,
        b * stride_y,
        y0 + d * origin_x + e * origin_y,
        d * stride_x,
        e * stride_y,
    )


def shapely_affine(geotransform: Geotransform) -> list[float]:
    """The geotransform as shapely.affinity.affine_transform's [a, b, d, e, xoff, yoff]."""
    x0, a, b, y0, d, e = geotransform
    return [a, b, d, e, x0, y0]


def resolve_crs(crs_wkt: str | None = None, epsg: int | None = None) -> pyproj.CRS | None:
    """The source's CRS (an EPSG code wins over WKT), or None when neither is given."""
    if epsg is not None:
        return pyproj.CRS.from_epsg(int(epsg))
    if crs_wkt:
        return pyproj.CRS.from_wkt(crs_wkt)
    return None


def crs_epsg(crs: pyproj.CRS) -> int | None:
    """The CRS's EPSG code where it has one (a WKT naming an EPSG CRS included)."""
    return crs.to_epsg(min_confidence=90)


def crs_name(crs: pyproj.CRS) -> str:
    """How GeoJSON's (2008) `crs` member names it: an OGC URN, or the WKT that GDAL also reads."""
    code = crs_epsg(crs)
    return f"urn:ogc:def:crs:EPSG::{code}" if code else crs.to_wkt()
