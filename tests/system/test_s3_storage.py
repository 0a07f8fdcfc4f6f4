"""STORAGE_URL=s3://bucket/prefix against a real S3-protocol server (moto_server in its own
process): the storage layer, and a job end to end (submit -> real worker -> download -> delete)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import scene_png

from shared.storage import Storage, StorageError, results_prefix, upload_prefix


class FailingStream(io.RawIOBase):
    """Gives `good` bytes, then fails like a client that hung up mid-upload."""

    def __init__(self, good: int):
        self.left = good

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            raise OSError("connection reset by peer")
        chunk = min(self.left, size if size > 0 else self.left)
        self.left -= chunk
        return b"x" * chunk


def test_objects_are_written_whole_or_not_at_all(s3_server):
    bucket = s3_server.new_bucket()
    storage = Storage(f"s3://{bucket}/deploy", s3_server.endpoint_url)
    payload = np.random.default_rng(0).bytes(3 * 1024 * 1024 + 17)
    size, digest = storage.put_stream("uploads/abc/image.png", io.BytesIO(payload))
    assert size == len(payload)
    assert b"".join(storage.iter_chunks("uploads/abc/image.png")) == payload
    assert s3_server.keys(bucket) == ["deploy/uploads/abc/image.png"]  # no temporary object, ever

    with pytest.raises(StorageError):  # a broken upload leaves nothing behind
        storage.put_stream("uploads/abc/broken.png", FailingStream(2 * 1024 * 1024))
    assert s3_server.keys(bucket) == ["deploy/uploads/abc/image.png"]
    with pytest.raises(FileNotFoundError):  # raised when opening, before any response starts
        storage.iter_chunks("results/abc/heatmap.npz")

    storage.delete_prefix(upload_prefix("abc"))
    assert s3_server.keys(bucket) == []


@pytest.mark.slow
def test_job_end_to_end_on_s3(fresh_stack, s3_server):
    bucket = s3_server.new_bucket()
    stack = fresh_stack(storage_url=f"s3://{bucket}/heatmaps", s3_endpoint_url=s3_server.endpoint_url)
    stack.start_worker()
    client = stack.client()
    image, _ = scene_png(192, 160)
    response = stack.submit(client, image, top_k=2)
    assert response.status_code == 202, response.json
    job_id = response.json["id"]
    body = stack.wait_for(client, job_id)
    assert body["status"] == "succeeded", body

    keys = s3_server.keys(bucket)
    listed = stack.job_row(job_id).result["artifacts"]
    expected = {listed["heatmap"], listed["summary"], *listed["overlays"].values()}
    assert {f"heatmaps/{key}" for key in expected} <= set(keys)  # every key the row lists exists
    assert not [key for key in keys if ".tmp" in key]
    assert [key for key in keys if "/uploads/" in f"/{key}"] == [f"heatmaps/{upload_prefix(job_id)}/image.png"]
    assert not (stack.tmp_path / "storage").exists()  # nothing went to a local folder

    heatmap = client.get(body["result"]["heatmap_url"])
    assert heatmap.status_code == 200
    with np.load(io.BytesIO(heatmap.data)) as npz:
        assert npz["scores"].shape[2] == 2
    assert client.get(body["result"]["summary_url"]).json["classes"]
    overlay = client.get(body["result"]["classes"][0]["overlay_url"])
    assert overlay.status_code == 200 and overlay.data[:8] == b"\x89PNG\r\n\x1a\n"

    assert client.delete(f"/api/v1/jobs/{job_id}").status_code == 204
    assert s3_server.keys(bucket, f"heatmaps/{results_prefix(job_id)}") == []
    assert s3_server.keys(bucket) == []
