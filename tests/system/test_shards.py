"""One job, many workers (issue 16): a job split into shards that real Celery workers run.

Each test builds its own stack (own Redis, own database, two or three worker processes).
The grid a sharded job assembles must equal the unsharded job's (same scheme) to float
rounding, in direct and tiled mode, with a mask, on SQLite and PostgreSQL, on local storage
and S3; a SIGKILLed worker costs at most its own shard; a shard failing on bad input fails
the job once; cancel and delete stop every shard and leave no partial grid behind.
"""

from __future__ import annotations

import io
import os
import signal
import time

import numpy as np
import pytest
from conftest import DATABASES, png_bytes, scene_png
from score_checks import assert_close_scaled

from shared.jobs import shard_store
from shared.jobs.database import session_scope

pytestmark = pytest.mark.slow

IMAGE = scene_png(480, 400, seed=16, n_objects=3)[0]
SLOW = {"mode": "tiled", "stride": 4, "batch_size": 32}  # a few seconds per shard on 2 cores


def _scores(stack, client, job_id: str) -> np.ndarray:
    response = client.get(f"/api/v1/jobs/{job_id}/heatmap")
    assert response.status_code == 200
    with np.load(io.BytesIO(response.data)) as data:
        return data["scores"]


def _shards(stack, job_id: str):
    with session_scope(stack.settings.resolved_database_url) as session:
        return shard_store.get_shards(session, job_id)


def _partials(stack) -> list:
    root = stack.tmp_path / "storage" / "shards"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _run_pair(stack, client, form: dict, shards: int):
    """The same job unsharded and in `shards` shards; returns both finished job JSONs."""
    one = stack.submit(client, IMAGE, shards=1, **form).json["id"]
    many = stack.submit(client, IMAGE, shards=shards, **form).json["id"]
    return stack.wait_for(client, one, timeout=240), stack.wait_for(client, many, timeout=240)


@pytest.mark.parametrize("database", DATABASES)
def test_sharded_jobs_equal_unsharded_ones(fresh_stack, database):
    stack = fresh_stack(database)
    stack.start_worker("w1")
    stack.start_worker("w2")
    client = stack.client()
    for form, shards in (({"mode": "direct", "top_k": 2}, 3), ({"mode": "tiled", "stride": 16, "top_k": 2}, 2)):
        single, sharded = _run_pair(stack, client, form, shards)
        assert single["status"] == sharded["status"] == "succeeded", (single, sharded)
        assert single["shards"] is None
        assert sharded["shards"]["count"] == shards and sharded["shards"]["done"] == shards
        assert sharded["shards"]["recomputed"] == 0
        assert set(sharded["shards"]["workers"]) <= {"w1", "w2"} and sharded["shards"]["workers"]
        assert [c["name"] for c in sharded["result"]["classes"]] == [c["name"] for c in single["result"]["classes"]]
        assert sharded["result"]["grid"] == single["result"]["grid"]
        assert_close_scaled(_scores(stack, client, sharded["id"]), _scores(stack, client, single["id"]))
        summary = client.get(f"/api/v1/jobs/{sharded['id']}/summary").json
        assert summary["shards"] == sharded["shards"]
    assert _partials(stack) == []  # the partial grids are removed once a job is assembled


def test_a_masked_sharded_job_holds_only_computed_bands(fresh_stack):
    stack = fresh_stack()
    stack.start_worker("w1")
    stack.start_worker("w2")
    client = stack.client()
    mask = np.zeros((400, 480), np.uint8)
    mask[:120, :200] = 255  # two patches: bands hold computed windows only (balanced by them)
    mask[300:, 300:] = 255
    form = {"mode": "direct", "mask": "image", "top_k": 2}
    files = {"mask_image": (io.BytesIO(png_bytes(mask)), "mask.png")}
    one = client.post(
        "/api/v1/jobs",
        data={"image": (io.BytesIO(IMAGE), "scene.png"), "shards": "1", **form, **files},
        content_type="multipart/form-data",
    ).json["id"]
    files = {"mask_image": (io.BytesIO(png_bytes(mask)), "mask.png")}
    many = client.post(
        "/api/v1/jobs",
        data={"image": (io.BytesIO(IMAGE), "scene.png"), "shards": "4", **form, **files},
        content_type="multipart/form-data",
    ).json["id"]
    single, sharded = stack.wait_for(client, one, timeout=240), stack.wait_for(client, many, timeout=240)
    assert single["status"] == sharded["status"] == "succeeded", (single, sharded)
    rows = _shards(stack, many)
    assert 2 <= len(rows) <= 4 and all(row.work > 0 for row in rows)
    expected, got = _scores(stack, client, one), _scores(stack, client, many)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    finite = np.isfinite(expected)
    assert_close_scaled(got[finite], expected[finite])


