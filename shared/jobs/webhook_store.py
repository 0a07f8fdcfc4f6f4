"""Changes of a job row's webhook columns, each a compare-and-set like `shared.jobs.job_store`.

A delivery is due when the job is finished, has a ``callback_url``, and either was never
tried (``webhook_state`` None) or is ``pending`` with ``webhook_next_at`` in the past. A
sender claims one attempt by bumping ``webhook_attempts`` from the value it read and setting
``webhook_next_at`` to a lease (the attempt's timeout plus slack): two senders cannot make the
same attempt, and an attempt whose sender died becomes due again when the lease runs out.
The outcome is written only by the holder of that attempt number.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from shared.jobs.job_status import TERMINAL
from shared.jobs.tables import Job, utcnow

_TERMINAL = [s.value for s in TERMINAL]


class WebhookState(StrEnum):
    pending = "pending"  # an attempt is in flight or a retry is scheduled
    delivered = "delivered"  # the receiver answered 2xx
    gave_up = "gave_up"  # WEBHOOK_GIVE_UP_AFTER_S passed without a 2xx
    refused = "refused"  # the destination failed the SSRF guard at delivery time


def _due(now: datetime):
    return and_(
        Job.callback_url.is_not(None),
        Job.status.in_(_TERMINAL),
        or_(
            Job.webhook_state.is_(None),
            and_(Job.webhook_state == WebhookState.pending.value, Job.webhook_next_at <= now),
        ),
    )


def due_deliveries(session: Session, limit: int = 50, skip_origins=()) -> list[tuple[str, int, str]]:
    """(job id, attempts so far, callback_url) of deliveries that should be attempted now,
    oldest first, less those to `skip_origins` (``scheme://host:port`` as the URL's text
    begins: receivers with every slot this sender gives them in use, so that their backlog
    never fills the batch and starves the others)."""
    query = select(Job.id, Job.webhook_attempts, Job.callback_url).where(_due(utcnow()))
    for origin in skip_origins:
        query = query.where(
            Job.callback_url != origin,
            *(~Job.callback_url.startswith(origin + end, autoescape=True) for end in "/?#"),
        )
    rows = session.execute(query.order_by(Job.finished_at).limit(limit))
    return [(job_id, attempts or 0, url) for job_id, attempts, url in rows]


def claim_attempt(session: Session, job_id: str, seen_attempts: int, lease_s: float) -> bool:
    """Take attempt number `seen_attempts + 1`; False when another sender took it first."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.webhook_attempts == seen_attempts, _due(now))
        .values(
            webhook_state=WebhookState.pending.value,
            webhook_attempts=seen_attempts + 1,
            webhook_next_at=now + timedelta(seconds=lease_s),
        )
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def record_attempt(
    session: Session,
    job_id: str,
    attempt: int,
    state: WebhookState,
    status: int | None,
    error: str | None,
    next_at: datetime | None,
) -> bool:
    """The outcome of attempt `attempt` (ignored when the row moved on or was deleted)."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.webhook_attempts == attempt)
        .values(
            webhook_state=state.value,
            webhook_last_status=status,
            webhook_last_error=(error or None) and error[:300],
            webhook_last_at=utcnow(),
            webhook_next_at=next_at,
        )
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1
