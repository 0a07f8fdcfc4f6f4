"""The viewer's image tiles read on demand from the job's input (issue 17), over the real stack:
a tile equals the source region resized (within JPEG error) for an upload, a pyramidal slide
by reference and an s3:// input on the moto server; strong caching (ETag, 304, immutable);
access as for every artifact; and the worker writes no copy of the image."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import scene_png
from PIL import Image
from slide_inputs import make_slide, write_pyramid_tiff

from shared.image_sources.dzi_geometry import TILE_SIZE, level_count, min_level
from shared.jobs.job_status import JobStatus
from shared.storage import results_prefix


def expected_tile(pixels: np.ndarray, level: int, col: int, row: int) -> np.ndarray:
    """The tile computed from the whole image in the test: the level-0 box, area-averaged."""
    height, width = pixels.shape[:2]
    scale = 2 ** (level_count(width, height) - 1 - level)
    level_w, level_h = math.ceil(width / scale), math.ceil(height / scale)
    tile_w, tile_h = min(TILE_SIZE, level_w - col * TILE_SIZE), min(TILE_SIZE, level_h - row * TILE_SIZE)
    x0, y0 = col * TILE_SIZE * scale, row * TILE_SIZE * scale
    box = pixels[y0 : min(height, y0 + tile_h * scale), x0 : min(width, x0 + tile_w * scale)]
    return np.asarray(Image.fromarray(box).resize((tile_w, tile_h), Image.Resampling.BOX)).astype(np.int16)


def served_tile(client, job_id: str, level: int, col: int, row: int) -> np.ndarray:
    response = client.get(f"/api/v1/jobs/{job_id}/dzi/image_files/{level}/{col}_{row}.jpeg")
    assert response.status_code == 200 and response.mimetype == "image/jpeg", response.data[:200]
    return np.asarray(Image.open(io.BytesIO(response.data)).convert("RGB")).astype(np.int16)


def assert_tiles_match(client, job_id: str, pixels: np.ndarray, tiles, tolerance: float = 3.0) -> None:
    for level, col, row in tiles:
        got, want = served_tile(client, job_id, level, col, row), expected_tile(pixels, level, col, row)
        assert got.shape == want.shape, (level, col, row)
        error = float(np.abs(got - want).mean())
        assert error < tolerance, f"tile {level}/{col}_{row}: mean error {error:.2f}"


def every_tile(width: int, height: int):
    top = level_count(width, height) - 1
    for level in range(min_level(width, height), top + 1):
        scale = 2 ** (top - level)
        for row in range(math.ceil(math.ceil(height / scale) / TILE_SIZE)):
            for col in range(math.ceil(math.ceil(width / scale) / TILE_SIZE)):
                yield level, col, row


def smooth_scene(width: int, height: int) -> np.ndarray:
    """Photographic-ish content (gradients and soft shapes): JPEG error stays small, so a
    misplaced or mis-scaled tile stands out from the encoding error."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 128 + 100 * np.sin(xs / 41.0)
    green = 128 + 100 * np.cos(ys / 29.0)
    blue = 255 * ((xs + ys) / (width + height))
    return np.clip(np.stack([red, green, blue], axis=2), 0, 255).astype(np.uint8)


