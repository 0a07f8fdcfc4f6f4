"""Static checks of docker-compose.yml and the Dockerfiles (Docker itself is not needed).

They catch what breaks a deployment quietly: an env var the settings object never reads
(a typo), a worker that cannot be scaled, api and worker disagreeing on where artifacts live,
a visibility timeout shorter than a job, an API image that drags TensorFlow in, a Dockerfile
copying a path that does not exist.
"""

from __future__ import annotations

import glob
import re
import shlex
from pathlib import Path

import pytest
import yaml

from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE_API = ROOT / "docker" / "Dockerfile.api"
DOCKERFILE_WORKER = ROOT / "docker" / "Dockerfile.worker"
DOCKERIGNORE = ROOT / ".dockerignore"

EXPECTED_SERVICES = {"redis", "postgres", "migrate", "api", "nginx", "worker", "flower"}
# Variables that are not settings fields but are legitimately set in the stack.
ALLOWED_EVERYWHERE = {
    "KERAS_BACKEND",
    "CUDA_VISIBLE_DEVICES",
    "TF_FORCE_GPU_ALLOW_GROWTH",
    "PYTHONUNBUFFERED",
}
ALLOWED_PREFIXES = ("POSTGRES_",)
ALLOWED_FLOWER = {"CELERY_BROKER_URL"}
ALLOWED_FLOWER_PREFIXES = ("FLOWER_",)
ALLOWED_NGINX = {"API_UPSTREAM", "LISTEN_ADDRESS", "NGINX_MAX_BODY_MB"}
APP_SERVICES = ("migrate", "api", "worker")

_INTERP = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: str) -> str:
    """Compose interpolation with every variable unset: ${VAR:-default} -> default."""

    def repl(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        operator, default = match.group(2), match.group(3)
        if operator in (":-", "-"):
            return default
        return ""

    return _INTERP.sub(repl, value)


def interpolated_names(value: str) -> set[str]:
    return {m.group(1) or m.group(4) for m in _INTERP.finditer(value) if m.group(0) != "$$"}


@pytest.fixture(scope="module")
def compose() -> dict:
    assert COMPOSE.is_file(), "docker-compose.yml is missing"
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        out = {}
        for item in env:
            key, _, value = str(item).partition("=")
            out[key] = value
        return out
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def resolved_env(service: dict) -> dict[str, str]:
    return {k: interpolate(v) for k, v in environment(service).items()}


def command_list(service: dict) -> list[str]:
    command = service.get("command")
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def depends_on(service: dict) -> dict:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: {"condition": "service_started"} for name in deps}
    return deps


def named_mounts(service: dict) -> dict[str, str]:
    """volume name -> container path, for named-volume mounts (short or long syntax)."""
    out = {}
    for mount in service.get("volumes") or []:
        if isinstance(mount, str):
            source, _, rest = mount.partition(":")
            target = rest.split(":")[0]
            if source and not source.startswith((".", "/", "~", "$")):
                out[source] = target
        elif mount.get("type", "volume") == "volume" and mount.get("source"):
            out[mount["source"]] = mount["target"]
    return out


SETTINGS_NAMES = {name.upper() for name in Settings.model_fields}


# --- compose ---------------------------------------------------------------------------------


def test_no_version_key_and_expected_services(compose, services):
    assert "version" not in compose
    assert set(services) == EXPECTED_SERVICES


def test_redis_is_persistent_and_never_evicts(compose, services):
    redis = services["redis"]
    assert str(redis["image"]).startswith("redis:7")
    command = " ".join(command_list(redis))
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    mounts = named_mounts(redis)
    assert "/data" in mounts.values(), "Redis data must be on a named volume"
    assert set(mounts) <= set(compose.get("volumes") or {})
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])


