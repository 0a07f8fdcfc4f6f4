"""Prometheus metrics computed at scrape time from the truth (the job rows and the broker
queue), so every API process reports the same numbers and nothing needs a shared registry.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from prometheus_client.core import CollectorRegistry, GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import select

from shared import job_store
from shared.database import session_scope
from shared.job_status import JobStatus
from shared.tables import Job, utcnow

log = logging.getLogger("heatmaps.metrics")
DURATION_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
WINDOW = timedelta(hours=1)


class JobCollector:
    def __init__(self, context):
        self.context = context

    def collect(self):
        settings = self.context.settings
        by_status = GaugeMetricFamily("heatmap_jobs", "Jobs in the database by status", labels=["status"])
        depth = GaugeMetricFamily("heatmap_queue_depth", "Messages waiting in the broker queue", labels=["queue"])
        duration = None
        tiles = GaugeMetricFamily(
            "heatmap_tiles_per_second",
            "Tiles or window batches per second of inference, jobs finished in the last hour",
        )
        try:
            with session_scope(settings.resolved_database_url) as session:
                for status, count in job_store.counts_by_status(session).items():
                    by_status.add_metric([status], count)
                since = utcnow() - WINDOW
                rows = session.execute(
                    select(Job.started_at, Job.finished_at, Job.units_total, Job.inference_seconds).where(
                        Job.status == JobStatus.succeeded, Job.finished_at >= since
                    )
                ).all()
            durations = [(f - s).total_seconds() for s, f, _, _ in rows if s and f]
            buckets = [[str(b), sum(1 for d in durations if d <= b)] for b in DURATION_BUCKETS]
            buckets.append(["+Inf", len(durations)])
            duration = HistogramMetricFamily(
                "heatmap_job_duration_seconds",
                "Run time of jobs that succeeded in the last hour",
                buckets=buckets,
                sum_value=sum(durations),
            )
            units = sum(u for _, _, u, _ in rows if u)
            seconds = sum(t for _, _, _, t in rows if t)
            tiles.add_metric([], units / seconds if seconds else 0.0)
        except Exception as exc:
            log.warning("metrics: database unavailable: %s", exc)
        try:
            depth.add_metric([settings.queue_name], self.context.redis().llen(settings.queue_name))
        except Exception as exc:
            log.warning("metrics: redis unavailable: %s", exc)
        yield by_status
        yield depth
        if duration is not None:
            yield duration
        yield tiles


def make_registry(context) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobCollector(context))
    return registry
