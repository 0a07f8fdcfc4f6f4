"""End to end over real parts: HTTP -> Redis -> Celery worker process -> database + storage."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pytest
from conftest import scene_png
from PIL import Image


def test_submit_poll_download_matches_engine(service, tmp_path):
    client = service.client()
    image, objects = scene_png(384, 320, seed=11, n_objects=2)
    response = service.submit(client, image, model="shapes", mode="direct", top_k=3)
    assert response.status_code == 202, response.json
    job = response.json
    assert response.headers["Location"] == f"/api/v1/jobs/{job['id']}"
    assert job["status"] in ("queued", "running", "succeeded")
    assert job["image"]["width"] == 384 and job["image"]["height"] == 320
    done = service.wait_for(client, job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1.0 and done["attempts"] == 1 and done["worker"]
    assert done["started_at"] and done["finished_at"]
    result = done["result"]
    assert len(result["classes"]) == 3

    heatmap = client.get(result["heatmap_url"])
    assert heatmap.status_code == 200
    served = np.load(io.BytesIO(heatmap.data))
    summary = client.get(result["summary_url"]).json
    assert summary["classes"][0]["name"] == result["classes"][0]["name"]
    overlay = client.get(result["classes"][0]["overlay_url"])
    assert overlay.status_code == 200 and overlay.mimetype == "image/png"
    png = Image.open(io.BytesIO(overlay.data))
    legend = summary["overlay"]["legend_height"]  # the legend strip under the map
    assert png.size == (summary["overlay_size"]["width"], summary["overlay_size"]["height"] + legend)

    # The same engine run in this process gives the same numbers.
    from shared.jobspec import JobParams
    from worker.engine import run_inference
    from worker.inference.model_registry import ModelRegistry

    path = tmp_path / "scene.png"
    path.write_bytes(image)
    registry = ModelRegistry(service.settings.model_dirs)
    local = run_inference(path, JobParams.from_json(done["params"]), registry, tmp_path / "out", max_pixels=10**8)
    expected = np.load(tmp_path / "out" / "heatmap.npz")
    np.testing.assert_allclose(served["scores"], expected["scores"], atol=1e-5)
    assert list(served["classes"]) == list(expected["classes"])
    assert [c["peak"] for c in local["classes"]] == [c["peak"] for c in result["classes"]]


def test_tiled_job_and_explicit_classes(service):
    client = service.client()
    image, _ = scene_png(256, 192, seed=3)
    response = service.submit(client, image, mode="tiled", stride=32, batch_size=8, classes="circle,square")
    assert response.status_code == 202, response.json
    done = service.wait_for(client, response.json["id"])
    assert done["status"] == "succeeded", done
    assert [c["name"] for c in done["result"]["classes"]] == ["circle", "square"]
    assert done["result"]["grid"]["stride"] == {"y": 32, "x": 32}


def test_idempotency_key_returns_the_same_job(service):
    client = service.client()
    image, _ = scene_png(200, 200, seed=5)
    key = uuid.uuid4().hex
    first = service.submit(client, image, headers={"Idempotency-Key": key})
    second = service.submit(client, image, headers={"Idempotency-Key": key})
    assert first.status_code == 202 and second.status_code == 200
    assert first.json["id"] == second.json["id"]
    other_owner = service.submit(service.client("bob"), image, headers={"Idempotency-Key": key})
    assert other_owner.status_code == 202 and other_owner.json["id"] != first.json["id"]


def test_cancel_running_job_stops_it(service):
    client = service.client()
    image, _ = scene_png(1600, 1200, seed=7, n_objects=4)
    response = service.submit(client, image, mode="tiled", stride=4, batch_size=8)
    assert response.status_code == 202
    job_id = response.json["id"]
    service.wait_for(client, job_id, statuses=("running",), predicate=lambda b: b["progress"] > 0, timeout=120)
    canceled = client.delete(f"/api/v1/jobs/{job_id}")
    assert canceled.status_code == 202 and canceled.json["status"] == "canceled"
    # The worker notices within one batch and is free for the next job.
    follow_up = service.submit(client, scene_png(200, 200, seed=8)[0])
    assert service.wait_for(client, follow_up.json["id"], timeout=60)["status"] == "succeeded"
    row = service.job_row(job_id)
    assert row.status == "canceled" and row.result is None
    assert client.get(f"/api/v1/jobs/{job_id}/heatmap").status_code == 409
    # Deleting a finished job removes it and its files.
    assert client.delete(f"/api/v1/jobs/{job_id}").status_code == 204
    assert client.get(f"/api/v1/jobs/{job_id}").status_code == 404
    assert not (service.tmp_path / "storage" / "uploads" / job_id).exists()


def test_list_filter_and_paginate(service):
    client = service.client("bob")
    ids = []
    for seed in range(3):
        response = service.submit(client, scene_png(160, 160, seed=100 + seed)[0], classes="circle")
        ids.append(response.json["id"])
    for job_id in ids:
        service.wait_for(client, job_id)
    seen, cursor = [], None
    while True:
        query = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/api/v1/jobs", query_string=query)
        assert page.status_code == 200
        seen += [job["id"] for job in page.json["jobs"]]
        cursor = page.json["next_cursor"]
        if not cursor:
            break
    mine = [job_id for job_id in seen if job_id in ids]
    assert mine == list(reversed(ids))  # newest first
    assert len(seen) == len(set(seen))
    succeeded = client.get("/api/v1/jobs", query_string={"status": "succeeded", "limit": 200}).json["jobs"]
    assert {job["status"] for job in succeeded} == {"succeeded"}
    assert client.get("/api/v1/jobs", query_string={"status": "nope"}).status_code == 400
    assert client.get("/api/v1/jobs", query_string={"cursor": "!!!"}).status_code == 400
    # alice cannot see bob's jobs
    alice = service.client("alice")
    assert all(job["id"] not in ids for job in alice.get("/api/v1/jobs?limit=200").json["jobs"])
    assert alice.get(f"/api/v1/jobs/{ids[0]}").status_code == 404
    assert alice.get(f"/api/v1/jobs/{ids[0]}/heatmap").status_code == 404


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/jobs/0123456789abcdef0123456789abcdef",
        "/api/v1/jobs/not-an-id",
        "/api/v1/jobs/..%2F..%2Fetc%2Fpasswd",
        "/api/v1/jobs/0123456789abcdef0123456789abcdef/overlays/..%2Fsummary",
        "/api/v1/jobs/%00",
    ],
)
def test_unknown_and_malformed_ids_are_404(service, path):
    response = service.client().get(path)
    assert response.status_code == 404
    assert response.json["error"]["code"] == "not_found"


def test_models_endpoint(service):
    body = service.client().get("/api/v1/models").json
    shapes = next(m for m in body["models"] if m["name"] == "shapes")
    assert shapes["input_size"] == {"height": 64, "width": 64}
    assert shapes["preprocess"] == "tf" and "circle" in shapes["classes"]
    vgg = next(m for m in body["models"] if m["name"] == "vgg16")
    assert vgg["num_classes"] == 1000 and vgg["preprocess"] == "caffe"


def test_metrics_and_readiness(service):
    client = service.client()
    assert client.get("/readyz").status_code == 200
    text = client.get("/metrics").data.decode()
    assert 'heatmap_jobs{status="succeeded"}' in text
    assert f'heatmap_queue_depth{{queue="{service.settings.queue_name}"}}' in text
    assert "heatmap_job_duration_seconds_bucket" in text


def test_summary_json_is_served(service):
    client = service.client()
    response = service.submit(client, scene_png(200, 180, seed=21)[0], top_k=1)
    done = service.wait_for(client, response.json["id"])
    summary = client.get(done["result"]["summary_url"])
    assert summary.mimetype == "application/json"
    data = json.loads(summary.data)
    assert data["image"] == {"width": 200, "height": 180} and data["mode"] == "direct"


def _encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def test_corrupt_images_fail_their_job_and_the_worker_stays_up(service):
    client = service.client()
    rng = np.random.default_rng(4)
    jpeg = _encoded(Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)), "JPEG")
    tiff = bytearray(
        _encoded(
            Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)),
            "TIFF",
            compression="tiff_adobe_deflate",
        )
    )
    strip = Image.open(io.BytesIO(bytes(tiff))).tag_v2[273][0]  # StripOffsets: keep the header intact
    tiff[strip + 16 : strip + 1016] = b"\xff" * 1000  # corrupt the compressed strip
    for payload in (jpeg[: len(jpeg) // 2], bytes(tiff)):
        response = service.submit(client, payload)
        assert response.status_code == 202, response.json  # the header is fine
        done = service.wait_for(client, response.json["id"])
        assert done["status"] == "failed" and done["error"]["code"] == "corrupt_image", done
        assert done["attempts"] == 1
        assert not (service.tmp_path / "storage" / "uploads" / done["id"]).exists()  # nothing left behind
    ok = service.submit(client, scene_png(160, 160, seed=2)[0])
    assert service.wait_for(client, ok.json["id"])["status"] == "succeeded"


def test_unusual_pixel_formats_succeed(service):
    client = service.client()
    scene = Image.open(io.BytesIO(scene_png(192, 160, seed=6)[0]))
    gray16 = Image.fromarray(np.asarray(scene.convert("L"), dtype=np.uint16) * 257)
    variants = {
        "16-bit PNG": _encoded(gray16, "PNG"),
        "CMYK JPEG": _encoded(scene.convert("CMYK"), "JPEG", quality=95),
        "palette PNG": _encoded(scene.convert("P"), "PNG"),
        "alpha PNG": _encoded(scene.convert("RGBA"), "PNG"),
        "16-bit TIFF": _encoded(gray16, "TIFF"),
    }
    ids = {name: service.submit(client, data).json["id"] for name, data in variants.items()}
    for name, job_id in ids.items():
        done = service.wait_for(client, job_id)
        assert done["status"] == "succeeded", (name, done)