def test_postgres(compose, services):
    postgres = services["postgres"]
    assert str(postgres["image"]).startswith("postgres:16")
    env = environment(postgres)
    assert {"POSTGRES_DB", "POSTGRES_USER", "POSTGRES_PASSWORD"} <= set(env)
    assert "/var/lib/postgresql/data" in named_mounts(postgres).values()
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    # The app's DATABASE_URL points at this server with these credentials.
    url = resolved_env(services["api"])["DATABASE_URL"]
    pg = {k: interpolate(v) for k, v in env.items()}
    assert url == (
        f"postgresql+psycopg://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
    )


def test_migrate_runs_once_from_the_api_image(services):
    migrate, api = services["migrate"], services["api"]
    assert command_list(migrate) == ["python", "-m", "shared.jobs.migrate"]
    assert str(migrate.get("restart")) == "no"
    assert depends_on(migrate)["postgres"]["condition"] == "service_healthy"
    assert migrate["build"] == api["build"]
    assert migrate["build"]["dockerfile"] == "docker/Dockerfile.api"
    assert (ROOT / "shared" / "jobs" / "migrate.py").is_file()


def test_api_service(services):
    api = services["api"]
    command = command_list(api)
    assert command[0] == "gunicorn"
    assert "0.0.0.0:8000" in command
    assert "api:create_app()" in command
    assert "ports" not in api and "8000" in [str(p) for p in api["expose"]]  # reached through nginx only
    deps = depends_on(api)
    assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert deps["redis"]["condition"] == "service_healthy"
    health = " ".join(api["healthcheck"]["test"])
    assert "python" in health and "/healthz" in health and "curl" not in health
    assert '"/healthz"' in (ROOT / "api" / "routes" / "health.py").read_text()


def test_nginx_fronts_the_api(services):
    nginx, api = services["nginx"], services["api"]
    assert nginx["build"]["dockerfile"] == "docker/Dockerfile.nginx"
    assert "8000:8080" in [str(p) for p in nginx["ports"]]
    assert environment(nginx)["API_UPSTREAM"] == "api:8000"
    assert depends_on(nginx)["api"]["condition"] == "service_healthy"
    assert int(interpolate(environment(nginx)["NGINX_MAX_BODY_MB"])) > float(
        interpolate(resolved_env(api)["MAX_UPLOAD_MB"])
    )
    dockerfile = (ROOT / "docker" / "Dockerfile.nginx").read_text()
    assert "apt-get install" in dockerfile and " nginx " in dockerfile  # Debian's package
    assert re.search(r"^USER\s+(?!root)\S+", dockerfile, re.M)
    for source in _copy_sources(ROOT / "docker" / "Dockerfile.nginx"):
        assert (ROOT / source).is_file(), source
    template = (ROOT / "docker" / "nginx.conf.template").read_text()
    entry = (ROOT / "docker" / "nginx-entrypoint.sh").read_text()
    for name in set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)\}", template)):
        assert "${" + name + "}" in entry, f"{name} is not rendered by the entrypoint"
    command = command_list(api)
    assert command[command.index("--worker-class") + 1] == "gthread"


def test_command_modules_exist(services):
    target = next(c for c in command_list(services["api"]) if ":" in c and "create_app" in c)
    module, _, attr = target.partition(":")
    attr = attr.removesuffix("()")
    module_path = ROOT / Path(*module.split("."))
    source = module_path / "__init__.py" if module_path.is_dir() else module_path.with_suffix(".py")
    assert source.is_file(), source
    assert f"def {attr}(" in source.read_text()

    worker_cmd = command_list(services["worker"])
    app_module = worker_cmd[worker_cmd.index("-A") + 1]
    assert (ROOT / Path(*app_module.split("."))).with_suffix(".py").is_file()
    assert "app = " in (ROOT / Path(*app_module.split("."))).with_suffix(".py").read_text()


