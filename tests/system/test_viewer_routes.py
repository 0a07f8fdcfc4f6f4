"""The viewer's data routes (/api/v1/jobs/<id>/viewer and /dzi/...) over the real stack:
the worker writes the pyramids, the API serves them behind the key, to the job's owner only;
the web page's HTML is served without a key; Swagger UI comes from the service itself."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET

from conftest import scene_png
from PIL import Image

from shared.jobs.job_status import JobStatus


def test_viewer_files_of_a_job(service):
    alice, bob, anonymous = service.client("alice"), service.client("bob"), service.client(None)
    image, objects = scene_png(640, 384, seed=5, n_objects=2)
    job = service.submit(alice, image, model="shapes").json
    body = service.wait_for(alice, job["id"])
    assert body["status"] == JobStatus.succeeded
    base = f"/api/v1/jobs/{job['id']}"

    manifest = alice.get(f"{base}/viewer")
    assert manifest.status_code == 200 and manifest.mimetype == "application/json"
    viewer = manifest.json
    assert (viewer["image"]["width"], viewer["image"]["height"]) == (640, 384)
    assert [c["name"] for c in viewer["classes"]] == [c["name"] for c in body["result"]["classes"]]
    grid = viewer["grid"]
    assert len(grid["scores"]) == len(viewer["classes"]) and len(grid["scores"][0]) == len(grid["rows"])

    descriptor = alice.get(f"{base}/dzi/image.dzi")
    assert descriptor.status_code == 200
    size = ET.fromstring(descriptor.data).find("{http://schemas.microsoft.com/deepzoom/2008}Size")
    assert (size.get("Width"), size.get("Height")) == ("640", "384")
    tile = alice.get(f"{base}/dzi/image_files/10/2_1.jpeg")  # level 10 = full size: 640 = 256 + 256 + 128
    assert tile.status_code == 200 and tile.mimetype == "image/jpeg"
    assert Image.open(io.BytesIO(tile.data)).size == (128, 128)
    heat = viewer["classes"][0]["layer"]
    heat_tile = alice.get(f"{base}/dzi/{heat['name']}_files/{heat['min_level']}/0_0.png")
    assert heat_tile.status_code == 200 and Image.open(io.BytesIO(heat_tile.data)).mode == "RGBA"

    # Behind the key, to the owner only, and nothing outside the viewer folder.
    for path in (f"{base}/viewer", f"{base}/dzi/image.dzi", f"{base}/dzi/image_files/10/2_1.jpeg"):
        assert anonymous.get(path).status_code == 401
        assert bob.get(path).status_code == 404
    for bad in ("dzi/summary.dzi", "dzi/image_files/99/0_0.jpeg", "dzi/image_files/10/0_0.npz", "dzi/..%2Fsummary.dzi"):
        response = alice.get(f"{base}/{bad}")
        assert response.status_code == 404 and response.json["error"]["code"] == "not_found", bad

    # Deleting the job deletes its pyramids.
    assert alice.delete(base).status_code == 204
    assert alice.get(f"{base}/dzi/image.dzi").status_code == 404


def test_viewer_of_an_unfinished_job_is_409(fresh_stack):
    stack = fresh_stack()  # no worker: the job stays queued
    alice = stack.client("alice")
    image, _ = scene_png(128, 128)
    job = stack.submit(alice, image, model="shapes").json
    response = alice.get(f"/api/v1/jobs/{job['id']}/viewer")
    assert response.status_code == 409 and response.json["error"]["code"] == "job_not_finished"


def test_pages_and_assets_need_no_key_and_name_no_other_host(app):
    client = app.test_client()  # keys are on in this app; the page asks for one itself
    for path in ("/", "/jobs", "/jobs/0123456789abcdef0123456789abcdef", "/api/v1/docs"):
        response = client.get(path)
        assert response.status_code == 200 and response.mimetype == "text/html", path
        html = response.get_data(as_text=True)
        assert "http://" not in html and "https://" not in html and "//cdn" not in html, path
    page = client.get("/")
    assert "connect-src 'self'" in page.headers["Content-Security-Policy"]
    assert '"auth_required": true' in page.get_data(as_text=True)
    for asset in (
        "/static/app.js",
        "/static/app.css",
        "/static/vendor/openseadragon/openseadragon.min.js",
        "/static/vendor/swagger-ui/swagger-ui-bundle.js",
        "/static/vendor/swagger-ui/swagger-ui.css",
    ):
        assert client.get(asset).status_code == 200, asset
    assert client.get("/api/v1/jobs").status_code == 401  # the data still needs the key
