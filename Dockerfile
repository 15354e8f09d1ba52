# The example gateway (examples/gateway.py) and the demo upstream (examples/upstream.py) in one
# image. Build: `docker build -t gateway-breaker .`; the fleet: `docker compose up --build`.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# An unprivileged user with a fixed id, no login shell and no home of its own.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin gateway

# Dependencies come from the project's own metadata: the package and its `example` extra
# (FastAPI, uvicorn). Only what the install needs is copied first, so editing the examples does
# not reinstall anything. DL3013 (pin versions) is waived for this local install: the versions
# are the ranges in pyproject.toml, the project's one source of them.
COPY pyproject.toml README.md ./
COPY gateway_breaker ./gateway_breaker
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[example]"

COPY examples ./examples

USER 10001:10001
EXPOSE 8000

# slim has no curl: ask /healthz with the standard library. Compose overrides this for a
# container that runs something else than the gateway on port 8000 (the demo upstream).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]

CMD ["uvicorn", "examples.gateway:app", "--host", "0.0.0.0", "--port", "8000"]
