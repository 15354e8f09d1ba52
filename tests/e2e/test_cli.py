"""The installed `gateway-breaker` command against a real redis-server and running gateways."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import port_for
import pytest
import yaml

from tests.conftest import RedisServer
from tests.e2e.conftest import Gateway, StartGateway, Upstream, clean_env, counts, make_config
from tests.helpers import wait_until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

# The console script pip installed next to this interpreter.
COMMAND = str(Path(sys.executable).with_name("gateway-breaker"))
CLI_BOUND_SECONDS = 0.5  # the bound, from the command's exit to every gateway rejecting


def cli(
    *args: str, env: Mapping[str, str | None] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COMMAND, *args],
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def config_file(tmp_path: Path, upstream: Upstream) -> Path:
    config: dict[str, Any] = make_config(upstream.url)
    config["redis"] = {"key_prefix": f"cli_{uuid.uuid4().hex[:8]}"}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def gateways(
    start_gateway: StartGateway, config_file: Path, redis_shared: RedisServer
) -> list[Gateway]:
    return [start_gateway(config_file, redis_url=redis_shared.url) for _ in range(2)]


def rejects(gateway: Gateway, service: str = "discovery") -> bool:
    response = gateway.get(f"/{service}/status/200")
    assert response.status_code in (200, 503), response.text
    return response.status_code == 503


def test_open_release_status_history(
    gateways: list[Gateway], config_file: Path, redis_shared: RedisServer, upstream: Upstream
) -> None:
    env = {"REDIS_URL": redis_shared.url, "GATEWAY_BREAKER_CONFIG": str(config_file)}
    for gateway in gateways:
        assert not rejects(gateway)

    opened = cli("open", "discovery", "--reason", "INC-9 upstream down", env=env)
    assert opened.returncode == 0, opened.stderr
    assert "forced_open" in opened.stdout
    for gateway in gateways:
        wait_until_sync(lambda g=gateway: rejects(g), CLI_BOUND_SECONDS, 0.005, "a rejection")
    reached = counts(upstream)
    assert all(rejects(g) for g in gateways)
    assert reached() == 0

    status = cli("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    views = {v["service"]: v for v in json.loads(status.stdout)["breakers"]}
    assert views["discovery"]["state"] == "forced_open"
    assert views["discovery"]["manual"]["reason"] == "INC-9 upstream down"
    assert views["sona"]["state"] == "closed"
    table = cli("status", env=env)
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split()[:2] == ["SERVICE", "STATE"]
    assert any(
        line.split()[:2] == ["discovery", "forced_open"] for line in table.stdout.splitlines()
    )

    released = cli("release", "discovery", env=env)
    assert released.returncode == 0, released.stderr
    for gateway in gateways:
        wait_until_sync(lambda g=gateway: not rejects(g), 2, 0.01, "traffic again")

    history = cli("history", "discovery", "--json", env=env)
    assert history.returncode == 0, history.stderr
    events = json.loads(history.stdout)["history"]
    assert [e["cause"] for e in events[:2]] == ["manual_released", "manual"]
    assert events[1]["reason"] == "INC-9 upstream down"
    human = cli("history", "discovery", "--limit", "1", env=env)
    assert human.returncode == 0
    assert len(human.stdout.splitlines()) == 2  # the header and one transition
    assert "manual_released" in human.stdout


def test_timed_mode_reset_fleet_and_discovery_without_a_config(
    gateways: list[Gateway], config_file: Path, redis_shared: RedisServer
) -> None:
    prefix = yaml.safe_load(config_file.read_text())["redis"]["key_prefix"]
    # No config file: the services come from what Redis and the live instances report.
    env = {"REDIS__KEY_PREFIX": prefix}
    for gateway in gateways:
        for service in ("discovery", "sona", "auth"):
            gateway.get(f"/{service}/status/200")

    def fleet() -> dict[str, Any]:
        done = cli("--redis-url", redis_shared.url, "fleet", "--json", env=env)
        assert done.returncode == 0, done.stderr
        data: dict[str, Any] = json.loads(done.stdout)
        return data

    pids = {g.process.pid for g in gateways}
    wait_until_sync(
        lambda: pids <= {i["pid"] for i in fleet()["instances"]}, 5, 0.1, "both gateways listed"
    )
    table = cli("fleet", "--redis-url", redis_shared.url, env=env)
    assert table.returncode == 0
    assert table.stdout.startswith("INSTANCE")

    opened = cli("--redis-url", redis_shared.url, "metrics-only", "sona", "--for", "30", env=env)
    assert opened.returncode == 0, opened.stderr
    assert "metrics_only until" in opened.stdout
    reset = cli("--redis-url", redis_shared.url, "reset", "sona", "--reason", "fresh", env=env)
    assert reset.returncode == 0, reset.stderr
    status = json.loads(cli("--redis-url", redis_shared.url, "status", "--json", env=env).stdout)
    views = {v["service"]: v for v in status["breakers"]}
    assert {"discovery", "sona", "auth"} <= set(views)
    assert views["sona"]["state"] == "closed"


def test_watch_prints_transitions(
    gateways: list[Gateway], config_file: Path, redis_shared: RedisServer
) -> None:
    env = clean_env({"REDIS_URL": redis_shared.url, "GATEWAY_BREAKER_CONFIG": str(config_file)})
    watch = subprocess.Popen(
        [COMMAND, "watch", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert watch.stderr is not None
        assert watch.stdout is not None
        assert "watching" in watch.stderr.readline()
        assert cli("disable", "auth", "--reason", "seen live", env=env).returncode == 0
        line = json.loads(watch.stdout.readline())
        assert (line["service"], line["from"], line["to"]) == ("auth", "closed", "disabled")
    finally:
        watch.terminate()
        watch.wait(10)
    assert cli("release", "auth", env=env).returncode == 0


def test_errors_are_one_line_and_a_non_zero_exit(
    config_file: Path, redis_shared: RedisServer, gateways: list[Gateway]
) -> None:
    dead = f"redis://:hunter2secret@127.0.0.1:{port_for.select_random()}/0"
    down = cli("--redis-url", dead, "status")
    assert down.returncode == 1
    assert down.stdout == ""
    assert len(down.stderr.strip().splitlines()) == 1, down.stderr
    assert "cannot reach Redis" in down.stderr
    assert "hunter2secret" not in down.stderr
    assert "Traceback" not in down.stderr

    env = {"REDIS_URL": redis_shared.url, "GATEWAY_BREAKER_CONFIG": str(config_file)}
    for args in (["open", "nosuch"], ["history", "nosuch"], ["release", "nosuch"]):
        unknown = cli(*args, env=env)
        assert unknown.returncode == 1, unknown
        assert unknown.stderr.strip().splitlines() == [unknown.stderr.strip()]
        assert "unknown service 'nosuch'" in unknown.stderr

    for args in (
        ["open"],
        ["open", "discovery", "--for", "-3"],
        ["history", "sona", "--limit", "0"],
        [],
    ):
        usage = cli(*args, env=env)
        assert usage.returncode == 2, (args, usage)
        assert "Traceback" not in usage.stderr

    no_url = cli("status", env={"GATEWAY_BREAKER_CONFIG": str(config_file)})
    assert no_url.returncode == 2
    assert "REDIS_URL" in no_url.stderr
