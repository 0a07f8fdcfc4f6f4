"""The API refuses bad input with a 4xx JSON error, creates no job and leaves nothing in
storage; authentication and ownership; OpenAPI; no TensorFlow in the API process."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from conftest import KEYS, png_bytes
from PIL import Image

from shared.settings import REPO_ROOT

RNG = np.random.default_rng(0)
GOOD = png_bytes(RNG.integers(0, 255, (96, 120, 3), dtype=np.uint8))


def _storage_files(app):
    root = app.extensions["heatmaps"].storage.root
    from pathlib import Path

    return [p for p in Path(root).rglob("*") if p.is_file()]


def _job_count(app):
    from sqlalchemy import func, select

    from shared.jobs.database import session_scope
    from shared.jobs.tables import Job

    with session_scope(app.config["HEATMAP_SETTINGS"].resolved_database_url) as session:
        return session.scalar(select(func.count()).select_from(Job))


def _post(client, files=None, data=None, **kwargs):
    payload = dict(data or {})
    for name, value in files or []:
        payload.setdefault(name, [])
        payload[name].append(value)
    return client.post("/api/v1/jobs", data=payload, content_type="multipart/form-data", **kwargs)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def _gif_frames() -> bytes:
    frames = [Image.fromarray(RNG.integers(0, 255, (80, 80, 3), dtype=np.uint8)).convert("P") for _ in range(5)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def _jpeg() -> bytes:
    return png_bytes(RNG.integers(0, 255, (128, 128, 3), dtype=np.uint8), fmt="JPEG")


BAD_IMAGES = {
    "zero_bytes": (b"", 400, "empty_file"),
    "text_as_png": (b"hello, this is not an image\n" * 10, 415, "unsupported_format"),
    "html_as_png": (b"<!doctype html><html><body>hi</body></html>", 415, "unsupported_format"),
    "pdf": (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 415, "unsupported_format"),
    "eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n", 415, "unsupported_format"),
    "psd": (
        b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 100, 100, 8, 3) + b"\x00" * 64,
        415,
        "unsupported_format",
    ),
    "svg": (
        b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"><rect/></svg>',
        415,
        "unsupported_format",
    ),
    "gif_frames": (_gif_frames(), 415, "unsupported_format"),
    "bomb_png_header": (_png_header_only(50_000, 50_000), 413, "too_many_pixels"),
    "too_small": (png_bytes(RNG.integers(0, 255, (40, 300, 3), dtype=np.uint8)), 422, "image_too_small"),
    "truncated_png_header": (GOOD[:20], 400, "corrupt_image"),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_images_are_refused_before_a_job_exists(app, client, name):
    data, status, code = BAD_IMAGES[name]
    response = _post(client, files=[("image", (io.BytesIO(data), "x.png"))])
    assert response.status_code == status, response.json
    assert response.json["error"]["code"] == code
    assert response.json["error"]["message"]
    assert _job_count(app) == 0
    assert _storage_files(app) == []


def test_pixel_limit_is_exact(tmp_path, redis_server):
    from conftest import Stack, make_database

    stack = Stack(tmp_path, make_database("sqlite", tmp_path), redis_server, max_image_pixels=120 * 100)
    client = stack.client()
    at_limit = png_bytes(RNG.integers(0, 255, (100, 120, 3), dtype=np.uint8))
    over = png_bytes(RNG.integers(0, 255, (101, 120, 3), dtype=np.uint8))
    assert stack.submit(client, over).json["error"]["code"] == "too_many_pixels"
    assert stack.submit(client, at_limit).status_code == 202
    stack.close()


@pytest.mark.parametrize(
    "form, code",
    [
        ({"model": "nope"}, "unknown_model"),
        ({"classes": "circle,unicorn"}, "unknown_class"),
        ({"classes": "99"}, "unknown_class"),
        ({"mode": "foo"}, "invalid_parameter"),
        ({"mode": "tiled", "stride": "0"}, "invalid_parameter"),
        ({"mode": "tiled", "stride": "-8"}, "invalid_parameter"),
        ({"mode": "tiled", "stride": "100000"}, "invalid_parameter"),
        ({"mode": "tiled", "stride": "abc"}, "invalid_parameter"),
        ({"mode": "tiled", "stride": "1e3"}, "invalid_parameter"),
        ({"stride": "12"}, "invalid_parameter"),  # direct mode: the output stride (16) / 1, 2, 4 or 8
        ({"mode": "tiled", "batch_size": "0"}, "invalid_parameter"),
        ({"mode": "tiled", "batch_size": "-1"}, "invalid_parameter"),
        ({"mode": "tiled", "batch_size": "99999999"}, "invalid_parameter"),
        ({"top_k": "0"}, "invalid_parameter"),
        ({"top_k": "-3"}, "invalid_parameter"),
        ({"top_k": "1000000"}, "invalid_parameter"),
        ({"top_k": "2", "classes": "circle"}, "invalid_parameter"),
        ({"weighting": "median"}, "invalid_parameter"),
        ({"colour": "red"}, "unexpected_field"),
    ],
)
def test_bad_parameters(app, client, form, code):
    response = _post(client, files=[("image", (io.BytesIO(GOOD), "a.png"))], data=form)
    assert response.status_code == 400, response.json
    assert response.json["error"]["code"] == code
    assert _job_count(app) == 0 and _storage_files(app) == []


def test_request_shape_errors(app, client):
    assert client.post("/api/v1/jobs").status_code == 415  # empty body, no content type
    as_json = client.post("/api/v1/jobs", json={"image": "aGVsbG8="})
    assert as_json.status_code == 415 and as_json.json["error"]["code"] == "unsupported_media_type"
    no_image = _post(client, data={"model": "shapes"})
    assert no_image.status_code == 400 and no_image.json["error"]["code"] == "missing_image"
    two = _post(client, files=[("image", (io.BytesIO(GOOD), "a.png")), ("image", (io.BytesIO(GOOD), "b.png"))])
    assert two.status_code == 400 and two.json["error"]["code"] == "multiple_images"
    assert _job_count(app) == 0 and _storage_files(app) == []


def test_upload_and_form_limits_are_413(tmp_path, redis_server):
    from conftest import Stack, make_database

    stack = Stack(tmp_path, make_database("sqlite", tmp_path), redis_server, max_upload_mb=0.25)
    client = stack.client()
    big = RNG.integers(0, 255, (600, 600, 3), dtype=np.uint8)
    too_big = png_bytes(big)
    assert len(too_big) > 0.25 * 2**20
    response = stack.submit(client, too_big)
    assert response.status_code == 413 and response.json["error"]["code"] == "payload_too_large"
    long_field = stack.submit(client, GOOD, classes="x" * 600_000)
    assert long_field.status_code == 413
    many_parts = {f"f{i}": "1" for i in range(2000)}
    many_parts["image"] = (io.BytesIO(GOOD), "a.png")
    parts = client.post("/api/v1/jobs", data=many_parts, content_type="multipart/form-data")
    assert parts.status_code == 413
    assert _job_count(stack.app) == 0 and _storage_files(stack.app) == []
    stack.close()


@pytest.mark.parametrize("filename", ["../../etc/passwd.png", "a\x00b.png", "x" * 300 + ".png", "/abs/path.png"])
def test_client_filenames_never_become_storage_names(app, client, filename):
    response = _post(client, files=[("image", (io.BytesIO(GOOD), filename))])
    assert response.status_code == 202, response.json
    files = _storage_files(app)
    job_id = response.json["id"]
    assert [p.relative_to(app.extensions["heatmaps"].storage.root).as_posix() for p in files] == [
        f"uploads/{job_id}/image.png"
    ]


def test_special_image_kinds_are_accepted(app, client):
    gray16 = Image.fromarray((RNG.integers(0, 65535, (96, 96))).astype(np.uint16))
    cmyk = Image.fromarray(RNG.integers(0, 255, (96, 96, 3), dtype=np.uint8)).convert("CMYK")
    palette = Image.fromarray(RNG.integers(0, 255, (96, 96, 3), dtype=np.uint8)).convert("P")
    alpha = Image.fromarray(RNG.integers(0, 255, (96, 96, 4), dtype=np.uint8), "RGBA")
    for image, fmt in [
        (gray16, "PNG"),
        (gray16, "TIFF"),
        (cmyk, "JPEG"),
        (cmyk, "TIFF"),
        (palette, "PNG"),
        (alpha, "PNG"),
    ]:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        response = _post(client, files=[("image", (io.BytesIO(buffer.getvalue()), "img"))])
        assert response.status_code == 202, (fmt, image.mode, response.json)


def test_api_keys_are_required_and_jobs_are_private(app):
    anonymous = app.test_client()
    assert anonymous.get("/api/v1/jobs").status_code == 401
    assert anonymous.get("/api/v1/jobs").json["error"]["code"] == "unauthorized"
    wrong = app.test_client()
    wrong.environ_base["HTTP_X_API_KEY"] = "not-a-key"
    assert wrong.get("/api/v1/models").status_code == 403
    bearer = app.test_client()
    bearer.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {KEYS['bob']}"
    assert bearer.get("/api/v1/models").status_code == 200
    # health, readiness and metrics are outside /api/v1
    assert anonymous.get("/healthz").status_code == 200


def test_open_mode_when_no_keys(tmp_path, redis_server, caplog):
    from conftest import Stack, make_database

    stack = Stack(tmp_path, make_database("sqlite", tmp_path), redis_server)
    stack.settings = stack.settings.model_copy(update={"api_keys": []})
    with caplog.at_level("WARNING"):
        client = stack.app.test_client()
    assert "OPEN MODE" in caplog.text
    assert client.get("/api/v1/jobs").status_code == 200
    stack.close()


def test_rate_limit_and_quota(tmp_path, redis_server):
    from conftest import Stack, make_database

    stack = Stack(
        tmp_path, make_database("sqlite", tmp_path), redis_server, rate_limit_per_minute=2, max_active_jobs_per_key=50
    )
    stack.forget_rate_limits()
    client = stack.client("alice")
    codes = [stack.submit(client, GOOD).status_code for _ in range(3)]
    assert codes[:2] == [202, 202]
    limited = stack.submit(client, GOOD)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert stack.submit(stack.client("bob"), GOOD).status_code == 202  # per key
    stack.close()

    quota = Stack(tmp_path, make_database("sqlite", tmp_path), redis_server, max_active_jobs_per_key=2)
    client = quota.client("alice")
    assert [quota.submit(client, GOOD).status_code for _ in range(2)] == [202, 202]
    refused = quota.submit(client, GOOD)
    assert refused.status_code == 429 and refused.json["error"]["code"] == "too_many_active_jobs"
    quota.close()


def test_openapi_document(client):
    spec = client.get("/api/v1/openapi.json").json
    assert spec["openapi"].startswith("3.")
    paths = spec["paths"]
    for path in [
        "/api/v1/jobs",
        "/api/v1/jobs/{job_id}",
        "/api/v1/jobs/{job_id}/heatmap",
        "/api/v1/jobs/{job_id}/summary",
        "/api/v1/jobs/{job_id}/overlays/{class_name}",
        "/api/v1/models",
    ]:
        assert path in paths
    assert "multipart/form-data" in paths["/api/v1/jobs"]["post"]["requestBody"]["content"]
    assert client.get("/api/v1/docs").status_code == 200


def test_edge_headers_nosniff_everywhere_and_a_csp_on_the_docs(client):
    """Issue 20, item 7: no `nosniff` anywhere, and the Swagger UI page had no CSP."""
    for path in ("/api/v1/models", "/api/v1/jobs/" + "0" * 32, "/api/v1/openapi.json", "/healthz"):
        assert client.get(path).headers.get("X-Content-Type-Options") == "nosniff", path
    docs = client.get("/api/v1/docs")
    policy = docs.headers["Content-Security-Policy"]
    assert "'unsafe-inline'" not in policy.split("script-src")[1].split(";")[0]
    assert "'sha256-" in policy and "object-src 'none'" in policy


def test_importing_the_api_does_not_load_tensorflow():
    code = (
        "import sys; from api import create_app; from shared.settings import Settings; "
        "create_app(Settings(data_dir='/tmp/heatmaps-import-check')); import importlib, pkgutil, shared, api; "
        "[importlib.import_module(m.name) for p in (shared, api) "
        "for m in pkgutil.iter_modules(p.__path__, p.__name__ + '.')]; "
        "bad = [m for m in ('tensorflow', 'keras', 'torch', 'jax') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_database_down_is_503_never_500(tmp_path, redis_server):
    from conftest import Stack

    from scripts.embedded_redis import free_port

    stack = Stack(tmp_path, f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere", redis_server)
    client = stack.client()
    for response in (
        client.get("/api/v1/jobs"),
        client.get(f"/api/v1/jobs/{'0' * 32}"),
        _post(client, files=[("image", (io.BytesIO(GOOD), "a.png"))]),
        client.get("/readyz"),
    ):
        assert response.status_code == 503, response.json
        assert response.json["error"]["code"] in ("database_unavailable", "not_ready")
    assert _storage_files(stack.app) == []  # the refused upload was not kept
    stack.close()


# --- messages that say what to do (issue 19) -------------------------------------------------
def test_messages_tell_the_user_what_to_do(client):
    """image_url switched off names INPUT_URL_PREFIXES; an unknown class lists the model's
    classes; canceling an ended job says it ended (not "the job is already canceled")."""
    off = _post(client, data={"image_url": "file:///data/slide.svs", "model": "shapes"})
    assert off.status_code == 403 and off.json["error"]["code"] == "image_url_disabled"
    assert "INPUT_URL_PREFIXES" in off.json["error"]["message"]
    unknown = _post(client, [("image", (io.BytesIO(GOOD), "a.png"))], {"model": "shapes", "classes": "crosses"})
    assert unknown.status_code == 400 and unknown.json["error"]["code"] == "unknown_class"
    assert "background, circle, square, triangle, cross" in unknown.json["error"]["message"]
    wide = _post(client, [("image", (io.BytesIO(GOOD), "a.png"))], {"model": "shapes", "mode": "tiled", "stride": 65})
    assert wide.status_code == 400 and "between 1 and 64 (the model's window" in wide.json["error"]["message"]
    job = _post(client, [("image", (io.BytesIO(GOOD), "a.png"))], {"model": "shapes"}).json
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 202
    again = client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and again.json["error"]["code"] == "job_finished"
    assert again.json["error"]["message"] == "the job has already ended (canceled); there is nothing to cancel"


def test_direct_mode_accepts_the_finer_strides(app, client):
    """Direct mode: the output stride (16 for the bundled model) divided by 1, 2, 4 or 8."""
    for stride in ("16", "8", "4", "2"):
        response = _post(client, files=[("image", (io.BytesIO(GOOD), "a.png"))], data={"stride": stride})
        assert response.status_code == 202, response.json
        job = client.get(f"/api/v1/jobs/{response.json['id']}").json
        assert job["params"]["stride"] == int(stride) and job["params"]["mode"] == "direct"


def _squeeze_excitation_model(folder):
    """A real .keras classifier with a squeeze-excitation block in its trunk, and its sidecar."""
    import json

    import keras

    layers = keras.layers
    inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    se = layers.GlobalAveragePooling2D(name="block1_se_squeeze")(x)
    se = layers.Reshape((1, 1, 8))(layers.Dense(8, activation="sigmoid")(se))
    x = layers.GlobalAveragePooling2D(name="avg_pool")(layers.Multiply()([x, se]))
    folder.mkdir()
    keras.Model(inputs, layers.Dense(2, activation="softmax")(x)).save(folder / "senet.keras")
    (folder / "senet.json").write_text(json.dumps({"classes": ["a", "b"], "preprocess": "tf"}))


def test_squeeze_excitation_model_refused_in_direct_mode_at_submission(tmp_path, redis_server):
    from conftest import Stack, make_database

    _squeeze_excitation_model(tmp_path / "user_models")
    stack = Stack(tmp_path, make_database("sqlite", tmp_path), redis_server, models_dir=tmp_path / "user_models")
    client = stack.client()
    refused = stack.submit(client, GOOD, model="senet", mode="direct")
    assert refused.status_code == 400
    assert refused.json["error"]["code"] == "invalid_parameter"
    assert "block1_se_squeeze" in refused.json["error"]["message"]
    assert "mode=tiled" in refused.json["error"]["message"]
    assert stack.submit(client, GOOD, model="senet", mode="tiled").status_code == 202
    stack.close()
