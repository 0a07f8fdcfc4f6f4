"""Prometheus metrics for ``GET /metrics``.

Counters and histograms (job outcomes, run times, tiles per second) only go up: they are
kept in Redis by the process that observes each event (`shared.jobs.job_metrics`), never
computed from rows that retention deletes. Gauges say how things are now: jobs in the
database by status (``queued`` + ``running`` are the active jobs) and the broker queue depth.
Every API process reports the same numbers, so Prometheus may scrape any of them.

``/metrics`` is served on the API's port without an API key: it holds aggregate numbers
only, no job ids, owners or inputs. Set ``METRICS_TOKEN`` to require ``Authorization: Bearer
<token>`` (Prometheus: ``authorization: {credentials: ...}``) where the port is reachable
from outside.
"""

from __future__ import annotations

import hmac
import logging

from prometheus_client.core import CollectorRegistry, GaugeMetricFamily

from api.error_handlers import ApiError
from shared.jobs import job_metrics, job_store
from shared.jobs.database import session_scope

log = logging.getLogger("heatmaps.metrics")


def check_scrape_auth(settings, authorization: str | None) -> None:
    """401 unless METRICS_TOKEN is unset or the request carries it as a bearer token."""
    token = settings.metrics_token
    if not token:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "unauthorized", "GET /metrics needs 'Authorization: Bearer <METRICS_TOKEN>'")


class JobCollector:
    def __init__(self, context):
        self.context = context

    def collect(self):
        settings = self.context.settings
        by_status = GaugeMetricFamily("heatmap_jobs", "Jobs in the database now, by status", labels=["status"])
        depth = GaugeMetricFamily("heatmap_queue_depth", "Messages waiting in the broker queue", labels=["queue"])
        try:
            with session_scope(settings.resolved_database_url) as session:
                for status, count in job_store.counts_by_status(session).items():
                    by_status.add_metric([status], count)
        except Exception as exc:
            log.warning("metrics: database unavailable: %s", exc)
        yield by_status
        try:
            client = self.context.redis()
            depth.add_metric([settings.queue_name], client.llen(settings.queue_name))
            counters = list(job_metrics.collect(settings, client))
        except Exception as exc:  # no counters rather than zeros: a gap, not a reset, for rate()
            log.warning("metrics: redis unavailable: %s", exc)
            counters = []
        yield depth
        yield from counters


def make_registry(context) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobCollector(context))
    return registry
