"""A fleet at rest and in motion, by number of instances (N) and services (S).

In-process managers spread over a few worker processes share one redis-server this script
starts on a free port (or, with --cluster, a 3-master Redis Cluster it starts). For each
(N, S) of the grid it measures:

- at rest, over a window: Redis commands per second (`INFO stats` delta) and Redis CPU
  (`INFO cpu`), the instances' CPU (process CPU times of the workers, per instance);
- memory per instance (the workers' RSS growth over their managers, divided by N);
- propagation: an operator forces one breaker open through a manager of the parent process;
  the time until every instance applies it (p50 / p99 over the instances);
- a burst of 1,000 transitions (min(S, 1000) services forced open at once): how long until every
  instance applied all of them, and Redis commands and CPU seconds it cost.

    .venv/bin/python benchmarks/scale_fleet.py                       # the grid below
    .venv/bin/python benchmarks/scale_fleet.py --grid 10x1000,50x10000 --window 10
    .venv/bin/python benchmarks/scale_fleet.py --package-root ../main  # the same on main's code
    .venv/bin/python benchmarks/scale_fleet.py --smoke               # tiny sizes, for CI
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from benchmarks._common import (  # noqa: E402
    clean_environment,
    free_port,
    machine,
    print_table,
    quantile,
    redis_server,
    revision,
    write_json,
)

GRID = ((1, 10), (1, 1_000), (1, 10_000), (10, 1_000), (10, 10_000), (50, 1_000), (100, 10))
PER_WORKER = 25  # managers per worker process
BURST = 1_000
SETTLE_SECONDS = 180.0
WATCH_SECONDS = 120.0  # how long the instances are watched for a transition or a burst


def config_for(url: str, services: int, prefix: str) -> Any:
    from gateway_breaker import Config

    return Config(
        redis={"url": url, "key_prefix": prefix, "pool_size": 4},
        circuit_breaker={"services": {f"svc{i}": {} for i in range(services)}},
    )


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(conn: Connection, url: str, services: int, count: int, prefix: str, root: str) -> None:
    if root:
        sys.path.insert(0, root)
    asyncio.run(_worker(conn, url, services, count, prefix))


async def _worker(conn: Connection, url: str, services: int, count: int, prefix: str) -> None:
    from gateway_breaker import CircuitBreakerManager

    config = config_for(url, services, prefix)
    before = rss_bytes()
    managers = []
    for _ in range(count):
        managers.append(await CircuitBreakerManager.with_redis(config))
        # As the example gateway does once started: the breakers live as long as the process,
        # and the garbage collector need not go over them again (with 25 instances of 10,000
        # services a process, each full collection would stall every instance of it for a
        # second or more: their reads would time out, as no gateway's do).
        gc.freeze()
    conn.send(("ready", (rss_bytes() - before) / count))
    loop = asyncio.get_running_loop()
    try:
        while True:
            command, arg = await loop.run_in_executor(None, conn.recv)
            if command == "cpu":
                conn.send(("cpu", cpu_seconds()))
            elif command == "settle":
                conn.send(("settled", await _settle(managers)))
            elif command == "watch":
                names = [f"svc{i}" for i in arg]
                conn.send(("seen", await _watch(conn, managers, names)))
            elif command == "stop":
                break
    finally:
        for manager in managers:
            await manager.aclose()
        conn.send(("stopped", None))


async def _settle(managers: list[Any]) -> float:
    """Wait until every instance is connected and done with the re-reads a fault (a timeout
    while all of them started at once) brings: at rest means after that. Returns the wait."""
    started = time.monotonic()
    while time.monotonic() - started < SETTLE_SECONDS:
        now = time.monotonic()
        if all(
            m._sync.connected
            and not getattr(m._sync, "_full_reads", ())
            and getattr(m._sync, "_recovering_until", 0.0) < now
            for m in managers
        ):
            break
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def _watch(conn: Connection, managers: list[Any], names: list[str]) -> list[float]:
    """When each manager applied the last of `names` forced open (wall clock), told by its
    transition listener: nothing polls, so the watch costs the instances nothing meanwhile."""
    left = [set(names) for _ in managers]
    seen = [float("nan")] * len(managers)
    done = asyncio.Event()
    remaining = len(managers)

    def listener(i: int) -> Any:
        def on(event: Any) -> None:
            nonlocal remaining
            if event.to_state != "forced_open" or event.service not in left[i]:
                return
            left[i].discard(event.service)
            if not left[i]:
                seen[i] = time.time()
                remaining -= 1
                if not remaining:
                    done.set()

        return on

    stops = [m.on_transition(listener(i)) for i, m in enumerate(managers)]
    conn.send(("watching", None))
    try:
        await asyncio.wait_for(done.wait(), WATCH_SECONDS)
    except TimeoutError:
        pass
    finally:
        for stop in stops:
            stop()
    return seen


class Fleet:
    def __init__(
        self, url: str, n: int, services: int, prefix: str, root: str, per_worker: int
    ) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs = []
        left = n
        while left:
            count = min(per_worker, left)
            left -= count
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(child, url, services, count, prefix, root))
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        self.memory = [self._recv(c, "ready") for c in self.conns]

    def _recv(self, conn: Connection, kind: str) -> Any:
        if not conn.poll(600):
            raise SystemExit(f"a worker did not answer {kind}")
        got, value = conn.recv()
        assert got == kind, (got, kind)
        return value

    def ask(self, command: str, arg: Any = None) -> list[Any]:
        for conn in self.conns:
            conn.send((command, arg))
        kind = {"cpu": "cpu", "settle": "settled", "watch": "seen", "stop": "stopped"}[command]
        return [self._recv(conn, kind) for conn in self.conns]

    def watch(self, indexes: Any) -> None:
        """Every worker watches its instances for these services' forced opens."""
        for conn in self.conns:
            conn.send(("watch", list(indexes)))
        for conn in self.conns:
            self._recv(conn, "watching")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.ask("stop")
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def command_usec(clients: list[redis.Redis]) -> dict[str, int]:
    """Redis's time spent per command so far (`INFO commandstats`), summed over the nodes."""
    spent: dict[str, int] = {}
    for client in clients:
        for name, stats in client.info("commandstats").items():
            key = name.removeprefix("cmdstat_")
            spent[key] = spent.get(key, 0) + int(stats["usec"])
    return spent


