"""The webhook sender: POSTs a finished job's JSON to its ``callback_url``, signed, with retries.

It runs as a thread in each worker's main process (beside the reconciler, away from the pool
process that runs jobs), so a receiver that hangs holds one of its ``WEBHOOK_CONCURRENCY``
delivery threads for at most ``WEBHOOK_DEADLINE_S`` in all (``WEBHOOK_TIMEOUT_S`` per socket
operation) and never the next job. One receiver (scheme, host, port) gets at most
``WEBHOOK_HOST_CONCURRENCY`` threads and never all of them, and an attempt is claimed only
when a thread is free to start it, so a slow receiver delays only its own deliveries
(issue 20: a receiver trickling one header byte every 3 s used to hold every thread).

It finds due deliveries in the database (see `shared.jobs.webhook_store`), so every way a job
ends - succeeded or failed in a worker, canceled through the API, failed ``worker_lost`` by
the reconciler - is delivered, and a sender that dies mid-attempt is replaced by another
once the attempt's lease runs out. Deliveries are at least once: receivers de-duplicate on
``X-Heatmap-Delivery`` (job id) and the job's status.

Retries: after a failed attempt (no answer, or not 2xx) the next waits ``WEBHOOK_RETRY_BASE_S``
doubled per attempt, at most ``WEBHOOK_RETRY_MAX_DELAY_S``; no attempt starts later than
``WEBHOOK_GIVE_UP_AFTER_S`` after the job finished (then ``gave_up``). ``python -m
worker.webhook_delivery`` runs the sender alone.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, timedelta

import urllib3
import urllib3.connection

from shared.jobs import job_store, webhook_store
from shared.jobs.database import session_scope
from shared.jobs.tables import Job, utcnow
from shared.jobs.webhook_store import WebhookState
from shared.settings import Settings, get_settings
from shared.webhook_signing import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    Destination,
    DestinationRefused,
    check_destination,
    sign,
)

log = logging.getLogger("heatmaps.webhooks")


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def job_payload(job: Job) -> dict:
    """The job as GET /api/v1/jobs/<id> shows it, less the artifact links (fetch them there)."""
    result = None
    if job.result:
        summary = job.result["summary"]
        result = {
            "classes": [{key: c[key] for key in ("name", "index", "max", "mean", "peak")} for c in summary["classes"]],
            "grid": summary["grid"],
            "timings": summary["timings"],
        }
    return {
        "event": f"job.{job.status}",
        "job": {
            "id": job.id,
            "status": job.status,
            "created_at": _iso(job.created_at),
            "started_at": _iso(job.started_at),
            "finished_at": _iso(job.finished_at),
            "model": job.model,
            "mode": job.mode,
            "params": job.params,
            "attempts": job.attempts,
            "image": {"width": job.image_width, "height": job.image_height, "sha256": job.image_sha256},
            "error": {"code": job.error_code, "message": job.error_message or ""} if job.error_code else None,
            "result": result,
        },
    }


class AttemptDeadline(Exception):
    """The attempt ran past ``WEBHOOK_DEADLINE_S`` in all and was cut off."""


def post(destination: Destination, body: bytes, headers: dict, timeout_s: float, deadline_s: float) -> int:
    """One POST to the checked address (not a second DNS answer); no redirects, no retries.

    `timeout_s` bounds each socket operation, `deadline_s` the whole attempt: a watchdog shuts
    the socket down when it passes, so a receiver that sends one byte every few seconds
    (each within the timeout) cannot hold a delivery thread for longer (issue 20)."""
    default_port = 443 if destination.scheme == "https" else 80
    host = f"[{destination.host}]" if ":" in destination.host else destination.host
    headers = {**headers, "Host": host if destination.port == default_port else f"{host}:{destination.port}"}
    connection = _connection(destination, timeout_s)
    expired = threading.Event()
    watchdog = threading.Timer(deadline_s, _cut, (connection, expired))
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.connect()  # bounded by timeout_s; the watchdog may fire meanwhile
        if expired.is_set():
            raise AttemptDeadline(f"no answer within {deadline_s:g}s")
        connection.request("POST", destination.path, body=body, headers=headers)
        status = connection.getresponse().status  # the body is not read: closing drops the connection
        if expired.is_set():  # a head cut short by the watchdog can still parse: it is no answer
            raise AttemptDeadline(f"no answer within {deadline_s:g}s")
        return status
    except AttemptDeadline:
        raise
    except Exception as exc:
        if expired.is_set():
            raise AttemptDeadline(f"no answer within {deadline_s:g}s") from exc
        raise
    finally:
        watchdog.cancel()
        connection.close()


def _connection(destination: Destination, timeout_s: float) -> urllib3.connection.HTTPConnection:
    """A connection to the checked address; TLS verifies the certificate for the name."""
    timeout = float(timeout_s)  # connect, and each send or receive
    if destination.scheme == "https":
        return urllib3.connection.HTTPSConnection(
            destination.address,
            destination.port,
            timeout=timeout,
            server_hostname=destination.host,
            assert_hostname=destination.host,
            cert_reqs="CERT_REQUIRED",
        )
    return urllib3.connection.HTTPConnection(destination.address, destination.port, timeout=timeout)


def _cut(connection: urllib3.connection.HTTPConnection, expired: threading.Event) -> None:
    """The watchdog: mark the attempt expired, then wake whatever operation is blocked."""
    expired.set()
    sock = connection.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed


def origin(url: str) -> str:
    """``scheme://host:port`` exactly as the URL's text begins: one receiver, for the limit."""
    head, _, rest = (url or "").partition("://")
    for index, char in enumerate(rest):
        if char in "/?#":
            return f"{head}://{rest[:index]}"
    return f"{head}://{rest}"


