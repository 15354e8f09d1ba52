"""The CLI's arguments, exit codes and formatting, without Redis (tests/e2e/test_cli.py runs it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway_breaker import cli

VIEW = {
    "service": "discovery",
    "state": "forced_open",
    "automatic_state": "closed",
    "failure_count": 2,
    "success_count": 0,
    "failure_rate": 0.25,
    "window": {"calls": 8, "failures": 2},
    "calls": {"success": 6, "failure": 2, "slow": 0, "rejected": 4, "ignored": 0},
    "last_failure_time": 1_795_921_371.2,
    "opened_at": None,
    "retry_after": 0.0,
    "version": 7,
    "manual": {"mode": "forced_open", "until": 1_795_925_000.0, "reason": "INC-7"},
    "policy": {"failure_threshold": 3},
    "policy_overridden": True,
    "local": False,
}
EVENT = {
    "service": "discovery",
    "at": 1_795_921_371.2,
    "from": "closed",
    "to": "forced_open",
    "cause": "manual",
    "origin": "manual",
    "instance": "0123456789ab",
    "version": 8,
    "failure_count": 0,
    "failure_rate": None,
    "reason": 'says "hi"',
    "id": 3,
}


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nosuch"],
        ["open"],
        ["open", "discovery", "--for", "0"],
        ["open", "discovery", "--for", "abc"],
        ["open", "discovery", "--for", "nan"],
        ["open", "discovery", "--reason", "x" * 201],
        ["open", "discovery", "--reason", "two\nlines"],
        ["history", "discovery", "--limit", "0"],
        ["history", "discovery", "--limit", "1001"],
        ["status", "--bogus"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "gateway-breaker" in err
    assert "Traceback" not in err


def test_options_before_or_after_the_command() -> None:
    parser = cli.build_parser()
    before = parser.parse_args(["--redis-url", "redis://h:1/0", "status", "--json"])
    after = parser.parse_args(["status", "--redis-url", "redis://h:1/0"])
    assert before.redis_url == after.redis_url == "redis://h:1/0"
    opened = parser.parse_args(["open", "sona", "--for", "90", "--reason", "INC-1"])
    assert (opened.service, opened.seconds, opened.reason) == ("sona", 90.0, "INC-1")


def test_no_redis_url_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "gateway-breaker: error: no Redis URL: give --redis-url or set REDIS_URL"


def test_a_bad_config_is_one_line_without_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("redis:\n  url: redis://:topsecret@h:6379/0\n  pool_size: 0\n")
    assert cli.main(["--config", str(path), "status"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "redis.pool_size" in err
    assert "topsecret" not in err

    assert cli.main(["--config", str(tmp_path / "missing.yaml"), "status"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_status_table() -> None:
    text = cli.format_status([VIEW])
    header, row = text.splitlines()
    assert header.split()[:3] == ["SERVICE", "STATE", "FAILURES"]
    assert row.split()[:5] == ["discovery", "forced_open", "2", "25%", "-"]
    assert "forced_open until 2026-" in row
    assert "(INC-7)" in row
    assert cli.format_status([]) == "no breakers known"


def test_status_shows_health_and_the_share_shed() -> None:
    view = {**VIEW, "state": "closed", "health": 0.6316, "rejection_probability": 0.3676}
    header, row = cli.format_status([view]).splitlines()
    assert header.split()[3:6] == ["RATE", "HEALTH", "SHED"]
    assert row.split()[3:6] == ["25%", "0.63", "37%"]
    quiet = {**view, "health": 1.0, "rejection_probability": 0.0}
    assert cli.format_status([quiet]).splitlines()[1].split()[3:6] == ["25%", "1.00", "-"]


def test_history_table_and_event_line() -> None:
    text = cli.format_history([EVENT])
    assert text.splitlines()[1].split()[2:6] == ["closed", "forced_open", "manual", "manual"]
    line = cli.format_event(EVENT)
    assert "discovery closed -> forced_open cause=manual" in line
    assert 'reason="says \\"hi\\""' in line
    assert json.loads(line.split("reason=", 1)[1]) == 'says "hi"'


def test_fleet_table_shows_stale_and_disagreeing_instances() -> None:
    fleet = {
        "instances": [
            {
                "id": "aaaaaaaaaaaa",
                "host": "gw-1",
                "pid": 10,
                "started_at": 100.0,
                "last_seen": 199.5,
                "version": "0.1.0",
                "breakers": {"sona": {"state": "open", "version": 4}},
            },
            {
                "id": "bbbbbbbbbbbb",
                "host": "gw-2",
                "pid": 11,
                "started_at": 100.0,
                "last_seen": 150.0,
                "version": "0.1.0",
                "breakers": {"sona": {"state": "closed", "version": 3}},
            },
        ],
        "store": {"sona": {"state": "open", "version": 4}},
    }
    lines = cli.format_fleet(fleet, now=200.0, stale_after=4.0).splitlines()
    assert "STALE" not in lines[1]
    assert "sona=open@4" in lines[1]
    assert "(store" not in lines[1]
    assert "STALE" in lines[2]
    assert "sona=closed@3 (store open@4)" in lines[2]
    assert lines[-1] == "store: sona=open@4"
