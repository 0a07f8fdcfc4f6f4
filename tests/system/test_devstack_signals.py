"""`make serve` stops everything it started however it is stopped, refuses a busy port, and
its worker clears the scratch folders killed workers left (issue 11, defect 7)."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest

from scripts.embedded_redis import free_port
from shared.settings import REPO_ROOT

pytestmark = pytest.mark.slow


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "STORAGE_URL")}
    env["DATA_DIR"] = str(tmp_path / "data")
    env["TMPDIR"] = str(tmp_path / "tmp")
    env["SCRATCH_DIR"] = str(tmp_path / "tmp" / "scratch")
    (tmp_path / "tmp" / "scratch").mkdir(parents=True, exist_ok=True)
    return env


def _ours(data_dir: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("DATA_DIR") == data_dir and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.Error, OSError):
            pass
    return found


def _wait_gone(data_dir: str, timeout: float = 60) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (left := _ours(data_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _serve(tmp_path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "scripts/devstack.py", "serve", "--port", str(port)],
        cwd=REPO_ROOT,
        env=_env(tmp_path),
        stdout=open(tmp_path / "serve.log", "ab"),
        stderr=subprocess.STDOUT,
    )


def _wait_serving(tmp_path, proc, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b"serving;" in (tmp_path / "serve.log").read_bytes():
            return
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        time.sleep(0.5)
    raise AssertionError((tmp_path / "serve.log").read_text()[-3000:])


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_serve_leaves_nothing_running(tmp_path, sig):
    scratch = tmp_path / "tmp" / "scratch"  # the stack's SCRATCH_DIR (see _env)
    scratch.mkdir(parents=True)
    stale = scratch / f"job-{uuid.uuid4().hex}-pid{_dead_pid()}-abc"
    live = scratch / f"job-{uuid.uuid4().hex}-pid{os.getpid()}-def"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "image").write_bytes(b"x" * 100)
    proc = _serve(tmp_path, free_port())
    data_dir = str(tmp_path / "data")
    try:
        _wait_serving(tmp_path, proc)
        banner = (tmp_path / "serve.log").read_text()
        # Issue 19: serve mode logs to this terminal; the banner named a log folder it never used.
        assert "logs in" not in banner and "its and the API's log follow here" in banner
        names = {p.name() for p in _ours(data_dir)}
        assert len(_ours(data_dir)) >= 4, names  # redis, celery (+ pool), gunicorn (+ workers)
        deadline = time.monotonic() + 60
        while stale.exists() and time.monotonic() < deadline:  # cleared by the worker at start
            time.sleep(0.5)
        assert not stale.exists() and live.exists()
        proc.send_signal(sig)
        proc.wait(timeout=90)
        if sig != signal.SIGKILL:  # a stop request, handled like Ctrl-C: a clean exit
            assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-2000:]
        left = _wait_gone(data_dir)
        assert left == [], [(p.pid, p.name()) for p in left]
    finally:
        for process in _ours(data_dir):
            process.kill()


def test_busy_port_is_refused(tmp_path):
    class Foreign(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # answers /readyz with 200 like a healthy API would
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"status": "ready"}')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Foreign)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        result = subprocess.run(
            [sys.executable, "scripts/devstack.py", "serve", "--port", str(port)],
            cwd=REPO_ROOT,
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode != 0
    assert f"port {port} is busy" in result.stdout + result.stderr
    assert "serving" not in result.stdout
    assert _wait_gone(str(tmp_path / "data"), timeout=10) == []


def test_readiness_needs_our_own_token(tmp_path):
    """A foreign server answering /readyz is not taken for ours (the token check)."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import devstack

    class Foreign(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("X-Heatmaps-Instance", "someone-else")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Foreign)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    sleeper.wait()

    class Exited:
        name, log_path, process = "api", tmp_path / "api.log", sleeper
        log_where = str(log_path)

    try:
        with pytest.raises(SystemExit, match="api exited"):
            devstack.wait_ready(f"http://127.0.0.1:{server.server_address[1]}", "ours", [Exited], timeout=10)
    finally:
        server.shutdown()
        server.server_close()
