"""deploy/fleet.py: the compose topology as plain processes, on free ports.

Starts the fleet as a user would (`python deploy/fleet.py`, here with free ports), follows the
README's walk-through against it, then stops it with a signal and checks that every process it
started is gone. Readiness and propagation are polled with deadlines, never slept for.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import port_for
import pytest
import redis

from tests.deploy.conftest import FLEET_SCRIPT, REPO_ROOT
from tests.helpers import wait_until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

START_TIMEOUT = 45.0
STOP_TIMEOUT = 30.0
# The machine's own Redis and the fleet's defaults are never used by these tests.
RESERVED_PORTS = {6379, 6390, 9001, 8001, 8002}


@dataclass(frozen=True)
class Ports:
    redis: int
    upstream: int
    gateways: tuple[int, int]

    def all(self) -> list[int]:
        return [self.redis, self.upstream, *self.gateways]


def free_ports() -> Ports:
    chosen: list[int] = []
    while len(chosen) < 4:
        port = port_for.select_random()
        if port not in RESERVED_PORTS and port not in chosen:
            chosen.append(port)
    return Ports(chosen[0], chosen[1], (chosen[2], chosen[3]))


def process_start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time), or None when the process is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    if fields[0] == "Z":
        return None
    return fields[19]


def children_of(pid: int) -> dict[int, str]:
    """The live child processes of `pid`: pid -> command line."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def names_port(word: str, port: int) -> bool:
    """`--port 9001` has the word `9001`; redis-server shows itself as `127.0.0.1:6390`."""
    return word == str(port) or word.endswith(f":{port}")


def processes_using(ports: list[int]) -> dict[int, str]:
    """Live processes (other than this one) whose command line names one of `ports`."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            line = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        words = line.replace("\0", " ").split()
        named = any(names_port(word, port) for word in words for port in ports)
        if named and process_start_time(int(entry.name)) is not None:
            found[int(entry.name)] = " ".join(words)
    return found


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class FleetProcess:
    """`python deploy/fleet.py` on given ports, its output in a file."""

    def __init__(self, ports: Ports, logdir: Path, *extra: str) -> None:
        self.ports = ports
        self.output_path = logdir / "fleet.out"
        self._output = self.output_path.open("wb")
        argv = [
            sys.executable,
            str(FLEET_SCRIPT),
            "--redis-port",
            str(ports.redis),
            "--upstream-port",
            str(ports.upstream),
            "--gateway-ports",
            ",".join(str(p) for p in ports.gateways),
            *extra,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
        )
        self.children: dict[int, str] = {}  # pid -> command line, recorded once ready
        self.start_times: dict[int, str | None] = {}

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.upstream}"

    def gateway_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.ports.gateways[index]}"

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def _ok(self, url: str) -> bool:
        try:
            return httpx.get(url, timeout=1.0, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(
                f"the fleet exited with {self.process.returncode} before it was ready:\n"
                + self.output()
            )
        if "fleet is up" not in self.output():
            return False
        urls = [f"{self.upstream_url}/_stats"]
        urls += [f"{self.gateway_url(i)}/healthz" for i in range(2)]
        return all(self._ok(url) for url in urls)

    def wait_ready(self) -> None:
        wait_until_sync(self._ready, START_TIMEOUT, 0.05, "the fleet to be ready")
        self.children = children_of(self.process.pid)
        self.start_times = {pid: process_start_time(pid) for pid in self.children}

    def child_gone(self, pid: int) -> bool:
        start = process_start_time(pid)
        return start is None or start != self.start_times.get(pid)

    def signal(self, signum: int) -> int:
        """Sends `signum` and returns the exit code, with a deadline."""
        self.process.send_signal(signum)
        try:
            return self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the fleet still runs {STOP_TIMEOUT}s after {signal.Signals(signum).name}:\n"
                + self.output()
            ) from None

    def wait_exit(self) -> int:
        try:
            return self.process.wait(START_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the fleet still runs:\n{self.output()}") from None

    def cleanup(self) -> None:
        """Whatever a failed test left: the fleet, then the children it had."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)
        for pid in self.children:
            if not self.child_gone(pid):
                os.kill(pid, signal.SIGKILL)
        self._output.close()


@pytest.fixture
def start_fleet(tmp_path: Path) -> Iterator[type[FleetProcess]]:
    started: list[FleetProcess] = []

    class Tracked(FleetProcess):
        def __init__(self, ports: Ports, logdir: Path, *extra: str) -> None:
            super().__init__(ports, logdir, *extra)
            started.append(self)

    yield Tracked
    for fleet in started:
        fleet.cleanup()


def assert_all_stopped(fleet: FleetProcess) -> None:
    wait_until_sync(
        lambda: all(fleet.child_gone(pid) for pid in fleet.children),
        STOP_TIMEOUT,
        0.05,
        f"every child of the fleet to be gone: {fleet.children}",
    )
    for port in fleet.ports.all():
        assert port_is_free(port), f"port {port} still in use after the fleet stopped"
    assert processes_using(fleet.ports.all()) == {}


