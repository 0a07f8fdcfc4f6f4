"""Whether a model can run here (shared.catalog): GET /api/v1/models says so (`available`,
`reason`), and the API refuses a job for a model that cannot run (400 model_unavailable)
instead of accepting a job that would fail. The worker resolves VGG16's weights with the
same function, so the two never disagree.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import KEYS, Stack, make_database, png_bytes
from sqlalchemy import func, select

from shared.catalog import (
    VGG16_WEIGHTS_FILE,
    ModelCatalog,
    ModelUnavailableError,
    find_vgg16_weights,
    require_available,
    resolve_vgg16_weights,
)
from shared.exceptions import InputError
from shared.jobs.database import session_scope
from shared.jobs.tables import Job
from shared.settings import BUNDLED_MODELS_DIR

IMAGE = png_bytes(np.random.default_rng(0).integers(0, 255, (240, 240, 3), dtype=np.uint8))


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    home = tmp_path / "keras-home"
    (home / "models").mkdir(parents=True)
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home


def _stack(tmp_path, redis_server, **overrides) -> Stack:
    return Stack(tmp_path, make_database("sqlite", tmp_path), redis_server, **overrides)


def _models(stack) -> dict:
    response = stack.client().get("/api/v1/models")
    assert response.status_code == 200, response.json
    return {model["name"]: model for model in response.json["models"]}


def _submit(stack, model: str):
    return stack.client().post(
        "/api/v1/jobs",
        data={"image": (io.BytesIO(IMAGE), "a.png"), "model": model},
        content_type="multipart/form-data",
    )


def _rows_and_files(stack) -> tuple[int, list[Path]]:
    with session_scope(stack.settings.resolved_database_url) as session:
        rows = session.scalar(select(func.count()).select_from(Job))
    root = Path(stack.app.extensions["heatmaps"].storage.root)
    return rows, [p for p in root.rglob("*") if p.is_file()]


def test_vgg16_without_weights_is_listed_unavailable_and_refused(tmp_path, redis_server, keras_home):
    stack = _stack(tmp_path, redis_server)
    models = _models(stack)
    assert models["shapes"]["available"] is True and "reason" not in models["shapes"]
    vgg = models["vgg16"]
    assert vgg["available"] is False
    assert "VGG16_WEIGHTS" in vgg["reason"] and VGG16_WEIGHTS_FILE in vgg["reason"]
    assert str(keras_home) not in vgg["reason"] and str(tmp_path) not in vgg["reason"]  # no server paths
    response = _submit(stack, "vgg16")
    assert response.status_code == 400
    assert response.json["error"]["code"] == "model_unavailable"
    assert "VGG16_WEIGHTS" in response.json["error"]["message"]
    assert _rows_and_files(stack) == (0, [])  # nothing stored, no job
    stack.close()


def test_vgg16_with_weights_in_keras_cache_or_configured_is_available(tmp_path, redis_server, keras_home):
    (keras_home / "models" / VGG16_WEIGHTS_FILE).write_bytes(b"weights")
    stack = _stack(tmp_path / "a", redis_server)
    assert _models(stack)["vgg16"]["available"] is True
    stack.close()
    (keras_home / "models" / VGG16_WEIGHTS_FILE).unlink()
    configured = tmp_path / "elsewhere.h5"
    configured.write_bytes(b"weights")
    stack = _stack(tmp_path / "b", redis_server, vgg16_weights=configured)
    assert _models(stack)["vgg16"]["available"] is True
    # ... and the worker's lookup is the very same function.
    assert resolve_vgg16_weights(configured) == configured == find_vgg16_weights(configured)
    configured.unlink()
    assert _models(stack)["vgg16"]["available"] is False  # checked on every request
    with pytest.raises(ModelUnavailableError) as exc:
        resolve_vgg16_weights(configured)
    assert str(configured) in str(exc.value) and exc.value.code == "model_unavailable"
    stack.close()


def test_user_model_whose_file_disappears_is_unavailable(tmp_path, redis_server, keras_home):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "mine.json").write_text(json.dumps({"classes": ["a", "b"], "preprocess": "none", "input_size": [32, 32]}))
    (folder / "mine.h5").write_bytes(b"not really a model")
    stack = _stack(tmp_path, redis_server, models_dir=folder)
    assert _models(stack)["mine"]["available"] is True
    (folder / "mine.h5").unlink()
    # The API rescans its catalogue when the model folder changes (issue 11, defect 3): the
    # sidecar without its model file is then listed under `problems`, no longer as a model.
    # Were the change not yet seen, the model would be listed as unavailable instead.
    mine = _models(stack).get("mine")
    assert mine is None or (mine["available"] is False and str(folder) not in mine["reason"])
    response = _submit(stack, "mine")
    assert response.status_code == 400
    assert response.json["error"]["code"] in ("model_unavailable", "unknown_model")
    assert str(folder) not in response.json["error"]["message"]
    stack.close()


def test_broken_user_models_are_problems_refused_at_submission(tmp_path, redis_server, keras_home):
    """Issue 19: a .keras without its sidecar was silently absent, and a 5-class sidecar on a
    3-output model was listed as available and failed in the worker. Both are now listed
    under `problems` with the reason, and a job naming one is refused (400, no row, no file)."""
    keras = pytest.importorskip("keras")
    folder = tmp_path / "models"
    folder.mkdir()
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Flatten(), keras.layers.Dense(3)])
    model.save(folder / "lonely.keras")
    model.save(folder / "five.keras")
    (folder / "five.json").write_text(json.dumps({"classes": list("abcde"), "preprocess": "tf"}))
    stack = _stack(tmp_path, redis_server, models_dir=folder)
    listing = stack.client().get("/api/v1/models").json
    assert not {"lonely", "five"} & {m["name"] for m in listing["models"]}
    problems = {p["file"]: p["message"] for p in listing["problems"]}
    assert "no sidecar lonely.json" in problems["lonely.keras"]
    assert "5 classes" in problems["five.json"] and "3 outputs" in problems["five.json"]
    for name, reason in (("lonely", "no sidecar"), ("five", "3 outputs")):
        response = _submit(stack, name)
        assert response.status_code == 400, response.json
        assert response.json["error"]["code"] == "model_unavailable" and reason in response.json["error"]["message"]
        assert str(folder) not in response.json["error"]["message"]
    assert _rows_and_files(stack) == (0, [])
    stack.close()


def test_require_available_is_an_input_error(keras_home):
    info = ModelCatalog([BUNDLED_MODELS_DIR]).get("vgg16")
    with pytest.raises(InputError) as exc:  # the API's error handler makes it a 400
        require_available(info, Path("/nonexistent/weights.h5"))
    assert exc.value.code == "model_unavailable"


def test_models_listing_matches_openapi_schema(app):
    client = app.test_client()
    client.environ_base["HTTP_X_API_KEY"] = KEYS["alice"]
    spec = client.get("/api/v1/openapi.json").json
    schema = spec["components"]["schemas"]["Model"]
    assert {"available", "reason"} <= set(schema["properties"]) and "available" in schema["required"]
