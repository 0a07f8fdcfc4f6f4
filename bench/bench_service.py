"""Service overhead benchmark: what the job system adds around inference.

    python -m bench.bench_service [--jobs 200] [--clients 50] [--seconds 20]
                                  [--precisions float32 bfloat16]

Starts the embedded stack (SQLite, local storage, embedded Redis, gunicorn API, one warm
worker), then:

1. submits `--jobs` small jobs one after another to the idle worker with the bundled model,
   and reports median and p95 of submit -> running (the row's `started_at` minus the moment
   the client sent the request) and of the service overhead (end to end, up to the row's
   `finished_at`, minus the job's own inference seconds); once per `--precisions` entry
   (the job's `precision` field; the worker keeps a warm copy per precision);
2. polls a job's status from `--clients` concurrent clients for `--seconds` and reports
   requests per second, p50/p99 latency and the error count.

Timestamps come from one machine's clock (client and server run here).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import threading
import time
from contextlib import ExitStack
from datetime import datetime

import numpy as np
import requests
from PIL import Image

from scripts.devstack import start_stack
from shapes.scenes import generate_scene
from shared.jobs.job_status import TERMINAL, JobStatus


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def submit_latencies(base: str, jobs: int, precision: str = "float32") -> dict:
    image, _ = generate_scene(256, 256, n_objects=1, seed=1)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    payload = buffer.getvalue()
    session = requests.Session()
    to_running, overhead, end_to_end, inference = [], [], [], []
    for i in range(jobs + 5):
        sent = time.time()
        response = session.post(
            f"{base}/api/v1/jobs",
            files={"image": ("s.png", payload, "image/png")},
            data={"classes": "circle", "precision": precision},
            timeout=30,
        )
        response.raise_for_status()
        url = base + response.headers["Location"]
        while True:
            job = session.get(url, timeout=30).json()
            if job["status"] in TERMINAL:
                break
            time.sleep(0.002)
        if job["status"] != JobStatus.succeeded:
            raise SystemExit(f"job failed: {job}")
        if i < 5:
            continue  # warm-up: first requests open connections and trace the model
        started = datetime.fromisoformat(job["started_at"]).timestamp()
        finished = datetime.fromisoformat(job["finished_at"]).timestamp()
        infer = job["result"]["timings"]["inference_s"]
        to_running.append((started - sent) * 1000)
        end_to_end.append((finished - sent) * 1000)
        inference.append(infer * 1000)
        overhead.append((finished - sent - infer) * 1000)
    if job["params"].get("precision") != precision:
        raise SystemExit(f"the job asked for {job['params'].get('precision')}, not {precision}")
    return {
        "jobs": jobs,
        "precision": precision,
        "submit_to_running_ms": {"p50": percentile(to_running, 50), "p95": percentile(to_running, 95)},
        "overhead_ms": {"p50": percentile(overhead, 50), "p95": percentile(overhead, 95)},
        "end_to_end_ms": {"p50": percentile(end_to_end, 50), "p95": percentile(end_to_end, 95)},
        "inference_ms": {"p50": percentile(inference, 50)},
    }


def polling_load(base: str, clients: int, seconds: float) -> dict:
    session = requests.Session()
    jobs = session.get(f"{base}/api/v1/jobs", params={"limit": 1}, timeout=10).json()["jobs"]
    url = base + jobs[0]["url"]
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client():
        own = requests.Session()
        mine, failed = [], 0
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            try:
                ok = own.get(url, timeout=10).status_code == 200
            except requests.RequestException:
                ok = False
            mine.append((time.perf_counter() - start) * 1000)
            failed += not ok
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    threads = [threading.Thread(target=client) for _ in range(clients)]
    begun = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - begun
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "errors": errors[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument("--precisions", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    args = parser.parse_args()
    from scripts.embedded_redis import free_port

    os.environ.setdefault("RATE_LIMIT_PER_MINUTE", "0")  # 200 submissions in a row are the point here
    os.environ.setdefault("MAX_ACTIVE_JOBS_PER_KEY", "0")
    with ExitStack() as stack:
        base, _ = start_stack(stack, free_port(), quiet=True)
        latencies = [submit_latencies(base, args.jobs, precision) for precision in args.precisions]
        load = polling_load(base, args.clients, args.seconds)
    print("\n| measure | precision | p50 | p95 |\n|---|---|---|---|")
    for latency in latencies:
        for key in ("submit_to_running_ms", "overhead_ms", "end_to_end_ms"):
            print(
                f"| {key} ({latency['jobs']} jobs) | {latency['precision']} "
                f"| {latency[key]['p50']:.1f} | {latency[key]['p95']:.1f} |"
            )
        print(
            f"| inference_ms (bundled model, 256x256) | {latency['precision']} "
            f"| {latency['inference_ms']['p50']:.1f} | |"
        )
    print(
        f"\nstatus polling: {load['clients']} clients for {load['seconds']} s: {load['rps']:.0f} req/s, "
        f"p50 {load['p50_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms, errors {load['errors']} of {load['requests']}"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"latency": latencies, "polling": load}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
