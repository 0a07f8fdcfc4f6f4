"""Prometheus counters and histograms of job outcomes, kept in Redis by the process that
observes each event, and read back by the API's ``/metrics``.

Why Redis and not the rows: a count computed from the jobs table goes down when retention
deletes rows, and ``rate()`` reads every drop as a counter reset. Why not prometheus_client's
multiprocess mode: workers come and go (``--scale worker=N``, pool children replaced after
a crash), and each would need its own scrape target and files that outlive it. Redis is
already the broker that every API and worker process reaches; its counters only go up (a
Redis that loses its data without persistence reads as one counter reset, which ``rate()``
handles).

Who counts what, each event exactly once:
* the worker (pool process) counts ``succeeded`` and ``failed`` for the attempt it holds
  (the row's claim token is its own), with the run time and the tiles per second;
* the API counts ``canceled`` when its DELETE moves a job to canceled;
* the reconciler counts ``failed`` for jobs it fails with ``worker_lost``.
Counting never fails a job: a Redis error is logged and that increment is lost.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import redis
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from shared.jobs import job_store
from shared.jobs.database import session_scope
from shared.jobs.job_status import JobStatus, ShardState
from shared.jobspec import MODES
from shared.settings import Settings

log = logging.getLogger("heatmaps.metrics")
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
TILES_PER_SECOND_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
OUTCOMES = (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)
HISTOGRAMS = {
    "duration": DURATION_BUCKETS,
    "tiles_per_second": TILES_PER_SECOND_BUCKETS,
}


#: How a shard run can end (the `heatmap_shards` counter's labels).
SHARD_OUTCOMES = (ShardState.done.value, ShardState.failed.value, "lost")


def _prefix(settings: Settings) -> str:
    """One namespace per deployment (its queue), so stacks sharing a Redis do not mix."""
    return f"heatmap:metrics:{settings.queue_name}"


@lru_cache(maxsize=8)
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)


def _bucket_field(buckets: tuple, value: float) -> str:
    for index, bound in enumerate(buckets):
        if value <= bound:
            return f"b{index}"
    return "inf"


def count_outcome(settings: Settings, outcome: JobStatus, mode: str | None = None, **observed: float) -> None:
    """One finished job: +1 outcome; for a succeeded job also observe `duration` (seconds of
    the attempt) and `tiles_per_second`, and add `tiles` and `inference_seconds` to totals."""
    if not settings.redis_url:
        return
    prefix = _prefix(settings)
    try:
        pipe = _client(settings.redis_url).pipeline(transaction=True)
        pipe.hincrby(f"{prefix}:outcomes", outcome.value, 1)
        for name, buckets in HISTOGRAMS.items():
            value = observed.get(name)
            if value is None or mode is None:
                continue
            key = f"{prefix}:{name}:{mode}"
            pipe.hincrby(key, _bucket_field(buckets, value), 1)
            pipe.hincrbyfloat(key, "sum", value)
        if mode is not None and observed.get("tiles") is not None:
            pipe.hincrbyfloat(f"{prefix}:tiles", mode, observed["tiles"])
            pipe.hincrbyfloat(f"{prefix}:inference_seconds", mode, observed.get("inference_seconds") or 0.0)
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("metrics: could not count a %s job: %s", outcome.value, exc)


def count_shard(settings: Settings, outcome: str) -> None:
    """One shard run ended: `outcome` is a ShardState (done, failed) or "lost" (its run was
    stopped: the job canceled, the shard re-queued, a backup committed first)."""
    if not settings.redis_url:
        return
    try:
        _client(settings.redis_url).hincrby(f"{_prefix(settings)}:shards", outcome, 1)
    except redis.RedisError as exc:
        log.warning("metrics: could not count a shard: %s", exc)


def observe_job_end(settings: Settings, job_id: str, token: str) -> None:
    """Count the attempt this worker held (claim `token`) if it ended succeeded or failed."""
    with session_scope(settings.resolved_database_url) as session:
        job = job_store.get_job(session, job_id)
        if job is None or job.claim_token != token or job.status not in (JobStatus.succeeded, JobStatus.failed):
            return
        if job.error_code == "worker_lost":  # failed by the reconciler, which counted it
            return
        status, mode = JobStatus(job.status), job.mode
        duration = (job.finished_at - job.started_at).total_seconds() if job.started_at and job.finished_at else None
        tiles, seconds = job.units_total, job.inference_seconds
    if status != JobStatus.succeeded:
        count_outcome(settings, status)
        return
    rate = tiles / seconds if tiles and seconds else None
    count_outcome(
        settings, status, mode, duration=duration, tiles_per_second=rate, tiles=tiles, inference_seconds=seconds
    )


def _histogram(name: str, doc: str, buckets: tuple, values: dict[str, dict]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["mode"])
    for mode, fields in values.items():
        cumulative, points = 0, []
        for index, bound in enumerate(buckets):
            cumulative += int(fields.get(f"b{index}", 0))
            points.append((str(float(bound)), cumulative))
        cumulative += int(fields.get("inf", 0))
        points.append(("+Inf", cumulative))
        family.add_metric([mode], points, sum_value=float(fields.get("sum", 0.0)))
    return family


def collect(settings: Settings, client: redis.Redis):
    """The counter and histogram families, read from Redis (raises RedisError when it is down)."""
    prefix = _prefix(settings)
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(f"{prefix}:outcomes")
    for name in HISTOGRAMS:
        for mode in MODES:
            pipe.hgetall(f"{prefix}:{name}:{mode}")
    pipe.hgetall(f"{prefix}:tiles")
    pipe.hgetall(f"{prefix}:inference_seconds")
    pipe.hgetall(f"{prefix}:shards")
    replies = [{k.decode(): float(v) for k, v in reply.items()} for reply in pipe.execute()]
    shard_runs = replies.pop()
    outcomes = CounterMetricFamily("heatmap_jobs_finished", "Jobs that reached a final state", labels=["outcome"])
    for outcome in OUTCOMES:
        outcomes.add_metric([outcome.value], replies[0].get(outcome.value, 0.0))
    yield outcomes
    docs = {
        "duration": ("heatmap_job_duration_seconds", "Run time of the attempt that succeeded (started to finished)"),
        "tiles_per_second": ("heatmap_job_tiles_per_second", "Tiles or window batches per inference second, per job"),
    }
    for offset, (name, buckets) in enumerate(HISTOGRAMS.items()):
        values = dict(zip(MODES, replies[1 + offset * len(MODES) : 1 + (offset + 1) * len(MODES)], strict=True))
        yield _histogram(*docs[name], buckets, values)
    tiles = CounterMetricFamily(
        "heatmap_tiles", "Tiles or window batches computed by jobs that succeeded", labels=["mode"]
    )
    seconds = CounterMetricFamily(
        "heatmap_inference_seconds", "Inference seconds of jobs that succeeded", labels=["mode"]
    )
    for mode in MODES:
        tiles.add_metric([mode], replies[-2].get(mode, 0.0))
        seconds.add_metric([mode], replies[-1].get(mode, 0.0))
    yield tiles
    yield seconds
    shards = CounterMetricFamily(
        "heatmap_shards", "Shard runs of sharded jobs that ended, by outcome (done, failed, lost)", labels=["outcome"]
    )
    for outcome in SHARD_OUTCOMES:
        shards.add_metric([outcome], shard_runs.get(outcome, 0.0))
    yield shards
