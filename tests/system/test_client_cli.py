"""The ``heatmap`` client commands (client/) against the real stack: gunicorn serving the API
over HTTP, a Celery worker with the bundled model, Redis and SQLite. Every command runs as a
subprocess, as a user runs it; none may load TensorFlow or Keras, and each starts within a
small multiple of a bare ``python -c pass``.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import KEYS, Stack, make_database, read_terminal, scene_png
from PIL import Image

from scripts.embedded_redis import free_port
from shared.settings import REPO_ROOT

HEAVY = ("tensorflow", "keras", "torch", "jax")
# Start-up of a client command, best of several runs, as a multiple of `python -c pass`'s
# (loading Keras alone is about 100x on this machine; the client commands 5-12x).
MAX_STARTUP_RATIO = 25


@pytest.fixture(scope="module")
def http_stack(tmp_path_factory, redis_server):
    """The API under gunicorn on a free port plus one worker; yields (stack, base URL)."""
    tmp = tmp_path_factory.mktemp("client-cli")
    (tmp / "slides").mkdir()  # images the service reads by reference (--image-url)
    stack = Stack(tmp, make_database("sqlite", tmp), redis_server, input_url_prefixes=[f"file://{tmp}/slides"])
    stack.start_worker("cli")
    port = free_port()
    log = open(tmp / "api.log", "ab")
    api = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-w", "1", "--threads", "4", "-b", f"127.0.0.1:{port}", "api:create_app()"],
        cwd=REPO_ROOT,
        env=stack.env(KERAS_HOME=tmp / "keras-home"),  # no VGG16 weights: vgg16 is unavailable
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert api.poll() is None and time.monotonic() < deadline, (tmp / "api.log").read_text()[-3000:]
        time.sleep(0.2)
    yield stack, base
    os.killpg(api.pid, signal.SIGTERM)
    api.wait(timeout=30)
    stack.close()


def heatmap(*args, server=None, key="alice", extra_env=None, timeout=300) -> subprocess.CompletedProcess:
    """`heatmap ARGS` in a subprocess; the server and the key come from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEATMAP_", "PYTEST"))}
    if server:
        env["HEATMAP_SERVER"] = server
    if key:
        env["HEATMAP_API_KEY"] = KEYS.get(key, key)
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "client.commands", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> tuple[Path, list]:
    data, objects = scene_png(320, 256, seed=11, n_objects=2)
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    path.write_bytes(data)
    return path, objects


def _job_id(stdout: str) -> str:
    return re.search(r"/api/v1/jobs/([0-9a-f]{32})", stdout).group(1)


