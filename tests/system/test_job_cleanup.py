"""Rows and files agree under every interleaving of cancel, delete, finish, retention and
worker death (issue 11, defect 1).

The job runs in this process through `worker.jobrunner.execute` with the real model, the
real database and real storage; the client acts through the real API (Flask test client).
Interleavings are driven by the runner's checkpoints (after claim, after inference, after
storing, after commit), never by sleeping: at a checkpoint the test cancels, deletes, runs
retention or "kills" the worker (an exception no handler of the runner catches), then lets
the runner go on. The heartbeat thread never beats on its own (interval of an hour).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import DATABASES, Stack, make_database, scene_png

from shared.jobs import job_store
from shared.jobs.database import session_scope
from shared.jobs.reconcile import reconcile_once
from shared.storage import Storage
from worker.job_context import CLAIMED, COMMITTED, COMPUTED, STORED, WorkerContext
from worker.jobrunner import execute

IMAGE = scene_png(128, 128, seed=5, n_objects=1)[0]
STEPS = (CLAIMED, COMPUTED, STORED, COMMITTED)


class WorkerDied(BaseException):
    """Stands for SIGKILL at a checkpoint: no handler of the runner catches it."""


@pytest.fixture(scope="module")
def registry():
    from shared.settings import Settings
    from worker.inference.model_registry import ModelRegistry

    registry = ModelRegistry(Settings().model_dirs)
    _ = registry.load("shapes").fcn
    return registry


@pytest.fixture(params=DATABASES)
def stack(request, tmp_path, redis_server):
    stack = Stack(
        tmp_path,
        make_database(request.param, tmp_path),
        redis_server,
        heartbeat_interval_s=3600,  # no background beat: only the runner's own checks
        stale_after_s=0.001,
        retention_hours=1 / 3600 / 1000,  # one millisecond: any finished job has expired
        orphan_grace_s=3600,
        job_max_attempts=2,
        transient_retries=0,
    )
    yield stack
    stack.close()


def run(stack, registry, job_id, at=None, action=None):
    """Run the job's next attempt; at checkpoint `at`, call `action()` first."""

    def checkpoint(step, current):
        assert current == job_id
        if step == at:
            action()

    context = WorkerContext(
        settings=stack.settings,
        storage=Storage(stack.settings.resolved_storage_url),
        registry=registry,
        name="in-process",
        checkpoint=checkpoint,
    )
    return execute(job_id, context)


def folders(stack) -> set[str]:
    """Job ids that have anything under uploads/ or results/."""
    root = Path(stack.settings.resolved_storage_url)
    return {p.name for top in ("uploads", "results") if (root / top).is_dir() for p in (root / top).iterdir()}


def assert_rows_and_files_agree(stack) -> None:
    """No folder without a row; a succeeded row has every artifact it names; no temp file."""
    root = Path(stack.settings.resolved_storage_url)
    with session_scope(stack.settings.resolved_database_url) as session:
        rows = {job.id: job for job in job_store.list_jobs(session, None, None, 1000, None).jobs}
        orphans = folders(stack) - set(rows)
        assert orphans == set(), f"files without a row: {sorted(orphans)}"
        for job in rows.values():
            if job.status == "succeeded":
                keys = [job.result["artifacts"]["heatmap"], job.result["artifacts"]["summary"]]
                keys += list(job.result["artifacts"]["overlays"].values())
                assert all((root / key).is_file() for key in keys), f"{job.id}: succeeded without its files"
                assert (root / job.image_key).is_file()
    assert [p for p in root.rglob("*") if ".tmp-" in p.name] == []


def submit(stack) -> tuple[object, str]:
    client = stack.client()
    response = stack.submit(client, IMAGE, mode="tiled", stride=16, top_k=2)
    assert response.status_code == 202, response.json
    return client, response.json["id"]


def cancel(client, job_id):
    return lambda: client.delete(f"/api/v1/jobs/{job_id}")


def cancel_and_delete(client, job_id):
    """The reported sequence: DELETE twice (202 canceled, then 204 deleted)."""

    def act():
        first = client.delete(f"/api/v1/jobs/{job_id}").status_code
        second = client.delete(f"/api/v1/jobs/{job_id}").status_code
        assert (first, second) in ((202, 204), (204, 404))

    return act


def cancel_then_retention(stack, client, job_id):
    def act():
        client.delete(f"/api/v1/jobs/{job_id}")
        reconcile_once(stack.settings)

    return act


ACTIONS = {
    "cancel": lambda stack, client, job_id: cancel(client, job_id),
    "cancel_delete": lambda stack, client, job_id: cancel_and_delete(client, job_id),
    "cancel_retention": cancel_then_retention,
}


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_client_and_retention_interleavings(stack, registry, step, action):
    client, job_id = submit(stack)
    run(stack, registry, job_id, at=step, action=ACTIONS[action](stack, client, job_id))
    assert_rows_and_files_agree(stack)  # right away: not thanks to the orphan sweep
    response = client.get(f"/api/v1/jobs/{job_id}")
    if response.status_code == 200 and response.json["status"] == "succeeded":
        assert client.get(response.json["result"]["heatmap_url"]).status_code == 200


