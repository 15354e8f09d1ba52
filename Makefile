# Two entry points: `make run` (the example gateway, in memory) and `make test` (everything CI runs).
# Both install from the committed lock (uv.lock) with a pinned uv, so a fresh clone gets exactly
# the versions the suite was tested with. `make lock` refreshes the lock; `make test-latest` and
# `make test-lowest` run the suite against the newest and the lowest releases the ranges allow.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
export UV_PYTHON := $(PYTHON)
# uv must not pick up a managed interpreter or an environment of the caller's
export UV_PYTHON_DOWNLOADS := never
unexport VIRTUAL_ENV

.PHONY: run fleet test lint pytest lock test-latest test-lowest clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet uv==$(UV_VERSION)

# Exactly the lock: `--locked` fails when uv.lock does not match pyproject.toml.
.venv/.installed: pyproject.toml uv.lock | $(UV)
	UV_PROJECT_ENVIRONMENT=.venv $(UV) sync --locked --extra dev
	touch $@

# The newest (or lowest) releases the ranges in pyproject.toml allow, in a venv of their own;
# the lock is not touched. `lowest` lowers the runtime dependencies only (tools/lowest.py).
.venv-latest/.installed: pyproject.toml | $(UV)
	rm -rf .venv-latest && $(UV) venv --quiet .venv-latest
	$(UV) pip install --quiet --python .venv-latest --upgrade --refresh -e '.[dev]'
	touch $@
.venv-lowest/.installed: pyproject.toml uv.lock tools/lowest.py | $(UV)
	UV=$(UV) $(PYTHON) tools/lowest.py .venv-lowest
	touch $@

run: $(VENV)/.installed
	$(BIN)/uvicorn examples.gateway:app --host 127.0.0.1 --port 8000

# The compose fleet (redis, demo upstream, gateways on 8001/8002) as processes, without Docker.
# Other ports: make fleet FLEET_ARGS="--redis-port 6391 --gateway-ports 8011,8012"
fleet: $(VENV)/.installed
	$(BIN)/python deploy/fleet.py $(FLEET_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict gateway_breaker examples

pytest: $(VENV)/.installed
	@command -v redis-server >/dev/null || { echo "redis-server is needed: apt-get install redis-server"; exit 1; }
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint pytest

# Refresh the lock to the newest releases the ranges allow (then `make test` and commit uv.lock).
lock: | $(UV)
	$(UV) lock --upgrade

test-latest: .venv-latest/.installed
	$(MAKE) test VENV=.venv-latest

# Runtime dependencies at their lowest allowed versions. Lint is skipped: type stubs and
# hints differ between releases; the behaviour is what is checked. Redis Cluster needs
# redis-py 8.0 (its asyncio cluster pub/sub), so the Cluster's tests are left out here.
test-lowest: .venv-lowest/.installed
	$(MAKE) pytest VENV=.venv-lowest PYTEST_ARGS="-k 'not cluster' $(PYTEST_ARGS)"

clean:
	rm -rf $(VENV) .venv-latest .venv-lowest $(TOOLS) .pytest_cache .mypy_cache .ruff_cache .hypothesis