def test_uploaded_image_tiles_are_the_source_resized_and_cached(service):
    alice, bob, anonymous = service.client("alice"), service.client("bob"), service.client(None)
    pixels = smooth_scene(700, 530)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    job = service.submit(alice, buffer.getvalue(), model="shapes", top_k=1).json
    assert service.wait_for(alice, job["id"])["status"] == JobStatus.succeeded
    assert_tiles_match(alice, job["id"], pixels, every_tile(700, 530))

    # Nothing of the image under the job's results: the worker wrote no copy of it.
    root = Path(service.settings.resolved_storage_url) / results_prefix(job["id"])
    assert not list(root.rglob("image_files")) and not (root / "viewer" / "image.dzi").exists()

    # Strong caching: an ETag known before reading, 304 on revalidation, immutable.
    path = f"/api/v1/jobs/{job['id']}/dzi/image_files/{level_count(700, 530) - 1}/1_1.jpeg"
    first = alice.get(path)
    assert "immutable" in first.headers["Cache-Control"] and "private" in first.headers["Cache-Control"]
    etag = first.headers["ETag"]
    assert etag.startswith('"') and not etag.startswith("W/")
    again = alice.get(path, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.data == b"" and again.headers["ETag"] == etag
    stats = service.app.extensions["heatmaps"].tiles.stats
    hits = stats["hits"]
    assert alice.get(path).data == first.data and stats["hits"] == hits + 1  # from the API's cache
    descriptor = alice.get(f"/api/v1/jobs/{job['id']}/dzi/image.dzi")
    assert descriptor.status_code == 200 and b'Width="700" Height="530"' in descriptor.data

    # Access as for every artifact: another key's job does not exist, no key is 401.
    assert bob.get(path).status_code == 404 and bob.get(path, headers={"If-None-Match": etag}).status_code == 404
    assert anonymous.get(path).status_code == 401
    for bad in ("image_files/0/0_0.jpeg", "image_files/10/9_0.jpeg", "image_files/10/0_0.png"):
        response = alice.get(f"/api/v1/jobs/{job['id']}/dzi/{bad}")
        assert response.status_code == 404 and response.json["error"]["code"] == "not_found", bad
    assert alice.delete(f"/api/v1/jobs/{job['id']}").status_code == 204
    assert alice.get(path).status_code == 404  # the cached tile is not served past its row


def test_a_tile_of_an_input_gone_from_storage_is_410(service):
    alice = service.client("alice")
    image, _ = scene_png(256, 192, seed=9)
    job = service.submit(alice, image, model="shapes", top_k=1).json
    assert service.wait_for(alice, job["id"])["status"] == JobStatus.succeeded
    (Path(service.settings.resolved_storage_url) / service.job_row(job["id"]).image_key).unlink()
    response = alice.get(f"/api/v1/jobs/{job['id']}/dzi/image_files/{level_count(256, 192) - 1}/0_0.jpeg")
    assert response.status_code == 410 and response.json["error"]["code"] == "input_unavailable"
    assert "/" not in response.json["error"]["message"]  # no server path


@pytest.fixture(scope="module")
def slide_stack(tmp_path_factory, redis_server):
    from conftest import Stack, make_database

    tmp = tmp_path_factory.mktemp("viewer_tiles")
    slides = tmp / "slides"
    slides.mkdir()
    slide = make_slide(slides)
    stack = Stack(tmp, make_database("sqlite", tmp), redis_server, input_url_prefixes=[f"file://{slides}"])
    stack.start_worker()
    yield stack, slide
    stack.close()


@pytest.mark.slow
def test_slide_by_reference_tiles_come_from_its_pyramid(slide_stack):
    stack, slide = slide_stack
    client = stack.client()
    form = {"model": "shapes", "level": "1", "image_url": f"file://{slide.path}"}
    response = client.post("/api/v1/jobs", data=form, content_type="multipart/form-data")
    assert response.status_code == 202, response.json
    job_id = response.json["id"]
    assert stack.wait_for(client, job_id, timeout=300)["status"] == JobStatus.succeeded
    top = level_count(3072, 2048) - 1
    # Full resolution over the tissue, then coarser levels read from the file's own levels.
    tiles = [(top, 1, 1), (top, 2, 1), (top, 8, 6), (top - 1, 0, 0), (top - 2, 1, 1), (top - 3, 0, 0)]
    tiles.append((min_level(3072, 2048), 0, 0))
    assert_tiles_match(client, job_id, slide.level0, tiles, tolerance=8.0)  # the file is JPEG-tiled too
    files = [p for p in (Path(stack.settings.resolved_storage_url) / results_prefix(job_id)).rglob("*") if p.is_file()]
    assert len(files) < 200, len(files)


@pytest.mark.slow
def test_s3_inputs_serve_tiles(fresh_stack, s3_server, tmp_path):
    """An upload stored on S3 and an image_url=s3://... input: tiles read from the object."""
    bucket = s3_server.new_bucket()
    pixels = smooth_scene(1200, 900)
    write_pyramid_tiff(tmp_path / "slide.tif", pixels, levels=3)
    s3_server.client().upload_file(str(tmp_path / "slide.tif"), bucket, "inputs/slide.tif")
    stack = fresh_stack(
        storage_url=f"s3://{bucket}/heatmaps",
        s3_endpoint_url=s3_server.endpoint_url,
        input_url_prefixes=[f"s3://{bucket}/inputs"],
    )
    stack.start_worker()
    client = stack.client()
    by_url = {"model": "shapes", "image_url": f"s3://{bucket}/inputs/slide.tif", "top_k": "1"}
    response = client.post("/api/v1/jobs", data=by_url, content_type="multipart/form-data")
    assert response.status_code == 202, response.json
    scene, _ = scene_png(320, 256)
    uploaded = stack.submit(client, scene, top_k=1)
    assert uploaded.status_code == 202, uploaded.json
    top = level_count(1200, 900) - 1
    for job_id, image, tiles in (
        (response.json["id"], pixels, [(top, 0, 0), (top, 4, 3), (top - 1, 1, 1), (top - 2, 0, 0)]),
        (uploaded.json["id"], np.asarray(Image.open(io.BytesIO(scene)).convert("RGB")), every_tile(320, 256)),
    ):
        assert stack.wait_for(client, job_id, timeout=300)["status"] == JobStatus.succeeded
        assert_tiles_match(client, job_id, image, tiles, tolerance=6.0)


@pytest.mark.slow
def test_tiles_under_gevent_come_from_the_tile_process(service):
    """`make serve`'s server (gunicorn, gevent workers): tiles are rendered by each worker's
    tile process, never on the gevent loop, and equal the source region resized."""
    import subprocess

    import psutil
    import requests
    from conftest import KEYS, stop_process, wait_for_port

    from scripts.devstack import gunicorn_command
    from scripts.embedded_redis import free_port
    from shared.settings import REPO_ROOT

    alice = service.client("alice")
    pixels = smooth_scene(900, 600)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    job = service.submit(alice, buffer.getvalue(), model="shapes", top_k=1).json
    assert service.wait_for(alice, job["id"])["status"] == JobStatus.succeeded
    port = free_port()
    log = service.tmp_path / "gevent-api.log"
    api = subprocess.Popen(
        gunicorn_command(port), cwd=REPO_ROOT, env=service.env(), stdout=log.open("ab"), stderr=subprocess.STDOUT
    )
    try:
        wait_for_port(port, api)
        session = requests.Session()
        session.headers["X-API-Key"] = KEYS["alice"]
        top = level_count(900, 600) - 1
        for level, col, row in ((top, 0, 0), (top, 3, 2), (top - 1, 1, 1), (min_level(900, 600), 0, 0)):
            url = f"http://127.0.0.1:{port}/api/v1/jobs/{job['id']}/dzi/image_files/{level}/{col}_{row}.jpeg"
            response = session.get(url, timeout=60)
            assert response.status_code == 200, log.read_text()[-3000:]
            got = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(np.int16)
            assert float(np.abs(got - expected_tile(pixels, level, col, row)).mean()) < 3.0
        tile_processes = [
            child for child in psutil.Process(api.pid).children(recursive=True) if "api.tile_process" in child.cmdline()
        ]
        assert tile_processes, "no tile process under the gunicorn workers"
        # A tile process that dies is replaced: the next tiles are served all the same.
        for process in tile_processes:
            process.kill()
        psutil.wait_procs(tile_processes, timeout=30)
        for col in (1, 2):
            url = f"http://127.0.0.1:{port}/api/v1/jobs/{job['id']}/dzi/image_files/{top}/{col}_1.jpeg"
            assert session.get(url, timeout=60).status_code == 200, log.read_text()[-3000:]
        tile_processes += [
            child for child in psutil.Process(api.pid).children(recursive=True) if "api.tile_process" in child.cmdline()
        ]
    finally:
        stop_process(api)
    # The tile processes end with their workers (their sockets close): none is left behind.
    gone, alive = psutil.wait_procs(tile_processes, timeout=30)
    assert alive == []
