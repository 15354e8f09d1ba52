"""Fixtures: real redis-server processes on free loopback ports, started by the suite itself.

The machine's own Redis (127.0.0.1:6379) is never touched. Tests that only read and write keys
share one server per session and isolate themselves with a unique key prefix; tests that kill,
pause or restart Redis get a server of their own.
"""

from __future__ import annotations

import os
import shutil
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import port_for
import pytest
import redis
from pytest_redis.executor import RedisExecutor

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """A redis-server the tests own: URL, a sync client, and kill / restart / pause."""

    def __init__(self, datadir: Path, password: str | None = None) -> None:
        self.port = port_for.select_random()
        self.password = password
        self.paused = False
        datadir.mkdir(parents=True, exist_ok=True)
        self.executor = RedisExecutor(
            REDIS_SERVER,
            databases=4,
            redis_timeout=0,
            loglevel="warning",
            host="127.0.0.1",
            port=self.port,
            password=password,
            datadir=datadir,
            startup_timeout=20,
        )

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)

    def start(self) -> None:
        self.executor.start()

    def stop(self) -> None:
        self.executor.stop()

    def kill(self) -> None:
        self.executor.kill(sig=signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        assert self.executor.process is not None
        os.kill(self.executor.process.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.executor.process is not None
        os.kill(self.executor.process.pid, signal.SIGCONT)
        self.paused = False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under CI nothing may be skipped: a skip (say, for a missing redis-server) is a failure."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, which must run everything: {report.longrepr}"


@pytest.fixture(scope="session")
def redis_shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session's key-only tests (isolate with `key_prefix`)."""
    server = RedisServer(tmp_path_factory.mktemp("redis-shared"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the test's own, free to kill, pause and restart."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    if server.paused:
        server.resume()
    if server.executor.running():
        server.stop()


@pytest.fixture
def key_prefix() -> str:
    """A key prefix no other test uses."""
    return f"test_{uuid.uuid4().hex[:10]}"
