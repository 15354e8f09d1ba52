"""The benchmark scripts keep working: each runs its --smoke mode (seconds) cleanly.

The Redis ones start their own redis-server on a free port; peers.py reports peer libraries that
are not installed (they are not the project's dependencies) instead of failing.

Only that the scripts run and write well-formed results is checked here, never their figures:
CI machines are too noisy for performance assertions. The full runs are in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


@pytest.mark.parametrize(
    ("script", "keys"),
    [
        ("asgi_overhead.py", {"machine", "contenders", "ratios"}),
        ("scale.py", {"machine", "lookup", "memory"}),
        ("profile_breaker.py", {"machine", "isolated", "components_ns", "cprofile"}),
        ("instructions.py", {"settings"}),
        ("e2e_load.py", {"settings"}),
        ("restore.py", {"settings"}),
        ("peers.py", {"settings"}),
        ("fleet_propagation.py", {"settings", "propagation_ms"}),
        ("metrics_cost.py", {"settings", "request_path", "scrape", "history"}),
        ("fleet_evidence.py", {"settings", "failed_calls", "redis_steady"}),
        ("hostile.py", {"settings", "planted", "flood"}),
        ("outbound_overhead.py", {"settings", "machine", "local_upstream", "wrapper_alone"}),
        ("scale_fleet.py", {"settings", "results"}),
        ("brownout.py", {"settings", "runs"}),
    ],
)
def test_benchmark_smoke(script: str, keys: set[str], tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    results = json.loads(out.read_text())
    assert keys <= results.keys()
    assert results["settings"]["smoke"] is True