def test_worker_is_scalable_gpu_worker(services):
    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "docker/Dockerfile.worker"
    command = command_list(worker)
    assert command[:4] == ["celery", "-A", "worker.tasks", "worker"]
    assert "--pool=prefork" in command and "--concurrency=1" in command
    assert command[command.index("-Q") + 1] == Settings.model_fields["queue_name"].default == "heatmaps"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia"
        and "gpu" in d.get("capabilities", [])
        and (d.get("count") == 1 or d.get("device_ids"))
        for d in devices
    )
    assert "container_name" not in worker
    assert "ports" not in worker
    deps = depends_on(worker)
    assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert deps["redis"]["condition"] == "service_healthy"
    grace = str(worker["stop_grace_period"])
    seconds = int(grace[:-1]) * {"s": 1, "m": 60, "h": 3600}[grace[-1]]
    assert seconds >= 300, "SIGTERM is a warm shutdown: give a job time to finish"


def test_flower_watches_the_same_broker(services):
    flower = services["flower"]
    image = str(flower.get("image", ""))
    command = " ".join(command_list(flower))
    assert "flower" in image or "flower" in command
    assert any("5555" in str(p) for p in flower["ports"])
    env = resolved_env(flower)
    broker = env.get("CELERY_BROKER_URL") or next(
        (c.split("=", 1)[1] for c in command_list(flower) if c.startswith("--broker=")), None
    )
    assert broker == resolved_env(services["worker"])["REDIS_URL"]


def test_api_and_worker_share_artifacts(compose, services):
    api_mounts, worker_mounts = named_mounts(services["api"]), named_mounts(services["worker"])
    assert "artifacts" in api_mounts and "artifacts" in worker_mounts
    path = api_mounts["artifacts"]
    assert worker_mounts["artifacts"] == path
    for name in ("api", "worker"):
        assert resolved_env(services[name])["STORAGE_URL"] == path
    assert "artifacts" in (compose.get("volumes") or {})
    # MODELS_DIR is mounted too, at the same path in both.
    models_dir = resolved_env(services["worker"])["MODELS_DIR"]
    assert models_dir in worker_mounts.values() and models_dir in api_mounts.values()
    assert resolved_env(services["api"])["MODELS_DIR"] == models_dir


def test_named_volumes_declared(compose, services):
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert set(named_mounts(service)) <= declared, name


def test_every_env_var_is_a_setting_or_allowed(services):
    def allowed(name: str, service: str) -> bool:
        if name in SETTINGS_NAMES or name in ALLOWED_EVERYWHERE or name.startswith(ALLOWED_PREFIXES):
            return True
        if service == "nginx":
            return name in ALLOWED_NGINX
        return service == "flower" and (name in ALLOWED_FLOWER or name.startswith(ALLOWED_FLOWER_PREFIXES))

    unknown = []
    for service_name, service in services.items():
        for key, value in environment(service).items():
            for name in {key} | interpolated_names(value):
                if not allowed(name, service_name):
                    unknown.append(f"{service_name}: {name}")
    assert not unknown, f"not a Settings field nor allow-listed: {unknown}"


def test_common_env_shared_by_app_services(compose, services):
    common = compose["x-common-env"]
    required = {
        "DATABASE_URL",
        "REDIS_URL",
        "STORAGE_URL",
        "MODELS_DIR",
        "API_KEYS",
        "JOB_MAX_ATTEMPTS",
        "BROKER_VISIBILITY_TIMEOUT_S",
        "JOB_TIME_LIMIT_S",
        "JOB_SOFT_TIME_LIMIT_S",
        "MEMORY_BUDGET_MB",
        "RETENTION_HOURS",
        "MAX_UPLOAD_MB",
        "MAX_IMAGE_PIXELS",
    }
    assert required <= set(common)
    assert common["API_KEYS"] == "${API_KEYS:-}"  # empty = open mode
    for name in APP_SERVICES:
        env = environment(services[name])
        for key, value in common.items():
            assert env.get(key) == str(value), (name, key)


