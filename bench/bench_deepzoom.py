"""Deep Zoom pyramid writing (worker/outputs/deepzoom.py): time and peak memory.

The image is procedural (each region computed from its coordinates), so it is never held
whole: the peak RSS growth shows what the writer itself keeps (a few tiles).

    python -m bench.bench_deepzoom --sizes 4096x3072 16384x16384
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from worker.outputs.deepzoom import write_dzi


def procedural(x: int, y: int, w: int, h: int) -> np.ndarray:
    """A textured RGB region of an endless image, from its coordinates alone."""
    ys, xs = np.mgrid[y : y + h, x : x + w]
    r = (np.sin(xs / 37.0) * 60 + 128).astype(np.uint8)
    g = (np.cos(ys / 53.0) * 60 + 128).astype(np.uint8)
    b = ((xs ^ ys) & 0xFF).astype(np.uint8)
    return np.stack([r, g, b], axis=2)


def run(width: int, height: int) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as folder:
        started, cpu = time.perf_counter(), time.process_time()
        write_dzi(Path(folder), "image", (width, height), procedural, "jpeg")
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        tiles = sum(1 for _ in Path(folder).rglob("*.jpeg"))
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    image_mb = width * height * 3 / 2**20
    print(
        f"{width}x{height} ({width * height / 1e6:.0f} MP): {seconds:.1f} s wall, {cpu:.1f} s CPU, {tiles} tiles "
        f"({cpu / tiles * 1000:.1f} ms CPU per tile), peak RSS growth {grown:.0f} MB (the image: {image_mb:.0f} MB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["4096x3072", "16384x16384"])
    for size in parser.parse_args().sizes:
        width, height = (int(v) for v in size.split("x"))
        run(width, height)


if __name__ == "__main__":
    main()
