"""The README's least-privilege ACL user: derived from what the package runs, and enough for it.

The command list is checked two ways on real servers: every command the package sends while it
does everything it does (fleet counting, registration, history, policies, manual modes, probe
leases, the CLI) must be on the README's line, and the same work done as the user created exactly
as the README says must leave nothing in Redis's `ACL LOG` (where Redis records every command it
refused), whatever the client library prints about it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from gateway_breaker import CircuitBreakerManager, CircuitOpenError, CircuitState, Config
from tests.conftest import RedisServer
from tests.helpers import wait_until

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SERVICE = "discovery"
# 12 consecutive failures over the fleet open it; each of two instances sees 6.
POLICY = {"failure_threshold": 12, "min_calls": 1_000_000, "timeout_seconds": 1}


def documented_acl() -> str:
    """The ACL line the README gives operators, with its password placeholder."""
    match = re.search(r"ACL SETUSER (gateway .*CHANGE-ME.*)", README.read_text())
    assert match, "README.md must document the ACL line"
    return match.group(1)


def documented_commands() -> set[str]:
    """`+get`, `+client|setname` ... on the README's line, lower case."""
    return {word[1:].lower() for word in documented_acl().split() if word.startswith("+")}


def create_documented_user(server: RedisServer) -> str:
    """The README's user, created exactly as written; returns its password."""
    password = secrets.token_hex(12)
    words = documented_acl().replace("CHANGE-ME", password).split()
    server.client().execute_command("ACL", "SETUSER", *words)
    return password


def _boom() -> None:
    raise RuntimeError("upstream failed")


def run_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS", "GATEWAY_BREAKER"))}
    env["REDIS_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "gateway_breaker.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )


async def everything_the_package_does(url: str) -> None:
    """Two instances and the CLI use every feature that talks to Redis."""
    config = Config(
        redis={"url": url},
        circuit_breaker={"services": {SERVICE: POLICY, "sona": {}}},
    )
    a = await CircuitBreakerManager.with_redis(config)
    b = await CircuitBreakerManager.with_redis(config)
    try:
        for manager in (a, b):
            assert manager._sync is not None
            assert manager._sync.connected
        # Fleet counting: 6 + 6 failures open a breaker of threshold 12 on both.
        for manager in (a, b):
            for _ in range(6):
                with pytest.raises(RuntimeError):
                    await manager.call(SERVICE, _boom)
        for manager in (a, b):
            await wait_until(
                lambda m=manager: m.get(SERVICE).state is CircuitState.OPEN,
                timeout=10,
                message="the fleet's count to open the breaker",
            )
        with pytest.raises(CircuitOpenError):
            await b.call(SERVICE, lambda: "ok")
        # The probe lease, then the close.
        await wait_until(lambda: b.get(SERVICE).retry_after() == 0, timeout=5)
        assert await b.call(SERVICE, lambda: "probe") == "probe"
        await wait_until(lambda: a.get(SERVICE).state is CircuitState.CLOSED, timeout=5)
        # History and the fleet view (registration).
        history = await a.history(SERVICE)
        assert {e.to_state for e in history} >= {"open", "closed"}, history
        await wait_until(
            lambda: _live_instances(a, 2), timeout=10, message="both instances registered"
        )
        # A live policy, the manual modes, a reset.
        await a.set_policy(SERVICE, {"failure_threshold": 3})
        await wait_until(lambda: b.get(SERVICE).policy.failure_threshold == 3, timeout=5)
        await a.clear_policy(SERVICE)
        await a.set_manual(SERVICE, "forced_open", seconds=600, reason="acl check")
        await wait_until(lambda: b.view(SERVICE).state == "forced_open", timeout=5)
        await a.clear_manual(SERVICE)
        await a.set_manual("sona", "metrics_only")
        await a.reset("sona")
        await wait_until(lambda: b.view("sona").state == "closed", timeout=5)
        # The operator's command line, straight to Redis, while the fleet is live.
        for args in (
            ("status", "--json"),
            ("fleet", "--json"),
            ("history", SERVICE, "--json"),
            ("open", SERVICE, "--for", "60", "--reason", "acl"),
            ("release", SERVICE),
        ):
            done = await asyncio.to_thread(run_cli, url, *args)
            assert done.returncode == 0, (args, done.stderr)
            if "--json" in args:
                json.loads(done.stdout)
    finally:
        await a.aclose()
        await b.aclose()


async def _live_instances(manager: CircuitBreakerManager, n: int) -> bool:
    return len((await manager.fleet()).instances) >= n


def commands_run(server: RedisServer) -> set[str]:
    """Every command the server ran since its stats were reset, as `get`, `client|setname`."""
    stats = server.client().info("commandstats")
    return {name.removeprefix("cmdstat_").lower() for name in stats}


def lua_commands() -> set[str]:
    """Every command the package's Lua scripts can run."""
    found: set[str] = set()
    for script in (ROOT / "gateway_breaker" / "resources").glob("*.lua"):
        found |= {c.lower() for c in re.findall(r"redis\.p?call\(\s*'(\w+)'", script.read_text())}
    return found


def test_the_readme_line_names_every_command_of_the_lua_scripts() -> None:
    missing = lua_commands() - documented_commands()
    assert not missing, f"README.md's ACL line lacks {sorted(missing)}"


async def test_the_readme_line_names_every_command_the_package_sends(
    redis_server: RedisServer,
) -> None:
    admin = redis_server.client()
    admin.config_resetstat()
    await everything_the_package_does(redis_server.url)
    ours = {"config|resetstat", "info"}  # this test's own inspection
    missing = commands_run(redis_server) - ours - documented_commands()
    assert not missing, f"README.md's ACL line lacks {sorted(missing)}"


async def test_the_readme_user_is_enough_and_reaches_nothing_else(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    password = create_documented_user(redis_server)
    admin = redis_server.client()
    admin.acl_log_reset()
    url = f"redis://gateway:{password}@127.0.0.1:{redis_server.port}/0"
    await everything_the_package_does(url)
    refused = admin.acl_log()
    assert not refused, f"Redis refused commands of the README's user: {refused}"
    assert password not in caplog.text
    # And the user can reach nothing else.
    user = redis.Redis(port=redis_server.port, username="gateway", password=password)
    with pytest.raises(redis.exceptions.NoPermissionError):
        user.get("some_other_app:secret")
    with pytest.raises(redis.exceptions.NoPermissionError):
        user.flushall()
