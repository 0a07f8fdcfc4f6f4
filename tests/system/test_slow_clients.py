"""Slow clients do not stall the API (issue 11, defect 2).

64 connections each send a request line and then one header line every 2 s, never
finishing; meanwhile normal requests must be answered: >= 99 % within 5 s (a stalled server
answers nothing; a busy machine can be slower than 1 s). Run against the
dev server (gunicorn as `make serve` starts it) and against nginx (Debian's package, from
the repository's template, on a free port) in front of it, as in docker-compose.yml.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import Stack, make_database

from bench.slow_clients import SlowClients
from scripts.embedded_redis import free_port
from shared.settings import REPO_ROOT

pytestmark = pytest.mark.slow
SLOW_CLIENTS = 64
NORMAL_REQUESTS = 200
TEMPLATE = REPO_ROOT / "docker" / "nginx.conf.template"

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import devstack  # noqa: E402


def render_nginx(folder: Path, listen_port: int, upstream: str, max_upload_mb: float) -> Path:
    """The compose config, rendered the way docker/nginx-entrypoint.sh renders it."""
    (folder / "run").mkdir(parents=True, exist_ok=True)
    values = {
        "NGINX_RUNTIME_DIR": str(folder / "run"),
        "NGINX_ACCESS_LOG": "off",
        "NGINX_MAX_BODY_MB": str(int(max_upload_mb) + 1),
        "API_UPSTREAM": upstream,
        "LISTEN_ADDRESS": f"127.0.0.1:{listen_port}",
    }
    # envsubst's job: ${UPPER_CASE} names only (a missing one is a KeyError here)
    text = re.sub(r"\$\{([A-Z_][A-Z0-9_]*)\}", lambda m: values[m.group(1)], TEMPLATE.read_text())
    path = folder / "nginx.conf"
    path.write_text(text)
    return path


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise AssertionError(log.read_text()[-3000:])


@pytest.fixture
def dev_server(tmp_path, redis_server):
    stack = Stack(tmp_path, make_database("sqlite", tmp_path), redis_server)
    port = free_port()
    log = tmp_path / "gunicorn.log"
    proc = subprocess.Popen(
        devstack.gunicorn_command(port),
        cwd=REPO_ROOT,
        env=stack.env(),
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )
    _wait_http(f"http://127.0.0.1:{port}/healthz", proc, log)
    yield f"127.0.0.1:{port}", stack
    proc.terminate()
    proc.wait(timeout=30)
    stack.close()


@pytest.fixture
def nginx(tmp_path, dev_server):
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.fail("nginx is not installed (scripts/system-packages.txt lists it)")
    upstream, stack = dev_server
    port = free_port()
    config = render_nginx(tmp_path / "nginx", port, upstream, stack.settings.max_upload_mb)
    log = tmp_path / "nginx.log"
    test = subprocess.run([binary, "-t", "-p", str(config.parent), "-c", str(config)], capture_output=True, text=True)
    assert test.returncode == 0, test.stderr
    proc = subprocess.Popen(
        [binary, "-p", str(config.parent), "-c", str(config)], stdout=open(log, "ab"), stderr=subprocess.STDOUT
    )
    _wait_http(f"http://127.0.0.1:{port}/healthz", proc, log)
    yield f"127.0.0.1:{port}", stack
    proc.terminate()
    proc.wait(timeout=30)


def answered_within(address: str, n: int, limit_s: float) -> float:
    """Share of `n` normal requests (healthz, readyz, the job list) answered within limit_s."""
    paths = ["/healthz", "/readyz", "/api/v1/jobs"]
    ok = 0
    session = requests.Session()
    for i in range(n):
        start = time.monotonic()
        try:
            response = session.get(
                f"http://{address}{paths[i % 3]}", headers={"X-API-Key": "alice-secret-key"}, timeout=limit_s
            )
            ok += response.status_code == 200 and time.monotonic() - start <= limit_s
        except requests.RequestException:
            pass
    return ok / n


@pytest.mark.parametrize("front", ["dev_server", "nginx"])
def test_slow_clients_do_not_stall_the_api(request, front):
    address, _stack = request.getfixturevalue(front)
    slow = SlowClients(address, SLOW_CLIENTS)
    try:
        time.sleep(2.5)  # let every slow connection reach the server and drip once
        # A stalled server answers nothing; 5 s (not 1 s) leaves room for a machine busy with
        # other work, which is not what this test is about (issue 20: green under load).
        share = answered_within(address, NORMAL_REQUESTS, limit_s=5.0)
    finally:
        slow.close()
    print(f"{front}: {share:.1%} of {NORMAL_REQUESTS} requests answered within 5 s with {SLOW_CLIENTS} slow clients")
    assert share >= 0.99


def test_nginx_refuses_oversized_uploads_in_the_api_envelope(nginx):
    address, stack = nginx
    limit_mb = int(stack.settings.max_upload_mb) + 1
    body = b"x" * (limit_mb * 1024 * 1024 + 1)
    response = requests.post(
        f"http://{address}/api/v1/jobs",
        data=body,
        headers={"Content-Type": "application/octet-stream", "X-API-Key": "alice-secret-key"},
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_nginx_cuts_off_a_client_that_never_finishes_its_headers(nginx):
    """client_header_timeout: the connection is closed, it does not stay open forever."""
    address, _stack = nginx
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"GET /healthz HTTP/1.1\r\n")
    start = time.monotonic()
    try:
        data = sock.recv(1024)  # nginx closes (b"") or answers 408 after client_header_timeout
    except OSError:
        data = b""
    assert time.monotonic() - start < 25 and b"200 OK" not in data
    sock.close()


def _raw(address: str, request: bytes) -> bytes:
    """Send bytes no HTTP library would send; the whole answer (the server closes)."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(request)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:  # closed with our unread bytes still queued: answer already read
        pass
    sock.close()
    return data


@pytest.mark.parametrize("front", ["dev_server", "nginx"])
def test_refusals_before_the_app_are_the_json_envelope(request, front):
    """Issue 20, item 7: requests the HTTP server refuses by itself were answered in HTML."""
    address, _stack = request.getfixturevalue(front)
    cases = [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\nConnection: close\r\n\r\n", {400}),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", {400, 414}),
        ("GET /api/v1/jobs/caf\u00e9 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(), {400, 404}),
    ]
    for raw, statuses in cases:
        answer = _raw(address, raw)
        head, _, body = answer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        assert status in statuses, (front, head[:200])
        assert b"content-type: application/json" in head.lower(), (front, head[:300])
        assert json.loads(body)["error"]["code"], (front, body[:200])
        assert b"a" * 100 not in body and b"\x01" not in body  # the input is not echoed