def redis_figures(clients: list[redis.Redis]) -> tuple[int, float]:
    commands, cpu = 0, 0.0
    for client in clients:
        info = client.info()
        commands += int(info["total_commands_processed"])
        cpu += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return commands, cpu


async def _operator(url: str, services: int, prefix: str, names: list[str]) -> float:
    from gateway_breaker import CircuitBreakerManager

    manager = await CircuitBreakerManager.with_redis(config_for(url, services, prefix))
    try:
        started = time.time()
        for i in range(0, len(names), 100):  # an operator's commands, 100 at a time
            # A command that waited too long for its write is still written (and applied by
            # every instance): the watchers tell when.
            await asyncio.gather(
                *(manager.set_manual(n, "forced_open") for n in names[i : i + 100]),
                return_exceptions=True,
            )
        return started
    finally:
        await manager.aclose()


def one(
    url: str,
    clients: list[redis.Redis],
    n: int,
    services: int,
    window: float,
    root: str,
    per_worker: int = PER_WORKER,
) -> dict[str, Any]:
    prefix = f"scale{n}x{services}"
    fleet = Fleet(url, n, services, prefix, root, per_worker)
    try:
        settle = max(fleet.ask("settle"))  # startup reads and first registrations
        time.sleep(min(3.0, window))
        cmd0, rcpu0 = redis_figures(clients)
        stats0 = command_usec(clients)
        cpu0, t0 = sum(fleet.ask("cpu")), time.monotonic()
        time.sleep(window)
        cmd1, rcpu1 = redis_figures(clients)
        stats1 = command_usec(clients)
        cpu1, elapsed = sum(fleet.ask("cpu")), time.monotonic() - t0
        spent = {k: v - stats0.get(k, 0) for k, v in stats1.items()}
        rest = {
            "settle_s": settle,
            # Redis's time by command at rest (microseconds a second), the costliest first.
            "redis_usec_per_s": {
                k: round(v / elapsed) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])[:6]
            },
            "redis_cmds_per_s": (cmd1 - cmd0) / elapsed,
            "redis_cpu_percent": 100 * (rcpu1 - rcpu0) / elapsed,
            "instance_cpu_percent": 100 * (cpu1 - cpu0) / elapsed / n,
            "memory_mb_per_instance": sum(fleet.memory) / len(fleet.memory) / 2**20,
        }
        # One transition: propagation to every instance.
        fleet.watch([0])
        started = asyncio.run(_operator(url, services, prefix, ["svc0"]))
        seen = [s for c in fleet.conns for s in fleet._recv(c, "seen")]
        delays = [1000 * (s - started) for s in seen]
        # A burst of transitions (of services other than the first one's).
        burst = min(BURST, services - 1)
        cmd0, rcpu0 = redis_figures(clients)
        cpu0 = sum(fleet.ask("cpu"))
        fleet.watch(range(1, burst + 1))
        started = asyncio.run(
            _operator(url, services, prefix, [f"svc{i}" for i in range(1, burst + 1)])
        )
        seen_all = [s for c in fleet.conns for s in fleet._recv(c, "seen")]
        cmd1, rcpu1 = redis_figures(clients)
        cpu1 = sum(fleet.ask("cpu"))
        return {
            "instances": n,
            "services": services,
            "rest": rest,
            "propagation_ms": {
                "p50": quantile(delays, 0.5),
                "p99": quantile(delays, 0.99),
                "max": max(delays),
            },
            "burst": {
                "transitions": burst,
                "all_seen_s": max(seen_all) - started,
                "redis_commands": cmd1 - cmd0,
                "redis_cpu_s": rcpu1 - rcpu0,
                "instances_cpu_s": cpu1 - cpu0,
            },
        }
    finally:
        fleet.stop()


