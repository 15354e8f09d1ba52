"""End to end: the example gateway under uvicorn, loaded over loopback, with and without breakers.

The script starts, on free loopback ports (never 127.0.0.1:6379):
  - the demo upstream, `uvicorn examples.upstream:app` (one process);
  - a redis-server of its own (no persistence);
  - three example gateways, `uvicorn examples.gateway:app` (one worker process each), with a
    YAML config whose services `discovery`, `sona` and `auth` point at the upstream:
      disabled   CIRCUIT_BREAKER_ENABLED=false: the middleware only passes requests through
      memory     the middleware, breakers in memory
      redis      the middleware, state shared through the redis-server (REDIS_URL)

Then it loads one gateway at a time with `GET /discovery/items` (proxied to the upstream's JSON
echo, about 0.5 KB) from a closed-loop load generator: wrk when it is on the PATH (`-t1`, keep-
alive connections), else a Python asyncio generator in this process (raw sockets, keep-alive),
which the output names. Every round starts a fresh process for each gateway (two identical
processes can differ by several percent for the whole of their life: hash seed, memory layout),
warms each up unmeasured, then runs each contender once, in a shuffled order; figures are
medians over the rounds, and each ratio is taken between contenders of the same round.

On a machine with two or more usable CPUs, processes are pinned with taskset: the gateways on
one CPU, everything else (upstream, redis-server, load generator, this script) on another, so
that none of our own processes competes with the loaded gateway (other load on the machine
still can; `--no-pin` turns pinning off). The gateway is the bottleneck: its CPU use during a
round is read from /proc and reported as CPU time per request, a figure less sensitive to other
load on the machine than requests/s.

Measured per contender: requests/s, p50 and p99 latency (closed loop: at saturation latency is
mostly queueing, about connections / throughput), gateway CPU per request. Ratios: memory /
disabled and redis / disabled of requests/s (goal >= 0.97). Redis: the commands the server
processed during the redis rounds (INFO commandstats delta, INFO itself left out) per request
and per second, against the same server's rate while the other contenders were loaded (the
redis gateway idle). Goal: 0 commands per request in steady state.

Transports and server loops (`--contenders transport`, the set of issue 15): the same gateway
(breakers in memory) with each HTTP engine under httpx's API and each uvicorn server stack, next
to the bare demo upstream run as a contender of its own, on the gateway's CPU:
  upstream              `uvicorn examples.upstream:app` (asyncio loop, h11): the baseline
  upstream-fast         the same with uvloop and httptools
  httpx / httpx-fast    UPSTREAM_TRANSPORT=httpx (httpx's own transport, httpcore), asyncio+h11
                        / uvloop+httptools
  httpx-aiohttp-fast    the httpx-aiohttp package's transport, uvloop+httptools
  aiohttp / aiohttp-fast  UPSTREAM_TRANSPORT=aiohttp (examples/transport.py), asyncio+h11 /
                        uvloop+httptools: what the image runs
Every ratio is taken between contenders on the same server stack only (loop and HTTP parser):
a gateway over `upstream` on asyncio + h11, over `upstream-fast` on uvloop + httptools.

The floor (`--contenders floor`, the set of issue 23), all on uvloop + httptools:
  upstream-fast         the bare demo upstream
  floor                 benchmarks/floor_proxy.py: a minimal ASGI proxy on one shared aiohttp
                        session, no framework, no breaker: the floor of a Python proxy here
  gateway               the example gateway as the image runs it, breakers in memory
Goals, from CPU time per request: gateway / floor >= 0.8, gateway / upstream-fast >= 0.5.
`--paced 0.5` then adds latency rounds: an open-loop load (benchmarks/paced_load.py) at half the
floor's requests/s, p50/p90/p99 per contender and the microseconds each adds over the bare
upstream and over the floor. The gateways (`disabled`, `memory`, `redis`) run on uvloop +
httptools too, as the image does.

Run:  .venv/bin/python benchmarks/e2e_load.py [--rounds 5] [--seconds 10] [--json PATH]
      .venv/bin/python benchmarks/e2e_load.py --contenders floor --rounds 5 --seconds 5 --paced 0.5
      .venv/bin/python benchmarks/e2e_load.py --contenders transport --rounds 5 --seconds 5
CI:   .venv/bin/python benchmarks/e2e_load.py --smoke
A/A:  .venv/bin/python benchmarks/e2e_load.py --contenders disabled,disabled  (should be 1.0)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import port_for
import redis
from _common import (
    bootstrap_ratio_ci,
    clean_environment,
    describe,
    finish,
    machine,
    print_table,
    quantile,
    summary,
    write_json,
)
from paced_load import Paced, read_response, run_paced

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = ("disabled", "memory", "redis")
GOAL_RATIO = 0.97  # requests/s with the middleware / without: at least this
FAST_SERVER = ["--loop", "uvloop", "--http", "httptools"]
PLAIN_SERVER = ["--loop", "asyncio", "--http", "h11"]


@dataclass(frozen=True)
class Kind:
    """What one contender runs: the uvicorn app, its server stack, its environment."""

    app: str = "examples.gateway:app"
    server: tuple[str, ...] = tuple(FAST_SERVER)
    env: tuple[tuple[str, str], ...] = ()
    breakers: str = "memory"  # disabled, memory, redis; "" for the bare upstream


KINDS: dict[str, Kind] = {
    "disabled": Kind(breakers="disabled"),
    "memory": Kind(),
    "redis": Kind(breakers="redis"),
    "upstream": Kind(app="examples.upstream:app", server=tuple(PLAIN_SERVER), breakers=""),
    "upstream-fast": Kind(app="examples.upstream:app", breakers=""),
    "httpx": Kind(server=tuple(PLAIN_SERVER), env=(("UPSTREAM_TRANSPORT", "httpx"),)),
    "httpx-fast": Kind(env=(("UPSTREAM_TRANSPORT", "httpx"),)),
    "httpx-aiohttp-fast": Kind(env=(("UPSTREAM_TRANSPORT", "httpx-aiohttp"),)),
    "aiohttp": Kind(server=tuple(PLAIN_SERVER), env=(("UPSTREAM_TRANSPORT", "aiohttp"),)),
    "aiohttp-fast": Kind(env=(("UPSTREAM_TRANSPORT", "aiohttp"),)),
    # The floor of a Python proxy on the gateway's stack: benchmarks/floor_proxy.py.
    "floor": Kind(
        app="floor_proxy:app", server=(*FAST_SERVER, "--app-dir", "benchmarks"), breakers=""
    ),
    # What the image and `make run` serve: the example gateway, breakers in memory.
    "gateway": Kind(),
}
TRANSPORT_SET = (
    "upstream",
    "upstream-fast",
    "httpx",
    "httpx-fast",
    "httpx-aiohttp-fast",
    "aiohttp",
    "aiohttp-fast",
)
# The set of issue 23: the example gateway against the floor of a Python proxy and against the
# bare upstream, all three on uvloop + httptools.
FLOOR_SET = ("upstream-fast", "floor", "gateway")
# Denominators, and the goal of a gateway over each. Against the bare upstream a gateway does at
# least twice the HTTP work (it is a server and a client): issue 15 asked >= 0.4 on asyncio +
# h11, issue 23 >= 0.5 on uvloop + httptools, and >= 0.8 of the floor proxy.
GOALS = {"disabled": GOAL_RATIO, "floor": 0.8, "upstream": 0.4, "upstream-fast": 0.5}
BASES = tuple(GOALS)
PATH = "/discovery/items"
SERVICES = ("discovery", "sona", "auth")
# One more service, never loaded: before the rounds it is opened on purpose (failure_threshold
# 1, failing upstream) to check that each gateway is the contender it claims to be.
CHECK_SERVICE = "check"
RESERVED_PORTS = {6379}  # somebody's Redis: never ours
UVICORN_ARGS = ["--no-access-log", "--log-level", "warning"]
# What the redis gateway may send while serving steady traffic: the periodic re-read of its
# services (TIME + MGET every sync_interval_seconds) and redis-py's health-check PING.
PERIODIC_COMMANDS = {"time", "mget", "ping"}
SERVER_PACKAGES = (
    "uvicorn",
    "h11",
    "httptools",
    "uvloop",
    "httpx",
    "httpcore",
    "aiohttp",
    "httpx-aiohttp",
    "redis",
)


# -- processes -------------------------------------------------------------------------------


def free_port() -> int:
    while True:
        port = port_for.select_random()
        if port not in RESERVED_PORTS:
            return port


@dataclass
class Pinning:
    """CPU sets for the gateways and for everything else; empty when not pinning."""

    gateway: str = ""
    rest: str = ""

    def prefix(self, cpus: str) -> list[str]:
        return ["taskset", "-c", cpus] if cpus else []

    @classmethod
    def choose(cls, enabled: bool) -> Pinning:
        usable = sorted(os.sched_getaffinity(0))
        if not enabled or len(usable) < 2 or shutil.which("taskset") is None:
            return cls()
        # The last CPU for the gateways: the kernel tends to put stray work on CPU 0.
        return cls(gateway=str(usable[-1]), rest=",".join(str(c) for c in usable[:-1]))


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far."""
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Fleet:
    """Starts processes, and stops every one of them (by its own pid) on the way out."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[Process] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Process:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                args,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def stop_one(self, process: Process) -> None:
        if process.popen.poll() is None:
            process.popen.terminate()
        try:
            process.popen.wait(10)
        except subprocess.TimeoutExpired:
            process.popen.kill()
            process.popen.wait(10)
        self.processes.remove(process)

    def stop(self) -> None:
        for p in reversed(self.processes):
            if p.popen.poll() is None:
                p.popen.terminate()
        for p in reversed(self.processes):
            try:
                p.popen.wait(10)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(10)
        self.processes = []


def wait_http(process: Process, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited at start:\n{process.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{process.name} did not answer {url} in {timeout} s")
        time.sleep(0.1)


def wait_redis(process: Process, port: int) -> redis.Redis:
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return client
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.popen.poll() is not None:
                raise
            time.sleep(0.02)


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def write_config(path: Path, upstream_port: int) -> None:
    lines = ["circuit_breaker:", "  services:"]
    for name in SERVICES:
        lines += [f"    {name}:", f"      upstream: http://127.0.0.1:{upstream_port}/{name}"]
    lines += [
        f"    {CHECK_SERVICE}:",
        f"      upstream: http://127.0.0.1:{upstream_port}/{CHECK_SERVICE}",
        "      failure_threshold: 1",
        "      timeout_seconds: 3600",
    ]
    path.write_text("\n".join(lines) + "\n")


# -- load generators -------------------------------------------------------------------------


@dataclass
class Load:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    not_2xx: int
    errors: int


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    number = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if number is None:
        raise ValueError(f"unreadable wrk latency {text!r}")
    return float(number.group(1)) * _UNITS[number.group(2)]


def parse_wrk(output: str) -> Load:
    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise ValueError(f"wrk output without {pattern!r}:\n{output}")
        return match

    done = find(r"^\s*(\d+) requests in ([\d.]+)(ms|s|m),")
    seconds = _ms(done.group(2) + done.group(3)) / 1000
    not_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return Load(
        requests=int(done.group(1)),
        seconds=seconds,
        rps=float(find(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=_ms(find(r"^\s+50%\s+(\S+)").group(1)),
        p99_ms=_ms(find(r"^\s+99%\s+(\S+)").group(1)),
        not_2xx=int(not_2xx.group(1)) if not_2xx else 0,
        errors=sum(int(g) for g in errors.groups()) if errors else 0,
    )


def run_wrk(url: str, connections: int, seconds: int, pin: Pinning) -> Load:
    args = [*pin.prefix(pin.rest), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s"]
    args += ["--latency", "--timeout", "5s", url]
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return parse_wrk(done.stdout)


async def _python_load(host: str, port: int, connections: int, seconds: float) -> Load:
    """Closed loop: `connections` keep-alive connections, each sending its next GET as soon as
    the previous response is complete."""
    request = f"GET {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: e2e_load\r\n\r\n"
    payload = request.encode()
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors = 0
    started = time.perf_counter()
    deadline = started + seconds
    finished = started

    async def worker() -> None:
        nonlocal errors, finished
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            errors += 1
            return
        try:
            while (begin := time.perf_counter()) < deadline:
                writer.write(payload)
                status = await read_response(reader)
                finished = time.perf_counter()
                latencies.append(finished - begin)
                statuses[status] += 1
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = max(finished - started, 1e-9)
    if not latencies:
        raise RuntimeError(f"no response from {host}:{port}")
    return Load(
        requests=len(latencies),
        seconds=elapsed,
        rps=len(latencies) / elapsed,
        p50_ms=quantile(latencies, 0.5) * 1000,
        p99_ms=quantile(latencies, 0.99) * 1000,
        not_2xx=sum(n for s, n in statuses.items() if not 200 <= s < 400),
        errors=errors,
    )


def run_python(port: int, connections: int, seconds: float) -> Load:
    return asyncio.run(_python_load("127.0.0.1", port, connections, seconds))


# -- the benchmark ---------------------------------------------------------------------------


@dataclass
class Gateway:
    name: str
    kind: str  # disabled, memory or redis
    port: int = 0
    process: Process = field(init=False)
    logs: list[str] = field(default_factory=list)  # the tail of each process's log
    loads: list[Load] = field(default_factory=list)
    cpu_us_per_request: list[float] = field(default_factory=list)
    cpu_busy: list[float] = field(default_factory=list)  # gateway CPU seconds / wall seconds
    upstream_busy: list[float] = field(default_factory=list)
    redis_commands: list[Counter[str]] = field(default_factory=list)
    redis_seconds: list[float] = field(default_factory=list)
    paced: list[Paced] = field(default_factory=list)  # --paced rounds


def command_stats(client: redis.Redis | None) -> Counter[str]:
    if client is None:
        return Counter()
    stats = client.info("commandstats")
    calls = Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()})
    del calls["info"]
    return calls


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, pin: Pinning) -> None:
        self.args = args
        self.workdir = workdir
        self.pin = pin
        self.fleet = Fleet(workdir)
        self.redis: redis.Redis | None = None
        self.redis_port = 0
        self.upstream: Process | None = None
        self.gateways: list[Gateway] = []
        self.env: dict[str, dict[str, str]] = {}  # each kind of gateway's environment
        self.loadgen = ""

    def start(self) -> None:
        python = sys.executable
        upstream_port = free_port()
        self.upstream = self.fleet.start(
            "upstream",
            [
                *self.pin.prefix(self.pin.rest),
                python,
                "-m",
                "uvicorn",
                "examples.upstream:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(upstream_port),
                *UVICORN_ARGS,
                *(FAST_SERVER if _has("uvloop") and _has("httptools") else PLAIN_SERVER),
            ],
        )
        config = self.workdir / "gateway.yaml"
        write_config(config, upstream_port)

        contenders = list(self.args.contenders)
        server = shutil.which("redis-server")
        if server is None:
            print("redis-server not found: the redis contender is skipped", file=sys.stderr)
            contenders = [c for c in contenders if KINDS[c].breakers != "redis"]
        elif any(KINDS[c].breakers == "redis" for c in contenders):
            self.redis_port = free_port()
            args = [server, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", ""]
            args += ["--appendonly", "no", "--dir", str(self.workdir)]
            process = self.fleet.start("redis", [*self.pin.prefix(self.pin.rest), *args])
            self.redis = wait_redis(process, self.redis_port)

        base = dict(os.environ)  # already cleaned of the package's settings
        base |= {"GATEWAY_BREAKER_CONFIG": str(config), "LOG_LEVEL": "warning"}
        by_breakers = {
            "": base,
            "disabled": base | {"CIRCUIT_BREAKER_ENABLED": "false"},
            "memory": base,
            "redis": base | {"REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0"},
        }
        self.env = {
            name: by_breakers[kind.breakers] | dict(kind.env) for name, kind in KINDS.items()
        }
        self.env["floor"]["FLOOR_UPSTREAM"] = f"http://127.0.0.1:{upstream_port}"
        self.upstream_port = upstream_port
        seen: Counter[str] = Counter()
        for kind in contenders:
            seen[kind] += 1
            name = kind if seen[kind] == 1 else f"{kind}#{seen[kind]}"  # an A/A check
            self.gateways.append(Gateway(name, kind))
        wait_http(self.upstream, f"http://127.0.0.1:{upstream_port}/_stats")
        self.start_gateways()

    def start_gateways(self) -> None:
        """A fresh process for every gateway (all at once), checked before use."""
        if self.redis is not None:
            self.redis.delete(f"circuit_breaker:{CHECK_SERVICE}:state")  # the check opens it
        for gateway in self.gateways:
            gateway.port = free_port()
            kind = KINDS[gateway.kind]
            args = [*self.pin.prefix(self.pin.gateway), sys.executable, "-m", "uvicorn"]
            args += [kind.app, "--host", "127.0.0.1", "--port", str(gateway.port)]
            gateway.process = self.fleet.start(
                f"gateway-{gateway.name}",
                [*args, *UVICORN_ARGS, *kind.server],
                self.env[gateway.kind],
            )
        for gateway in self.gateways:
            health = "/healthz" if KINDS[gateway.kind].breakers else "/_stats"
            wait_http(gateway.process, f"http://127.0.0.1:{gateway.port}{health}")
        self.check_contenders()

    def stop_gateways(self) -> None:
        for gateway in self.gateways:
            gateway.logs.append(gateway.process.tail(5))
            self.fleet.stop_one(gateway.process)

    def check_contenders(self) -> None:
        """Each gateway proxies, and its breakers are what it claims (off, memory, Redis)."""
        for gateway in self.gateways:
            base = f"http://127.0.0.1:{gateway.port}"
            if (status := status_of(base + PATH)) != 200:
                raise RuntimeError(f"{gateway.name}: GET {PATH} answered {status}")
            breakers = KINDS[gateway.kind].breakers
            if not breakers:
                continue  # the bare upstream
            failing = f"{base}/{CHECK_SERVICE}/status/500"
            codes = [status_of(failing), status_of(failing)]
            expected = [500, 500] if breakers == "disabled" else [500, 503]
            if codes != expected:
                raise RuntimeError(f"{gateway.name}: failing upstream gave {codes}, not {expected}")
        if self.redis is not None:
            deadline = time.monotonic() + 5
            key = f"circuit_breaker:{CHECK_SERVICE}:state"
            while b'"open"' not in (self.redis.get(key) or b""):
                if time.monotonic() > deadline:
                    raise RuntimeError("the redis gateway did not store its open breaker")
                time.sleep(0.02)

    def load(self, gateway: Gateway, seconds: int) -> Load:
        if self.loadgen.startswith("wrk"):
            return run_wrk(
                f"http://127.0.0.1:{gateway.port}{PATH}", self.args.connections, seconds, self.pin
            )
        return run_python(gateway.port, self.args.connections, seconds)

    def measure(self, gateway: Gateway) -> None:
        if self.args.warmup:
            self.load(gateway, self.args.warmup)
        assert self.upstream is not None
        commands = command_stats(self.redis)
        cpu, up_cpu = gateway.process.cpu_seconds(), self.upstream.cpu_seconds()
        wall = time.perf_counter()
        result = self.load(gateway, self.args.seconds)
        wall = time.perf_counter() - wall
        cpu, up_cpu = gateway.process.cpu_seconds() - cpu, self.upstream.cpu_seconds() - up_cpu
        sent = command_stats(self.redis) - commands
        if result.not_2xx or result.errors or not result.requests:
            raise RuntimeError(
                f"{gateway.name}: {result.requests} requests, {result.not_2xx} not 2xx,"
                f" {result.errors} errors\n{gateway.process.tail()}"
            )
        gateway.loads.append(result)
        gateway.cpu_us_per_request.append(cpu / result.requests * 1e6)
        gateway.cpu_busy.append(cpu / wall)
        gateway.upstream_busy.append(up_cpu / wall)
        # Every window: while another gateway is loaded the redis gateway sits idle, which
        # gives the idle command rate to compare the loaded one with.
        gateway.redis_commands.append(sent)
        gateway.redis_seconds.append(wall)

    def run(self) -> None:
        rng = random.Random(20261129)
        first = self.args.warmup or 1
        for number in range(1, self.args.rounds + 1):
            if number > 1 and self.args.restart:
                # New processes every round: a process's own luck (hash seed, address layout)
                # moves its speed by several percent and would otherwise stick to a contender.
                self.stop_gateways()
                self.start_gateways()
            if number == 1 or self.args.restart:
                for gateway in self.gateways:  # first requests, upstream pool, caches
                    self.load(gateway, first)
            order = list(self.gateways)
            rng.shuffle(order)
            for gateway in order:
                self.measure(gateway)
            print(
                f"  round {number}/{self.args.rounds}: "
                + ", ".join(f"{g.name} {g.loads[-1].rps:.0f} req/s" for g in self.gateways),
                flush=True,
            )

    def run_paced(self, fraction: float) -> float:
        """Open-loop rounds at `fraction` of the base's median requests/s (the floor's when it
        runs, else the first base's), each contender once per round in a shuffled order, on the
        processes of the last throughput round."""
        base = next(g for name in ("floor", *BASES) for g in self.gateways if g.name == name)
        rate = fraction * statistics.median(x.rps for x in base.loads)
        rng = random.Random(20261204)
        for number in range(1, self.args.rounds + 1):
            order = list(self.gateways)
            rng.shuffle(order)
            for gateway in order:
                result = run_paced(gateway.port, PATH, rate, self.args.seconds)
                if result.not_2xx or result.errors:
                    raise RuntimeError(
                        f"{gateway.name} paced: {result.not_2xx} not 2xx, {result.errors}"
                        f" failed or unanswered of {result.sent}\n{gateway.process.tail()}"
                    )
                gateway.paced.append(result)
            print(
                f"  paced round {number}/{self.args.rounds} at {rate:.0f} req/s: "
                + ", ".join(f"{g.name} p50 {g.paced[-1].p50_us:.0f} us" for g in self.gateways),
                flush=True,
            )
        return rate


def paced_report(bench: Bench, rate: float, fraction: float) -> dict[str, Any]:
    """p50/p90/p99 per contender (medians over rounds), and the latency each adds over the
    bare upstream and over the floor, in microseconds."""
    result: dict[str, Any] = {"rate": rate, "fraction_of_base": fraction, "contenders": {}}
    medians: dict[str, dict[str, float]] = {}
    for g in bench.gateways:
        medians[g.name] = {
            q: statistics.median(getattr(x, f"{q}_us") for x in g.paced)
            for q in ("p50", "p90", "p99")
        }
    rows = []
    for g in bench.gateways:
        m = medians[g.name]
        entry: dict[str, Any] = {
            **{f"{q}_us": v for q, v in m.items()},
            "per_round_p50_us": [round(x.p50_us, 1) for x in g.paced],
            "per_round_p99_us": [round(x.p99_us, 1) for x in g.paced],
        }
        added = []
        for base in ("upstream-fast", "floor"):
            if base in medians and base != g.name:
                over = {q: m[q] - medians[base][q] for q in m}
                entry[f"added_over_{base}_us"] = over
                added.append(f"{base}: +{over['p50']:.0f} / +{over['p99']:.0f}")
        result["contenders"][g.name] = entry
        rows.append(
            [g.name, f"{m['p50']:.0f}", f"{m['p90']:.0f}", f"{m['p99']:.0f}", "; ".join(added)]
        )
    print(
        f"\nopen loop at {rate:.0f} req/s ({fraction:.0%} of the base's req/s), medians of rounds"
    )
    print_table(["contender", "p50 us", "p90 us", "p99 us", "added p50 / p99 us over"], rows)
    return result


def at_least(value: float, low: float, high: float, goal: float) -> str:
    """ "met" / "MISSED" when the whole interval agrees with the point, else "unclear"."""
    if value >= goal and low >= goal:
        return "met"
    if value < goal and high < goal:
        return "MISSED"
    return "unclear (met?)" if value >= goal else "unclear (missed?)"


def report(bench: Bench, smoke: bool) -> dict[str, Any]:
    gateways = {g.name: g for g in bench.gateways}
    contenders: dict[str, Any] = {}
    rows = []
    for g in bench.gateways:
        rps = summary([x.rps for x in g.loads])
        c = contenders[g.name] = {
            "rps": rps,
            "p50_ms": summary([x.p50_ms for x in g.loads]),
            "p99_ms": summary([x.p99_ms for x in g.loads]),
            "gateway_cpu_us_per_request": summary(g.cpu_us_per_request),
            "gateway_cpu_busy": summary(g.cpu_busy),
            "upstream_cpu_busy": summary(g.upstream_busy),
            "requests": [x.requests for x in g.loads],
            "per_round_rps": [round(x.rps, 1) for x in g.loads],
            "per_round_cpu_us_per_request": [round(x, 1) for x in g.cpu_us_per_request],
            "per_round_gateway_cpu_busy": [round(x, 3) for x in g.cpu_busy],
            "per_round_p99_ms": [round(x.p99_ms, 2) for x in g.loads],
        }
        rows.append(
            [
                g.name,
                f"{rps['median']:.0f}",
                f"{rps['p25']:.0f} - {rps['p75']:.0f}",
                f"{c['p50_ms']['median']:.1f}",
                f"{c['p99_ms']['median']:.1f}",
                f"{c['gateway_cpu_us_per_request']['median']:.0f}",
                f"{c['gateway_cpu_busy']['median'] * 100:.0f}%",
                f"{c['upstream_cpu_busy']['median'] * 100:.0f}%",
            ]
        )
    print()
    print_table(
        [
            "contender",
            "req/s",
            "p25 - p75",
            "p50 ms",
            "p99 ms",
            "gateway CPU us/req",
            "gateway CPU",
            "upstream CPU",
        ],
        rows,
    )

    ratios: dict[str, Any] = {}
    for base_name, goal in GOALS.items():
        base = gateways.get(base_name)
        if base is None:
            continue
        for g in bench.gateways:
            if g is base or not comparable(g.kind, base_name):
                continue
            ratios[f"{g.name}/{base_name}"] = ratio(g, base, goal, smoke)
    return {"contenders": contenders, "ratios": ratios, "redis": redis_report(bench, gateways)}


def comparable(kind: str, base: str) -> bool:
    """A ratio only between contenders on the same server stack (loop and HTTP parser), and
    over a proxy-less base (a bare upstream) or over one that proxies less (disabled, floor)."""
    top, bottom = KINDS[kind], KINDS[base]
    if _stack(top) != _stack(bottom):
        return False
    if not top.breakers:  # a bare upstream or the floor: only over a bare upstream
        return kind == "floor" and not bottom.breakers and base != "floor"
    return True


def _stack(kind: Kind) -> tuple[str, str]:
    args = list(kind.server)
    return args[args.index("--loop") + 1], args[args.index("--http") + 1]


def ratio(top_g: Gateway, base: Gateway, goal: float, smoke: bool) -> dict[str, Any]:
    """`top_g` over `base`, from requests/s and from CPU time per request, with verdicts."""
    name, base_name = top_g.name, base.name
    top = [x.rps for x in top_g.loads]
    bottom = [x.rps for x in base.loads]
    point = statistics.median(top) / statistics.median(bottom)
    low, high = bootstrap_ratio_ci(top, bottom)
    per_round = [t / b for t, b in zip(top, bottom, strict=True)]
    # The same from the gateway's CPU time per request, which does not depend on how much
    # of its core the gateway got (other load on the machine): the throughput one core
    # would give, contender / disabled = CPU per request of disabled / of the contender.
    cpu_top, cpu_bottom = base.cpu_us_per_request, top_g.cpu_us_per_request
    cpu = statistics.median(cpu_top) / statistics.median(cpu_bottom)
    cpu_low, cpu_high = bootstrap_ratio_ci(cpu_top, cpu_bottom)
    if smoke:
        outcome = cpu_outcome = "smoke run, no verdict"
    else:
        outcome = at_least(point, low, high, goal)
        cpu_outcome = at_least(cpu, cpu_low, cpu_high, goal)
    result = {
        "rps_ratio": point,
        "ci95_low": low,
        "ci95_high": high,
        "per_round": summary(per_round),
        "per_round_values": [round(r, 4) for r in per_round],
        "goal": f">= {goal}",
        "verdict": outcome,
        "cpu_capacity_ratio": cpu,
        "cpu_capacity_ci95_low": cpu_low,
        "cpu_capacity_ci95_high": cpu_high,
        "cpu_capacity_verdict": cpu_outcome,
    }
    print(
        f"{name}/{base_name} req/s = {point:.3f} (95% CI {low:.3f} - {high:.3f}; per round"
        f" {min(per_round):.3f} - {max(per_round):.3f}; goal >= {goal}): {outcome}"
    )
    print(
        f"{name}/{base_name} from CPU per request = {cpu:.3f} (95% CI {cpu_low:.3f} -"
        f" {cpu_high:.3f}; goal >= {goal}): {cpu_outcome}"
    )
    return result


def redis_report(bench: Bench, gateways: dict[str, Gateway]) -> dict[str, Any]:
    redis_result: dict[str, Any] = {}
    if "redis" in gateways:
        g = gateways["redis"]
        loaded: Counter[str] = sum(g.redis_commands, Counter())
        seconds = sum(g.redis_seconds)
        requests = sum(x.requests for x in g.loads)
        idle: Counter[str] = Counter()
        idle_seconds = 0.0
        for other in bench.gateways:
            if other is not g:
                idle += sum(other.redis_commands, Counter())
                idle_seconds += sum(other.redis_seconds)
        total = sum(loaded.values())
        idle_rate = sum(idle.values()) / idle_seconds if idle_seconds else float("nan")
        rate = total / seconds
        unexpected = {k: v for k, v in loaded.items() if k not in PERIODIC_COMMANDS}
        # Commands beyond the idle rate are the ones the traffic caused.
        excess = max(0.0, total - idle_rate * seconds)
        redis_result = {
            "requests": requests,
            "seconds": seconds,
            "commands": total,
            "commands_by_name": dict(sorted(loaded.items())),
            "commands_per_request": total / requests,
            "commands_per_second": rate,
            "idle_commands_per_second": idle_rate,
            "idle_commands_by_name": dict(sorted(idle.items())),
            "commands_beyond_idle_per_request": excess / requests,
            "unexpected_commands": unexpected,
            "goal": "0 commands per request in steady state",
            "verdict": "met" if not unexpected and rate <= idle_rate * 1.5 + 1 else "MISSED",
        }
        print(
            f"redis: {total} commands over {requests} requests in {seconds:.0f} s"
            f" ({', '.join(f'{k} {v}' for k, v in sorted(loaded.items())) or 'none'}):"
            f" {total / requests:.5f} per request, {rate:.2f}/s loaded vs {idle_rate:.2f}/s idle"
            f" (the periodic re-read); beyond idle {excess / requests:.5f} per request:"
            f" {redis_result['verdict']}"
        )
    return redis_result


def contender_list(text: str) -> list[str]:
    if text.strip() == "transport":
        return list(TRANSPORT_SET)
    if text.strip() == "floor":
        return list(FLOOR_SET)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in KINDS]
    if unknown or not any(n in BASES for n in names):
        raise argparse.ArgumentTypeError(
            f"`transport`, `floor`, or names from {', '.join(KINDS)} with one of {', '.join(BASES)}"
        )
    return names


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def loadgen_name(choice: str) -> str:
    wrk = shutil.which("wrk")
    if choice == "wrk" and wrk is None:
        raise SystemExit("--loadgen wrk: wrk is not on the PATH (apt-get install wrk)")
    if choice in ("auto", "wrk") and wrk is not None:
        done = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
        first = (done.stdout or done.stderr).splitlines()[0] if (done.stdout or done.stderr) else ""
        return f"wrk ({first.split(' Copyright')[0].strip() or 'unknown version'})"
    return "python asyncio (raw sockets, keep-alive)"


@contextlib.contextmanager
def pinned_self(pin: Pinning) -> Iterator[None]:
    """This process (and so the Python load generator) on the non-gateway CPUs."""
    if not pin.rest:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(c) for c in pin.rest.split(",")})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=10, help="measured seconds per run")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured seconds before each")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--contenders",
        type=contender_list,
        default=list(CONTENDERS),
        help="comma-separated, in start order; a repeated name is an A/A check (disabled,disabled)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--keep-processes",
        dest="restart",
        action="store_false",
        help="one process per gateway for the whole run (default: new processes every round)",
    )
    parser.add_argument(
        "--paced",
        type=float,
        metavar="FRACTION",
        help="then latency rounds, open loop at this fraction of the floor's req/s (e.g. 0.5)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI: does it work?")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.seconds, args.warmup = 1, 2, 0
    if args.rounds < 1 or args.seconds < 1 or args.warmup < 0 or args.connections < 1:
        parser.error("--rounds, --seconds and --connections must be >= 1, --warmup >= 0")

    clean_environment()
    info = machine()
    pin = Pinning.choose(not args.no_pin)
    loadgen = loadgen_name(args.loadgen)
    pinning = (
        f"gateways on CPU {pin.gateway}; upstream, redis-server, load generator on CPU {pin.rest}"
        if pin.gateway
        else "none"
    )
    print(
        f"e2e_load: {args.rounds} rounds x {args.seconds} s per contender, {args.connections}"
        f" connections, load generator {loadgen}; pinning: {pinning}; {info['cpu_model']},"
        f" {info['nproc']} CPUs, Python {info['python']}, load {info['loadavg']},"
        f" commit {describe(info)}",
        flush=True,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="e2e_load.") as tmp, pinned_self(pin):
        bench = Bench(args, Path(tmp), pin)
        bench.loadgen = loadgen
        try:
            bench.start()
            bench.run()
            results = report(bench, args.smoke)
            if args.paced:
                rate = bench.run_paced(args.paced)
                results["paced"] = paced_report(bench, rate, args.paced)
            logs = {g.name: [*g.logs, g.process.tail(5)] for g in bench.gateways}
        finally:
            bench.fleet.stop()
            if bench.redis is not None:
                bench.redis.close()
    elapsed = time.perf_counter() - started
    finish(info)
    print(f"\n{elapsed:.1f} s")
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "e2e_load",
                "machine": info,
                "settings": {
                    "rounds": args.rounds,
                    "seconds": args.seconds,
                    "warmup": args.warmup,
                    "connections": args.connections,
                    "path": PATH,
                    "loadgen": loadgen,
                    "contenders": [g.name for g in bench.gateways],
                    "new_processes_every_round": args.restart,
                    "pinning": pinning,
                    "uvicorn": UVICORN_ARGS,
                    "versions": {name: _version(name) for name in SERVER_PACKAGES},
                    "smoke": args.smoke,
                },
                "seconds": round(elapsed, 2),
                **results,
                "gateway_log_tail": logs,
            },
        )
    return 0


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