def test_visibility_timeout_exceeds_job_limits(services):
    for name in APP_SERVICES:
        env = resolved_env(services[name])
        assert int(env["BROKER_VISIBILITY_TIMEOUT_S"]) > int(env["JOB_TIME_LIMIT_S"]), name
        assert int(env["JOB_SOFT_TIME_LIMIT_S"]) < int(env["JOB_TIME_LIMIT_S"]), name


@pytest.mark.parametrize("service_name", APP_SERVICES)
def test_settings_load_from_compose_env(services, service_name, monkeypatch):
    for field in Settings.model_fields:  # nothing from the test machine leaks in
        monkeypatch.delenv(field.upper(), raising=False)
    env = resolved_env(services[service_name])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)
    assert settings.resolved_database_url.startswith("postgresql+psycopg://")
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.resolved_storage_url == env["STORAGE_URL"]
    assert settings.api_keys == []  # the default is open mode
    assert settings.broker_visibility_timeout_s > settings.job_time_limit_s
    assert str(settings.models_dir) == env["MODELS_DIR"]


def test_depends_on_targets_exist(services):
    for name, service in services.items():
        for target, spec in depends_on(service).items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = (spec or {}).get("condition", "service_started")
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} health"


# --- Dockerfiles -----------------------------------------------------------------------------


def _dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    for line in text.splitlines():
        parts = line.strip().split()
        if parts and parts[0].upper() in ("COPY", "ADD"):
            args = [p for p in parts[1:] if not p.startswith("--")]
            sources.extend(args[:-1])
    return sources


@pytest.mark.parametrize("dockerfile", [DOCKERFILE_API, DOCKERFILE_WORKER], ids=["api", "worker"])
def test_dockerfiles_exist_pin_and_copy_real_paths(dockerfile):
    assert dockerfile.is_file()
    text = dockerfile.read_text()
    assert "constraints.txt" in text
    assert re.search(r"^USER\s+(?!root)\S+", text, re.M), "runs as non-root"
    sources = _copy_sources(dockerfile)
    assert "pyproject.toml" in sources and "constraints.txt" in sources
    for source in sources:
        assert glob.glob(str(ROOT / source)), f"{dockerfile.name}: COPY {source} matches nothing"
        for pattern in _dockerignore_patterns():
            assert not Path(source).match(pattern.strip("/")), f"{source} is excluded by .dockerignore"


def test_api_dockerfile_has_no_tensorflow():
    text = DOCKERFILE_API.read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert "'.[api]'" in text or '".[api]"' in text
    assert "-c constraints.txt" in text
    assert "tensorflow" not in text.lower() and "keras" not in text.lower()
    assert re.search(r"^EXPOSE 8000", text, re.M)
    for source in ("shared", "api", "migrations", "alembic.ini"):
        assert source in _copy_sources(DOCKERFILE_API)
    # The api extra itself must stay free of TensorFlow/Keras.
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [r for r in extras["api"] if re.match(r"(tensorflow|keras)", r, re.I)]


def test_worker_dockerfile_gpu_tensorflow_matches_constraints():
    text = DOCKERFILE_WORKER.read_text()
    assert "tensorflow[and-cuda]" in text
    assert "TF_FORCE_GPU_ALLOW_GROWTH=true" in text
    for source in ("shared", "worker", "models", "migrations"):
        assert source in _copy_sources(DOCKERFILE_WORKER)
    # The image reads the TensorFlow version from the tensorflow-cpu pin: it must be there.
    pins = re.findall(r"^tensorflow[-_]cpu==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M | re.I)
    assert len(pins) == 1
    assert "tensorflow[-_]cpu" in text


def test_dockerignore():
    patterns = set(_dockerignore_patterns())
    assert {".venv", "data", ".git", "__pycache__", "bench/results", "*.pyc"} <= patterns
    assert not patterns & {"models", "shared", "api", "worker", "migrations", "constraints.txt", "pyproject.toml"}
