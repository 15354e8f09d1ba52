"""Helpers shared by the benchmark scripts: statistics, machine description, a clean env."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("gateway-breaker", "starlette", "fastapi", "pydantic", "pydantic-settings", "anyio")
# Settings the package reads from the environment. A benchmark must never pick up a Redis URL
# or a YAML file from the shell it was started in, so they are dropped before any Config().
_ENV_PREFIXES = ("REDIS", "CIRCUIT_BREAKER", "GATEWAY_BREAKER")


def clean_environment() -> None:
    """Remove every variable the package's Config would read (this process only)."""
    for name in list(os.environ):
        if name.upper().startswith(_ENV_PREFIXES):
            del os.environ[name]


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; the median for q=0.5."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and extremes of repeated measurements."""
    return {
        "median": statistics.median(values),
        "p25": quantile(values, 0.25),
        "p75": quantile(values, 0.75),
        "min": min(values),
        "max": max(values),
    }


def bootstrap_ratio_ci(
    top: Sequence[float],
    bottom: Sequence[float],
    *,
    resamples: int = 2_000,
    confidence: float = 0.95,
    seed: int = 20261129,
) -> tuple[float, float]:
    """Confidence interval of median(top) / median(bottom), resampling paired rounds."""
    if len(top) != len(bottom) or not top:
        raise ValueError("paired, non-empty samples needed")
    rng = random.Random(seed)
    n = len(top)
    ratios = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        below = statistics.median(bottom[i] for i in picks)
        if below > 0:
            ratios.append(statistics.median(top[i] for i in picks) / below)
    if not ratios:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2
    return quantile(ratios, tail), quantile(ratios, 1 - tail)


def verdict(value: float, low: float, high: float, goal: float, *, inclusive: bool) -> str:
    """ "met" / "MISSED" when the whole interval agrees, else "unclear" with the point's side."""

    def meets(x: float) -> bool:
        return x <= goal if inclusive else x < goal

    if meets(value) and meets(high):
        return "met"
    if not meets(value) and not meets(low):
        return "MISSED"
    return "unclear (met?)" if meets(value) else "unclear (missed?)"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    """Output of a read-only git command in the repository, or "" when git is unavailable."""
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=Path(__file__)
            .resolve()
            .parents[1],  # the repository root: paths are relative to it
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def package_digest() -> str:
    """A hash of the package's source as it is on disk (what the run imported at its start)."""
    root = Path(__file__).resolve().parents[1] / "gateway_breaker"
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in {".py", ".lua"} and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def revision() -> dict[str, Any]:
    """The commit measured, the package files that differ from it, and the source's hash."""
    changed = _git("status", "--porcelain", "--", "gateway_breaker")
    return {
        "commit": _git("rev-parse", "--short", "HEAD"),
        "package_changes": [line[3:] for line in changed.splitlines()],
        "package_digest": package_digest(),
    }


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": usable,
        "cpu_model": _cpu_model(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "loadavg": load,
        "packages": {name: _version(name) for name in PACKAGES},
        "revision": revision(),
    }


def finish(info: dict[str, Any]) -> None:
    """Note the load and the revision at the end; warn when the package changed meanwhile."""
    try:
        info["loadavg_end"] = list(os.getloadavg())
    except OSError:
        info["loadavg_end"] = []
    info["revision_end"] = revision()
    before, after = info["revision"]["package_digest"], info["revision_end"]["package_digest"]
    if before != after:
        print(
            f"WARNING: the package's source changed during the run ({before} -> {after});"
            " check that the change does not touch the measured path",
            file=sys.stderr,
        )


def describe(info: dict[str, Any]) -> str:
    """The commit, and "+ local changes" when the package differs from it."""
    rev = info["revision"]
    local = " + local changes" if rev["package_changes"] else ""
    return f"{rev['commit'] or '?'}{local} (package source {rev['package_digest']})"


def write_json(path: str, data: dict[str, Any]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A Markdown table, columns padded so it also reads well in a terminal."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


RESERVED_PORTS = {6379}  # the machine's own Redis: never ours


def free_port() -> int:
    """A free loopback port that is never the machine's own Redis."""
    import port_for

    while True:
        port = int(port_for.select_random())
        if port not in RESERVED_PORTS:
            return port


@contextlib.contextmanager
def redis_server() -> Iterator[int]:
    """A throwaway redis-server on a free loopback port (its port), stopped on the way out."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is needed: apt-get install redis-server")
    with tempfile.TemporaryDirectory() as datadir:
        port = free_port()
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", datadir]
        server = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        try:
            client = redis.Redis(host="127.0.0.1", port=port)
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise
                    time.sleep(0.02)
            client.close()
            yield port
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
