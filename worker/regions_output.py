"""``regions.geojson``: where each selected class scores at or above a threshold, as polygons
QuPath imports (File > Import objects, or drag and drop) and GIS tools read.

Each hot cell stands for its stride x stride square around its window centre (the convention
of `worker.cell_geometry`); the squares of one class are merged (shapely ``unary_union``) and
every connected region (4-connected: squares touching only at a corner stay apart) becomes one
feature::

    {"type": "Feature", "geometry": Polygon,
     "properties": {"objectType": "annotation",
                    "classification": {"name": class, "color": [r, g, b]},
                    "measurements": {"max", "mean", "cells", "area", "area_um2" (with mpp)}}}

``max`` and ``mean`` are over the region's cells, ``area`` is in level-0 square pixels. Cells
not computed (NaN) are never hot. Coordinates are level-0 pixels. For a georeferenced source a
second file, ``regions_map.geojson``, holds the same features in the source's map coordinates
with GeoJSON's (2008) ``crs`` member naming the CRS (an EPSG URN, or WKT), which GDAL and
QGIS honour; its ``area`` is in square CRS units.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import shapely
from shapely.affinity import affine_transform
from shapely.geometry import mapping
from shapely.geometry.polygon import orient

from shared.storage import REGIONS_FILE, REGIONS_MAP_FILE
from worker.artifacts import write_atomic
from worker.cell_geometry import (
    Geotransform,
    cell_centres,
    check_geotransform,
    crs_name,
    resolve_crs,
    shapely_affine,
)
from worker.grid import ScoreGrid

# Class colours (matplotlib's "tab10"), by the model's class index so a class keeps its colour.
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def _runs(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last index of every run of True in a boolean row."""
    edges = np.diff(np.concatenate(([0], row.astype(np.int8), [0])))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1


def class_regions(grid: ScoreGrid, channel: int, threshold: float) -> list[tuple[shapely.Polygon, dict]]:
    """Connected regions of the cells scoring >= threshold in one score channel, each with its
    cells' max, mean and count; largest maximum first."""
    plane = grid.scores[:, :, channel]
    hot = plane >= threshold  # NaN (not computed) compares False
    if not hot.any():
        return []
    centre_y, centre_x = cell_centres(grid)
    half_y, half_x = grid.stride[0] / 2, grid.stride[1] / 2
    strips = []  # one rectangle per run of hot cells in a row: far fewer shapes than cells
    for i in np.flatnonzero(hot.any(axis=1)):
        first, last = _runs(hot[i])
        strips.append(
            shapely.box(centre_x[first] - half_x, centre_y[i] - half_y, centre_x[last] + half_x, centre_y[i] + half_y)
        )
    merged = shapely.unary_union(np.concatenate(strips))
    polygons = shapely.simplify(shapely.get_parts(merged), 0.0)  # drops the joins' collinear vertices
    rows, cols = np.nonzero(hot)
    values = plane[rows, cols].astype(np.float64)
    points = shapely.points(centre_x[cols], centre_y[rows])
    point_index, region_index = shapely.STRtree(polygons).query(points, predicate="within")
    count = np.bincount(region_index, minlength=len(polygons))
    total = np.bincount(region_index, weights=values[point_index], minlength=len(polygons))
    best = np.full(len(polygons), -np.inf)
    np.maximum.at(best, region_index, values[point_index])
    regions = [
        (polygon, {"max": float(best[k]), "mean": float(total[k] / count[k]), "cells": int(count[k])})
        for k, polygon in enumerate(polygons)
        if count[k]
    ]
    return sorted(regions, key=lambda region: -region[1]["max"])


def _feature(polygon, name: str, colour, measurements: dict) -> dict:
    return {
        "type": "Feature",
        "geometry": mapping(orient(polygon, sign=1.0)),
        "properties": {
            "objectType": "annotation",
            "classification": {"name": name, "color": list(colour)},
            "measurements": measurements,
        },
    }


def _collection(features: list[dict], **members) -> bytes:
    return json.dumps({"type": "FeatureCollection", **members, "features": features}).encode()


def write_regions(
    out_dir: Path,
    grid: ScoreGrid,
    class_names: list[str],
    threshold: float,
    *,
    geotransform: Geotransform | None = None,
    crs_wkt: str | None = None,
    epsg: int | None = None,
    mpp: tuple[float, float] | None = None,
) -> dict:
    """Write ``regions.geojson`` (and ``regions_map.geojson`` for a georeferenced source);
    returns what summary.json says of them."""
    geotransform = check_geotransform(geotransform)
    crs = resolve_crs(crs_wkt, epsg)
    pixel_features, map_features, counts = [], [], {}
    for channel, name in enumerate(class_names):
        colour = PALETTE[int(grid.class_indices[channel]) % len(PALETTE)]
        regions = class_regions(grid, channel, threshold)
        counts[name] = len(regions)
        for polygon, stats in regions:
            area = float(polygon.area)
            extra = {"area_um2": area * float(mpp[0]) * float(mpp[1])} if mpp is not None else {}
            pixel_features.append(_feature(polygon, name, colour, {**stats, "area": area, **extra}))
            if geotransform is not None:
                on_map = affine_transform(polygon, shapely_affine(geotransform))
                map_features.append(_feature(on_map, name, colour, {**stats, "area": float(on_map.area)}))
    write_atomic(out_dir / REGIONS_FILE, _collection(pixel_features, threshold=threshold, units="level-0 pixels"))
    map_file = None
    if geotransform is not None:
        members = {"crs": {"type": "name", "properties": {"name": crs_name(crs)}}} if crs is not None else {}
        write_atomic(out_dir / REGIONS_MAP_FILE, _collection(map_features, threshold=threshold, **members))
        map_file = REGIONS_MAP_FILE
    return {"file": REGIONS_FILE, "map_file": map_file, "threshold": threshold, "regions": counts}
