"""Faults: killed workers, a stopped broker, a locked database, a full disk, shutdown.

Every submitted job must end in a terminal state within a bound, with one result, and the
database and storage must agree. Each test builds its own stack (own Redis and database).
"""

from __future__ import annotations

import os
import resource
import signal
import sqlite3
import threading
import time

import pytest
from conftest import DATABASES, scene_png

pytestmark = pytest.mark.slow
LONG_JOB = {"mode": "tiled", "stride": 4, "batch_size": 32}


def long_image() -> bytes:
    return scene_png(720, 560, seed=99, n_objects=3)[0]


def wait_running(stack, client, job_id, attempts=1, timeout=120):
    return stack.wait_for(
        client,
        job_id,
        statuses=("running",),
        predicate=lambda b: b["attempts"] == attempts and b["progress"] > 0.02,
        timeout=timeout,
    )


def assert_consistent(stack, job_id):
    """The row and the files agree: a succeeded job has every artifact it names, complete.
    Call it when no job is running: it also checks that no temporary file is left anywhere."""
    row = stack.job_row(job_id)
    root = stack.tmp_path / "storage"
    if row.status == "succeeded":
        artifacts = row.result["artifacts"]
        keys = [artifacts["heatmap"], artifacts["summary"], *artifacts["overlays"].values()]
        for key in keys:
            assert (root / key).is_file() and (root / key).stat().st_size > 0, key
        import numpy as np

        with np.load(root / artifacts["heatmap"]) as data:
            assert data["scores"].ndim == 3
    leftovers = [p for p in root.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_pool_process_killed_mid_job_is_rerun(fresh_stack):
    stack = fresh_stack()
    worker = stack.start_worker()
    client = stack.client()
    job_id = stack.submit(client, long_image(), **LONG_JOB).json["id"]
    wait_running(stack, client, job_id)
    (child,) = stack.pool_children(worker)
    os.kill(child, signal.SIGKILL)
    done = stack.wait_for(client, job_id, timeout=180)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    assert_consistent(stack, job_id)


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _scratch(folder, job_id: str, pid: int):
    path = folder / f"job-{job_id}-pid{pid}-x"
    path.mkdir(parents=True)
    (path / "image").write_bytes(b"x" * 100)
    return path


def _wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_killed_pool_process_leaves_no_scratch_and_other_stacks_keep_theirs(fresh_stack, tmp_path):
    """Issue 20, item 6: the scratch folder of a SIGKILLed pool process stayed until the
    worker's main process restarted (with S3 storage: the downloaded input and partial
    outputs), and a worker's start-up sweep cleared other stacks' folders in the shared temp
    folder. Now Celery's replacement pool process sweeps at once, and only this stack's."""
    temp = tmp_path / "tmp"
    mine = temp / "mine"
    stack = fresh_stack(scratch_dir=mine)
    dead = _dead_pid()
    stale = _scratch(mine, "a" * 32, dead)  # this stack's, left by a killed worker
    theirs = [_scratch(temp, "b" * 32, dead), _scratch(temp / "heatmaps-scratch-other", "c" * 32, dead)]
    worker = stack.start_worker(TMPDIR=str(temp))
    _wait_until(lambda: not stale.exists(), 60, "the start-up sweep")
    client = stack.client()
    job_id = stack.submit(client, long_image(), **LONG_JOB).json["id"]
    wait_running(stack, client, job_id)
    (child,) = stack.pool_children(worker)
    (folder,) = mine.glob(f"job-{job_id}-pid{child}-*")
    os.kill(child, signal.SIGKILL)
    _wait_until(lambda: not folder.exists(), 60, "the replacement pool process to sweep")
    assert stack.wait_for(client, job_id, timeout=180)["status"] == "succeeded"
    # the second attempt removes its own folder right after its commit (not seen by clients)
    _wait_until(lambda: list(mine.glob(f"job-{job_id}-*")) == [], 60, "the second attempt's clean-up")
    assert all(path.exists() for path in theirs), theirs


def test_whole_worker_killed_and_replaced(fresh_stack):
    stack = fresh_stack()
    first = stack.start_worker("first")
    client = stack.client()
    job_id = stack.submit(client, long_image(), **LONG_JOB).json["id"]
    wait_running(stack, client, job_id)
    stack.stop_worker(first, signal.SIGKILL)
    stack.start_worker("second")
    done = stack.wait_for(client, job_id, timeout=180)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    assert done["worker"] == "second"
    assert_consistent(stack, job_id)


def test_job_that_kills_its_worker_every_time_is_failed_after_max_attempts(fresh_stack):
    stack = fresh_stack(job_max_attempts=2)
    worker = stack.start_worker()
    client = stack.client()
    job_id = stack.submit(client, long_image(), **LONG_JOB).json["id"]
    for attempt in (1, 2):
        wait_running(stack, client, job_id, attempts=attempt, timeout=180)
        for child in stack.pool_children(worker):
            os.kill(child, signal.SIGKILL)
    done = stack.wait_for(client, job_id, timeout=120)
    assert done["status"] == "failed" and done["attempts"] == 2, done
    assert done["error"]["code"] == "worker_lost"
    # The worker survives and serves the next job.
    follow_up = stack.submit(client, scene_png(160, 160, seed=1)[0]).json["id"]
    assert stack.wait_for(client, follow_up, timeout=120)["status"] == "succeeded"


@pytest.mark.parametrize("appendonly", [True, False], ids=["aof", "no-persistence"])
def test_redis_restart_loses_no_job(fresh_stack, appendonly):
    stack = fresh_stack(appendonly=appendonly, rate_limit_per_minute=1000)  # the limiter fails open
    stack.start_worker()
    client = stack.client()
    running = stack.submit(client, long_image(), **LONG_JOB).json["id"]
    queued = [stack.submit(client, scene_png(160, 160, seed=s)[0]).json["id"] for s in range(3)]
    wait_running(stack, client, running)
    stack.redis.stop()
    assert client.get("/readyz").status_code == 503
    # Submissions while Redis is down are accepted (the row is the truth) and sent later.
    during = stack.submit(client, scene_png(160, 160, seed=9)[0])
    assert during.status_code == 202, during.json
    time.sleep(2)
    stack.redis.start()
    assert client.get("/readyz").status_code == 200
    ids = [running, *queued, during.json["id"]]
    for job_id in ids:
        done = stack.wait_for(client, job_id, timeout=240)
        assert done["status"] == "succeeded", done
    for job_id in ids:  # once nothing is being written any more
        assert_consistent(stack, job_id)


@pytest.mark.parametrize("database", DATABASES)
def test_database_unavailable_during_updates_recovers(fresh_stack, database):
    """The jobs table is locked for 3 s while the worker heart-beats; on PostgreSQL the worker's
    connections are also killed. The worker waits or reconnects, and the job still succeeds."""
    stack = fresh_stack(database)
    stack.start_worker()
    client = stack.client()
    job_id = stack.submit(client, long_image(), **LONG_JOB).json["id"]
    wait_running(stack, client, job_id)
    url = stack.settings.resolved_database_url
    if database == "sqlite":
        lock = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30)
        lock.execute("BEGIN EXCLUSIVE")  # heartbeats and commits block while this is held
        time.sleep(3)
        lock.rollback()
        lock.close()
    else:
        from sqlalchemy import create_engine, text

        engine = create_engine(url)
        with engine.connect() as conn:
            conn.execute(text("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE"))
            time.sleep(3)
            conn.rollback()
        with engine.connect() as conn:  # drop every other connection to this database
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
            conn.commit()
        engine.dispose()
    done = stack.wait_for(client, job_id, timeout=180)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    assert_consistent(stack, job_id)


