"""Issue 20's bounds, measured (printed, not asserted):

    python -m bench.bench_reliability

1. How long the header check takes to refuse the two TIFF bombs (an 18 KB file declaring
   190000x190000 with every byte count 0; a 40960x40960 file whose tiles share one deflate
   blob), and to open a sparse file that stores 1 in 4 of its tiles.
2. How long one webhook attempt against a receiver that trickles one header byte per second
   (tests/webhook_receiver.py, /trickle/1/) holds its thread, per WEBHOOK_DEADLINE_S, with a
   2 s socket timeout that the trickle never trips.
"""

from __future__ import annotations

import io
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from scripts.embedded_redis import free_port
from shared.image_sources.source_opener import probe_source
from shared.image_sources.source_types import ImageError
from shared.settings import REPO_ROOT, Settings
from shared.webhook_signing import check_destination
from tests.slide_inputs import tiled_tiff
from worker.webhook_delivery import post

LIMITS = {"max_pixels": 200_000_000, "max_region_pixels": 40_000_000_000}


def _probe_ms(data: bytes, runs: int = 5) -> tuple[float, str]:
    times, outcome = [], ""
    for _ in range(runs):
        started = time.perf_counter()
        try:
            outcome = f"accepted {probe_source(io.BytesIO(data), **LIMITS).width} px wide"
        except ImageError as exc:
            outcome = exc.code
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), outcome


def bombs() -> None:
    blob = zlib.compress(np.zeros((4096, 4096, 3), np.uint8).tobytes(), 9)
    tiles = {i: zlib.compress(np.full((64, 64, 3), i, np.uint8).tobytes()) for i in range(16)}
    cases = {
        "190000^2, every byte count 0": tiled_tiff(190_000, 190_000, 4096, lambda i, n: b""),
        "40960^2, one shared deflate blob": tiled_tiff(40_960, 40_960, 4096, lambda i, n: blob),
        "512^2, 1 in 4 tiles stored": tiled_tiff(512, 512, 64, lambda i, n: tiles[i // 4] if i % 4 == 0 else b""),
    }
    for name, data in cases.items():
        ms, outcome = _probe_ms(data)
        print(f"header check  {name:34s} {len(data) / 1024:7.1f} KB  {ms:7.1f} ms  {outcome}")


def webhook_deadline() -> None:
    port = free_port()
    log = Path("/tmp") / f"bench-receiver-{port}.jsonl"
    receiver = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "webhook_receiver.py"), str(port), str(log)])
    try:
        time.sleep(1.5)
        settings = Settings(
            webhook_secret="x", webhook_allowed_hosts=["127.0.0.1"], webhook_allowed_networks=["127.0.0.0/8"]
        )
        destination = check_destination(f"http://127.0.0.1:{port}/trickle/1/bench", settings)
        for deadline in (2.0, 4.0, 8.0):
            started = time.perf_counter()
            try:
                post(destination, b"{}", {}, 2.0, deadline)
                outcome = "delivered (wrong)"
            except Exception as exc:
                outcome = type(exc).__name__
            held = time.perf_counter() - started
            print(f"webhook attempt, trickling receiver, deadline {deadline:4.1f} s: held {held:5.2f} s  {outcome}")
    finally:
        receiver.terminate()
        receiver.wait()
        log.unlink(missing_ok=True)


if __name__ == "__main__":
    bombs()
    webhook_deadline()
