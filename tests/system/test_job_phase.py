"""The job JSON's `phase` tells what a job does (issue 17): queued, then reading, inference,
writing and storing as the worker moves on, done at the end; progress grows through every
phase (writing counted, never a silent 99 %), and summary.json times each writer.

The job runs in this process through `worker.jobrunner.execute` (real model, database and
storage); at each phase the runner's checkpoint lets the test read the job through the real
API, so no poll can miss a short phase. The heartbeat thread never beats on its own.
"""

from __future__ import annotations

import pytest
from conftest import DATABASES, Stack, make_database, scene_png

from shared.jobs.job_status import JobPhase, JobStatus
from shared.storage import Storage
from worker.job_context import WorkerContext
from worker.jobrunner import execute


@pytest.mark.parametrize("database", DATABASES)
def test_phases_and_progress_of_a_job(database, tmp_path, redis_server):
    from shared.settings import Settings
    from worker.inference.model_registry import ModelRegistry

    stack = Stack(tmp_path, make_database(database, tmp_path), redis_server, heartbeat_interval_s=3600)
    client = stack.client()
    image, _ = scene_png(192, 160, seed=3)
    job_id = stack.submit(client, image, model="shapes", top_k=2).json["id"]
    queued = client.get(f"/api/v1/jobs/{job_id}").json
    assert (queued["status"], queued["phase"], queued["progress"]) == (JobStatus.queued, JobPhase.queued, 0.0)
    seen = []

    def checkpoint(step, current):
        if step in JobPhase.__members__.values():
            body = client.get(f"/api/v1/jobs/{current}").json
            seen.append((step, body["status"], body["phase"], body["progress"]))

    context = WorkerContext(
        settings=stack.settings,
        storage=Storage(stack.settings.resolved_storage_url),
        registry=ModelRegistry(Settings().model_dirs),
        checkpoint=checkpoint,
    )
    assert execute(job_id, context) == JobStatus.succeeded
    stack.close()

    phases = [step for step, *_ in seen]
    assert phases == [JobPhase.inference, JobPhase.writing, JobPhase.storing], seen
    for step, status, phase, _ in seen:
        assert (status, phase) == (JobStatus.running, step)  # the row says it as the phase begins
    progress = [value for *_, value in seen]
    assert progress == sorted(progress) and 0.0 < progress[0] and progress[-1] < 1.0, progress
    assert progress[1] >= 0.8  # inference done: the writing phase is what is left, and it is counted
    done = client.get(f"/api/v1/jobs/{job_id}").json
    assert (done["phase"], done["progress"]) == (JobPhase.done, 1.0)
    timings = done["result"]["timings"]
    writers = {key for key in timings if key.startswith("write_") and key != "write_s"}
    assert writers == {f"write_{name}_s" for name in ("viewer", "heatmap", "overlays", "raster", "regions")}
    assert sum(timings[key] for key in writers) <= timings["write_s"] + 1e-3
