# Two commands matter: `make demo` and `make test`. Both work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format system-packages serve bench bench-engine bench-service install migrate train-shapes clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[api,worker,dev]"
	touch $@

install: $(STAMP)

# Worker processes of the embedded stack and compute threads of each (`make serve` below).
WORKERS ?= 1
WORKER_THREADS ?=
WORKER_FLAGS = --workers $(WORKERS) $(if $(WORKER_THREADS),--worker-threads $(WORKER_THREADS))

## Start the embedded stack, submit a generated large scene, wait, print where the results are, stop.
demo: install
	$(PY) scripts/devstack.py demo $(WORKER_FLAGS)

## Lint (ruff check + format --check), then the whole test suite (PostgreSQL too when TEST_DATABASE_URL is set),
## on TEST_WORKERS processes (pytest-xdist; each takes whole test files, so a file's stack and order stay its own).
TEST_WORKERS ?= 2
test: lint system-packages
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile --durations=15

## Debian packages the tests run as real processes (scripts/system-packages.txt), if missing.
system-packages:
	bash scripts/install-system-packages.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

## Apply ruff's fixes and formatting.
format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

## The embedded stack in the foreground on $$PORT (default 8000) until Ctrl-C, with WORKERS worker
## processes (default 1) of WORKER_THREADS compute threads each (default: the cores divided by the
## workers, at least 1), so that workers on one machine do not fight over its cores:
##   make serve WORKERS=2 WORKER_THREADS=1
serve: install
	$(PY) scripts/devstack.py serve $(WORKER_FLAGS)

bench: bench-engine bench-service

bench-engine: install
	$(PY) -m bench.bench_engine

bench-service: install
	$(PY) -m bench.bench_service

migrate: install
	$(PY) -m shared.jobs.migrate

## Retrain the bundled model (models/shapes.keras + models/shapes.json).
train-shapes: install
	$(PY) -m shapes.train --out models

clean:
	rm -rf data .pytest_cache