def test_submit_wait_out_downloads_the_results(http_stack, scene, tmp_path):
    stack, base = http_stack
    out = tmp_path / "results"
    result = heatmap(
        "submit", str(scene[0]), "--model", "shapes", "--classes", "circle,square,triangle,cross",
        "--wait", "--out", str(out), server=base,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = _job_id(result.stdout)
    assert f"{base}/api/v1/jobs/{job_id}" in result.stdout
    # Not a terminal: no progress bar.
    assert "%|" not in result.stderr and "\r" not in result.stderr
    # The files are the service's own, byte for byte.
    job = requests.get(f"{base}/api/v1/jobs/{job_id}", headers={"X-API-Key": KEYS["alice"]}, timeout=10).json()
    assert job["status"] == "succeeded"
    names = sorted(p.name for p in out.iterdir())
    overlays = [f"overlay_{c['index']}.png" for c in job["result"]["classes"]]
    # Every output the job has, the QuPath/QGIS map outputs too (issue 19).
    assert names == sorted(["heatmap.npz", "summary.json", "heatmap.tif", "regions.geojson", *overlays])
    served = requests.get(base + job["result"]["regions_url"], headers={"X-API-Key": KEYS["alice"]}, timeout=10)
    assert (out / "regions.geojson").read_bytes() == served.content
    for entry in job["result"]["classes"]:
        served = requests.get(base + entry["overlay_url"], headers={"X-API-Key": KEYS["alice"]}, timeout=10).content
        assert (out / f"overlay_{entry['index']}.png").read_bytes() == served
    summary = json.loads((out / "summary.json").read_text())
    with np.load(out / "heatmap.npz") as data:
        assert data["scores"].shape[2] == 4
    # Per-class peaks printed: every class with its best peak from summary.json.
    for entry in summary["classes"]:
        best = entry["peaks"][0] if entry["peaks"] else entry["peak"]
        line = next(line for line in result.stdout.splitlines() if line.startswith(entry["name"] + " "))
        assert f"({best['x']}, {best['y']}:" in line
    assert not list(out.glob(".*"))  # no temporary files left


def test_submit_by_reference_uploads_nothing(http_stack, scene, tmp_path):
    """Issue 19: `heatmap submit --image-url URL --wait --out DIR` (no file), and a URL given
    as the positional image, are submissions by reference: the job reads the file in place
    (its image key is the URL, no upload stored) and --out saves every output."""
    stack, base = http_stack
    slide = stack.tmp_path / "slides" / "scene.png"
    slide.write_bytes(scene[0].read_bytes())
    url = f"file://{slide}"
    out = tmp_path / "by-reference"
    result = heatmap("submit", "--image-url", url, "--model", "shapes", "--wait", "--out", str(out), server=base)
    assert result.returncode == 0, result.stdout + result.stderr
    job = requests.get(
        f"{base}/api/v1/jobs/{_job_id(result.stdout)}", headers={"X-API-Key": KEYS["alice"]}, timeout=10
    ).json()
    assert job["params"]["image_url"] == url and job["image"]["bytes"] == 0
    assert {"heatmap.tif", "regions.geojson", "heatmap.npz", "summary.json"} <= {p.name for p in out.iterdir()}
    # The default top-3 of the bundled model skips its background class.
    assert "background" not in [c["name"] for c in job["result"]["classes"]]
    positional = heatmap("submit", url, "--model", "shapes", "--json", server=base)
    assert positional.returncode == 0, positional.stderr
    assert json.loads(positional.stdout)["params"]["image_url"] == url
    both = heatmap("submit", str(scene[0]), "--image-url", url, server=base)
    assert both.returncode == 2 and "not both" in both.stderr
    neither = heatmap("submit", "--model", "shapes", server=base)
    assert neither.returncode == 2 and "missing_image" in neither.stderr and "--image-url" in neither.stderr
    outside = heatmap("submit", "--image-url", f"file://{tmp_path}/x.png", server=base)
    assert outside.returncode == 2 and "url_not_allowed" in outside.stderr
    assert "INPUT_URL_PREFIXES" in outside.stderr


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`heatmap models | head` with the reader gone: exit status, no BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first write: every write fails
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEATMAP_", "PYTEST"))}
    env |= {"KERAS_HOME": str(tmp_path), "DATA_DIR": str(tmp_path)}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "client.commands", "models"],
            cwd=REPO_ROOT,
            env=env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr


def test_progress_bar_on_a_terminal(http_stack, scene, tmp_path):
    """Counter-check of the quiet mode: with stderr on a pseudo-terminal the bar is drawn."""
    stack, base = http_stack
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(HEATMAP_SERVER=base, HEATMAP_API_KEY=KEYS["alice"])
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "client.commands", "submit", str(scene[0]), "--mode", "tiled", "--wait"],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(slave)
        output = read_terminal(master)
        proc.stdout.read()
        assert proc.wait(timeout=120) == 0
    finally:
        os.close(master)
    terminal = output.decode(errors="replace")
    assert "100%|" in terminal and "succeeded" in terminal


