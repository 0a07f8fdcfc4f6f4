"""The HTTP contract without a worker: timezone-aware timestamps on SQLite and PostgreSQL,
a typed OpenAPI document (operationIds, download media types, form limits from the same
schema that validates the form), Idempotency-Key conflicts, Retry-After while a job is
unfinished, and retrying canceled or failed jobs (a new linked job on a copy of the input)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from conftest import DATABASES, Stack, make_database, png_bytes
from sqlalchemy import create_engine

from shared.jobs import job_store
from shared.jobs.database import session_scope
from shared.jobspec import FORM_FIELDS

RNG = np.random.default_rng(11)
IMAGE = png_bytes(RNG.integers(0, 255, (96, 120, 3), dtype=np.uint8))
OTHER_IMAGE = png_bytes(RNG.integers(0, 255, (96, 120, 3), dtype=np.uint8))


@pytest.fixture(params=DATABASES)
def stack(request, tmp_path, redis_server):
    """An API over a fresh database of each kind; no worker (jobs stay queued)."""
    stack = Stack(tmp_path, make_database(request.param, tmp_path), redis_server)
    yield stack
    stack.close()


def _files(stack) -> list[str]:
    root = Path(stack.app.extensions["heatmaps"].storage.root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _aware_utc(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    assert value.tzinfo is not None and value.utcoffset() == timedelta(0), text
    return value


# --- timestamps ---------------------------------------------------------------------------
def test_timestamps_are_timezone_aware_on_every_route(stack):
    client = stack.client()
    posted = stack.submit(client, IMAGE)
    assert posted.status_code == 202, posted.json
    got = client.get(posted.json["url"]).json
    listed = client.get("/api/v1/jobs").json["jobs"][0]
    assert _aware_utc(posted.json["created_at"]) == _aware_utc(got["created_at"]) == _aware_utc(listed["created_at"])
    canceled = client.delete(posted.json["url"]).json
    _aware_utc(canceled["finished_at"])
    assert _aware_utc(client.get(posted.json["url"]).json["finished_at"]) == _aware_utc(canceled["finished_at"])


def test_the_column_type_stores_any_zone_and_reads_utc(stack):
    """Another zone in, the same instant out, tagged UTC; comparisons use the instant."""
    client = stack.client()
    job_id = stack.submit(client, IMAGE).json["id"]
    instant = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
    url = stack.settings.resolved_database_url
    with session_scope(url) as session:
        job = job_store.get_job(session, job_id)
        job.heartbeat_at = instant.astimezone(timezone(timedelta(hours=5, minutes=30)))
    with session_scope(url) as session:
        stored = job_store.get_job(session, job_id).heartbeat_at
        assert stored == instant and stored.tzinfo is not None and stored.utcoffset() == timedelta(0)
        from shared.jobs.tables import Job

        before = instant.astimezone(timezone(timedelta(hours=-8))) - timedelta(seconds=1)
        assert session.query(Job).filter(Job.heartbeat_at > before).count() == 1
        assert session.query(Job).filter(Job.heartbeat_at > instant).count() == 0


def test_migrations_match_the_tables(stack):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from shared.jobs.tables import Base

    engine = create_engine(stack.settings.resolved_database_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


# --- the document -------------------------------------------------------------------------
OPERATIONS = {
    ("post", "/api/v1/jobs"): "submitJob",
    ("get", "/api/v1/jobs"): "listJobs",
    ("get", "/api/v1/jobs/{job_id}"): "getJob",
    ("delete", "/api/v1/jobs/{job_id}"): "deleteJob",
    ("post", "/api/v1/jobs/{job_id}/retry"): "retryJob",
    ("get", "/api/v1/jobs/{job_id}/heatmap"): "getHeatmap",
    ("get", "/api/v1/jobs/{job_id}/summary"): "getSummary",
    ("get", "/api/v1/jobs/{job_id}/overlays/{class_name}"): "getOverlay",
    ("get", "/api/v1/models"): "listModels",
}
METHODS = ("get", "post", "put", "patch", "delete")


def _untyped_objects(node, path="") -> list[str]:
    """Object schemas a generator can only turn into a free-form dict."""
    found = []
    if isinstance(node, dict):
        if node.get("type") == "object" and not node.get("properties") and "$ref" not in node:
            found.append(path)
        for key, value in node.items():
            found.extend(_untyped_objects(value, f"{path}/{key}"))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.extend(_untyped_objects(value, f"{path}/{index}"))
    return found


def test_every_operation_has_an_operation_id_and_downloads_declare_their_type(app, client):
    spec = client.get("/api/v1/openapi.json").json
    ids = {(m, p): op.get("operationId") for p, item in spec["paths"].items() for m, op in item.items() if m in METHODS}
    assert all(ids.values()), [key for key, value in ids.items() if not value]
    assert len(set(ids.values())) == len(ids)
    assert {key: ids.get(key) for key in OPERATIONS} == OPERATIONS
    paths = spec["paths"]
    content = {
        name: paths[f"/api/v1/jobs/{{job_id}}/{name}"]["get"]["responses"]["200"]["content"]
        for name in ("heatmap", "summary", "overlays/{class_name}")
    }
    assert content["heatmap"] == {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    assert content["overlays/{class_name}"] == {"image/png": {"schema": {"type": "string", "format": "binary"}}}
    assert content["summary"] == {"application/json": {"schema": {"$ref": "#/components/schemas/Summary"}}}
    assert "Retry-After" in paths["/api/v1/jobs/{job_id}"]["get"]["responses"]["200"]["headers"]


def test_results_and_errors_are_typed(client):
    spec = client.get("/api/v1/openapi.json").json
    schemas = spec["components"]["schemas"]
    job = schemas["Job"]["properties"]
    assert job["result"]["anyOf"] == [{"$ref": "#/components/schemas/Result"}, {"type": "null"}]
    assert job["error"]["anyOf"] == [{"$ref": "#/components/schemas/JobError"}, {"type": "null"}]
    assert job["params"] == {"$ref": "#/components/schemas/Params"}
    result = schemas["Result"]["properties"]
    for name, ref in [("grid", "Grid"), ("overlay_size", "Size"), ("timings", "Timings")]:
        assert result[name].get("$ref") == f"#/components/schemas/{ref}", name
    assert schemas["Peak"]["required"] == ["x", "y"]
    assert _untyped_objects(schemas) == []
    assert set(schemas["Job"]["required"]) == set(job)  # every key is always present (null when unset)


def test_the_form_schema_is_generated_from_the_form_fields_and_states_this_deployments_limits(tmp_path, redis_server):
    stack = Stack(tmp_path, make_database("sqlite", tmp_path), redis_server, max_top_k=7, max_upload_mb=3)
    spec = stack.client().get("/api/v1/openapi.json").json
    body = spec["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    submit = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    props = submit["properties"]
    assert set(props) == {field.name for field in FORM_FIELDS} | {"image", "mask_image"}
    assert "required" not in submit and submit["additionalProperties"] is False  # image or image_url
    assert props["image"]["format"] == "binary" and "at most 3 MB" in props["image"]["description"]
    assert props["top_k"]["maximum"] == 7 and props["batch_size"]["maximum"] == stack.settings.max_batch_size
    for field in FORM_FIELDS:
        assert props[field.name]["description"].startswith(field.description)
        assert props[field.name].get("enum") == (list(field.choices) if field.choices else None)
        assert props[field.name].get("maxLength") == field.max_length
    # ... and the same limits are what the form is validated with
    client = stack.client()
    refused = stack.submit(client, IMAGE, top_k=8)
    assert refused.status_code == 400 and refused.json["error"]["code"] == "invalid_parameter"
    assert "top_k" in refused.json["error"]["message"]
    long = stack.submit(client, IMAGE, classes="circle," * 3000)
    assert long.status_code == 400 and "classes" in long.json["error"]["message"]
    assert len(long.json["error"]["message"]) < 200
    assert stack.submit(client, IMAGE, top_k=7).status_code == 202
    empty = stack.submit(client, IMAGE, stride="", classes="")  # an untouched HTML input means absent
    assert empty.status_code == 202, empty.json
    stack.close()


# --- idempotency ----------------------------------------------------------------------------
def test_an_idempotency_key_stands_for_one_request(stack):
    client = stack.client()
    key = {"Idempotency-Key": "order-42"}
    first = stack.submit(client, IMAGE, headers=key, top_k=2)
    assert first.status_code == 202
    again = stack.submit(client, IMAGE, headers=key, top_k="02")  # the same parameters, spelled otherwise
    assert again.status_code == 200 and again.json["id"] == first.json["id"]
    files = _files(stack)
    for image, form in [
        (IMAGE, {"top_k": 3}),
        (IMAGE, {}),
        (OTHER_IMAGE, {"top_k": 2}),
        (IMAGE, {"classes": "circle"}),
    ]:
        conflict = stack.submit(client, image, headers=key, **form)
        assert conflict.status_code == 422, (form, conflict.json)
        assert conflict.json["error"]["code"] == "idempotency_conflict"
    assert _files(stack) == files  # nothing stored for the refused requests
    assert len(client.get("/api/v1/jobs").json["jobs"]) == 1
    other_owner = stack.submit(stack.client("bob"), OTHER_IMAGE, headers=key)  # keys are per API key
    assert other_owner.status_code == 202


# --- polling ----------------------------------------------------------------------------------
def test_retry_after_while_a_job_is_unfinished(stack):
    client = stack.client()
    posted = stack.submit(client, IMAGE)
    assert posted.headers["Retry-After"] == str(stack.settings.poll_retry_after_s)
    polled = client.get(posted.json["url"])
    assert polled.json["status"] == "queued" and int(polled.headers["Retry-After"]) >= 1
    canceled = client.delete(posted.json["url"])
    assert canceled.status_code == 202 and "Retry-After" not in canceled.headers
    assert "Retry-After" not in client.get(posted.json["url"]).headers


# --- retry ------------------------------------------------------------------------------------
def test_retry_makes_a_linked_job_on_a_copy_of_the_input(stack):
    client = stack.client()
    original = stack.submit(client, IMAGE, top_k=2).json
    not_yet = client.post(f"{original['url']}/retry")
    assert not_yet.status_code == 409 and not_yet.json["error"]["code"] == "job_not_retryable"
    assert client.delete(original["url"]).json["status"] == "canceled"

    retried = client.post(f"{original['url']}/retry")
    assert retried.status_code == 202, retried.json
    new = retried.json
    assert new["id"] != original["id"] and new["retry_of"] == original["id"]
    assert new["status"] == "queued" and new["params"] == original["params"]
    assert new["image"] == original["image"]  # same bytes, same sha256
    assert retried.headers["Location"] == new["url"] and "Retry-After" in retried.headers
    assert f"uploads/{new['id']}/image.png" in _files(stack)
    again = client.post(f"{original['url']}/retry")
    assert again.status_code == 200 and again.json["id"] == new["id"]  # one retry per job

    assert client.delete(original["url"]).status_code == 204  # the old job goes with its own files only
    assert _files(stack) == [f"uploads/{new['id']}/image.png"]
    assert client.get(new["url"]).json["retry_of"] == original["id"]
    assert stack.client("bob").post(f"{new['url']}/retry").status_code == 404
    assert client.post(f"/api/v1/jobs/{'0' * 32}/retry").status_code == 404
    assert client.post("/api/v1/jobs/not-an-id/retry").status_code == 404


def test_retry_of_a_failed_job_whose_input_is_gone_is_409(stack):
    client = stack.client()
    job = stack.submit(client, IMAGE).json
    url = stack.settings.resolved_database_url
    with session_scope(url) as session:  # what the worker does with an unreadable upload
        assert job_store.finish_failed(session, job["id"], None, "corrupt_image", "cannot decode")
    stack.app.extensions["heatmaps"].storage.delete_prefix(f"uploads/{job['id']}")
    refused = client.post(f"{job['url']}/retry")
    assert refused.status_code == 409 and refused.json["error"]["code"] == "input_gone"
    assert len(client.get("/api/v1/jobs").json["jobs"]) == 1 and _files(stack) == []


def test_retry_counts_against_the_active_jobs_quota(tmp_path, redis_server):
    stack = Stack(tmp_path, make_database("sqlite", tmp_path), redis_server, max_active_jobs_per_key=1)
    client = stack.client()
    first = stack.submit(client, IMAGE).json
    client.delete(first["url"])
    second = stack.submit(client, IMAGE).json
    assert second["status"] == "queued"
    refused = client.post(f"{first['url']}/retry")
    assert refused.status_code == 429 and refused.json["error"]["code"] == "too_many_active_jobs"
    stack.close()


def test_concurrent_retries_make_one_job(stack):
    """jobs.retry_of is unique: racing retries of one job all answer with the same new job,
    and the losers' upload copies are removed."""
    from concurrent.futures import ThreadPoolExecutor

    client = stack.client()
    original = stack.submit(client, IMAGE).json
    client.delete(original["url"])

    def retry(_):
        response = stack.client().post(f"{original['url']}/retry")
        return response.status_code, response.json["id"]

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(retry, range(6)))
    assert sorted(status for status, _ in outcomes) == [200] * 5 + [202]
    new_ids = {job_id for _, job_id in outcomes}
    assert len(new_ids) == 1
    assert _files(stack) == sorted(f"uploads/{job_id}/image.png" for job_id in new_ids | {original["id"]})


def test_racing_requests_with_one_idempotency_key(stack):
    """Concurrent first uses of one key: one job; the same request gets it (200), another
    request gets 422 - never someone else's job."""
    from concurrent.futures import ThreadPoolExecutor

    def submit(index):
        response = stack.submit(stack.client(), IMAGE, headers={"Idempotency-Key": "race"}, top_k=1 + index % 2)
        return 1 + index % 2, response.status_code, (response.json.get("params") or {}).get("top_k")

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(submit, range(6)))
    created = [top_k for top_k, status, _ in outcomes if status == 202]
    assert len(created) == 1, outcomes
    for top_k, status, answered in outcomes:
        assert (status, answered) in ([(202, top_k), (200, top_k)] if top_k == created[0] else [(422, None)])
    assert len(stack.client().get("/api/v1/jobs").json["jobs"]) == 1
    assert len(_files(stack)) == 1