class WebhookSender:
    """Finds due deliveries and runs each attempt on a small thread pool."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.pool = ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="webhook")
        # An attempt's lease: longer than the longest attempt (its deadline, or a connect that
        # the deadline interrupted), so an attempt in flight is never claimed a second time.
        self.lease_s = max(settings.webhook_deadline_s, settings.webhook_timeout_s) + 10
        # One receiver gets at most this many threads, and never all of them.
        concurrency = settings.webhook_concurrency
        self.host_limit = max(1, min(settings.webhook_host_concurrency, concurrency - 1))
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()

    def run_once(self) -> int:
        """Claim due attempts while threads are free (each receiver within its share) and
        hand each to the pool, where it starts at once; returns how many."""
        url = self.settings.resolved_database_url
        with self._lock:
            if self._in_flight.total() >= self.settings.webhook_concurrency:
                return 0
            full = [name for name, count in self._in_flight.items() if count >= self.host_limit]
        with session_scope(url) as session:
            due = webhook_store.due_deliveries(session, limit=4 * self.settings.webhook_concurrency, skip_origins=full)
        started = 0
        for job_id, seen, callback in due:
            receiver = origin(callback)
            if not self._reserve(receiver):
                continue
            with session_scope(url) as session:
                claimed = webhook_store.claim_attempt(session, job_id, seen, self.lease_s)
            if claimed:
                self.pool.submit(self._attempt_safely, job_id, seen + 1, receiver)
                started += 1
            else:
                self._release(receiver)
        return started

    def _reserve(self, receiver: str) -> bool:
        with self._lock:
            if self._in_flight.total() >= self.settings.webhook_concurrency:
                return False
            if self._in_flight[receiver] >= self.host_limit:
                return False
            self._in_flight[receiver] += 1
            return True

    def _release(self, receiver: str) -> None:
        with self._lock:
            self._in_flight[receiver] -= 1
            if self._in_flight[receiver] <= 0:
                del self._in_flight[receiver]

    def _attempt_safely(self, job_id: str, attempt: int, receiver: str) -> None:
        try:
            self.attempt(job_id, attempt)
        except Exception:  # the lease runs out and the attempt is made again
            log.exception("webhook attempt %d for job %s crashed", attempt, job_id)
        finally:
            self._release(receiver)

    def attempt(self, job_id: str, attempt: int) -> WebhookState | None:
        settings = self.settings
        with session_scope(settings.resolved_database_url) as session:
            job = job_store.get_job(session, job_id)
            if job is None:
                return None  # deleted meanwhile: nothing to tell
            callback, finished, payload = job.callback_url, job.finished_at, job_payload(job)
        if finished is not None and finished.tzinfo is None:  # SQLite drops the zone
            finished = finished.replace(tzinfo=UTC)
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "heatmap-webhooks/1",
            EVENT_HEADER: payload["event"],
            DELIVERY_HEADER: job_id,
            SIGNATURE_HEADER: sign(settings.webhook_secret or "", body),
        }
        status, error = None, None
        try:
            destination = check_destination(callback, settings)
            status = post(destination, body, headers, settings.webhook_timeout_s, settings.webhook_deadline_s)
        except DestinationRefused as exc:
            return self._record(job_id, attempt, WebhookState.refused, None, exc.message, None)
        except Exception as exc:  # no answer: connection refused, timeout, TLS, protocol
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
        if status is not None and 200 <= status < 300:
            return self._record(job_id, attempt, WebhookState.delivered, status, None, None)
        error = error or f"HTTP {status}"
        delay = min(settings.webhook_retry_base_s * 2 ** (attempt - 1), settings.webhook_retry_max_delay_s)
        next_at = utcnow() + timedelta(seconds=delay)
        if finished is None or next_at > finished + timedelta(seconds=settings.webhook_give_up_after_s):
            return self._record(job_id, attempt, WebhookState.gave_up, status, error, None)
        return self._record(job_id, attempt, WebhookState.pending, status, error, next_at)

    def _record(self, job_id, attempt, state, status, error, next_at) -> WebhookState:
        with session_scope(self.settings.resolved_database_url) as session:
            webhook_store.record_attempt(session, job_id, attempt, state, status, error, next_at)
        log.info("webhook for job %s attempt %d: %s (%s)", job_id, attempt, state.value, error or status)
        return state

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.wait(self.settings.webhook_poll_interval_s):
            try:
                self.run_once()
            except Exception:  # the database may be down; the next pass tries again
                log.exception("webhook pass failed")
        self.pool.shutdown(wait=False, cancel_futures=True)


def start_thread(settings: Settings) -> threading.Event:
    stop = threading.Event()
    sender = WebhookSender(settings)
    threading.Thread(target=sender.run_forever, args=(stop,), name="webhook-sender", daemon=True).start()
    return stop


def main() -> int:
    logging.basicConfig(level=logging.INFO)
    settings = get_settings()
    try:
        WebhookSender(settings).run_forever(threading.Event())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
