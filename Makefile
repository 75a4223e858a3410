# fedhe developer entry points. `make demo` and `make test` are the README's two commands;
# each builds the virtual environment it needs from the hash-locked requirements.

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check --no-input

.PHONY: demo test test-unit test-integration lint typecheck bench lock clean api-docs

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "fedhe needs Python 3.11"' \
	  || { echo "fedhe needs Python 3.11 (set PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: $(BIN)/python requirements/runtime.lock pyproject.toml
	$(PIP) install --require-hashes -r requirements/runtime.lock
	$(PIP) install --no-deps --no-build-isolation -e .
	@touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements/dev.lock
	$(PIP) install --require-hashes -r requirements/dev.lock
	@touch $@

## Run a whole federation (keyserver, aggregator, 3 DP-SGD agents) on breast cancer and report accuracy.
demo: $(VENV)/.runtime
	TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/fedhe demo --dataset $(or $(DATASET),breast_cancer) --report $(or $(REPORT),fedhe-demo-report.json) $(DEMO_ARGS)

## Lint, type-check and run every test (needs Postgres on 127.0.0.1:5432).
test: $(VENV)/.dev lint typecheck
	TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/python -m pytest $(PYTEST_ARGS)

## The fast tier (under a minute): no real processes, chart, browser or slow TensorFlow tests; no Postgres needed.
test-unit: $(VENV)/.dev
	TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/python -m pytest -m "not integration and not deploy and not browser and not slow" $(PYTEST_ARGS)

## The real services on loopback against Postgres (and Redis); the browser tests are among them.
test-integration: $(VENV)/.dev
	TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/python -m pytest -m integration $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.dev
	$(BIN)/mypy

## Benchmarks (not tests): writes bench/results/*.md, *.json and *.png.
bench: $(VENV)/.dev
	TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/python -m bench.run_all $(BENCH_ARGS)

## Regenerate the Python API reference (docs/api/) from docstrings with pdoc; tests/unit/test_api_docs.py checks it.
api-docs: $(VENV)/.dev
	$(BIN)/python docs/api/generate.py

## Build the three role images from the one Dockerfile (needs Docker), tagged with pyproject's version:
## fedhe-keyserver, fedhe-aggregator and fedhe-client-agent, under REGISTRY/ when it is set.
.PHONY: images
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE   := $(if $(REGISTRY),$(REGISTRY:%/=%)/,)fedhe
images:
	docker build --build-arg ROLE=keyserver --build-arg VERSION=$(VERSION) -t $(IMAGE)-keyserver:$(VERSION) .
	docker build --build-arg ROLE=aggregator --build-arg VERSION=$(VERSION) -t $(IMAGE)-aggregator:$(VERSION) .
	docker build --build-arg ROLE=agent --build-arg VERSION=$(VERSION) -t $(IMAGE)-client-agent:$(VERSION) .

## Installed size of each role's image from its lock's wheels (reads their zip directories from PyPI):
## bench/results/role_sizes.md and .json, before (runtime.lock everywhere) and after (the role's lock).
.PHONY: role-sizes
role-sizes: $(VENV)/.runtime
	$(BIN)/python -m bench.role_sizes

## Re-lock dependencies after editing requirements/*.in (needs network to PyPI): runtime.lock (every
## role: the venv, the demo, the tests), then each role's lock within it, then the development tools.
ROLES   := agent aggregator keyserver cli
COMPILE := ../$(BIN)/uv pip compile --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --no-header
lock: $(VENV)/.dev
	$(PIP) install uv==0.13.9
	cd requirements && $(COMPILE) runtime.in -o runtime.lock
	cd requirements && for role in $(ROLES); do $(COMPILE) $$role.in -c runtime.lock -o $$role.lock || exit 1; done
	cd requirements && $(COMPILE) dev.in -o dev.lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache fedhe-demo-report.json