def test_status_jobs_and_cancel(http_stack, scene, tmp_path):
    stack, base = http_stack
    # A long job (tiled, stride 1, one window per batch: minutes), canceled right away.
    big = tmp_path / "big.png"
    big.write_bytes(scene_png(512, 512, seed=3)[0])
    submitted = heatmap("submit", str(big), "--mode", "tiled", "--stride", "1", "--batch-size", "1", server=base)
    assert submitted.returncode == 0, submitted.stderr
    job_id = _job_id(submitted.stdout)

    listed = heatmap("jobs", "--json", server=base)
    assert listed.returncode == 0, listed.stderr
    assert job_id in [job["id"] for job in json.loads(listed.stdout)["jobs"]]
    table = heatmap("jobs", "--limit", "50", server=base)
    assert re.search(rf"^{job_id}\s+(queued|running)\s", table.stdout, re.M), table.stdout

    canceled = heatmap("cancel", job_id, server=base)
    assert canceled.returncode == 0, canceled.stderr
    assert f"canceled {base}/api/v1/jobs/{job_id}" in canceled.stdout
    assert stack.job_row(job_id).status == "canceled"

    # Status of a canceled job: printed, exit 1 with its code; canceling again is refused
    # (409 job_finished: cancel never deletes) and the job stays listed.
    status = heatmap("status", f"{base}/api/v1/jobs/{job_id}", server=base)
    assert status.returncode == 1
    assert re.search(r"^status\s+canceled", status.stdout, re.M) and "error: canceled:" in status.stderr
    again = heatmap("cancel", job_id, server=base)
    assert again.returncode == 2 and "error: job_finished:" in again.stderr
    assert stack.job_row(job_id) is not None
    assert heatmap("jobs", "--status", "canceled", "--json", server=base).stdout.count(job_id) >= 1


def test_status_of_a_succeeded_job(http_stack, scene):
    stack, base = http_stack
    done = heatmap("submit", str(scene[0]), "--top-k", "2", "--wait", "--json", server=base)
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    status = heatmap("status", job["id"], server=base)
    assert status.returncode == 0
    assert re.search(r"^status\s+succeeded\s+100%", status.stdout, re.M)
    assert all(re.search(rf"^{c['name']}\s+{c['max']:.3f}", status.stdout, re.M) for c in job["result"]["classes"])
    as_json = json.loads(heatmap("status", job["id"], "--json", server=base).stdout)
    assert as_json["id"] == job["id"] and as_json["status"] == "succeeded"


def test_a_failed_job_exits_non_zero_with_its_code(http_stack, tmp_path):
    stack, base = http_stack
    rng = np.random.default_rng(4)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # header fine, data cut
    result = heatmap("submit", str(broken), "--wait", "--out", str(tmp_path / "out"), server=base)
    assert result.returncode == 1
    assert "error: corrupt_image:" in result.stderr
    assert "/api/v1/jobs/" in result.stdout
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    "args,key,code,rc",
    [
        (["jobs"], None, "unauthorized", 2),
        (["jobs"], "not-a-key", "forbidden", 2),
        (["submit", "IMAGE", "--model", "nope"], "alice", "unknown_model", 2),
        (["submit", "IMAGE", "--model", "vgg16"], "alice", "model_unavailable", 2),
        (["submit", "IMAGE", "--mode", "tiled", "--stride", "1000"], "alice", "invalid_parameter", 2),
        (["status", "0" * 32], "alice", "not_found", 2),
    ],
)
def test_refusals_print_the_service_code(http_stack, scene, args, key, code, rc):
    stack, base = http_stack
    args = [str(scene[0]) if a == "IMAGE" else a for a in args]
    result = heatmap(*args, server=base, key=key)
    assert result.returncode == rc, result.stdout + result.stderr
    assert f"error: {code}:" in result.stderr and "Traceback" not in result.stderr


def test_api_key_flag_wins_over_the_environment(http_stack):
    stack, base = http_stack
    result = heatmap("jobs", "--api-key", KEYS["bob"], "--json", server=base, key="wrong")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["jobs"] == []  # bob has none; alice's stay invisible