@contextlib.contextmanager
def cluster() -> Iterator[tuple[str, list[redis.Redis]]]:
    """A 3-master Redis Cluster on free loopback ports."""
    binary = shutil.which("redis-server")
    cli = shutil.which("redis-cli")
    if binary is None or cli is None:
        raise SystemExit("redis-server and redis-cli are needed")
    with tempfile.TemporaryDirectory() as datadir:
        ports = [free_port() for _ in range(3)]
        procs = []
        for port in ports:
            d = Path(datadir) / str(port)
            d.mkdir()
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            args += ["--appendonly", "no", "--dir", str(d), "--cluster-enabled", "yes"]
            procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL))
        try:
            clients = [redis.Redis(port=p) for p in ports]
            deadline = time.monotonic() + 10
            for c in clients:
                while True:
                    try:
                        c.ping()
                        break
                    except redis.ConnectionError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
            nodes = [f"127.0.0.1:{p}" for p in ports]
            subprocess.run(
                [cli, "--cluster", "create", *nodes, "--cluster-yes"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 20
            while any(c.cluster("info")["cluster_state"] != "ok" for c in clients):
                if time.monotonic() > deadline:
                    raise SystemExit("the cluster did not come up")
                time.sleep(0.1)
            yield "redis+cluster://" + ",".join(nodes), clients
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", help="NxS,NxS,... (instances x services)")
    parser.add_argument("--window", type=float, default=10.0, help="seconds at rest measured")
    parser.add_argument("--cluster", action="store_true", help="a 3-master Cluster")
    parser.add_argument("--package-root", default="", help="import gateway_breaker from here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    parser.add_argument(
        "--per-worker", type=int, default=PER_WORKER, help="in-process managers a worker process"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    clean_environment()
    if args.package_root:
        sys.path.insert(0, str(Path(args.package_root).resolve()))
    grid = list(GRID)
    if args.grid:
        grid = [(int(a), int(b)) for a, b in (g.split("x") for g in args.grid.split(","))]
    window = args.window
    if args.smoke:
        grid, window = [(2, 20)], 1.0
    root = str(Path(args.package_root).resolve()) if args.package_root else ""
    results = []
    if args.cluster:
        server: Any = cluster()
    else:
        server = contextlib.contextmanager(_single)()
    with server as (url, clients):
        for n, s in grid:
            result = one(url, clients, n, s, window, root, max(1, args.per_worker))
            results.append(result)
            print(
                f"{n} x {s}: {result['rest']} {result['propagation_ms']} {result['burst']}",
                flush=True,
            )
    rows = [
        [
            f"{r['instances']} x {r['services']}",
            f"{r['rest']['redis_cmds_per_s']:.1f}",
            f"{r['rest']['redis_cpu_percent']:.2f}%",
            f"{r['rest']['instance_cpu_percent']:.2f}%",
            f"{r['rest']['memory_mb_per_instance']:.1f}",
            f"{r['propagation_ms']['p50']:.1f} / {r['propagation_ms']['p99']:.1f}",
            f"{r['burst']['all_seen_s']:.2f} s, {r['burst']['redis_commands']} cmds,"
            f" {r['burst']['redis_cpu_s']:.2f} s Redis CPU",
        ]
        for r in results
    ]
    print_table(
        [
            "N x S",
            "Redis cmds/s at rest",
            "Redis CPU at rest",
            "CPU per instance at rest",
            "MB per instance",
            "propagation p50 / p99 ms",
            "burst of min(S, 1000)",
        ],
        rows,
    )
    if args.json:
        write_json(
            args.json,
            {
                "settings": {
                    "smoke": args.smoke,
                    "window_seconds": window,
                    "cluster": args.cluster,
                    "package_root": args.package_root or ".",
                    "per_worker": args.per_worker,
                },
                "machine": machine(),
                "revision": revision(),
                "results": results,
            },
        )


def _single() -> Iterator[tuple[str, list[redis.Redis]]]:
    with redis_server() as port:
        yield f"redis://127.0.0.1:{port}/0", [redis.Redis(port=port)]


if __name__ == "__main__":
    main()
