"""Processes for the end-to-end tests: the demo upstream and example gateways under uvicorn.

Each process runs `python -m uvicorn ...` from the repository root on a free loopback port, with
its output in files under the test's tmp_path, and is stopped at teardown. Readiness is polled
with a deadline, never slept for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx
import port_for
import pytest
import yaml

from tests.helpers import wait_until_sync

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
# Settings a developer's shell may hold that would change what a process under test does.
_ISOLATED_NAMES = {
    "REDIS_URL",
    "GATEWAY_BREAKER_CONFIG",
    "CIRCUIT_BREAKER_ENABLED",
    "LOG_LEVEL",
    "UPSTREAM_TIMEOUT",
    "UPSTREAM_CONNECT_TIMEOUT",
}
_ISOLATED_PREFIXES = ("REDIS__", "CIRCUIT_BREAKER__")


def clean_env(extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment without gateway settings, plus `extra` (None removes)."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name.upper() not in _ISOLATED_NAMES and not name.upper().startswith(_ISOLATED_PREFIXES)
    }
    env["PYTHONUNBUFFERED"] = "1"
    for name, value in (extra or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


class ServerProcess:
    """A uvicorn process on a free port, its output captured to files, and an HTTP client."""

    health_path = "/"

    def __init__(
        self,
        name: str,
        app: str,
        env: Mapping[str, str],
        logdir: Path,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.port = port_for.select_random()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stdout_path = logdir / f"{name}.stdout.log"
        self.stderr_path = logdir / f"{name}.stderr.log"
        self._stdout = self.stdout_path.open("wb")
        self._stderr = self.stderr_path.open("wb")
        self.process = subprocess.Popen(
            [
                *[sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1"],
                *["--port", str(self.port), *extra_args],
            ],
            cwd=REPO_ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=self._stderr,
        )
        self.client = httpx.Client(base_url=self.url, timeout=10.0, trust_env=False)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.url}>"

    def output(self) -> str:
        """Everything the process printed so far, stdout then stderr."""
        return "\n".join(
            path.read_text(errors="replace") for path in (self.stdout_path, self.stderr_path)
        )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.request(method, path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, **kwargs)

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(
                f"{self.name} exited with {self.process.returncode} before it was ready:\n"
                + self.output()
            )
        try:
            return self.client.get(self.health_path, timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self) -> None:
        wait_until_sync(
            self._ready, START_TIMEOUT, 0.05, f"{self.name} to answer {self.health_path}"
        )

    def wait_exit(self, timeout: float = START_TIMEOUT) -> int:
        """The exit code of a process expected to stop on its own."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still runs after {timeout}s:\n{self.output()}"
            ) from None

    def wait_for_log(self, text: str, timeout: float = 5.0) -> None:
        wait_until_sync(
            lambda: text in self.output(), timeout, 0.02, f"{self.name} to log {text!r}"
        )

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        self._stdout.close()
        self._stderr.close()


class Upstream(ServerProcess):
    """The flaky demo upstream (examples.upstream)."""

    health_path = "/_stats"

    def __init__(self, logdir: Path) -> None:
        super().__init__("upstream", "examples.upstream:app", clean_env(), logdir)

    def requests(self) -> int:
        """Requests the upstream has served so far."""
        count = self.get("/_stats").json()["requests"]
        assert isinstance(count, int)
        return count


class Gateway(ServerProcess):
    """The example gateway (examples.gateway) with its own config and environment."""

    health_path = "/healthz"


def make_config(base_url: str, **discovery: Any) -> dict[str, Any]:
    """A gateway config: discovery, sona and auth under `base_url`; discovery opens fast.

    `discovery` keys override discovery's policy and upstream.
    """
    return {
        "circuit_breaker": {
            "enabled": True,
            "services": {
                "discovery": {
                    "prefix": "/discovery",
                    "upstream": f"{base_url}/discovery",
                    "failure_threshold": 3,
                    "timeout_seconds": 1,
                    **discovery,
                },
                "sona": {"prefix": "/sona", "upstream": f"{base_url}/sona"},
                "auth": {"upstream": f"{base_url}/auth"},
            },
        },
    }


class StartGateway(Protocol):
    def __call__(
        self,
        config: Mapping[str, Any] | Path | None = None,
        *,
        example_config: bool = False,
        redis_url: str | None = None,
        env: Mapping[str, str | None] | None = None,
        ready: bool = True,
    ) -> Gateway: ...


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """One demo upstream for the session; tests compare its request count before and after."""
    server = Upstream(tmp_path_factory.mktemp("upstream"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_gateway(tmp_path: Path, upstream: Upstream) -> Iterator[StartGateway]:
    """Starts example gateways; each is stopped at teardown.

    `config`: a mapping written to a YAML file in tmp_path, or a path used as it is (it may not
    exist); None means `make_config(upstream.url)`. `example_config=True` leaves
    GATEWAY_BREAKER_CONFIG unset (examples/config.yaml). REDIS_URL is set only from `redis_url`.
    `ready=False` returns at once, for a process expected to fail.
    """
    started: list[Gateway] = []

    def start(
        config: Mapping[str, Any] | Path | None = None,
        *,
        example_config: bool = False,
        redis_url: str | None = None,
        env: Mapping[str, str | None] | None = None,
        ready: bool = True,
    ) -> Gateway:
        name = f"gateway{len(started) + 1}"
        extra: dict[str, str | None] = {"LOG_LEVEL": "debug"}
        if not example_config:
            if config is None:
                config = make_config(upstream.url)
            if isinstance(config, Path):
                path = config
            else:
                path = tmp_path / f"{name}.yaml"
                # Through JSON first: plain dicts and lists, whatever mappings the test passed.
                path.write_text(yaml.safe_dump(json.loads(json.dumps(config))))
            extra["GATEWAY_BREAKER_CONFIG"] = str(path)
        if redis_url is not None:
            extra["REDIS_URL"] = redis_url
        extra.update(env or {})
        gateway = Gateway(name, "examples.gateway:app", clean_env(extra), tmp_path)
        started.append(gateway)
        if ready:
            gateway.wait_ready()
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


def counts(upstream: Upstream) -> Callable[[], int]:
    """How many requests reached the upstream since this call."""
    before = upstream.requests()
    return lambda: upstream.requests() - before
