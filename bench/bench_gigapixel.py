"""Benchmark the large-image path: a generated 2-gigapixel pyramidal slide, bundled model,
direct mode, tissue mask "auto" (printed, not asserted).

    python -m bench.bench_gigapixel [--width 51200 --height 40960] [--level 0] [--keep FILE]
                                    [--json out.json]

Steps:
1. Write a JPEG-tiled pyramidal BigTIFF (SubIFD levels down to ~1600 px) of blank "glass"
   with ~10 % textured "tissue" blocks carrying shapes of the bundled model. It is written
   tile by tile from a generator (never whole in memory); a few 2048 px tissue patches
   (and their reductions) are reused.
2. In a FRESH child process (so its peak RSS is its own): ``worker.engine.run_inference``
   exactly as a job runs it, with ``mask`` left to its slide default (auto). The child reports
   wall time, peak RSS (``ru_maxrss``), trunk tiles read vs skipped, the time spent reading
   and computing the tiles it read (``worker.inference.direct._trunk_tile`` timed), and the rest of the
   inference time (head on computed rows, window fractions, skipped-tile bookkeeping): an upper
   bound of what the skipped tiles cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BLOCK = 2048  # level-0 side of one glass-or-tissue block
TILE = 256
GLASS = (238, 236, 240)


def _patches(count: int, seed: int) -> list[list[np.ndarray]]:
    """Tissue patches (textured, darker than glass, with shapes) and their 2^k reductions."""
    from PIL import Image

    from shapes.scenes import generate_scene

    out = []
    for index in range(count):
        image, _ = generate_scene(BLOCK, BLOCK, n_objects=12, seed=seed + index, margin=48)
        image = (image.astype(np.float32) * 0.8).astype(np.uint8)
        levels = [image]
        while levels[-1].shape[0] > 1:
            levels.append(np.asarray(Image.fromarray(levels[-1]).reduce(2)))
        out.append(levels)
    return out


def _layout(blocks_y: int, blocks_x: int, fraction: float, seed: int) -> np.ndarray:
    """Which blocks are tissue (-1: glass, else a patch index): a few compact clusters."""
    rng = np.random.default_rng(seed)
    layout = np.full((blocks_y, blocks_x), -1, dtype=np.int64)
    wanted = max(1, round(fraction * blocks_y * blocks_x))
    while (layout >= 0).sum() < wanted:
        cy, cx = rng.integers(0, blocks_y), rng.integers(0, blocks_x)
        radius = rng.uniform(1.0, 2.5)
        yy, xx = np.mgrid[:blocks_y, :blocks_x]
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        for y, x in zip(*np.nonzero(blob & (layout < 0)), strict=True):
            if (layout >= 0).sum() < wanted:
                layout[y, x] = rng.integers(0, 4)
    return layout


def _level_tiles(layout, patches, level: int, height: int, width: int):
    """Tiles (TILE x TILE, row-major) of pyramid level `level`, composed block by block."""
    scale = 2**level
    block = BLOCK // scale
    for ty in range(0, height, TILE):
        for tx in range(0, width, TILE):
            tile = np.empty((TILE, TILE, 3), np.uint8)
            tile[:] = GLASS
            for by in range(ty // block, min(layout.shape[0], (ty + TILE - 1) // block + 1)):
                for bx in range(tx // block, min(layout.shape[1], (tx + TILE - 1) // block + 1)):
                    patch = layout[by, bx]
                    if patch < 0:
                        continue
                    pixels = patches[patch][level]
                    y0, x0 = max(ty, by * block), max(tx, bx * block)
                    y1, x1 = min(ty + TILE, (by + 1) * block), min(tx + TILE, (bx + 1) * block)
                    tile[y0 - ty : y1 - ty, x0 - tx : x1 - tx] = pixels[
                        y0 - by * block : y1 - by * block, x0 - bx * block : x1 - bx * block
                    ]
            yield tile


def write_slide(path: Path, width: int, height: int, fraction: float = 0.10, seed: int = 7) -> dict:
    import tifffile

    started = time.perf_counter()
    layout = _layout(height // BLOCK, width // BLOCK, fraction, seed)
    patches = _patches(4, seed)
    levels = []
    while not levels or max(levels[-1]) > 1600:
        scale = 2 ** len(levels)
        levels.append((height // scale, width // scale))
    options = {"tile": (TILE, TILE), "compression": "jpeg", "photometric": "rgb", "dtype": np.uint8, "maxworkers": 2}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level, (h, w) in enumerate(levels):
            extra = {"subifds": len(levels) - 1, "resolution": (1e4 / 0.25, 1e4 / 0.25)} if level == 0 else {}
            extra.update({"resolutionunit": "CENTIMETER"} if level == 0 else {"subfiletype": 1})
            tif.write(_level_tiles(layout, patches, level, h, w), shape=(h, w, 3), **options, **extra)
    return {
        "path": str(path),
        "width": width,
        "height": height,
        "levels": len(levels),
        "tissue_fraction": float((layout >= 0).mean()),
        "file_mb": round(path.stat().st_size / 2**20, 1),
        "write_s": round(time.perf_counter() - started, 1),
    }


def run_child(path: str, level: int) -> dict:
    """One job on the slide, as the worker runs it; prints its own measurements."""
    import worker.inference.direct as direct
    from shared.jobspec import JobParams
    from shared.settings import Settings
    from worker.engine import run_inference
    from worker.inference.model_registry import ModelRegistry

    spent = [0.0]
    original = direct._trunk_tile

    def timed_tile(*args, **kwargs):
        clock = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - clock

    direct._trunk_tile = timed_tile
    registry = ModelRegistry(Settings().model_dirs)
    registry.load("shapes")
    params = JobParams(model="shapes", mode="direct", top_k=None, class_indices=(1, 2, 3, 4), level=level or None)
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        summary = run_inference(path, params, registry, out, max_pixels=200_000_000)
        wall = time.perf_counter() - started
    mask = summary["mask"]
    return {
        "wall_s": round(wall, 1),
        "timings": summary["timings"],
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "tiles_read": mask["work_units_done"],
        "tiles_skipped": mask["work_units_skipped"],
        "read_and_trunk_s": round(spent[0], 2),
        "rest_of_inference_s": round(summary["timings"]["inference_s"] - spent[0], 2),
        "masked_fraction": mask["masked_fraction"],
        "inside_fraction": mask["inside_fraction"],
        "grid": summary["grid"],
        "analysis": summary["source"]["analysis"],
        "classes": [{k: c[k] for k in ("name", "max", "peak")} for c in summary["classes"]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=51200)
    parser.add_argument("--height", type=int, default=40960)
    parser.add_argument("--level", type=int, default=0, help="pyramid level analysed")
    parser.add_argument("--keep", help="write (or reuse) the slide at this path instead of a temp file")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.level)))
        return 0
    folder = tempfile.TemporaryDirectory()
    path = Path(args.keep) if args.keep else Path(folder.name) / "slide.tif"
    if path.exists():
        slide = {"path": str(path), "reused": True, "file_mb": round(path.stat().st_size / 2**20, 1)}
    else:
        slide = write_slide(path, args.width, args.height)
    print("slide:", json.dumps(slide), flush=True)
    child = subprocess.run(
        [sys.executable, "-m", "bench.bench_gigapixel", "--child", str(path), "--level", str(args.level)],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        check=True,
    )
    run = json.loads(child.stdout.strip().splitlines()[-1])
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "slide": slide,
        "run": run,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    folder.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
