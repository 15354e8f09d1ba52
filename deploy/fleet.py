"""The compose fleet as plain processes, for machines without Docker.

    .venv/bin/python deploy/fleet.py        # or: make fleet

Starts what `compose.yaml` starts, on this machine's loopback interface:

- `redis`: a redis-server of its own (default port 6390, never 6379), data in a temporary
  directory, no snapshots (`--save ""`) and no append-only file;
- `upstream`: the demo upstream, `uvicorn examples.upstream:app` (default port 9001);
- `gateway-1`, `gateway-2`: `uvicorn examples.gateway:app` (default ports 8001 and 8002) with the
  compose file's environment: REDIS_URL pointing at that redis-server,
  CIRCUIT_BREAKER_ENABLED=true, LOG_LEVEL=debug and GATEWAY_BREAKER_CONFIG naming a copy of
  `deploy/fleet.yaml` whose upstream host `upstream` is replaced by this machine's demo upstream.

It waits until every process answers (with a deadline), prints the URLs and the walk-through,
then prefixes every line the processes print with their name, as `docker compose up` does.
Ctrl-C or SIGTERM stops the gateways, then the upstream, then Redis (SIGTERM, then SIGKILL after
a grace period; a second Ctrl-C kills at once) and removes the temporary directory. Exit code 0
after a requested stop, 1 when a process failed to start or died, 2 for bad arguments.

Gateway settings in the caller's environment (REDIS_URL, REDIS__*, CIRCUIT_BREAKER__*, ...) are
not passed on: the fleet runs with the compose file's settings only.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import redis
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
FLEET_CONFIG = REPO_ROOT / "deploy" / "fleet.yaml"
# The upstream's host name inside compose's network, as written in deploy/fleet.yaml.
COMPOSE_UPSTREAM_HOST = "upstream"
GATEWAY_APP = "examples.gateway:app"
UPSTREAM_APP = "examples.upstream:app"
DEFAULT_REDIS_PORT = 6390
DEFAULT_UPSTREAM_PORT = 9001
DEFAULT_GATEWAY_PORTS = (8001, 8002)
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05
# Settings from the caller's shell that would make the fleet differ from compose's.
_ISOLATED_NAMES = frozenset(
    {"REDIS_URL", "GATEWAY_BREAKER_CONFIG", "CIRCUIT_BREAKER_ENABLED", "LOG_LEVEL"}
)
_ISOLATED_PREFIXES = ("REDIS__", "CIRCUIT_BREAKER__")


class FleetError(Exception):
    """A process could not start, or died: the fleet stops."""


class StopRequested(Exception):
    """Ctrl-C or SIGTERM arrived."""


def gateway_env(redis_url: str, config_path: Path | str) -> dict[str, str]:
    """The gateway environment of compose.yaml, for a given Redis and config file."""
    return {
        "REDIS_URL": redis_url,
        "CIRCUIT_BREAKER_ENABLED": "true",
        "GATEWAY_BREAKER_CONFIG": str(config_path),
        "LOG_LEVEL": "debug",
    }


def uvicorn_command(app: str, host: str, port: int) -> list[str]:
    """`uvicorn APP --host HOST --port PORT`, run by this interpreter, as the image runs it."""
    command = [sys.executable, "-m", "uvicorn", app, "--host", host, "--port", str(port)]
    if app == GATEWAY_APP:
        # An open admin event stream must not hold a stop forever.
        command += ["--timeout-graceful-shutdown", "5"]
    return command


def redis_command(redis_server: str, port: int, datadir: Path) -> list[str]:
    """A loopback redis-server that keeps nothing on disk."""
    return [
        redis_server,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(datadir),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--protected-mode",
        "yes",
        "--logfile",
        "",
    ]


def local_config(source: Path, upstream_base: str) -> dict[str, Any]:
    """`source` (deploy/fleet.yaml) with every upstream on host `upstream` moved to
    `upstream_base` (scheme://host:port), paths kept."""
    doc = yaml.safe_load(source.read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        raise FleetError(f"{source}: expected a mapping at the top level")
    base = urlsplit(upstream_base)
    services = (doc.get("circuit_breaker") or {}).get("services") or {}
    for service in services.values():
        url = service.get("upstream") if isinstance(service, dict) else None
        if not isinstance(url, str):
            continue
        parts = urlsplit(url)
        if parts.hostname == COMPOSE_UPSTREAM_HOST:
            service["upstream"] = urlunsplit(parts._replace(scheme=base.scheme, netloc=base.netloc))
    return doc


def key_prefix(config: Mapping[str, Any]) -> str:
    redis_section = config.get("redis") or {}
    return str(redis_section.get("key_prefix") or "circuit_breaker")


def isolated_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without gateway settings, plus `extra`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name.upper() not in _ISOLATED_NAMES and not name.upper().startswith(_ISOLATED_PREFIXES)
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def describe_exit(returncode: int | None) -> str:
    """`exited with code N`, or `ended by SIGNAME` for a process a signal ended."""
    if returncode is None:
        return "still runs"
    if returncode < 0:
        try:
            return f"ended by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"ended by signal {-returncode}"
    return f"exited with code {returncode}"


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on host:port now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As uvicorn and redis-server do: a port in TIME_WAIT is free, one in LISTEN is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class Child:
    """One process of the fleet, its output pumped to ours with its name in front."""

    name: str
    argv: list[str]
    process: subprocess.Popen[bytes]
    pump: threading.Thread = field(init=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None


class Output:
    """Line-by-line writes to one stream from many threads; a closed stream is ignored."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed terminal or pipe must not stop the fleet or its shutdown


class Fleet:
    """Starts, watches and stops the processes of the fleet."""

    def __init__(self, args: argparse.Namespace, output: Output) -> None:
        self.args = args
        self.out = output
        self.children: list[Child] = []
        self.stop_event = threading.Event()  # set by the first Ctrl-C / SIGTERM
        self.force_event = threading.Event()  # set by the second: kill at once
        self.name_width = max(len("upstream"), *(len(n) for n in self.gateway_names))
        self.workdir: Path | None = None
        self.config: dict[str, Any] = {}

    @property
    def gateway_names(self) -> list[str]:
        return [f"gateway-{i}" for i in range(1, len(self.args.gateway_ports) + 1)]

    @property
    def url_host(self) -> str:
        host: str = self.args.host
        return "127.0.0.1" if host in ("0.0.0.0", "") else host

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.args.redis_port}/0"

    @property
    def upstream_url(self) -> str:
        return f"http://{self.url_host}:{self.args.upstream_port}"

    def gateway_url(self, port: int) -> str:
        return f"http://{self.url_host}:{port}"

    # -- signals ---------------------------------------------------------------------------

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_event.is_set():
            self.force_event.set()
            self.say("second signal: killing what is left")
        else:
            self.stop_event.set()
            self.say(f"{signal.Signals(signum).name}: stopping the fleet")

    # -- start -----------------------------------------------------------------------------

    def start(self) -> None:
        args = self.args
        redis_server = args.redis_server or shutil.which("redis-server")
        if not redis_server:
            raise FleetError("redis-server is not on the PATH (apt-get install redis-server)")
        ports = {"redis": args.redis_port, "upstream": args.upstream_port}
        ports.update(zip(self.gateway_names, args.gateway_ports, strict=True))
        if len(set(ports.values())) != len(ports):
            raise FleetError(f"every process needs a port of its own: {ports}")
        busy = [f"{name} ({port})" for name, port in ports.items() if not port_is_free(port)]
        if busy:
            raise FleetError(f"ports in use: {', '.join(busy)}; choose others (see --help)")

        self.workdir = Path(tempfile.mkdtemp(prefix="gateway-breaker-fleet-"))
        datadir = self.workdir / "redis"
        datadir.mkdir()
        self.config = local_config(args.config, self.upstream_url)
        config_path = self.workdir / "fleet.yaml"
        header = f"# {args.config} for deploy/fleet.py: upstream host -> {self.upstream_url}\n"
        config_path.write_text(header + yaml.safe_dump(self.config, sort_keys=False))

        redis_child = self.spawn(
            "redis", redis_command(redis_server, args.redis_port, datadir), isolated_env()
        )
        self.wait_ready(redis_child, self.redis_answers)
        upstream = self.spawn(
            "upstream", uvicorn_command(UPSTREAM_APP, args.host, args.upstream_port), isolated_env()
        )
        self.wait_ready(upstream, lambda: self.http_ok(f"{self.upstream_url}/_stats"))
        env = isolated_env(gateway_env(self.redis_url, config_path))
        gateways = [
            self.spawn(name, uvicorn_command(GATEWAY_APP, args.host, port), env)
            for name, port in zip(self.gateway_names, args.gateway_ports, strict=True)
        ]
        for child, port in zip(gateways, args.gateway_ports, strict=True):
            health = f"{self.gateway_url(port)}/healthz"
            self.wait_ready(child, functools.partial(self.http_ok, health))

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str]) -> Child:
        self.check_stop()
        process = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # A session of its own: Ctrl-C reaches only the fleet, which stops the processes in
            # order (gateways flush their last writes to Redis before Redis goes away).
            start_new_session=True,
        )
        child = Child(name, argv, process)
        child.pump = threading.Thread(
            target=self.pump, args=(child,), name=f"pump-{name}", daemon=True
        )
        child.pump.start()
        self.children.append(child)
        return child

    def pump(self, child: Child) -> None:
        assert child.process.stdout is not None
        prefix = f"{child.name:<{self.name_width}} | "
        for raw in iter(child.process.stdout.readline, b""):
            self.out.write(prefix + raw.decode("utf-8", errors="replace").rstrip("\r\n") + "\n")
        child.process.stdout.close()

    def wait_ready(self, child: Child, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.args.start_timeout
        while True:
            self.check_stop()
            if not child.alive():
                raise FleetError(
                    f"{child.name} {describe_exit(child.process.returncode)} before it was "
                    f"ready: {' '.join(child.argv)}"
                )
            if ready():
                return
            if time.monotonic() > deadline:
                raise FleetError(f"{child.name} not ready after {self.args.start_timeout:g}s")
            self.stop_event.wait(POLL_INTERVAL)

    def check_stop(self) -> None:
        if self.stop_event.is_set():
            raise StopRequested

    def redis_answers(self) -> bool:
        client = redis.Redis(
            host="127.0.0.1",
            port=self.args.redis_port,
            socket_connect_timeout=1,
            socket_timeout=1,
        )
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    @staticmethod
    def http_ok(url: str) -> bool:
        try:
            return httpx.get(url, timeout=1.0, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    # -- run -------------------------------------------------------------------------------

    def supervise(self) -> int:
        """Until a stop is requested (0) or a process dies (1)."""
        while not self.stop_event.is_set():
            for child in self.children:
                if not child.alive():
                    self.say(
                        f"{child.name} {describe_exit(child.process.returncode)}; "
                        "stopping the fleet"
                    )
                    return 1
            self.stop_event.wait(0.2)
        return 0

    def banner(self) -> str:
        g1 = self.gateway_url(self.args.gateway_ports[0])
        g2 = self.gateway_url(self.args.gateway_ports[-1])
        key = f"{key_prefix(self.config)}:discovery:state"
        discovery = ((self.config.get("circuit_breaker") or {}).get("services") or {}).get(
            "discovery"
        ) or {}
        failures = int(discovery.get("failure_threshold", 5))
        open_seconds = discovery.get("timeout_seconds", 10)
        rows = [("redis", self.redis_url), ("upstream", self.upstream_url)]
        rows += [
            (name, self.gateway_url(port))
            for name, port in zip(self.gateway_names, self.args.gateway_ports, strict=True)
        ]
        pids = {child.name: child.pid for child in self.children}
        lines = ["", "gateway-breaker fleet is up (Ctrl-C stops everything):"]
        lines += [f"  {name:<{self.name_width}}  {url:<28} pid {pids[name]}" for name, url in rows]
        lines += [
            "",
            "Walk-through: open `discovery` on gateway-1, see gateway-2 reject too.",
            f"  for i in $(seq {failures}); do curl -s -o /dev/null -w '%{{http_code}}\\n' "
            f"{g1}/discovery/status/500; done",
            f"  curl -i {g1}/discovery/anything    # 503: open, the upstream is not called",
            f"  curl -i {g2}/discovery/anything    # 503: gateway-2 knows through Redis",
            f"  redis-cli -p {self.args.redis_port} GET {key}",
            f"  curl -i {g2}/sona/anything         # 200: other services are not affected",
            f"  sleep {open_seconds:g}; curl -i {g2}/discovery/anything"
            "   # 200: the probe closes it fleet-wide",
            "",
        ]
        return "\n".join(lines) + "\n"

    # -- stop ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Gateways, then the upstream, then Redis: SIGTERM, then SIGKILL after a grace."""
        gateways = [c for c in self.children if c.name.startswith("gateway-")]
        others = [c for c in self.children if c not in gateways]
        phases = [gateways, [c for c in others if c.name != "redis"]]
        phases.append([c for c in others if c.name == "redis"])
        for phase in phases:
            self.stop_children(phase)
        for child in self.children:
            child.pump.join(timeout=2.0)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def stop_children(self, children: Sequence[Child]) -> None:
        for child in children:
            if child.alive():
                child.process.terminate()
        deadline = time.monotonic() + self.args.stop_timeout
        while any(c.alive() for c in children):
            if self.force_event.is_set() or time.monotonic() > deadline:
                for child in children:
                    if child.alive():
                        self.say(f"{child.name} (pid {child.pid}) did not stop: killing it")
                        child.process.kill()
                for child in children:
                    child.process.wait()
                break
            self.force_event.wait(POLL_INTERVAL)
        for child in children:
            self.say(f"{child.name} stopped ({describe_exit(child.process.returncode)})")

    def say(self, message: str) -> None:
        self.out.write(f"{'fleet':<{self.name_width}} | {message}\n")


def _ports(text: str) -> list[int]:
    try:
        ports = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected ports separated by commas, got {text!r}"
        ) from None
    if not ports:
        raise argparse.ArgumentTypeError("at least one gateway port is needed")
    return [_port(str(port)) for port in ports]


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1-65535, got {text!r}")
    return port


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="deploy/fleet.py",
        description="Run the compose fleet (redis, demo upstream, two gateways) as processes.",
    )
    parser.add_argument(
        "--redis-port",
        type=_port,
        default=DEFAULT_REDIS_PORT,
        help=f"port of the fleet's own redis-server (default {DEFAULT_REDIS_PORT})",
    )
    parser.add_argument(
        "--upstream-port",
        type=_port,
        default=DEFAULT_UPSTREAM_PORT,
        help=f"port of the demo upstream (default {DEFAULT_UPSTREAM_PORT})",
    )
    parser.add_argument(
        "--gateway-ports",
        type=_ports,
        default=list(DEFAULT_GATEWAY_PORTS),
        help="ports of the gateways, one gateway each (default 8001,8002)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the gateways and the upstream listen on (default 127.0.0.1)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=FLEET_CONFIG,
        help="gateway config whose `upstream` hosts are moved here (default deploy/fleet.yaml)",
    )
    parser.add_argument("--redis-server", help="redis-server binary (default: from the PATH)")
    parser.add_argument("--start-timeout", type=float, default=START_TIMEOUT, help="seconds")
    parser.add_argument("--stop-timeout", type=float, default=STOP_TIMEOUT, help="seconds")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Output(sys.stdout)
    fleet = Fleet(args, out)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, fleet.on_signal)
    code = 0
    try:
        fleet.start()
        out.write(fleet.banner())
        code = fleet.supervise()
    except StopRequested:
        code = 0
    except FleetError as exc:
        fleet.say(f"error: {exc}")
        code = 1
    finally:
        fleet.stop()
    fleet.say("stopped" if code == 0 else "stopped after an error")
    return code


if __name__ == "__main__":
    sys.exit(main())
