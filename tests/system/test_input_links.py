"""image_url by reference against links and vanished files (issue 20, items 2 and 5): a link
under an allowed prefix that leads outside is refused at submission and again by the worker
when it opens the file; a file that vanished fails its job as `input_gone`, and its retry is
refused (409) while the file is missing and accepted once it is back. Real files, real links,
a real worker process. An upload removed before the worker reads it is `input_gone` too."""

from __future__ import annotations

import io
import os
import shutil

import pytest
from conftest import Stack, make_database, scene_png


@pytest.fixture
def linked(tmp_path, redis_server):
    """A stack whose only allowed prefix is `inputs/`, a private file beside it, no worker yet."""
    inputs, private = tmp_path / "inputs", tmp_path / "private"
    inputs.mkdir()
    private.mkdir()
    image = scene_png(160, 160, seed=3)[0]
    (inputs / "scene.png").write_bytes(image)
    (private / "secret.png").write_bytes(image)
    stack = Stack(tmp_path, make_database("sqlite", tmp_path), redis_server, input_url_prefixes=[f"file://{inputs}"])
    yield stack, inputs, private
    stack.close()


def _submit(client, url: str):
    return client.post("/api/v1/jobs", data={"image_url": url}, content_type="multipart/form-data")


def test_links_out_of_the_prefix_are_refused_at_submission(linked):
    stack, inputs, private = linked
    client = stack.client()
    os.symlink(private / "secret.png", inputs / "link.png")
    os.symlink(private, inputs / "folder")
    os.symlink(inputs / "scene.png", inputs / "inside.png")
    for url in (f"file://{inputs}/link.png", f"file://{inputs}/folder/secret.png"):
        response = _submit(client, url)
        assert (response.status_code, response.json["error"]["code"]) == (403, "url_not_allowed"), url
        assert str(private) not in response.json["error"]["message"]
    inside = _submit(client, f"file://{inputs}/inside.png")  # a link that stays inside is fine
    assert inside.status_code == 202, inside.json


@pytest.mark.slow
def test_the_worker_checks_links_again_and_reports_a_vanished_input(linked):
    """Both files are fine at submission; before the worker runs, one becomes a link to the
    private file and the other is removed. Before the fix the first analysed the private file
    and the second failed as `storage_error` ("could not write results"), retryable."""
    stack, inputs, private = linked
    client = stack.client()
    shutil.copy(inputs / "scene.png", inputs / "gone.png")
    swapped = _submit(client, f"file://{inputs}/scene.png")
    vanished = _submit(client, f"file://{inputs}/gone.png")
    upload = client.post(
        "/api/v1/jobs",
        data={"image": (io.BytesIO(scene_png(160, 160)[0]), "s.png")},
        content_type="multipart/form-data",
    )
    assert swapped.status_code == vanished.status_code == upload.status_code == 202, (swapped.json, vanished.json)
    shutil.rmtree(stack.tmp_path / "storage" / "uploads" / upload.json["id"])  # as retention would
    (inputs / "scene.png").unlink()
    os.symlink(private / "secret.png", inputs / "scene.png")
    held = inputs.parent / "held.png"
    (inputs / "gone.png").rename(held)
    stack.start_worker()

    done = stack.wait_for(client, swapped.json["id"], timeout=180)
    assert done["status"] == "failed" and done["error"]["code"] == "url_not_allowed", done
    done = stack.wait_for(client, vanished.json["id"], timeout=180)
    assert done["status"] == "failed" and done["error"]["code"] == "input_gone", done
    assert done["attempts"] == 1  # a read error, not a transient fault retried
    done = stack.wait_for(client, upload.json["id"], timeout=180)
    assert done["status"] == "failed" and done["error"]["code"] == "input_gone", done

    retry = client.post(f"/api/v1/jobs/{vanished.json['id']}/retry")
    assert (retry.status_code, retry.json["error"]["code"]) == (409, "input_gone"), retry.json
    retry = client.post(f"/api/v1/jobs/{swapped.json['id']}/retry")
    assert (retry.status_code, retry.json["error"]["code"]) == (403, "url_not_allowed"), retry.json

    held.rename(inputs / "gone.png")  # the input is back: the retry is accepted and succeeds
    retry = client.post(f"/api/v1/jobs/{vanished.json['id']}/retry")
    assert retry.status_code == 202, retry.json
    assert stack.wait_for(client, retry.json["id"], timeout=180)["status"] == "succeeded"