def die():
    raise WorkerDied


@pytest.mark.parametrize("step", (CLAIMED, COMPUTED, STORED))
@pytest.mark.parametrize("then", ("rerun", "cancel_delete"))
def test_worker_death_interleavings(stack, registry, step, then):
    """The worker dies after a step; then either the reconciler re-queues the job and a new
    worker runs it, or the client cancels and deletes it. Afterwards the sweep (grace 0)
    leaves rows and files agreeing, and the succeeded re-run has all its files."""
    client, job_id = submit(stack)
    with pytest.raises(WorkerDied):
        run(stack, registry, job_id, at=step, action=die)
    if then == "rerun":
        assert reconcile_once(stack.settings).requeued == [job_id]  # heartbeat stale at once
        assert run(stack, registry, job_id) == "succeeded"
    else:
        cancel_and_delete(client, job_id)()
    swept = reconcile_once(stack.settings.model_copy(update={"orphan_grace_s": 0.001, "retention_hours": 1}))
    assert_rows_and_files_agree(stack)
    if then == "rerun":
        assert stack.job_row(job_id).status == "succeeded" and swept.swept == []
        assert client.get(f"/api/v1/jobs/{job_id}/heatmap").status_code == 200


def test_store_failing_half_way_leaves_nothing_and_no_server_path(stack, registry, monkeypatch):
    """A failed store removes what it wrote; the failed job's message names no server path."""
    client, job_id = submit(stack)
    real_put_file = Storage.put_file
    written = []

    def put_file(self, key, local_path):
        if written:
            raise OSError(28, "No space left on device", f"{self.root}/{key}.tmp-x")
        written.append(key)
        return real_put_file(self, key, local_path)

    monkeypatch.setattr(Storage, "put_file", put_file)
    assert run(stack, registry, job_id) == "failed"
    body = client.get(f"/api/v1/jobs/{job_id}").json
    assert body["error"]["code"] == "storage_error"
    assert stack.settings.resolved_storage_url not in body["error"]["message"]
    assert "No space left on device" in body["error"]["message"]
    assert written and job_id not in {p.name for p in Path(stack.settings.resolved_storage_url).glob("results/*")}
    assert_rows_and_files_agree(stack)


def test_orphan_sweep_respects_grace_and_rows(stack, registry):
    """The sweep removes folders of ids without a row once untouched for ORPHAN_GRACE_S,
    and never the folders of a job that has a row."""
    client, kept = submit(stack)
    root = Path(stack.settings.resolved_storage_url)
    orphan = "ab" * 16
    (root / "results" / orphan).mkdir(parents=True)
    (root / "results" / orphan / "heatmap.npz").write_bytes(b"x")
    (root / "uploads" / orphan).mkdir(parents=True)
    (root / "uploads" / orphan / "image.png").write_bytes(b"x")
    (root / "results" / "not-a-job-id").mkdir()
    assert reconcile_once(stack.settings).swept == []  # within the grace period (1 h)
    assert orphan in folders(stack)
    old = time.time() - 7200
    for path in [*(root / "results" / orphan).rglob("*"), *(root / "uploads" / orphan).rglob("*")]:
        os.utime(path, (old, old))
    for path in (root / "results" / orphan, root / "uploads" / orphan):
        os.utime(path, (old, old))
    assert reconcile_once(stack.settings).swept == [orphan]
    assert orphan not in folders(stack) and kept in folders(stack)
    assert (root / "results" / "not-a-job-id").is_dir()  # only job folders are the sweep's business


class WatchedStorage(Storage):
    """The real local storage; each delete_prefix first notes the row's status at that moment."""

    def __init__(self, url: str, database_url: str, job_id: str):
        super().__init__(url)
        self.database_url, self.job_id, self.seen = database_url, job_id, []

    def delete_prefix(self, prefix: str) -> None:
        with session_scope(self.database_url) as session:
            self.seen.append((prefix, job_store.get_job(session, self.job_id).status))
        super().delete_prefix(prefix)


def test_an_unreadable_upload_is_gone_before_the_row_says_failed(stack, registry):
    """Issue 20, item 8: a client that sees `failed` must not find the upload still there.
    Before the fix the row was failed first and the upload removed after (a race a loaded
    CI machine lost)."""
    client = stack.client()
    response = stack.submit(client, IMAGE[: len(IMAGE) // 2])  # a truncated PNG: the header is fine
    assert response.status_code == 202, response.json
    job_id = response.json["id"]
    storage = WatchedStorage(stack.settings.resolved_storage_url, stack.settings.resolved_database_url, job_id)
    context = WorkerContext(settings=stack.settings, storage=storage, registry=registry, name="in-process")
    assert execute(job_id, context) == "failed"
    assert stack.job_row(job_id).error_code == "corrupt_image"
    uploads = [status for prefix, status in storage.seen if prefix.startswith("uploads/")]
    assert uploads == ["running"], storage.seen
    assert job_id not in folders(stack)