def expected_children(fleet: FleetProcess) -> None:
    commands = sorted(fleet.children.values())
    assert len(commands) == 4, fleet.children
    assert sum("redis-server" in c and str(fleet.ports.redis) in c for c in commands) == 1
    assert sum("examples.upstream:app" in c for c in commands) == 1
    assert sum("examples.gateway:app" in c for c in commands) == 2
    banner = fleet.output()
    for pid in fleet.children:
        assert f"pid {pid}" in banner, f"the banner does not name child {pid}"


def test_walk_through_on_the_process_fleet(tmp_path: Path, start_fleet: type[FleetProcess]) -> None:
    fleet = start_fleet(free_ports(), tmp_path)
    fleet.wait_ready()
    expected_children(fleet)
    output = fleet.output()
    assert f"{fleet.gateway_url(0)}/discovery/status/500" in output  # the walk-through
    assert f"redis-cli -p {fleet.ports.redis} GET circuit_breaker:discovery:state" in output

    with (
        httpx.Client(base_url=fleet.gateway_url(0), timeout=10.0, trust_env=False) as gw1,
        httpx.Client(base_url=fleet.gateway_url(1), timeout=10.0, trust_env=False) as gw2,
        httpx.Client(base_url=fleet.upstream_url, timeout=10.0, trust_env=False) as upstream,
        redis.Redis(port=fleet.ports.redis, socket_timeout=5) as client,
    ):
        served = upstream.get("/_stats").json()["requests"]
        # Three upstream failures through gateway-1 open `discovery` (failure_threshold 3).
        for _ in range(3):
            assert gw1.get("/discovery/status/500").status_code == 500
        rejected = gw1.get("/discovery/anything")
        assert rejected.status_code == 503
        assert rejected.headers["content-type"].startswith("application/problem+json")
        assert 1 <= int(rejected.headers["retry-after"]) <= 10
        assert rejected.json()["service"] == "discovery"
        assert upstream.get("/_stats").json()["requests"] == served + 3  # not called when open

        # gateway-2 learns it through Redis within a short deadline.
        wait_until_sync(
            lambda: gw2.get("/discovery/anything").status_code == 503,
            2.0,
            0.02,
            "gateway-2 to reject discovery",
        )
        assert gw2.get("/sona/anything").status_code == 200  # other services unaffected

        raw = client.get("circuit_breaker:discovery:state")
        assert raw is not None
        state = json.loads(raw)
        assert state["state"] == "open"
        assert state["failure_count"] >= 3
        assert 0 < client.ttl("circuit_breaker:discovery:state") <= 3600

    assert fleet.signal(signal.SIGTERM) == 0
    assert_all_stopped(fleet)
    output = fleet.output()
    assert "SIGTERM: stopping the fleet" in output
    assert output.rstrip().endswith("stopped")
    # The gateways stopped before Redis did.
    assert output.index("gateway-1 stopped") < output.index("redis stopped")


def test_ctrl_c_stops_every_process(tmp_path: Path, start_fleet: type[FleetProcess]) -> None:
    fleet = start_fleet(free_ports(), tmp_path)
    fleet.wait_ready()
    expected_children(fleet)
    assert fleet.signal(signal.SIGINT) == 0
    assert_all_stopped(fleet)
    assert "SIGINT: stopping the fleet" in fleet.output()


def test_a_gateway_that_cannot_start_stops_the_fleet(
    tmp_path: Path, start_fleet: type[FleetProcess]
) -> None:
    """Redis and the upstream are already up when a gateway fails: they are stopped too."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (REPO_ROOT / "deploy" / "fleet.yaml")
        .read_text()
        .replace("failure_threshold: 3", "failure_threshold: 0")
    )
    ports = free_ports()
    process = start_fleet(ports, tmp_path, "--config", str(bad))
    assert process.wait_exit() == 1
    output = process.output()
    assert "gateway-" in output
    assert "before it was ready" in output
    assert "failure_threshold" in output  # the gateway's own message, passed through
    assert "upstream stopped" in output
    assert "redis stopped" in output
    wait_until_sync(
        lambda: processes_using(ports.all()) == {},
        STOP_TIMEOUT,
        0.05,
        "no process left on the fleet's ports",
    )
    assert all(port_is_free(port) for port in ports.all())


def test_a_busy_port_is_refused_before_anything_starts(
    tmp_path: Path, start_fleet: type[FleetProcess]
) -> None:
    ports = free_ports()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", ports.gateways[1]))
        holder.listen()
        process = start_fleet(ports, tmp_path)
        assert process.wait_exit() == 1
    output = process.output()
    assert f"gateway-2 ({ports.gateways[1]})" in output
    assert "ports in use" in output
    assert re.search(r"^(redis|upstream|gateway-\d)\s+\|", output, re.MULTILINE) is None, output