def test_disk_full_while_writing_fails_the_job(fresh_stack):
    stack = fresh_stack()

    def small_files():  # writes past 400 KB (the overlay PNGs of this scene) fail with EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (400 * 1024, 400 * 1024))

    stack.start_worker(preexec_fn=small_files)
    client = stack.client()
    job_id = stack.submit(client, scene_png(1400, 1000, seed=4, n_objects=4)[0], top_k=3).json["id"]
    done = stack.wait_for(client, job_id, timeout=120)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "storage_error"
    assert client.get(f"/api/v1/jobs/{job_id}/heatmap").status_code == 409
    assert_consistent(stack, job_id)


def test_sigterm_finishes_the_running_job(fresh_stack):
    stack = fresh_stack()
    worker = stack.start_worker()
    client = stack.client()
    job_id = stack.submit(client, long_image(), **LONG_JOB).json["id"]
    wait_running(stack, client, job_id)
    stopper = threading.Thread(target=stack.stop_worker, args=(worker, signal.SIGTERM, 240))
    stopper.start()
    done = stack.wait_for(client, job_id, timeout=240)
    stopper.join()
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    assert worker.poll() is not None  # and the worker did stop
    assert_consistent(stack, job_id)


def test_two_workers_share_a_backlog_without_running_a_job_twice(fresh_stack):
    stack = fresh_stack()
    first, second = stack.start_worker("a"), stack.start_worker("b")
    client = stack.client()
    ids = [stack.submit(client, scene_png(192, 160, seed=s)[0], classes="circle").json["id"] for s in range(16)]
    results = [stack.wait_for(client, job_id, timeout=180) for job_id in ids]
    assert all(r["status"] == "succeeded" and r["attempts"] == 1 for r in results)
    assert {r["worker"] for r in results} == {"a", "b"}
    commits = "".join(p.log_path.read_text() for p in (first, second))
    for job_id in ids:
        assert commits.count(f"job {job_id} succeeded") == 1
