"""Hostile settings on the real example gateway: passwords never in its output, bad URL options
and hostile config files refused at start with one clear line."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import port_for
import pytest

from tests.conftest import RedisServer
from tests.e2e.conftest import Gateway, StartGateway
from tests.helpers import wait_until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

SECRET = "Xq7-very-secret-pw"


def urls(port: int, dead: int) -> list[str]:
    """Every URL form redis-py accepts, with a password, pointing at Redis or at nothing."""
    return [
        f"redis://gateway:{SECRET}@127.0.0.1:{port}/0",  # Redis refuses this user: AUTH errors
        f"redis://:{SECRET}@127.0.0.1:{dead}/0",  # nothing listens: connection errors
        f"redis://127.0.0.1:{dead}/0?password={SECRET}",
        f"unix:///nonexistent/redis.sock?password={SECRET}",
        f"redis+sentinel://:{SECRET}@127.0.0.1:{dead}/mymaster",
    ]


@pytest.mark.parametrize("form", range(5))
def test_a_password_never_reaches_the_gateways_output(
    start_gateway: StartGateway, redis_server: RedisServer, form: int
) -> None:
    url = urls(redis_server.port, port_for.select_random())[form]
    gateway = start_gateway(redis_url=url)
    for _ in range(4):  # opens discovery: a transition the gateway tries to persist
        gateway.get("/discovery/status/500")
    wait_until_sync(
        lambda: "Failed to" in gateway.output() or "in-memory" in gateway.output(),
        timeout=10,
        message="the gateway's Redis warning",
    )
    assert gateway.get("/discovery/anything").status_code == 503  # still protecting, in memory
    assert SECRET not in gateway.output()


def wait_exit_with_usage(gateway: Gateway, timeout: float) -> tuple[int, resource.struct_rusage]:
    """The exit code of a process expected to stop on its own, and its resource usage."""
    pid = gateway.process.pid
    deadline = time.monotonic() + timeout
    while True:
        waited, status, usage = os.wait4(pid, os.WNOHANG)
        if waited == pid:
            code = os.waitstatus_to_exitcode(status)
            gateway.process.returncode = code  # reaped here: tell Popen
            return code, usage
        assert time.monotonic() < deadline, f"still runs after {timeout}s:\n{gateway.output()}"
        time.sleep(0.05)


def test_a_bad_url_option_stops_the_gateway_at_start_with_one_line(
    start_gateway: StartGateway,
) -> None:
    gateway = start_gateway(
        redis_url=f"redis://:{SECRET}@127.0.0.1:6390/0?socket_timeout=abc", ready=False
    )
    assert gateway.wait_exit(timeout=20) != 0
    output = gateway.output()
    # Refused while starting: the application never came up, so it never served a request.
    assert "Application startup complete" not in output
    assert "socket_timeout" in output
    assert SECRET not in output
    assert "Traceback" not in output


def test_an_alias_bomb_config_is_refused_fast(start_gateway: StartGateway, tmp_path: Path) -> None:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 10) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    gateway = start_gateway(bomb, ready=False)
    code, usage = wait_exit_with_usage(gateway, timeout=20)
    assert code != 0
    # Refused before expanding: the file names 10**9 values, which would take tens of GB.
    assert usage.ru_maxrss < 400 * 1024, f"{usage.ru_maxrss} KiB"  # ru_maxrss is in KiB
    output = gateway.output()
    assert "Application startup complete" not in output
    assert "alias" in output.lower()
    assert "Traceback" not in output


def test_a_yaml_error_on_the_token_line_never_prints_the_token(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    token = "Tk-e2e-0123456789-secret"
    broken = tmp_path / "broken.yaml"
    broken.write_text(f'admin:\n  token: "{token}" oops\n')
    gateway = start_gateway(broken, ready=False)
    assert gateway.wait_exit(timeout=20) != 0
    output = gateway.output()
    assert "line 2" in output
    assert token[:10] not in output
    assert "Traceback" not in output


def test_a_bad_redis_url_env_var_is_blamed_on_the_env_var(start_gateway: StartGateway) -> None:
    gateway = start_gateway(example_config=True, redis_url=f"ftp://:{SECRET}@h", ready=False)
    assert gateway.wait_exit(timeout=20) != 0
    output = gateway.output()
    assert "REDIS_URL" in output
    assert "config.yaml" not in output
    assert SECRET not in output
