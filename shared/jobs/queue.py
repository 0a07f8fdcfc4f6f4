"""The Celery application object and the task names, shared by the API (which only sends)
and the worker (which consumes). The message carries nothing but the job id: the database
row is the truth. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import threading

import redis
from celery import Celery

from shared.settings import Settings

RUN_JOB_TASK = "heatmaps.run_job"
#: One shard of a sharded job (issue 16): args ``[job_id, shard_index, backup]``.
RUN_SHARD_TASK = "heatmaps.run_shard"


def make_celery(settings: Settings) -> Celery:
    app = Celery("heatmaps", broker=settings.redis_url or "redis://127.0.0.1:6379/0")
    app.conf.update(
        task_default_queue=settings.queue_name,
        task_routes={RUN_JOB_TASK: {"queue": settings.queue_name}, RUN_SHARD_TASK: {"queue": settings.queue_name}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # One job at a time per process, acknowledged only when finished: a worker that
        # dies mid-job leaves the message (and the row) to be picked up again.
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=False,  # the reconciler re-runs lost jobs, counting attempts
        task_time_limit=settings.job_time_limit_s,
        task_soft_time_limit=settings.job_soft_time_limit_s,
        broker_transport_options={
            "visibility_timeout": settings.broker_visibility_timeout_s,
            "socket_connect_timeout": 2,
            "socket_timeout": 5,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=2,
        worker_proc_alive_timeout=180,  # the pool child imports TensorFlow and warms models first
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app


_apps: dict[tuple[str | None, str], Celery] = {}
_apps_lock = threading.Lock()


def celery_for(settings: Settings) -> Celery:
    """One Celery app (and its connection pool) per broker and queue, built from these settings."""
    key = (settings.redis_url, settings.queue_name)
    with _apps_lock:
        if key not in _apps:
            _apps[key] = make_celery(settings)
        return _apps[key]


def send_job(settings: Settings, job_id: str) -> None:
    """Publish the job id. Raises on broker failure; the caller keeps the row `queued`
    and the reconciler re-sends it later."""
    app = celery_for(settings)
    app.send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id, queue=settings.queue_name, retry=False)


def send_shard(settings: Settings, job_id: str, index: int, backup: bool = False) -> None:
    """Publish one shard of a job (on the jobs' queue: any worker runs any shard). Raises on
    broker failure; the shard row stays `queued` and the reconciler sends it later."""
    app = celery_for(settings)
    task_id = f"{job_id}.{int(index)}{'.backup' if backup else ''}"
    app.send_task(
        RUN_SHARD_TASK, args=[job_id, int(index), bool(backup)], task_id=task_id, queue=settings.queue_name, retry=False
    )


#: How often a worker says it is alive (`announce_worker`), and how long the word lasts.
WORKER_ANNOUNCE_INTERVAL_S = 5.0
WORKER_ANNOUNCE_TTL_S = 15.0


def _workers_key(settings: Settings, name: str = "") -> str:
    return f"heatmaps:workers:{settings.queue_name}:{name}"


def announce_worker(settings: Settings, name: str, alive: bool = True) -> None:
    """Record (or, with `alive` False, withdraw) that worker `name` consumes this queue: what
    `shards=auto` sizes a job by. The record expires on its own when the worker dies."""
    if not settings.redis_url:
        return
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        if alive:
            client.set(_workers_key(settings, name), "1", ex=int(WORKER_ANNOUNCE_TTL_S))
        else:
            client.delete(_workers_key(settings, name))
    finally:
        client.close()


def live_workers(settings: Settings) -> int:
    """Workers that announced themselves on this queue within WORKER_ANNOUNCE_TTL_S (0 when
    Redis cannot say)."""
    if not settings.redis_url:
        return 0
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return sum(1 for _ in client.scan_iter(match=_workers_key(settings, "*"), count=1000))
    except redis.RedisError:
        return 0
    finally:
        client.close()
