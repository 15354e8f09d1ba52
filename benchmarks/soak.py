"""Soak: three example gateways, flapping upstream failures, Redis restarted a few times.

A bounded run (minutes), not part of CI. The script starts, on free loopback ports (never
127.0.0.1:6379):
  - a redis-server of its own, without persistence: each restart comes back empty;
  - the demo upstream, `uvicorn examples.upstream:app`;
  - three example gateways, `uvicorn examples.gateway:app`, LOG_LEVEL=debug, sharing the Redis,
    with `discovery`, `sona` and `auth` proxied to the upstream (3 failures open a breaker for
    1 s; every gateway re-reads Redis every 0.5 s).

Load goes through all three gateways at once: `discovery` flaps (the upstream's `/flaky` rate
switches between failing and healthy every few seconds), `auth` fails now and then, `sona` is
always healthy. Redis is killed (SIGKILL) and restarted `--restarts` times, evenly spread, each
outage lasting `--outage` seconds.

At the end the load stops and the script waits (with a deadline) until every gateway and Redis
agree on each service's state, a gateway's state being the last one its log shows (a transition
it made, or a state it restored from Redis). It reports the requests by outcome, the log lines
counted over the gateways ("Circuit breaker transition", "Persisted circuit breaker state to
Redis", "Restored circuit breaker state from Redis", outages and reconnects), the time the fleet
took to agree after each restart and at the end, and whether all agree. Exit status 1 when a
request failed for another reason than its upstream or a breaker (a transport error, a 502 or
504), or when the fleet does not agree at the end.

    .venv/bin/python benchmarks/soak.py                  # 3 minutes, 3 restarts
    .venv/bin/python benchmarks/soak.py --minutes 10 --restarts 6 --json soak.json
    .venv/bin/python benchmarks/soak.py --smoke          # about 20 s, one restart
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import port_for  # noqa: E402
import redis  # noqa: E402
import yaml  # noqa: E402

from benchmarks._common import clean_environment, machine, quantile  # noqa: E402

SERVICES = ("discovery", "sona", "auth")
KEY_PREFIX = "circuit_breaker"
START_TIMEOUT = 30.0
AGREE_TIMEOUT = 30.0
LINES = {
    "transitions": "Circuit breaker transition",
    "persisted": "Persisted circuit breaker state to Redis",
    "restored": "Restored circuit breaker state from Redis",
    "persist_failed": "Failed to persist circuit breaker state to Redis",
    "outages": "falling back to in-memory only",
    "reconnects": "Reconnected to Redis",
    "unusable": "Ignoring unusable circuit breaker state",
}
STATE_LINE = re.compile(
    r"Circuit breaker transition \(service=(?P<t_service>[^,]+), from=[^,]+, to=(?P<t_to>\w+)"
    r"|Restored circuit breaker state from Redis \(service=(?P<r_service>[^,]+),"
    r" state=(?P<r_state>\w+)"
)


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without gateway settings a shell may hold, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(("REDIS", "CIRCUIT_BREAKER", "GATEWAY_BREAKER", "LOG_LEVEL"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env | extra


def wait_for(condition: Any, timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll `condition` until true; the seconds it took. Raises after `timeout`."""
    start = time.monotonic()
    while True:
        try:
            if condition():
                return time.monotonic() - start
        except (OSError, httpx.HTTPError, redis.RedisError):
            pass
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Redis:
    workdir: Path
    port: int = field(default_factory=port_for.select_random)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = self.client()
        wait_for(client.ping, 10, "redis-server to answer")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=1)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@dataclass
