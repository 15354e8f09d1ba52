# Two entry points: `make run` (the example gateway, in memory) and `make test` (everything CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run fleet test lint bench-smoke clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
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

test: lint
	@command -v redis-server >/dev/null || { echo "redis-server is needed: apt-get install redis-server"; exit 1; }
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