def test_a_sharded_job_on_s3_storage(fresh_stack, s3_server):
    bucket = s3_server.new_bucket()
    stack = fresh_stack(storage_url=f"s3://{bucket}/heatmaps", s3_endpoint_url=s3_server.endpoint_url)
    stack.start_worker("w1")
    stack.start_worker("w2")
    client = stack.client()
    single, sharded = _run_pair(stack, client, {"mode": "direct", "top_k": 2}, 3)
    assert single["status"] == sharded["status"] == "succeeded", (single, sharded)
    assert_close_scaled(_scores(stack, client, sharded["id"]), _scores(stack, client, single["id"]))
    storage = stack.app.extensions["heatmaps"].storage
    assert storage.fs.find(storage.path(f"shards/{sharded['id']}")) == []


def _wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_killed_worker_costs_only_its_own_shard(fresh_stack):
    stack = fresh_stack()
    w1 = stack.start_worker("w1")
    stack.start_worker("w2")
    client = stack.client()
    reference = stack.submit(client, IMAGE, shards=1, **SLOW).json["id"]
    stack.wait_for(client, reference, timeout=300)
    job_id = stack.submit(client, IMAGE, shards=4, **SLOW).json["id"]

    def w1_computing():
        rows = _shards(stack, job_id)
        return [r for r in rows if r.state == "running" and r.worker == "w1" and r.units_done > 0]

    (victim,) = _wait_until(w1_computing, 240, "a shard computing on w1")[:1]
    done_before = {r.shard_index for r in _shards(stack, job_id) if r.state == "done"}
    stack.stop_worker(w1, signal.SIGKILL)
    stack.start_worker("w3")
    done = stack.wait_for(client, job_id, timeout=300)
    assert done["status"] == "succeeded", done
    assert done["shards"]["recomputed"] == 1, done["shards"]  # the killed shard, nothing else
    rows = {r.shard_index: r for r in _shards(stack, job_id)}
    assert rows[victim.shard_index].attempts == 2
    assert all(rows[i].attempts == 1 for i in done_before)
    assert_close_scaled(_scores(stack, client, job_id), _scores(stack, client, reference))
    assert _partials(stack) == []


def test_bad_input_in_a_shard_fails_the_job_once(fresh_stack):
    """The upload vanishes after planning (retention, say): the shards that read it fail
    with `input_gone`, the job fails once with that reason, nothing is left in storage."""
    stack = fresh_stack()
    stack.start_worker("w1")
    stack.start_worker("w2")
    client = stack.client()
    job_id = stack.submit(client, IMAGE, shards=4, **SLOW).json["id"]
    _wait_until(lambda: len(_shards(stack, job_id)) == 4, 240, "the plan")
    upload = stack.job_row(job_id).image_key
    os.remove(stack.tmp_path / "storage" / upload)
    done = stack.wait_for(client, job_id, timeout=240)
    assert done["status"] == "failed" and done["error"]["code"] == "input_gone", done
    assert stack.job_row(job_id).error_code == "input_gone"
    _wait_until(lambda: _partials(stack) == [], 30, "partial grids removed")


@pytest.mark.parametrize("action", ["cancel", "delete"])
def test_cancel_and_delete_stop_every_shard(fresh_stack, action):
    stack = fresh_stack()
    stack.start_worker("w1")
    stack.start_worker("w2")
    client = stack.client()
    job_id = stack.submit(client, IMAGE, shards=4, **SLOW).json["id"]
    _wait_until(lambda: any(r.state == "done" for r in _shards(stack, job_id)), 240, "a shard done")
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 202
    if action == "delete":
        assert client.delete(f"/api/v1/jobs/{job_id}").status_code == 204
    # Every shard stops within a few heartbeats; nothing stays in storage.
    _wait_until(lambda: _partials(stack) == [], 60, "no partial grid left")
    time.sleep(4)
    assert _partials(stack) == []
    if action == "delete":
        assert stack.job_row(job_id) is None and _shards(stack, job_id) == []
        assert not (stack.tmp_path / "storage" / "results" / job_id).exists()
    else:
        assert stack.job_row(job_id).status == "canceled"
    # The workers are free again: a new job runs.
    after = stack.submit(client, IMAGE, shards=1, mode="direct").json["id"]
    assert stack.wait_for(client, after, timeout=120)["status"] == "succeeded"


