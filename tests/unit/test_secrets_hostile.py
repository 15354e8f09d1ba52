"""No secret in any output: config parse errors, reprs, the CLI's one line; odd config values
get a ConfigError naming the field or the file's size."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway_breaker import Config
from gateway_breaker.cli import main
from gateway_breaker.config import MAX_YAML_NODES
from gateway_breaker.errors import ConfigError
from gateway_breaker.store.redis import RedisTopology

TOKEN = "Tk9-s3cretTokenValue77"
PASSWORD = "Pw4-hunter2hunter2"

BROKEN_FILES = [
    f'admin:\n  token: "{TOKEN}" x\n',
    f"admin:\n  token: {TOKEN}: [\n",
    f"admin:\n  token: '{TOKEN}\n",
    f"redis:\n  url: redis://:{PASSWORD}@h:6379 : [\n",
    f'redis:\n  sentinel_password: "{PASSWORD}" x\n',
    f"redis:\n  url: redis://h:6379/0?password={PASSWORD}\n\tpool_size: 3\n",
]


@pytest.mark.parametrize("text", BROKEN_FILES)
def test_a_yaml_error_never_shows_the_line_it_is_on(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path)
    message = str(info.value)
    assert "line " in message  # still says where
    for secret in (TOKEN, PASSWORD, TOKEN[:12], PASSWORD[:12]):
        assert secret not in message
    assert main(["--config", str(path), "status"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert TOKEN[:12] not in err
    assert PASSWORD[:12] not in err


SECRET_URLS = [
    f"redis://user:{PASSWORD}@127.0.0.1:6379/0",
    f"redis://:{PASSWORD}@127.0.0.1:6379/0",
    f"rediss://user:{PASSWORD}@127.0.0.1:6380/0",
    f"redis://127.0.0.1:6379/0?password={PASSWORD}",
    f"unix:///run/redis.sock?password={PASSWORD}",
    f"redis+sentinel://:{PASSWORD}@127.0.0.1:26379,127.0.0.1:26380/mymaster",
    f"redis+sentinel://user:{PASSWORD}@127.0.0.1:26379/mymaster/2",
    f"redis+cluster://user:{PASSWORD}@127.0.0.1:7000,127.0.0.1:7001",
]


@pytest.mark.parametrize("url", SECRET_URLS)
def test_the_topology_repr_hides_the_password(url: str) -> None:
    topology = RedisTopology.parse(url)
    assert PASSWORD not in repr(topology)
    assert PASSWORD not in str(topology)
    assert topology.kind in repr(topology)


def test_a_bad_redis_url_env_var_is_named_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("redis:\n  pool_size: 3\n")
    monkeypatch.setenv("REDIS_URL", f"ftp://:{PASSWORD}@h")
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path)
    message = str(info.value)
    assert "REDIS_URL" in message
    assert str(path) not in message
    assert PASSWORD not in message


def test_a_bad_file_value_still_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("redis:\n  pool_size: 0\n")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path)
    assert str(path) in str(info.value)
    assert "REDIS_URL" not in str(info.value)


def test_a_huge_yaml_integer_is_a_config_error_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("circuit_breaker:\n  defaults:\n    failure_threshold: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path)
    assert "circuit_breaker.defaults.failure_threshold" in str(info.value)
    assert len(str(info.value)) < 400


def test_a_file_of_too_many_values_is_refused_for_its_size(tmp_path: Path) -> None:
    lines = ["circuit_breaker:", "  services:"]
    lines += [f"    s{i}: {{}}" for i in range(60_000)]
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path)
    message = str(info.value)
    assert "alias" not in message.lower()
    assert str(MAX_YAML_NODES) in message


@pytest.mark.parametrize(
    "token", ["tökenvaluetokenvalue", "token\u202evaluetokenvalue", "a\x01" * 9]
)
def test_a_token_no_client_can_send_is_refused(token: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config(admin={"token": token})
    assert "admin.token" in str(info.value)
    assert token not in str(info.value)


def test_a_cluster_url_with_a_redis_py_lacking_cluster_pub_sub_names_the_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from redis.asyncio.cluster import RedisCluster

    monkeypatch.delattr(RedisCluster, "pubsub")
    with pytest.raises(ConfigError, match=r"redis\+cluster:// needs redis-py 8\.0 or newer"):
        RedisTopology.parse("redis+cluster://127.0.0.1:7000,127.0.0.1:7001")
