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


class ShardState(enum.StrEnum):
    """A shard of a sharded job (issue 16; shared.jobs.shard_store): queued until a worker
    claims it, running while it computes its band, done once its partial grid is stored
    and committed, failed when its input was bad (the job fails with the same reason)."""

    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


class JobPhase(enum.StrEnum):
    """What a job is doing now (the job JSON's `phase`): a running job reads its input, runs
    the model, writes its outputs and stores them; so that progress never sits silently at
    one value while minutes of work go on (issue 17)."""

    queued = "queued"
    reading = "reading"  # model load, opening the input, the tissue mask
    inference = "inference"
    writing = "writing"  # score grid, summary, heat pyramids, heatmap.tif, regions, overlays
    storing = "storing"  # copying the outputs to storage
    done = "done"  # succeeded, failed or canceled: the status says which


#: The part of `progress` (0..1) each running phase spans; within a phase, progress grows with
#: the phase's own fraction (tiles computed, writers done). 1.0 only once the job succeeded.
PHASE_PROGRESS = {
    JobPhase.reading: (0.0, 0.02),
    JobPhase.inference: (0.02, 0.85),
    JobPhase.writing: (0.85, 0.97),
    JobPhase.storing: (0.97, 0.99),
}


def phase_progress(phase: JobPhase, fraction: float) -> float:
    """Overall progress at `fraction` (0..1) of `phase`."""
    start, end = PHASE_PROGRESS[phase]
    return round(start + (end - start) * min(1.0, max(0.0, fraction)), 4)


def public_phase(status: str, phase: str | None) -> JobPhase:
    """The phase clients see: queued and finished jobs by their status, a running one as the
    worker last recorded it (reading until its first record)."""
    if status == JobStatus.queued:
        return JobPhase.queued
    if status in TERMINAL:
        return JobPhase.done
    return JobPhase(phase) if phase in JobPhase.__members__ else JobPhase.reading
