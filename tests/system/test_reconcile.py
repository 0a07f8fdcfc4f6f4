"""The reconciler on a real database and a real Redis: re-send, rescue, give up, expire."""

from __future__ import annotations

from datetime import timedelta

import pytest
import redis
from conftest import DATABASES, Stack, make_database

from shared.jobs import job_store
from shared.jobs.database import session_scope
from shared.jobs.reconcile import reconcile_once
from shared.jobs.tables import Job, utcnow


@pytest.fixture(params=DATABASES)
def stack(request, tmp_path, redis_server):
    stack = Stack(
        tmp_path,
        make_database(request.param, tmp_path),
        redis_server,
        requeue_queued_after_s=30,
        stale_after_s=30,
        job_max_attempts=2,
        retention_hours=1,
    )
    yield stack
    stack.close()


def add_job(stack, **values) -> str:
    job = Job(
        model="shapes",
        mode="direct",
        params={},
        image_key="uploads/x/image.png",
        image_format="PNG",
        image_width=100,
        image_height=100,
        image_sha256="0" * 64,
        image_bytes=1,
        **values,
    )
    with session_scope(stack.settings.resolved_database_url) as session:
        session.add(job)
        session.flush()
        return job.id


def queue_length(stack) -> int:
    return redis.Redis.from_url(stack.redis.url).llen(stack.settings.queue_name)


def test_unsent_and_lost_queued_jobs_are_sent_once(stack):
    old = utcnow() - timedelta(minutes=5)
    never_sent = add_job(stack, created_at=old)
    sent_long_ago = add_job(stack, created_at=old, enqueued_at=old)
    sent_just_now = add_job(stack, created_at=old, enqueued_at=utcnow())
    just_created = add_job(stack)
    report = reconcile_once(stack.settings)
    assert sorted(report.sent) == sorted([never_sent, sent_long_ago])
    assert queue_length(stack) == 2
    assert reconcile_once(stack.settings).sent == []  # marked as sent: not again before the delay
    assert just_created not in report.sent and sent_just_now not in report.sent


def test_stale_running_jobs_are_requeued_then_failed(stack):
    stale = utcnow() - timedelta(minutes=5)
    retry = add_job(stack, status="running", attempts=1, claim_token="a" * 32, heartbeat_at=stale)
    give_up = add_job(stack, status="running", attempts=2, claim_token="b" * 32, heartbeat_at=stale)
    alive = add_job(stack, status="running", attempts=1, claim_token="c" * 32, heartbeat_at=utcnow())
    report = reconcile_once(stack.settings)
    assert report.requeued == [retry] and report.failed == [give_up]
    assert retry in report.sent  # re-queued jobs are sent in the same pass
    with session_scope(stack.settings.resolved_database_url) as session:
        assert job_store.get_job(session, retry).status == "queued"
        failed = job_store.get_job(session, give_up)
        assert failed.status == "failed" and failed.error_code == "worker_lost"
        assert job_store.get_job(session, alive).status == "running"
        # The old holder of the re-queued job can no longer write to it.
        assert not job_store.heartbeat(session, retry, "a" * 32, 1, 2)
        assert not job_store.finish_succeeded(session, retry, "a" * 32, {}, 1.0)


def test_claim_is_exclusive(stack):
    job_id = add_job(stack)
    with session_scope(stack.settings.resolved_database_url) as session:
        first = job_store.claim(session, job_id, "w1")
    with session_scope(stack.settings.resolved_database_url) as session:
        second = job_store.claim(session, job_id, "w2")
        row = job_store.get_job(session, job_id)
    assert first and second is None
    assert row.attempts == 1 and row.worker == "w1" and row.status == "running"


def test_expired_jobs_are_deleted_with_their_files(stack):
    storage_root = stack.tmp_path / "storage"
    long_ago = utcnow() - timedelta(hours=2)
    expired = add_job(stack, status="succeeded", finished_at=long_ago)
    recent = add_job(stack, status="succeeded", finished_at=utcnow())
    running = add_job(stack, status="running", heartbeat_at=utcnow(), created_at=long_ago)
    for job_id in (expired, recent):
        for key in (f"results/{job_id}/heatmap.npz", f"uploads/{job_id}/image.png"):
            (storage_root / key).parent.mkdir(parents=True, exist_ok=True)
            (storage_root / key).write_bytes(b"x")
    report = reconcile_once(stack.settings)
    assert report.deleted == [expired]
    assert not (storage_root / "results" / expired).exists() and not (storage_root / "uploads" / expired).exists()
    assert (storage_root / "results" / recent / "heatmap.npz").exists()
    with session_scope(stack.settings.resolved_database_url) as session:
        assert job_store.get_job(session, expired) is None
        assert job_store.get_job(session, running) is not None
