"""Instructions per request under valgrind (cachegrind): the noise-free view of asgi_overhead.

Wall-clock ratios on a shared, noisy machine wobble from run to run; the number of machine
instructions executed does not. Each contender of asgi_overhead.py runs in a child process under
`valgrind --tool=cachegrind` twice, with the same warm-up and then SHORT and LONG requests; the
difference of the two totals divided by (LONG - SHORT) is the cost of one request, free of the
interpreter's start-up and the imports. The simulated L1 cache misses come along.

Instructions are not time: a cache miss or a mispredicted branch costs many cycles and no extra
instruction. So this complements asgi_overhead.py (time) and does not replace it; where the two
disagree, the difference is the hardware's (see docs/benchmarks.md).

Run:  .venv/bin/python benchmarks/instructions.py [--json PATH]        (needs valgrind)
CI:   .venv/bin/python benchmarks/instructions.py --smoke              (no valgrind needed)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import (
    clean_environment,
    describe,
    finish,
    machine,
    package_digest,
    print_table,
    write_json,
)

CONTENDERS = (
    "harness",
    "bare",
    "floor",
    "closed",
    "open",
    "pass_through",
    "fastapi_bare",
    "fastapi_floor",
    "fastapi_closed",
    "raw_closed",
    "raw_open",
)
BASELINES = {
    "raw_closed": "harness",
    "raw_open": "harness",
    "floor": "bare",
    "closed": "bare",
    "open": "bare",
    "pass_through": "bare",
    "fastapi_floor": "fastapi_bare",
    "fastapi_closed": "fastapi_bare",
}
WARMUP = 300
SHORT, LONG = 200, 1_200
EVENTS = ("Ir", "I1mr", "D1mr", "D1mw")


def child(names: list[str], requests: int, warmup: int) -> None:
    """Build the contenders as asgi_overhead does, then run `names`: warm-up, then requests."""
    from asgi_overhead import build_contenders, make_scope, open_breaker, timed_batch, verify

    print(f"package_digest={package_digest()}")  # the source this child imported
    contenders = {c.name: c for c in build_contenders()}

    async def run() -> None:
        for name in names:
            contender = contenders[name]
            if name == "open":
                await open_breaker(contender)
            await verify(contender)
            scope = make_scope(contender.path)
            if contender.prepare is not None:
                contender.prepare()
            await timed_batch(contender.app, scope, warmup)
            gc.collect()
            gc.disable()  # no collection lands in one run and not the other
            await timed_batch(contender.app, scope, requests)
            gc.enable()
            if contender.check is not None:
                contender.check()

    asyncio.run(run())


def child_command(names: str, requests: int, warmup: int = WARMUP) -> list[str]:
    script = str(Path(__file__).resolve())
    return [sys.executable, script, "--child", names, str(requests), str(warmup)]


def child_env() -> dict[str, str]:
    # A fixed hash seed: the same dict layouts, so the same instructions, in every run.
    return {**os.environ, "PYTHONHASHSEED": "0"}


def cachegrind(name: str, requests: int, workdir: Path) -> tuple[dict[str, int], str]:
    out = workdir / f"{name}.{requests}.cg"
    command = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=yes",
        f"--cachegrind-out-file={out}",
        *child_command(name, requests),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env=child_env(), timeout=1_800, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} ({requests}) failed under valgrind:\n{done.stderr[-3000:]}")
    events: list[str] = []
    totals: list[int] = []
    for line in out.read_text().splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("summary:"):
            totals = [int(v) for v in line.split()[1:]]
    digest = next(
        (line.split("=", 1)[1] for line in done.stdout.splitlines() if "package_digest=" in line),
        "?",
    )
    return dict(zip(events, totals, strict=True)), digest


def per_request(name: str, workdir: Path) -> tuple[dict[str, float], set[str]]:
    short, first = cachegrind(name, SHORT, workdir)
    long, second = cachegrind(name, LONG, workdir)
    counts = {event: (long[event] - short[event]) / (LONG - SHORT) for event in EVENTS}
    return counts, {first, second}


def measure(
    jobs: int, names: tuple[str, ...] = CONTENDERS
) -> tuple[dict[str, dict[str, float]], dict[str, list[str]]]:
    """Per-request counts by contender, and the package source digests each one ran."""
    with (
        tempfile.TemporaryDirectory(prefix="instructions-") as tmp,
        ThreadPoolExecutor(max_workers=jobs) as pool,
    ):
        futures = {name: pool.submit(per_request, name, Path(tmp)) for name in names}
        done = {name: future.result() for name, future in futures.items()}
    digests = {name: sorted(d) for name, (_, d) in done.items()}
    if len({d for ds in digests.values() for d in ds}) > 1:
        print(f"WARNING: the contenders ran different package sources: {digests}", file=sys.stderr)
    return {name: counts for name, (counts, _) in done.items()}, digests


def report(counts: dict[str, dict[str, float]]) -> dict[str, Any]:
    rows = []
    results: dict[str, Any] = {"per_request": counts, "overhead": {}, "ratios": {}}
    for name in (n for n in CONTENDERS if n in counts):
        c = counts[name]
        over = ""
        if BASELINES.get(name) in counts:
            base = counts[BASELINES[name]]
            diff = {event: c[event] - base[event] for event in EVENTS}
            results["overhead"][name] = diff
            over = f"{diff['Ir']:+,.0f}"
        rows.append(
            [name, f"{c['Ir']:,.0f}", over, f"{c['I1mr']:,.0f}", f"{c['D1mr'] + c['D1mw']:,.0f}"]
        )
    print_table(["contender", "instructions/request", "overhead", "L1i misses", "L1d misses"], rows)
    overhead = results["overhead"]
    if set(counts) != set(CONTENDERS):  # --only: the table, no ratios
        return results
    ratios = {
        "closed_overhead / floor_overhead": overhead["closed"]["Ir"] / overhead["floor"]["Ir"],
        "fastapi_closed_overhead / fastapi_floor_overhead": overhead["fastapi_closed"]["Ir"]
        / overhead["fastapi_floor"]["Ir"],
        "open_rejection / bare_request": counts["open"]["Ir"] / counts["bare"]["Ir"],
        "pass_through_overhead / floor_overhead": overhead["pass_through"]["Ir"]
        / overhead["floor"]["Ir"],
        # Both on a raw ASGI app: the load-shedding path against a whole closed request.
        "raw_open / raw_closed": counts["raw_open"]["Ir"] / counts["raw_closed"]["Ir"],
    }
    print()
    print_table(["ratio (instructions)", "value"], [[k, f"{v:.2f}"] for k, v in ratios.items()])
    results["ratios"] = ratios
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="check the child mode, no valgrind")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="valgrinds at once")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--only", help="comma-separated contenders (a quick look; no ratios)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # NAMES REQUESTS WARMUP
    args = parser.parse_args(argv)
    clean_environment()
    if args.child:
        names, requests, warmup = args.child
        child(names.split(","), int(requests), int(warmup))
        return 0

    info = machine()
    if args.smoke:
        # Every contender through the child mode once, without valgrind: the driver works.
        command = child_command(",".join(CONTENDERS), 5, warmup=5)
        subprocess.run(command, env=child_env(), check=True, timeout=60)
        print(f"instructions --smoke: the child mode ran {len(CONTENDERS)} contenders")
        if args.json:
            write_json(args.json, {"benchmark": "instructions", "settings": {"smoke": True}})
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: nothing measured", file=sys.stderr)
        return 2
    print(
        f"instructions: cachegrind, ({LONG} - {SHORT}) requests per contender after {WARMUP};"
        f" {info['cpu_model']}, Python {info['python']}, commit {describe(info)}"
    )
    started = time.perf_counter()
    names = tuple(args.only.split(",")) if args.only else CONTENDERS
    if unknown := set(names) - set(CONTENDERS):
        parser.error(f"--only: unknown contenders {sorted(unknown)}")
    counts, digests = measure(max(1, args.jobs), names)
    elapsed = time.perf_counter() - started
    finish(info)
    results = report(counts)
    print(f"\n{elapsed:.0f} s")
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "instructions",
                "machine": info,
                "settings": {"warmup": WARMUP, "short": SHORT, "long": LONG, "smoke": False},
                "seconds": round(elapsed, 1),
                "package_digests": digests,
                **results,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