def test_shards_parameter_is_checked(app, client):
    for value, code in (("0", 400), ("17", 400), ("x", 400), ("auto", 202), ("2", 202)):
        response = client.post(
            "/api/v1/jobs",
            data={"image": (io.BytesIO(IMAGE), "scene.png"), "shards": value},
            content_type="multipart/form-data",
        )
        assert response.status_code == code, (value, response.json)
        if code == 400:
            assert response.json["error"]["code"] == "invalid_parameter"
            assert "shards" in response.json["error"]["message"]


def test_a_straggler_gets_a_backup_run_and_the_first_commit_wins(fresh_stack):
    """Shard 0 is held by a slow run (this test: it claims the shard and beats its heartbeat,
    never finishing). Once shard 1 is done and shard 0 has run longer than STRAGGLER_FACTOR
    times shard 1's time, the reconciler queues a backup; the backup commits first and the
    job is assembled; the slow run's heartbeat and commit are refused from then on."""
    import threading

    from shared.jobs.job_status import JobStatus
    from shared.settings import Settings
    from shared.storage import Storage
    from worker.inference.model_registry import ModelRegistry
    from worker.job_context import WorkerContext
    from worker.jobrunner import execute

    stack = fresh_stack(straggler_factor=1.5, straggler_min_s=1.0)
    url = stack.settings.resolved_database_url
    client = stack.client()
    job_id = stack.submit(client, IMAGE, shards=2, mode="direct", top_k=2).json["id"]
    planner = WorkerContext(
        settings=stack.settings,
        storage=Storage(stack.settings.resolved_storage_url),
        registry=ModelRegistry(Settings().model_dirs),
        name="planner",
    )
    assert execute(job_id, planner) == JobStatus.running  # planned here; two shard messages queued
    with session_scope(url) as session:
        slow = shard_store.claim(session, job_id, 0, "slow")
    assert slow is not None
    stop, beats = threading.Event(), []

    def beat_forever():
        while not stop.wait(0.3):
            with session_scope(url) as session:
                beats.append(shard_store.heartbeat(session, job_id, 0, slow, 1, 10))

    thread = threading.Thread(target=beat_forever, daemon=True)
    thread.start()
    try:
        stack.start_worker("w1")
        done = stack.wait_for(client, job_id, timeout=240)
    finally:
        stop.set()
        thread.join()
    assert done["status"] == "succeeded", done
    assert done["shards"]["recomputed"] == 1
    rows = _shards(stack, job_id)
    assert rows[0].attempts == 2 and rows[0].token != slow and rows[0].worker == "w1"
    assert beats and beats[-1] is False  # the slow run learns it lost at its next beat
    with session_scope(url) as session:
        assert not shard_store.commit(session, job_id, 0, slow, "shards/none", 1.0)
    reference = stack.submit(client, IMAGE, shards=1, mode="direct", top_k=2).json["id"]
    stack.wait_for(client, reference, timeout=120)
    assert_close_scaled(_scores(stack, client, job_id), _scores(stack, client, reference))
    assert _partials(stack) == []


def test_auto_splits_a_large_job_over_the_live_workers(fresh_stack):
    """`shards=auto` (the default) on a job large enough: as many shards as workers consume
    the queue (each announces itself in Redis); a small job stays whole."""
    from shared.jobs.queue import live_workers

    stack = fresh_stack()
    stack.start_worker("w1")
    stack.start_worker("w2")
    _wait_until(lambda: live_workers(stack.settings) == 2, 30, "two workers announced")
    client = stack.client()
    large = scene_png(2048, 2048, seed=17, n_objects=4)[0]
    big = stack.wait_for(client, stack.submit(client, large, mode="direct").json["id"], timeout=240)
    small = stack.wait_for(client, stack.submit(client, IMAGE, mode="direct").json["id"], timeout=120)
    assert big["status"] == small["status"] == "succeeded", (big, small)
    assert big["shards"]["count"] == 2 and big["params"]["shards"] is None
    assert small["shards"] is None
