"""A model added to MODELS_DIR while the stack runs is accepted by the API and run by the
already running worker (issue 11, defect 3); one removed is refused by the API at once."""

from __future__ import annotations

import shutil

import pytest
from conftest import scene_png

from shared.settings import BUNDLED_MODELS_DIR

pytestmark = pytest.mark.slow


def test_model_added_while_running_is_served(fresh_stack, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    stack = fresh_stack(models_dir=models)
    stack.start_worker()
    client = stack.client()
    image = scene_png(160, 128, seed=3)[0]
    # the worker has scanned its catalogue at start (and run a job with it)
    first = stack.submit(client, image, model="shapes", mode="direct").json["id"]
    assert stack.wait_for(client, first)["status"] == "succeeded"
    assert stack.submit(client, image, model="added").json["error"]["code"] == "unknown_model"

    shutil.copy(BUNDLED_MODELS_DIR / "shapes.keras", models / "added.keras")
    shutil.copy(BUNDLED_MODELS_DIR / "shapes.json", models / "added.json")
    names = [m["name"] for m in client.get("/api/v1/models").json["models"]]
    assert "added" in names  # the API sees it at once (no TTL to wait out)
    response = stack.submit(client, image, model="added", mode="direct")
    assert response.status_code == 202, response.json
    body = stack.wait_for(client, response.json["id"])
    assert body["status"] == "succeeded", body["error"]
    assert body["model"] == "added"

    (models / "added.json").unlink()
    refused = stack.submit(client, image, model="added")
    # added.keras is left without its sidecar: named as a problem (issue 19), with the reason
    assert refused.status_code == 400 and refused.json["error"]["code"] == "model_unavailable"
    assert "no sidecar added.json" in refused.json["error"]["message"]