def test_server_unreachable_exits_3(tmp_path):
    result = heatmap("jobs", "--server", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 3
    assert "error: connection_failed:" in result.stderr and "Traceback" not in result.stderr
    missing = heatmap("submit", str(tmp_path / "absent.png"), "--server", "http://127.0.0.1:9")
    assert missing.returncode == 2 and "error: file_not_found:" in missing.stderr


def test_models_from_the_service_and_locally(http_stack, tmp_path):
    stack, base = http_stack
    remote = heatmap("models", server=base)
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout.startswith(f"models at {base}")
    header, *rows = [line for line in remote.stdout.splitlines()[1:] if line and not line.startswith("vgg16 cannot")]
    assert header.split()[:4] == ["name", "input", "classes", "available"]
    assert re.search(r"^shapes\s+64x64\s+5\s+yes\s", remote.stdout, re.M)
    listing = json.loads(heatmap("models", "--json", server=base).stdout)
    served = requests.get(f"{base}/api/v1/models", headers={"X-API-Key": KEYS["alice"]}, timeout=10).json()
    assert listing == served
    # Locally (no server named): this machine's catalogue, VGG16 weights absent here.
    local = heatmap("models", "--json", key=None, extra_env={"KERAS_HOME": str(tmp_path), "DATA_DIR": str(tmp_path)})
    models = {m["name"]: m for m in json.loads(local.stdout)["models"]}
    assert models["shapes"]["available"] is True
    assert models["vgg16"]["available"] is False and "VGG16_WEIGHTS" in models["vgg16"]["reason"]


# --------------------------------------------------------------------------- no TensorFlow, quick start

_PROBE = (
    "import sys, runpy; sys.argv = ['heatmap'] + sys.argv[1:]\n"
    "try:\n    runpy.run_module('client.commands', run_name='__main__')\n"
    "except SystemExit as exc:\n    code = exc.code\n"
    "bad = [m for m in {heavy!r} if m in sys.modules]\n"
    "print('HEAVY=' + ','.join(bad), file=sys.stderr)\n"
)


def test_client_commands_do_not_load_tensorflow(http_stack, scene, tmp_path):
    """Each command, run for real against the stack, leaves no deep-learning module loaded."""
    stack, base = http_stack
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEATMAP_", "PYTEST"))}
    env.update(HEATMAP_SERVER=base, HEATMAP_API_KEY=KEYS["alice"])
    probe = _PROBE.format(heavy=HEAVY)
    done = heatmap("submit", str(scene[0]), "--wait", "--json", server=base)
    job_id = json.loads(done.stdout)["id"]
    runs = [
        ["submit", str(scene[0]), "--wait", "--out", str(tmp_path / "o")],
        ["status", job_id],
        ["jobs"],
        ["cancel", job_id],  # refused (finished): the error path counts too
        ["models"],
        ["models", "--server", ""],  # the local catalogue
    ]
    for args in runs:
        result = subprocess.run(
            [sys.executable, "-c", probe, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert "HEAVY=\n" in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (args, result.stderr[-2000:])
    # Counter-check: the probe sees Keras where it is loaded (`infer` runs the engine here).
    result = subprocess.run(
        [sys.executable, "-c", probe, "infer", str(tmp_path / "absent.png"), "--out", str(tmp_path / "i")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "keras" in result.stderr.rsplit("HEAVY=", 1)[1], result.stderr[-2000:]


def _best_time(cmd: list[str], runs: int = 5) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, timeout=120)
        best = min(best, time.perf_counter() - started)
    return best


def test_client_commands_start_quickly():
    """Start-up relative to the interpreter's own (best of 5 each, interleaved by command)."""
    bare = _best_time([sys.executable, "-c", "pass"])
    closed = f"http://127.0.0.1:{free_port()}"
    timings = {
        "jobs": _best_time([sys.executable, "-m", "client.commands", "jobs", "--server", closed]),
        "models": _best_time([sys.executable, "-m", "client.commands", "models", "--json"]),
        "help": _best_time([sys.executable, "-m", "client.commands", "submit", "--help"]),
    }
    bare = min(bare, _best_time([sys.executable, "-c", "pass"]))
    ratios = {name: round(seconds / bare, 1) for name, seconds in timings.items()}
    print(f"python -c pass {bare:.3f} s; client commands {timings}; ratios {ratios}")
    assert max(ratios.values()) <= MAX_STARTUP_RATIO, ratios
