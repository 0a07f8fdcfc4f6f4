"""Metrics with Prometheus semantics, checked by a real Prometheus server (Debian's
`prometheus` package) that scrapes the API over HTTP: counters only go up, so `rate()`,
`increase()` and `histogram_quantile()` stay right after retention deletes the rows."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import pytest
import requests
from conftest import scene_png, stop_process, wait_for_port

from scripts.embedded_redis import free_port
from shared.jobs.reconcile import reconcile_once

TOKEN = "scrape-token"
# CI installs it (scripts/system-packages.txt); a developer without it gets a skip, CI a failure.
pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None and not os.environ.get("CI"), reason="Debian's prometheus is not installed"
)


def _serve(app):
    """The API on a real HTTP port (werkzeug's threaded server), for Prometheus to scrape."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _start_prometheus(tmp_path, api_port: int):
    port = free_port()
    config = tmp_path / "prometheus.yml"
    target = f"127.0.0.1:{api_port}"
    config.write_text(
        f"""global:
  scrape_interval: 1s
scrape_configs:
  - job_name: heatmaps
    authorization: {{credentials: {TOKEN}}}
    static_configs: [{{targets: ["{target}"]}}]
  - job_name: no-token
    static_configs: [{{targets: ["{target}"]}}]
"""
    )
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_for_port(port, proc)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60  # the port opens before the TSDB is up (queries answer 503)
    while requests.get(f"{base}/-/ready", timeout=5).status_code != 200:
        assert time.monotonic() < deadline and proc.poll() is None, "prometheus never became ready"
        time.sleep(0.2)
    return proc, base


def _query(base: str, promql: str) -> dict[str, float]:
    """Instant query: {label set as text: value}."""
    response = requests.get(f"{base}/api/v1/query", params={"query": promql}, timeout=10)
    assert response.status_code == 200, response.text
    return {str(item["metric"]): float(item["value"][1]) for item in response.json()["data"]["result"]}


def _scalar(base: str, promql: str) -> float:
    values = list(_query(base, promql).values())
    assert len(values) == 1, (promql, values)
    return values[0]


def _wait_value(base: str, promql: str, expected: float, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(_query(base, promql).values()) == [expected]:
            return
        time.sleep(0.5)
    raise AssertionError(f"{promql} never became {expected}: {_query(base, promql)}")


@pytest.mark.slow
def test_prometheus_rates_and_quantiles_survive_retention(fresh_stack, tmp_path):
    stack = fresh_stack(metrics_token=TOKEN)
    stack.start_worker()
    server = _serve(stack.app)
    prometheus, base = _start_prometheus(tmp_path, server.server_port)
    try:
        client = stack.client()
        assert client.get("/metrics").status_code == 401  # the token is required
        # Prometheus must have seen the counters at 0 before the jobs run: increase() counts
        # from a series' first sample, and a quick job could finish before the first scrape.
        _wait_value(base, 'heatmap_jobs_finished_total{outcome="succeeded"}', 0)
        image, _ = scene_png(160, 128)
        ids = [stack.submit(client, image).json["id"] for _ in range(4)]
        ids += [stack.submit(client, image, mode="tiled", batch_size=4).json["id"]]
        broken = stack.submit(client, image[: len(image) // 2]).json["id"]  # header fine, pixels cut: fails
        rows = [stack.wait_for(client, job_id) for job_id in ids]
        assert stack.wait_for(client, broken)["status"] == "failed"
        slow = stack.submit(client, scene_png(320, 256)[0], mode="tiled", stride=2).json["id"]
        assert client.delete(f"/api/v1/jobs/{slow}").status_code == 202
        assert {row["status"] for row in rows} == {"succeeded"}
        jobs = [stack.job_row(job_id) for job_id in ids]
        durations = [(job.finished_at - job.started_at).total_seconds() for job in jobs]
        tiles_per_second = sum(job.units_total for job in jobs) / sum(job.inference_seconds for job in jobs)
        _wait_value(base, 'heatmap_jobs_finished_total{outcome="succeeded"}', 5)

        # Retention deletes every finished row: gauges drop, counters do not.
        expire = stack.settings.model_copy(update={"retention_hours": 1e-9})
        time.sleep(0.1)
        assert len(reconcile_once(expire).deleted) == 7
        _wait_value(base, 'heatmap_jobs{job="heatmaps",status="succeeded"}', 0)
        time.sleep(3)  # a few more scrapes after the delete

        window = "[5m]"
        assert _query(base, f"resets(heatmap_jobs_finished_total{window})") and all(
            value == 0 for value in _query(base, f"resets(heatmap_jobs_finished_total{window})").values()
        )
        for outcome, count in (("succeeded", 5), ("failed", 1), ("canceled", 1)):
            increase = _scalar(base, f'increase(heatmap_jobs_finished_total{{outcome="{outcome}"}}{window})')
            assert count <= increase <= count * 1.5, (outcome, increase)  # extrapolation only adds
            assert _scalar(base, f'rate(heatmap_jobs_finished_total{{outcome="{outcome}"}}{window})') > 0

        buckets = f"sum by (le) (rate(heatmap_job_duration_seconds_bucket{window}))"
        median = _scalar(base, f"histogram_quantile(0.5, {buckets})")
        bounds = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
        low = max([b for b in bounds if b < min(durations)], default=0.0)
        high = min(b for b in bounds if b >= max(durations))
        assert low <= median <= high, (median, durations)
        assert median <= _scalar(base, f"histogram_quantile(0.99, {buckets})") <= high

        ratio = _scalar(
            base, f"sum(rate(heatmap_tiles_total{window})) / sum(rate(heatmap_inference_seconds_total{window}))"
        )
        assert ratio == pytest.approx(tiles_per_second, rel=0.01)
        assert _query(base, "up") == {
            str({"__name__": "up", "instance": f"127.0.0.1:{server.server_port}", "job": "heatmaps"}): 1.0,
            str({"__name__": "up", "instance": f"127.0.0.1:{server.server_port}", "job": "no-token"}): 0.0,
        }
    finally:
        stop_process(prometheus)
        server.shutdown()
