"""Fixtures: real redis-server processes on free loopback ports, started by the suite itself.

The machine's own Redis (127.0.0.1:6379) is never touched. Tests that only read and write keys
share one server per session and isolate themselves with a unique key prefix; tests that kill,
pause or restart Redis get a server of their own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import port_for
import pytest
import redis
from pytest_redis.executor import RedisExecutor

from tests.helpers import wait_until_sync

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


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        port = port_for.select_random(ports=set(range(20000, 40000)))
        if port_for.is_available(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisProcess:
    """A redis-server (or sentinel) with arbitrary arguments, for topologies pytest-redis lacks."""

    def __init__(self, datadir: Path, port: int, *args: str, sentinel_conf: str | None = None):
        self.port = port
        self.datadir = datadir
        datadir.mkdir(parents=True, exist_ok=True)
        command = [REDIS_SERVER]
        if sentinel_conf is not None:
            conf = datadir / f"sentinel-{port}.conf"
            conf.write_text(sentinel_conf)
            command += [str(conf), "--sentinel"]
        command += ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        command += ["--dir", str(datadir), "--logfile", str(datadir / f"redis-{port}.log"), *args]
        self.command = command
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        process = self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1)

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.command}")
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until_sync(answers, timeout=20, message=f"redis-server on port {self.port}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class RedisClusterServers:
    """Three masters, slots split evenly, no replicas."""

    def __init__(self, datadir: Path) -> None:
        self.nodes = [
            RedisProcess(
                datadir / f"node{i}",
                port := free_cluster_port(),
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "2000",
            )
            for i in range(3)
        ]  # fmt: skip

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [shutil.which("redis-cli") or "redis-cli", "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        for node in self.nodes:
            client = redis.Redis(port=node.port)
            wait_until_sync(
                lambda c=client: c.cluster("info")["cluster_state"] == "ok",
                timeout=30,
                message=f"cluster state ok on port {node.port}",
            )

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class RedisSentinelServers:
    """A master, a replica and one sentinel (quorum 1) watching them as `mymaster`."""

    service = "mymaster"

    def __init__(self, datadir: Path) -> None:
        master_port = port_for.select_random()
        self.master = RedisProcess(datadir / "master", master_port)
        self.replica = RedisProcess(
            datadir / "replica",
            port_for.select_random(),
            "--replicaof", "127.0.0.1", str(master_port),
        )  # fmt: skip
        conf = (
            f"sentinel monitor {self.service} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {self.service} 500\n"
            f"sentinel failover-timeout {self.service} 2000\n"
            f"sentinel parallel-syncs {self.service} 1\n"
        )
        self.sentinel = RedisProcess(
            datadir / "sentinel", port_for.select_random(), sentinel_conf=conf
        )

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{self.service}"

    def master_client(self) -> redis.Redis:
        host, port = redis.Redis(port=self.sentinel.port).sentinel_get_master_addr_by_name(
            self.service
        )
        return redis.Redis(host=host, port=port)

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        self.sentinel.start()

    def stop(self) -> None:
        for server in (self.sentinel, self.replica, self.master):
            server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A 3-master Redis Cluster for the session (isolate with `key_prefix`)."""
    cluster = RedisClusterServers(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinelServers]:
    """Master + replica + sentinel of the test's own (free to fail over)."""
    servers = RedisSentinelServers(tmp_path_factory.mktemp("sentinel"))
    servers.start()
    yield servers
    servers.stop()
