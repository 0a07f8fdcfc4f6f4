"""A slide job through the dev stack (`make serve`'s gunicorn/gevent API + one worker), then its
viewer's image tiles through the API while slow clients hold connections (issue 17).

    python -m bench.bench_viewer_tiles --size 24000x20000      # the issue's 480 MP slide
    python -m bench.bench_viewer_tiles --size 8000x6000        # what fits a shared machine

1. writes a JPEG-tiled pyramidal BigTIFF of `--size` (procedural "tissue" on glass, written
   tile by tile: never held whole) and submits it by `image_url` (mask auto, bundled model,
   3 classes), after one small warm-up job (the worker's model loaded and traced);
2. reports the job's wall time (submit -> succeeded, as the client sees it) against its own
   inference time, the writing time per writer, the phases the job JSON showed, and the
   files and bytes under the job's results;
3. opens `--slow-clients` connections that drip a header every 2 s (the slow-client test's
   setup), then fetches `--tiles` distinct image tiles of the finest levels (first
   requests: read from the slide), from `--parallel` clients at once like a browser, then
   the same tiles again on the same connections (cached in the API process), and prints
   p50/p95 of each.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import requests
import tifffile

from bench.slow_clients import SlowClients
from scripts.devstack import start_stack
from shared.image_sources.dzi_geometry import TILE_SIZE, level_count
from shared.jobs.job_status import TERMINAL, JobStatus
from shared.storage import results_prefix

GLASS = np.array([238, 236, 240], np.float32)


def _tissue_blobs(width: int, height: int, seed: int = 7) -> list[tuple[float, float, float, float]]:
    """(cx, cy, rx, ry) of the tissue ellipses, in level-0 pixels (about a quarter of the area)."""
    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(5):
        cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
        blobs.append((cx, cy, rng.uniform(0.08, 0.16) * width, rng.uniform(0.08, 0.16) * height))
    return blobs


def procedural_tile(x0: int, y0: int, scale: int, blobs) -> np.ndarray:
    """One 256x256 tile of the slide at `scale` level-0 pixels per pixel, origin (x0, y0) at level 0."""
    ys, xs = np.mgrid[0:TILE_SIZE, 0:TILE_SIZE].astype(np.float32)
    xs, ys = x0 + (xs + 0.5) * scale, y0 + (ys + 0.5) * scale
    inside = np.zeros(xs.shape, bool)
    for cx, cy, rx, ry in blobs:
        inside |= ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1.0
    texture = 40 * np.sin(xs / 23.0) * np.cos(ys / 17.0) + 30 * np.sin((xs + ys) / 61.0)
    tissue = np.stack([190 + texture, 110 + texture, 170 + 0.5 * texture], axis=2)
    out = np.where(inside[:, :, None], tissue, GLASS)
    return np.clip(out, 0, 255).astype(np.uint8)


def write_slide(path: Path, width: int, height: int, levels: int = 5) -> None:
    """A pyramidal BigTIFF (SubIFD levels, 2x apart), every tile computed as it is written."""
    blobs = _tissue_blobs(width, height)

    def tiles(scale: int):
        level_w, level_h = math.ceil(width / scale), math.ceil(height / scale)
        for row in range(math.ceil(level_h / TILE_SIZE)):
            for col in range(math.ceil(level_w / TILE_SIZE)):
                yield procedural_tile(col * TILE_SIZE * scale, row * TILE_SIZE * scale, scale, blobs)

    options = {"tile": (TILE_SIZE, TILE_SIZE), "compression": "jpeg", "photometric": "rgb", "dtype": np.uint8}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(tiles(1), shape=(height, width, 3), subifds=levels - 1, **options)
        for level in range(1, levels):
            scale = 2**level
            shape = (math.ceil(height / scale), math.ceil(width / scale), 3)
            tif.write(tiles(scale), shape=shape, subfiletype=1, **options)


def run_job(base: str, slide: Path) -> tuple[dict, float, list[str]]:
    """(finished job, wall seconds submit -> succeeded as the client saw it, phases seen)."""
    session = requests.Session()
    form = {"image_url": f"file://{slide}", "mask": "auto", "top_k": "3", "model": "shapes"}
    sent = time.perf_counter()
    response = session.post(f"{base}/api/v1/jobs", files={k: (None, v) for k, v in form.items()}, timeout=60)
    response.raise_for_status()
    url = base + response.headers["Location"]
    phases: list[str] = []
    while True:
        job = session.get(url, timeout=30).json()
        if not phases or phases[-1] != job["phase"]:
            phases.append(job["phase"])
        if job["status"] in TERMINAL:
            break
        time.sleep(0.05)
    wall = time.perf_counter() - sent
    if job["status"] != JobStatus.succeeded:
        raise SystemExit(f"job failed: {job['error']}")
    return job, wall, phases


def tile_urls(base: str, job: dict, count: int) -> list[str]:
    """`count` distinct tiles of the three finest levels, spread over the slide."""
    width, height = job["image"]["width"], job["image"]["height"]
    top = level_count(width, height) - 1
    every = []
    for level in (top, top - 1, top - 2):
        scale = 2 ** (top - level)
        cols, rows = math.ceil(math.ceil(width / scale) / TILE_SIZE), math.ceil(math.ceil(height / scale) / TILE_SIZE)
        every += [(level, c, r) for r in range(rows) for c in range(cols)]
    picked = random.Random(3).sample(every, min(count, len(every)))
    return [f"{base}/api/v1/jobs/{job['id']}/dzi/image_files/{lv}/{c}_{r}.jpeg" for lv, c, r in picked]


def fetch_all(urls: list[str], parallel: int) -> tuple[list[float], list[float]]:
    """(first-request latencies, repeat latencies) in ms; each client repeats its own tiles on
    its own connection (so a repeat reaches the API process that cached it)."""
    first: list[float] = []
    again: list[float] = []
    lock = threading.Lock()

    def client(part: list[str]) -> None:
        session = requests.Session()
        mine_first, mine_again = [], []
        for url in part:
            mine_first.append(_timed_get(session, url))
        for url in part:
            mine_again.append(_timed_get(session, url))
        with lock:
            first.extend(mine_first)
            again.extend(mine_again)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(client, [urls[i::parallel] for i in range(parallel)]))
    return first, again


def _timed_get(session: requests.Session, url: str) -> float:
    start = time.perf_counter()
    response = session.get(url, timeout=60)
    elapsed = (time.perf_counter() - start) * 1000
    if response.status_code != 200 or response.headers.get("Content-Type") != "image/jpeg":
        raise SystemExit(f"{url}: {response.status_code} {response.text[:200]}")
    return elapsed


def files_under(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def report(size: tuple[int, int], job: dict, wall: float, phases: list[str], files: tuple[int, int]) -> None:
    timings = job["result"]["timings"]
    inference = timings["inference_s"]
    width, height = size
    print(f"\nslide {width}x{height} ({width * height / 1e6:.0f} MP), JPEG-tiled pyramidal BigTIFF by image_url")
    print("\n| measure | value |\n|---|---|")
    print(f"| wall time, submit -> succeeded | {wall:.1f} s |")
    print(f"| inference_s | {inference:.1f} s |")
    print(f"| wall / inference | {wall / inference:.2f}x (target <= 1.25x) |")
    print(f"| model_load_s + decode_s | {timings['model_load_s'] + timings['decode_s']:.1f} s |")
    print(f"| write_s (all writers) | {timings['write_s']:.2f} s |")
    for key in sorted(k for k in timings if k.startswith("write_") and k != "write_s"):
        print(f"| {key} | {timings[key]:.2f} s |")
    print(f"| files under the job's results | {files[0]} ({files[1] / 1e6:.1f} MB) |")
    print(f"| phases seen by polling | {' -> '.join(phases)} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="24000x20000", help="slide width x height (level 0)")
    parser.add_argument("--tiles", type=int, default=300, help="distinct tiles fetched")
    parser.add_argument("--parallel", type=int, default=6, help="concurrent tile clients (a browser uses 6)")
    parser.add_argument("--slow-clients", type=int, default=64)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    from scripts.embedded_redis import free_port

    with tempfile.TemporaryDirectory(prefix="bench-tiles-") as folder, ExitStack() as stack:
        slides = Path(folder) / "slides"
        slides.mkdir()
        clock = time.perf_counter()
        write_slide(slides / "slide.tif", width, height)
        print(f"slide written in {time.perf_counter() - clock:.1f} s")
        os.environ.update(DATA_DIR=str(Path(folder) / "data"), INPUT_URL_PREFIXES=f"file://{slides}")
        os.environ.setdefault("RATE_LIMIT_PER_MINUTE", "0")
        base, settings = start_stack(stack, free_port(), quiet=True)
        write_slide(slides / "warm-up.tif", 1024, 768, levels=2)
        run_job(base, slides / "warm-up.tif")  # the worker's model loaded and traced
        job, wall, phases = run_job(base, slides / "slide.tif")
        files = files_under(Path(settings.resolved_storage_url) / results_prefix(job["id"]))
        slow = SlowClients(base.rsplit("/", 1)[-1], args.slow_clients)  # host:port
        try:
            time.sleep(2.5)  # every slow connection reached the server and dripped once
            first, again = fetch_all(tile_urls(base, job, args.tiles), args.parallel)
        except BaseException:
            log = Path(folder) / "data" / "logs" / "api.log"
            if log.exists():  # the API's errors, without its access log
                print("\n".join(line for line in log.read_text().splitlines() if "GET /api" not in line)[-6000:])
            raise
        finally:
            slow.close()
    report((width, height), job, wall, phases, files)
    print(
        f"\nimage tiles through the API ({len(first)} distinct, {args.parallel} clients at once, "
        f"{args.slow_clients} slow clients connected):\n\n| request | p50 | p95 |\n|---|---|---|"
    )
    for name, values in (("first (read from the slide)", first), ("repeat (API cache)", again)):
        print(f"| {name} | {np.percentile(values, 50):.1f} ms | {np.percentile(values, 95):.1f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
