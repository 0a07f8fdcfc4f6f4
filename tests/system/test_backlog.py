"""Backlog under fire: 300 small jobs, 3 workers, one of them SIGKILLed twice during the run.

All 300 must end succeeded, none lost, none committed twice. Run with ``-s`` to see the
figures quoted in bench/README.md (``pytest tests/system/test_backlog.py -s``).
"""

from __future__ import annotations

import signal
import time

import pytest
from conftest import scene_png

pytestmark = pytest.mark.slow
JOBS = 300


def test_backlog_with_a_worker_killed_twice(fresh_stack):
    stack = fresh_stack(stale_after_s=4.0)
    workers = {name: stack.start_worker(name) for name in ("a", "b", "c")}
    client = stack.client()
    images = [scene_png(128, 128, seed=s, n_objects=1)[0] for s in range(10)]
    started = time.monotonic()
    ids = []
    for i in range(JOBS):
        response = stack.submit(client, images[i % len(images)], classes="circle,square")
        assert response.status_code == 202, response.json
        ids.append(response.json["id"])

    def finished() -> int:
        return sum(1 for job_id in ids if stack.job_row(job_id).status in ("succeeded", "failed", "canceled"))

    kills = 0
    for threshold in (JOBS // 5, JOBS // 2):
        deadline = time.monotonic() + 300
        while finished() < threshold and time.monotonic() < deadline:
            time.sleep(0.5)
        stack.stop_worker(workers["c"], signal.SIGKILL)
        kills += 1
        workers["c"] = stack.start_worker("c")

    deadline = time.monotonic() + 600
    while finished() < JOBS and time.monotonic() < deadline:
        time.sleep(0.5)
    elapsed = time.monotonic() - started
    rows = [stack.job_row(job_id) for job_id in ids]
    statuses = {status: sum(1 for r in rows if r.status == status) for status in {r.status for r in rows}}
    logs = "".join(path.read_text() for path in {p.log_path for p in stack.workers})
    commits = {job_id: logs.count(f"job {job_id} succeeded") for job_id in ids}
    duplicated = sum(1 for count in commits.values() if count > 1)
    rerun = sum(1 for r in rows if r.attempts > 1)
    print(
        f"\nbacklog: submitted={JOBS} succeeded={statuses.get('succeeded', 0)} "
        f"lost={JOBS - sum(statuses.values())} failed={statuses.get('failed', 0)} duplicated={duplicated} "
        f"re-run after a kill={rerun} worker kills={kills} wall={elapsed:.1f}s"
    )
    assert statuses == {"succeeded": JOBS}
    assert duplicated == 0
    assert all(count == 1 for count in commits.values())
    by_worker = {r.worker for r in rows}
    assert {"a", "b"} <= by_worker
