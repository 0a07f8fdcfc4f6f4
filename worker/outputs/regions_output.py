"""``regions.geojson``: where each selected class scores at or above a threshold, as polygons
QuPath imports (File > Import objects, or drag and drop) and GIS tools read.

Each hot cell stands for its stride x stride square around its window centre (the convention
of `worker.outputs.cell_geometry`); the squares of one class are merged (the outline of the hot cells,
polygonized by shapely/GEOS) and every connected region (4-connected: squares touching only at
a corner stay apart) becomes one feature::

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
from scipy import ndimage
from shapely.affinity import affine_transform

from shared.storage import REGIONS_FILE, REGIONS_MAP_FILE
from worker.grid import ScoreGrid
from worker.outputs.artifacts import write_atomic
from worker.outputs.cell_geometry import (
    Geotransform,
    cell_centres,
    check_geotransform,
    crs_name,
    resolve_crs,
    shapely_affine,
)

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


def _edge_runs(edges: np.ndarray, junctions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of unit edges along each row of `edges` (True = an edge from x to x + 1),
    broken where `junctions` (same shape) says another edge meets the line at x, so that the
    linework stays noded for polygonize. Returns (row, first x, last x + 1) of every run."""
    before = np.zeros_like(edges)
    before[:, 1:] = edges[:, :-1]
    starts = edges & (~before | junctions)
    rows, cols = np.nonzero(edges)
    run = np.cumsum(starts[rows, cols]) - 1
    firsts = np.flatnonzero(np.diff(run, prepend=-1))
    lasts = np.append(firsts[1:], len(run)) - 1
    return rows[firsts], cols[firsts], cols[lasts] + 1


def _boundary_lines(hot: np.ndarray) -> np.ndarray:
    """The outline between hot and other cells in cell-index space (cell (i, j) is the unit
    square x = j..j+1, y = i..i+1) as straight segments, noded where four edges meet (two
    hot cells touching at a corner): the linework that polygonize turns into regions."""
    padded = np.pad(hot, 1)
    across_rows = padded[:-1, 1:-1] != padded[1:, 1:-1]  # (h + 1, w): edge y = i, x = j..j+1
    across_cols = padded[1:-1, :-1] != padded[1:-1, 1:]  # (h, w + 1): edge x = j, y = i..i+1
    vertical_at = np.zeros((hot.shape[0] + 1, hot.shape[1] + 1), dtype=bool)  # a vertical edge ends at (x, y)
    vertical_at[:-1] |= across_cols
    vertical_at[1:] |= across_cols
    horizontal_at = np.zeros_like(vertical_at)  # a horizontal edge ends at (x, y)
    horizontal_at[:, :-1] |= across_rows
    horizontal_at[:, 1:] |= across_rows
    y, x0, x1 = _edge_runs(across_rows, vertical_at[:, :-1])
    x, y0, y1 = _edge_runs(across_cols.T, horizontal_at.T[:, :-1])
    starts = np.concatenate([np.stack([x0, y], 1), np.stack([x, y0], 1)])
    ends = np.concatenate([np.stack([x1, y], 1), np.stack([x, y1], 1)])
    return shapely.linestrings(np.stack([starts, ends], 1).astype(np.float64))


def _cell_bounds(centres: np.ndarray, stride: int) -> np.ndarray:
    """Level-0 position of every boundary between cells along one axis: half a stride
    outside the first and last centres, midway between neighbouring centres (which is
    centre +- stride / 2 on a regular grid, and splits tiled mode's flush last cell fairly)."""
    bounds = np.empty(len(centres) + 1)
    bounds[0], bounds[-1] = centres[0] - stride / 2, centres[-1] + stride / 2
    bounds[1:-1] = (centres[:-1] + centres[1:]) / 2
    return bounds


def class_regions(grid: ScoreGrid, channel: int, threshold: float) -> list[tuple[shapely.Polygon, dict]]:
    """Connected regions of the cells scoring >= threshold in one score channel, each with its
    cells' max, mean and count; largest maximum first. Built in cell-index space (integer
    vertices: exact) by polygonizing the hot cells' outline, then mapped to level-0 pixels."""
    plane = grid.scores[:, :, channel]
    hot = plane >= threshold  # NaN (not computed) compares False
    if not hot.any():
        return []
    labels, count = ndimage.label(hot)  # 4-connected components: the regions
    members, values = labels[hot] - 1, plane[hot].astype(np.float64)
    cells = np.bincount(members, minlength=count)
    mean = np.bincount(members, weights=values, minlength=count) / cells
    best = np.full(count, -np.inf)
    np.maximum.at(best, members, values)
    faces = shapely.get_parts(shapely.polygonize(_boundary_lines(hot)))
    inside = shapely.get_coordinates(shapely.point_on_surface(faces)).astype(np.int64)
    face_labels = labels[inside[:, 1], inside[:, 0]]  # 0: a hole or the outside
    order = np.argsort(face_labels, kind="stable")[np.count_nonzero(face_labels == 0) :]
    firsts = np.flatnonzero(np.diff(face_labels[order], prepend=0))  # every label 1..count has a face
    pieces = np.split(faces[order], firsts[1:])
    outlines = [piece[0] if len(piece) == 1 else shapely.union_all(piece) for piece in pieces]
    polygons = np.asarray(outlines, dtype=object)
    centre_y, centre_x = cell_centres(grid)
    bounds_x, bounds_y = _cell_bounds(centre_x, grid.stride[1]), _cell_bounds(centre_y, grid.stride[0])

    def to_pixels(coords: np.ndarray) -> np.ndarray:
        at = np.rint(coords).astype(np.int64)
        return np.stack([bounds_x[at[:, 0]], bounds_y[at[:, 1]]], 1)

    regions = [
        (
            shapely.transform(polygon, to_pixels),
            {"max": float(best[k]), "mean": float(mean[k]), "cells": int(cells[k])},
        )
        for k, polygon in enumerate(polygons)
    ]
    return sorted(regions, key=lambda region: -region[1]["max"])


def _feature(polygon, name: str, colour, measurements: dict) -> dict:
    return {
        "type": "Feature",
        "geometry": json.loads(shapely.to_geojson(shapely.orient_polygons(polygon))),  # exterior counterclockwise
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
