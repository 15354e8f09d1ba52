"""Hostile configuration: secrets in every URL form, URL options, alias bombs, huge files,
malformed environment overrides, look-alike service names."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway_breaker import Config
from gateway_breaker.config import MAX_CONFIG_BYTES, redact_url
from gateway_breaker.errors import ConfigError, StoreError
from gateway_breaker.store.redis import RedisStateStore

SECRET = "Zq7-s3cr3t"

SECRET_URLS = [
    f"redis://user:{SECRET}@127.0.0.1:6379/0",
    f"redis://:{SECRET}@127.0.0.1:6379/0",
    f"rediss://user:{SECRET}@127.0.0.1:6380/0?ssl_cert_reqs=none",
    f"redis://127.0.0.1:6379/0?password={SECRET}",
    f"redis://127.0.0.1:6379/0?db=1&password={SECRET}&socket_timeout=1",
    f"unix:///run/redis.sock?password={SECRET}",
    f"unix:/:{SECRET}@127.0.0.1:6379",
    f"redis+sentinel://:{SECRET}@127.0.0.1:26379,127.0.0.1:26380/mymaster",
    f"redis+cluster://user:{SECRET}@127.0.0.1:7000,127.0.0.1:7001",
]


@pytest.mark.parametrize("url", SECRET_URLS)
def test_no_url_form_shows_its_password(url: str) -> None:
    assert SECRET not in redact_url(url)
    config = Config(redis={"url": url})
    assert SECRET not in repr(config)
    assert SECRET not in str(config)
    assert SECRET not in RedisStateStore(config.redis).describe()


def test_the_sentinel_password_is_masked_in_errors() -> None:
    url = "redis+sentinel://127.0.0.1:1/mymaster"
    store = RedisStateStore(Config(redis={"url": url, "sentinel_password": SECRET}).redis)
    assert SECRET not in repr(store.settings)

    async def fails() -> None:
        raise OSError(f"sentinel said no to {SECRET}")

    with pytest.raises(StoreError) as info:
        asyncio.run(store._run("PING", fails()))
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("query", "option"),
    [
        ("socket_timeout=abc", "socket_timeout"),
        ("socket_connect_timeout=-1", "socket_connect_timeout"),
        ("socket_timeout=nan", "socket_timeout"),
        ("health_check_interval=often", "health_check_interval"),
        ("max_connections=0", "max_connections"),
        ("frobnicate=1", "frobnicate"),
        ("decode_responses=true", "decode_responses"),
    ],
)
def test_url_query_options_are_checked_at_start(query: str, option: str) -> None:
    url = f"redis://:{SECRET}@127.0.0.1:6379/0?{query}&password={SECRET}"
    with pytest.raises(ConfigError) as info:
        Config(redis={"url": url})
    message = str(info.value)
    assert "redis.url" in message
    assert option in message
    assert SECRET not in message


def test_url_query_options_from_the_environment_are_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0?socket_timeout=abc")
    with pytest.raises(ConfigError, match="socket_timeout"):
        Config()


def test_good_url_query_options_are_accepted() -> None:
    url = "rediss://127.0.0.1:6380/0?socket_timeout=0.5&ssl_cert_reqs=none&health_check_interval=5"
    assert Config(redis={"url": url}).redis.url == url


def test_sentinel_and_cluster_urls_take_no_query_options() -> None:
    for url in (
        "redis+sentinel://127.0.0.1:26379/mymaster?socket_timeout=1",
        "redis+cluster://127.0.0.1:7000?socket_timeout=1",
    ):
        with pytest.raises(ConfigError, match="query options"):
            Config(redis={"url": url})


# -- hostile files ---------------------------------------------------------------------------

ALIAS_BOMB = """\
a: &a ["x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
circuit_breaker:
  services:
    discovery:
      failure_status_codes: *i
"""


def test_a_yaml_alias_bomb_is_refused_fast(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="expands to more than") as info:
        Config.from_yaml(path)
    assert time.monotonic() - started < 5  # refused, not expanded (a billion values)
    assert str(path) in str(info.value)


def test_a_self_referring_alias_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text("circuit_breaker: &loop\n  defaults: *loop\n")
    with pytest.raises(ConfigError, match=r"refers to itself|expands"):
        Config.from_yaml(path)


def test_a_deeply_nested_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("circuit_breaker: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(ConfigError, match=r"nested too deeply|expands"):
        Config.from_yaml(path)


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("w") as f:
        f.write("circuit_breaker:\n  enabled: true\n")
        f.write("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match="bytes") as info:
        Config.from_yaml(path)
    assert str(path) in str(info.value)


def test_ordinary_aliases_still_work(tmp_path: Path) -> None:
    path = tmp_path / "aliases.yaml"
    path.write_text(
        "circuit_breaker:\n"
        "  services:\n"
        "    sona: &strict {failure_threshold: 2, timeout_seconds: 3}\n"
        "    auth: *strict\n"
    )
    services = Config.from_yaml(path).circuit_breaker.services
    assert services["auth"].failure_threshold == 2
    assert services["sona"].timeout_seconds == 3


# -- the environment ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "CIRCUIT_BREAKER__SERVICES",
        "CIRCUIT_BREAKER__SERVICES__SONA__FAILURE_STATUS_CODES",
        "CIRCUIT_BREAKER",
        "REDIS",
    ],
)
def test_a_malformed_env_override_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(name, '{"broken": ' + SECRET)
    with pytest.raises(ConfigError) as info:
        Config()
    assert name in str(info.value)
    assert SECRET not in str(info.value)


def test_env_overrides_the_service_as_the_yaml_spells_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "circuit_breaker:\n"
        "  services:\n"
        "    Discovery:\n"
        "      prefix: /discovery\n"
        "      failure_threshold: 20\n"
        "      timeout_seconds: 3\n"
    )
    monkeypatch.setenv("CIRCUIT_BREAKER__SERVICES__DISCOVERY__FAILURE_THRESHOLD", "5")
    services = Config.from_yaml(path).circuit_breaker.services
    assert list(services) == ["Discovery"]
    assert services["Discovery"].failure_threshold == 5
    assert services["Discovery"].timeout_seconds == 3
    assert services["Discovery"].prefix == "/discovery"


def test_env_still_adds_a_service_the_yaml_does_not_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("circuit_breaker:\n  services:\n    Discovery: {}\n")
    monkeypatch.setenv("CIRCUIT_BREAKER__SERVICES__SONA__FAILURE_THRESHOLD", "5")
    services = Config.from_yaml(path).circuit_breaker.services
    assert sorted(services) == ["Discovery", "sona"]
