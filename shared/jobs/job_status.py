"""The job statuses: the one place their names are written.

Everything that compares, stores, lists or documents a status (the job store, the API
schemas, metrics, the worker, the dev tools) uses these members, never a string literal.
A plain `StrEnum`, so members compare equal to the strings stored in the database and sent
in JSON.
"""

from __future__ import annotations

import enum


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


#: No further transition happens from these (except deletion).
TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.canceled})
#: Counted by the per-key active-jobs quota.
ACTIVE = frozenset({JobStatus.queued, JobStatus.running})
#: Jobs that POST /jobs/<id>/retry (and the page's Retry button) take again.
RETRYABLE = (JobStatus.failed, JobStatus.canceled)
