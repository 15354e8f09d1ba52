# The example gateway (examples/gateway.py) and the demo upstream (examples/upstream.py).
# Build: `docker build -t gateway-breaker .` (the gateway, the last stage); the fleet:
# `docker compose up --build` (the upstream from the `upstream` stage).
#
# Stages: `build` installs the package and its `example` extra (FastAPI, uvicorn, aiohttp,
# uvloop, httptools) from uv.lock into /install; `runtime` is a clean python:slim with that tree
# copied in, so nothing of the build (build/, *.egg-info, pip's cache, the sources' copy, uv)
# reaches an image;
# `upstream` and `gateway` each add their own port, healthcheck and command.
FROM python:3.12-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Exactly the versions of the committed lock (uv.lock, hashes checked by pip), then the package
# itself without dependencies. uv is used only to export the lock as a requirements file.
COPY pyproject.toml uv.lock README.md ./
COPY gateway_breaker ./gateway_breaker
RUN pip install --no-cache-dir uv==0.13.9 \
    && uv export --frozen --extra example --no-emit-project -o /tmp/requirements.txt \
    && pip install --no-cache-dir --prefix=/install -r /tmp/requirements.txt \
    && pip install --no-cache-dir --prefix=/install --no-deps .

FROM python:3.12-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# An unprivileged user with a fixed id, no login shell and no home of its own.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin gateway

COPY --from=build /install /usr/local
WORKDIR /app
COPY examples ./examples
USER 10001:10001

# The demo upstream: `docker compose` runs it as the service `upstream`.
FROM runtime AS upstream
EXPOSE 9001
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=10 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9001/_stats', timeout=2).status != 200)"]
CMD ["uvicorn", "examples.upstream:app", "--host", "0.0.0.0", "--port", "9001"]

# The gateway, the default target. uvicorn picks uvloop and httptools by itself when they are
# installed, as they are here.
FROM runtime AS gateway
# 9180: the admin API and dashboard on a listener of their own (served once
# GATEWAY_BREAKER_ADMIN_TOKEN is set), never on the gateway's port where upstreams' pages live.
ENV GATEWAY_BREAKER_ADMIN_PORT=9180 \
    GATEWAY_BREAKER_ADMIN_HOST=0.0.0.0
EXPOSE 8000
EXPOSE 9180
# slim has no curl: ask /healthz with the standard library.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
# --timeout-graceful-shutdown: an open admin event stream must not hold a stop forever.
CMD ["uvicorn", "examples.gateway:app", "--host", "0.0.0.0", "--port", "8000", "--timeout-graceful-shutdown", "5"]
