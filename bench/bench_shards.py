"""One job on many workers (issue 16), measured through the whole service (printed, not asserted):

    python -m bench.bench_shards [--sizes 2048 4096] [--precision bfloat16]

VGG16 with random weights as a user model, direct mode, on a random image of each size.
Each configuration starts the embedded stack (gunicorn API, embedded Redis, SQLite, local
storage) with its own worker processes (``scripts/devstack.py``'s ``--workers`` and
``--worker-threads``), runs the job twice (the first traces the compiled calls of its shapes:
a cold worker; the second is what a warm worker does) and reports both:

* ``1 worker x 1 thread, shards=1``: t1, today's job;
* ``2 workers x 1 thread, shards=auto``: t2, and the scaling efficiency t1 / (2 * t2);
* ``1 worker x 1 thread, shards=4``: what sharding costs when no other worker is idle.

Wall time is the job's own (the row's created_at to finished_at: queueing, planning, the
shards, assembly, writing, storing), on one machine's clock.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime

import numpy as np
import requests
from PIL import Image

from scripts.devstack import start_stack
from scripts.embedded_redis import free_port
from shared.jobs.job_status import TERMINAL, JobStatus

CONFIGS = (
    ("1 worker x 1 thread, shards=1", 1, 1, "1"),
    ("2 workers x 1 thread, shards=auto", 2, 1, "auto"),
    ("1 worker x 1 thread, shards=4", 1, 1, "4"),
    # The machine's own limit: two whole jobs at once on the two workers, no seams at all.
    ("2 workers x 1 thread, two shards=1 jobs at once", 2, 1, "pair"),
)


def _save_model(folder: str) -> str:
    import keras

    keras.utils.set_random_seed(0)
    keras.applications.VGG16(weights=None).save(os.path.join(folder, "vgg16_random.keras"))
    sidecar = {"classes": [f"class_{i}" for i in range(1000)], "preprocess": "caffe", "input_size": [224, 224]}
    with open(os.path.join(folder, "vgg16_random.json"), "w") as handle:
        json.dump(sidecar, handle)
    return "vgg16_random"


def _png(size: int) -> bytes:
    pixels = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _run_job(base: str, model: str, image: bytes, shards: str, precision: str) -> dict:
    response = requests.post(
        f"{base}/api/v1/jobs",
        files={"image": ("image.png", image, "image/png")},
        data={"model": model, "mode": "direct", "top_k": "3", "shards": shards, "precision": precision},
        timeout=120,
    )
    response.raise_for_status()
    url = base + response.headers["Location"]
    while True:
        body = requests.get(url, timeout=30).json()
        if body["status"] in TERMINAL:
            break
        time.sleep(0.5)
    if body["status"] != JobStatus.succeeded:
        raise SystemExit(f"job failed: {body['error']}")
    created, finished = (datetime.fromisoformat(body[key]) for key in ("created_at", "finished_at"))
    timings = body["result"]["timings"]
    return {
        "wall_s": (finished - created).total_seconds(),
        "inference_s": timings["inference_s"],
        "write_s": timings["write_s"],
        "shards": (body["shards"] or {}).get("count", 1),
        "workers": len((body["shards"] or {}).get("workers") or [1]),
    }


def _run_pair(base: str, model: str, image: bytes, precision: str) -> dict:
    """Two unsharded jobs submitted together; the slower one's figures."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: _run_job(base, model, image, "1", precision), range(2)))
    return max(results, key=lambda r: r["wall_s"])


def measure(model_dir: str, model: str, sizes: list[int], precision: str) -> list[dict]:
    images = {size: _png(size) for size in sizes}
    rows = []
    for name, workers, threads, shards in CONFIGS:
        with tempfile.TemporaryDirectory(prefix="bench_shards_") as data_dir, ExitStack() as stack:
            os.environ.update(
                DATA_DIR=data_dir,
                MODELS_DIR=model_dir,
                WORKER_PRELOAD_MODELS=model,
                WORKER_PRECISION=precision,
                RATE_LIMIT_PER_MINUTE="0",
                MAX_ACTIVE_JOBS_PER_KEY="0",
                MAX_UPLOAD_MB="2048",
            )
            base, _ = start_stack(stack, free_port(), quiet=True, workers=workers, worker_threads=threads)
            for size in sizes:
                for run in ("cold", "warm"):
                    result = (
                        _run_pair(base, model, images[size], precision)
                        if shards == "pair"
                        else (_run_job(base, model, images[size], shards, precision))
                    )
                    rows.append({"config": name, "size": size, "run": run} | result)
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def report(rows: list[dict]) -> None:
    def find(config: str, size: int, run: str) -> dict:
        return next(r for r in rows if r["config"] == config and r["size"] == size and r["run"] == run)

    print("\n| image | run | configuration | shards | job wall s | inference s | write s | vs t1 |")
    print("|---|---|---|---|---|---|---|---|")
    for size in sorted({r["size"] for r in rows}):
        for run in ("cold", "warm"):
            t1 = find(CONFIGS[0][0], size, run)["wall_s"]
            for name, *_ in CONFIGS:
                r = find(name, size, run)
                print(
                    f"| {size}^2 | {run} | {name} | {r['shards']} | {r['wall_s']:.1f} | {r['inference_s']:.1f} "
                    f"| {r['write_s']:.1f} | {r['wall_s'] / t1:.2f}x |"
                )
            t2 = find(CONFIGS[1][0], size, run)["wall_s"]
            cost = find(CONFIGS[2][0], size, run)["wall_s"] / t1
            print(
                f"| {size}^2 | {run} | scaling efficiency t1 / (2 t2) = **{t1 / (2 * t2):.2f}**; "
                f"shards=4 on one worker costs **{cost:.2f}x** | | | | | |"
            )


def seams(model_dir: str, model: str, sizes: list[int]) -> None:
    """What a seam costs: the analysis rows both neighbours of a band compute (the halo on each
    side plus the head's span), and the count `auto` picks with 2 live workers."""
    from worker.inference.model_registry import ModelRegistry
    from worker.inference.shard_bands import GridGeometry, auto_shard_count

    fcn = ModelRegistry([model_dir]).load(model).fcn
    for size in sizes:
        geometry = GridGeometry.direct(fcn, size, size)
        count = auto_shard_count(geometry, None, 2)
        seam = geometry.seam_rows()
        extra = seam * (count - 1) / size
        print(f"{size}^2: auto on 2 workers = {count} shards; each seam recomputes {seam} rows", end="")
        print(f" ({extra:.0%} more trunk rows in all)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--precision", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_models_") as model_dir:
        model = _save_model(model_dir)
        seams(model_dir, model, args.sizes)
        rows = measure(model_dir, model, args.sizes, args.precision)
    report(rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
