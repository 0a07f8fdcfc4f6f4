"""Cost of heatmap.tif and regions.geojson on a large synthetic score grid (printed, not asserted).

    python -m bench.bench_map_outputs --cells 2000

Two classes of 300 gaussian blobs each, 5 % of the cells scattered as not computed (NaN):
a hard case for the regions (thousands of one-cell holes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from shared.storage import RASTER_FILE, REGIONS_FILE
from worker.grid import ScoreGrid
from worker.outputs.raster_output import write_raster
from worker.outputs.regions_output import write_regions


def blobs(cells: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:cells, 0:cells]
    plane = np.zeros((cells, cells), np.float32)
    for _ in range(300):
        cy, cx = rng.integers(0, cells, 2)
        radius = rng.integers(5, 40)
        plane = np.maximum(plane, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * radius**2)).astype(np.float32))
    plane[rng.random((cells, cells)) < 0.05] = np.nan
    return plane


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=2000, help="grid side in cells")
    args = parser.parse_args()
    plane = blobs(args.cells, np.random.default_rng(0))
    axis = np.arange(args.cells) * 16
    grid = ScoreGrid(np.stack([plane, plane.T], -1), axis, axis, (64, 64), (16, 16), np.array([0, 1]))
    georeference = {"geotransform": (500000.0, 0.5, 0.0, 4000000.0, 0.0, -0.5), "epsg": 32633}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        clock = time.perf_counter()
        info = write_regions(out, grid, ["a", "b"], 0.5, **georeference)
        regions_s = time.perf_counter() - clock
        clock = time.perf_counter()
        raster = write_raster(out, grid, ["a", "b"], **georeference)
        raster_s = time.perf_counter() - clock
        print(f"grid {args.cells} x {args.cells} cells, 2 classes")
        regions_mb = (out / REGIONS_FILE).stat().st_size / 1e6
        raster_mb = (out / RASTER_FILE).stat().st_size / 1e6
        print(f"regions: {regions_s:.1f} s, {sum(info['regions'].values())} regions, {regions_mb:.1f} MB")
        print(f"raster:  {raster_s:.1f} s, {len(raster['levels'])} levels, {raster_mb:.1f} MB")


if __name__ == "__main__":
    main()