class Server:
    name: str
    app: str
    env: dict[str, str]
    workdir: Path
    port: int = field(default_factory=port_for.select_random)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", self.app, "--host", "127.0.0.1",
             "--port", str(self.port), "--no-access-log"],
            cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_ready(self, path: str) -> None:
        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.output()[-2000:]}")
            return httpx.get(self.url + path, timeout=1, trust_env=False).status_code == 200

        wait_for(ready, START_TIMEOUT, f"{self.name} to answer {path}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def gateway_states(gateway: Server) -> dict[str, str]:
    """Each service's state as the gateway's log last showed it (closed if never)."""
    states = dict.fromkeys(SERVICES, "closed")
    for m in STATE_LINE.finditer(gateway.output()):
        if m["t_service"]:
            states[m["t_service"]] = m["t_to"]
        else:
            states[m["r_service"]] = m["r_state"]
    return states


def stored_states(store: Redis) -> dict[str, str]:
    client = store.client()
    states = {}
    for service in SERVICES:
        raw = client.get(f"{KEY_PREFIX}:{service}:state")
        states[service] = "closed" if raw is None else json.loads(raw)["state"]
    return states


def disagreement(gateways: list[Server], store: Redis) -> list[str]:
    stored = stored_states(store)
    return [
        f"{g.name} {service}={state} (Redis: {stored[service]})"
        for g in gateways
        for service, state in gateway_states(g).items()
        if state != stored[service]
    ]


@dataclass
class Load:
    """Requests through every gateway; `discovery` flaps on the upstream's `/flaky` rate."""

    gateways: list[Server]
    flap_seconds: float
    outcomes: Counter[str] = field(default_factory=Counter)
    by_gateway: dict[str, Counter[str]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def path(self, n: int) -> str:
        service = SERVICES[n % 3]
        if service == "discovery":
            failing = int((time.monotonic() - self.started) / self.flap_seconds) % 2 == 0
            return f"/discovery/flaky?rate={0.8 if failing else 0.02}"
        if service == "auth":
            return "/auth/flaky?rate=0.15"
        return "/sona/status/200"

    async def worker(self, client: httpx.AsyncClient, gateway: Server, n: int) -> None:
        counts = self.by_gateway.setdefault(gateway.name, Counter())
        while not self.stop.is_set():
            path = self.path(n)
            n += 1
            started = time.perf_counter()
            try:
                response = await client.get(gateway.url + path)
            except httpx.HTTPError as exc:
                outcome = "transport error"
                self.failures.append(f"{gateway.name} {path}: {exc!r}")
            else:
                self.latencies.append(time.perf_counter() - started)
                outcome = str(response.status_code)
                # 200 and 500 come from the upstream, 503 from a breaker; a 502 or 504 would
                # mean the gateway failed the request itself.
                if response.status_code not in (200, 500, 503):
                    self.failures.append(f"{gateway.name} {path}: {response.status_code}")
            self.outcomes[outcome] += 1
            counts[outcome] += 1
            await asyncio.sleep(0.005)  # pacing: a steady load, not waiting for anything

    async def run(self, workers: int) -> None:
        async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
            tasks = [
                asyncio.create_task(self.worker(client, g, i))
                for g in self.gateways
                for i in range(workers)
            ]
            await self.stop.wait()
            await asyncio.gather(*tasks)


async def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    store = Redis(workdir)
    store.start()
    upstream = Server("upstream", "examples.upstream:app", child_env({}), workdir)
    config = {
        "circuit_breaker": {
            "services": {
                s: {
                    "upstream": f"{upstream.url}/{s}",
                    "failure_threshold": 3,
                    "timeout_seconds": 1,
                }
                for s in SERVICES
            }
        },
        "redis": {"sync_interval_seconds": 0.5},
    }
    config_path = workdir / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = child_env(
        {"LOG_LEVEL": "debug", "REDIS_URL": store.url, "GATEWAY_BREAKER_CONFIG": str(config_path)}
    )
    gateways = [Server(f"gateway{i}", "examples.gateway:app", env, workdir) for i in (1, 2, 3)]
    servers = [upstream, *gateways]
    restarts: list[dict[str, float]] = []
    try:
        for server in servers:
            server.start()
        upstream.wait_ready("/_stats")
        for gateway in gateways:
            gateway.wait_ready("/healthz")

        duration = 20.0 if args.smoke else args.minutes * 60
        restart_count = 1 if args.smoke else args.restarts
        load = Load(gateways, flap_seconds=3.0 if args.smoke else 8.0)
        loader = asyncio.create_task(load.run(args.workers))
        print(
            f"soak: {duration:.0f} s, 3 gateways, {restart_count} Redis restarts,"
            f" logs in {workdir}",
            flush=True,
        )
        for i in range(restart_count):
            at = load.started + duration * (i + 1) / (restart_count + 1)
            await asyncio.sleep(max(0.0, at - time.monotonic()))  # the schedule, not a wait
            reconnects = [g.output().count(LINES["reconnects"]) for g in gateways]
            await asyncio.to_thread(store.kill)
            down = time.monotonic()
            await asyncio.sleep(args.outage)  # the outage lasts this long, on purpose
            await asyncio.to_thread(store.start)
            back = time.monotonic()

            def all_reconnected(before: list[int] = reconnects) -> bool:
                counts = [g.output().count(LINES["reconnects"]) for g in gateways]
                return all(now > then for now, then in zip(counts, before, strict=True))

            reconnected = await asyncio.to_thread(
                wait_for, all_reconnected, AGREE_TIMEOUT, "every gateway to reconnect", 0.05
            )
            # Then agreement, under load: the states keep moving, so the first time they agree.
            agreed = await asyncio.to_thread(
                wait_for_agreement, gateways, store, AGREE_TIMEOUT, 0.1
            )
            restarts.append(
                {
                    "at_s": round(down - load.started, 1),
                    "outage_s": round(back - down, 2),
                    "reconnected_after_s": round(reconnected, 2),
                    "agreed_after_s": None if agreed is None else round(reconnected + agreed, 2),
                }
            )
            print(f"  restart {i + 1}: {restarts[-1]}", flush=True)
        await asyncio.sleep(max(0.0, load.started + duration - time.monotonic()))
        load.stop.set()
        await loader
        stopped = time.monotonic()
        final_agreement = await asyncio.to_thread(
            wait_for_agreement, gateways, store, AGREE_TIMEOUT, 0.1
        )
        left = disagreement(gateways, store)
        logs = {name: sum(g.output().count(text) for g in gateways) for name, text in LINES.items()}
        per_gateway = {
            g.name: {name: g.output().count(text) for name, text in LINES.items()} for g in gateways
        }
        return {
            "duration_s": round(stopped - load.started, 1),
            "requests": dict(load.outcomes),
            "requests_by_gateway": {k: dict(v) for k, v in load.by_gateway.items()},
            "failed_requests": len(load.failures),
            "failed_examples": load.failures[:10],
            "latency_ms": {
                "p50": round(quantile(load.latencies, 0.5) * 1000, 2),
                "p99": round(quantile(load.latencies, 0.99) * 1000, 2),
            }
            if load.latencies
            else {},
            "log_lines": logs,
            "log_lines_by_gateway": per_gateway,
            "restarts": restarts,
            "final": {
                "agreed_after_s": final_agreement,
                "all_agree": not left,
                "disagreements": left,
                "redis": stored_states(store),
                "gateways": {g.name: gateway_states(g) for g in gateways},
            },
        }
    finally:
        for server in reversed(servers):
            server.stop()
        store.stop()


def wait_for_agreement(
    gateways: list[Server], store: Redis, timeout: float, interval: float
) -> float | None:
    """Seconds until every gateway's state matches Redis's, or None within `timeout`."""
    try:
        return round(
            wait_for(lambda: not disagreement(gateways, store), timeout, "agreement", interval), 2
        )
    except RuntimeError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="soak length (default 3)")
    parser.add_argument("--restarts", type=int, default=3, help="Redis restarts (default 3)")
    parser.add_argument("--outage", type=float, default=3.0, help="seconds Redis stays down")
    parser.add_argument("--workers", type=int, default=2, help="clients per gateway")
    parser.add_argument("--smoke", action="store_true", help="about 20 s, one restart")
    parser.add_argument("--json", help="write the results there too")
    parser.add_argument("--keep", action="store_true", help="keep the logs' directory")
    args = parser.parse_args()
    clean_environment()
    info = machine()
    workdir = Path(tempfile.mkdtemp(prefix="gateway-breaker-soak-"))
    try:
        results = asyncio.run(soak(args, workdir))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results = {"machine": info, "settings": vars(args), **results}
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=2))
    print(
        f"machine: {info['cpu_model']}, nproc {info['nproc']}, {info['date']},"
        f" python {info['python']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    ok = results["failed_requests"] == 0 and results["final"]["all_agree"]
    print("RESULT:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
