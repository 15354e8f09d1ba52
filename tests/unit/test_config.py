"""Config: defaults, YAML, environment, precedence, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway_breaker import (
    CircuitBreakerSettings,
    Config,
    ConfigError,
    Policy,
    RedisSettings,
    ServicePolicy,
)

SEED_YAML = """\
circuit_breaker:
  enabled: true
  services:
    discovery:
      prefix: /discovery
      upstream: http://127.0.0.1:9001
      failure_threshold: 20
      timeout_seconds: 3
      error_rate_threshold: 0.5
    sona:
      failure_threshold: 10
      timeout_seconds: 2
      error_rate_threshold: 0.4
redis:
  url: "redis://localhost:6379"
  pool_size: 10
"""

PASSWORD = "Sup3rS3cretPw"


@pytest.fixture
def seed_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(SEED_YAML)
    return path


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(**values: object) -> str:
    with pytest.raises(ConfigError) as info:
        Config(**values)
    return str(info.value)


# -- defaults ------------------------------------------------------------------------------


def test_defaults_match_the_design() -> None:
    config = Config()
    assert config.redis.url is None
    assert config.redis.pool_size == 10
    assert config.redis.key_prefix == "circuit_breaker"
    assert config.redis.state_ttl_seconds == 3600
    assert config.circuit_breaker.enabled is True
    assert config.circuit_breaker.services == {}
    policy = config.circuit_breaker.defaults
    assert policy.failure_threshold == 5
    assert policy.error_rate_threshold == 0.5
    assert policy.window_seconds == 10
    assert policy.min_calls == 20
    assert policy.timeout_seconds == 10
    assert policy.half_open_max_calls == 1
    assert policy.success_threshold == 1
    assert policy.slow_call_seconds is None
    assert policy.failure_status_codes == frozenset(range(500, 600))


def test_default_status_codes_make_5xx_failures_and_4xx_successes() -> None:
    policy = Policy()
    assert all(policy.is_failure_status(code) for code in (500, 502, 503, 504, 599))
    assert not any(policy.is_failure_status(code) for code in (200, 301, 400, 404, 429, 499))


def test_unconfigured_service_gets_the_defaults() -> None:
    config = Config(circuit_breaker={"defaults": {"failure_threshold": 9}})
    assert config.policy("anything").failure_threshold == 9


def test_public_names_are_exported() -> None:
    assert Config.model_fields.keys() >= {"redis", "circuit_breaker"}
    assert isinstance(Config().redis, RedisSettings)
    assert isinstance(Config().circuit_breaker, CircuitBreakerSettings)


# -- YAML ----------------------------------------------------------------------------------


def test_from_yaml_reads_the_seed_file(seed_yaml: Path) -> None:
    config = Config.from_yaml(seed_yaml)
    assert config.redis.url == "redis://localhost:6379"
    assert config.redis.pool_size == 10
    discovery = config.circuit_breaker.services["discovery"]
    assert isinstance(discovery, ServicePolicy)
    assert discovery.failure_threshold == 20
    assert discovery.timeout_seconds == 3
    assert discovery.error_rate_threshold == 0.5
    assert discovery.prefix == "/discovery"
    assert discovery.upstream == "http://127.0.0.1:9001"
    sona = config.circuit_breaker.services["sona"]
    assert (sona.failure_threshold, sona.timeout_seconds, sona.error_rate_threshold) == (10, 2, 0.4)
    assert sona.min_calls == 20  # not in the file: the built-in default
    assert config.policy("sona") == sona


def test_from_yaml_accepts_a_str_path(seed_yaml: Path) -> None:
    assert Config.from_yaml(str(seed_yaml)).circuit_breaker.services["sona"].failure_threshold == 10


def test_config_reads_the_file_named_by_gateway_breaker_config(
    seed_yaml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_BREAKER_CONFIG", str(seed_yaml))
    config = Config()
    assert set(config.circuit_breaker.services) == {"discovery", "sona"}
    assert config.redis.url == "redis://localhost:6379"


def test_without_gateway_breaker_config_no_file_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, SEED_YAML, "config.yaml")
    assert Config().circuit_breaker.services == {}


def test_empty_services_section_is_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, "circuit_breaker:\n  enabled: false\n")
    config = Config.from_yaml(path)
    assert config.circuit_breaker.enabled is False
    assert config.circuit_breaker.services == {}


def test_service_with_no_keys_takes_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "circuit_breaker:\n  services:\n    auth:\n")
    config = Config.from_yaml(path)
    assert config.circuit_breaker.services["auth"].failure_threshold == 5
    assert config.circuit_breaker.routes() == {"/auth": "auth"}


# -- environment ---------------------------------------------------------------------------


def test_env_wins_over_yaml(seed_yaml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_BREAKER_CONFIG", str(seed_yaml))
    monkeypatch.setenv("REDIS_URL", "redis://cache.internal:6380/2")
    monkeypatch.setenv("CIRCUIT_BREAKER_ENABLED", "false")
    monkeypatch.setenv("CIRCUIT_BREAKER__SERVICES__SONA__FAILURE_THRESHOLD", "5")
    config = Config()
    assert config.redis.url == "redis://cache.internal:6380/2"
    assert config.redis.pool_size == 10  # the rest of the YAML section stays
    assert config.circuit_breaker.enabled is False
    sona = config.circuit_breaker.services["sona"]
    assert sona.failure_threshold == 5
    assert sona.timeout_seconds == 2  # from YAML, untouched by the env var
    assert config.circuit_breaker.services["discovery"].failure_threshold == 20


def test_env_wins_over_from_yaml_too(seed_yaml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIRCUIT_BREAKER__SERVICES__DISCOVERY__TIMEOUT_SECONDS", "7")
    config = Config.from_yaml(seed_yaml)
    assert config.circuit_breaker.services["discovery"].timeout_seconds == 7
    assert config.circuit_breaker.services["discovery"].failure_threshold == 20


def test_redis_url_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "rediss://cache:6380/1")
    assert Config().redis.url == "rediss://cache:6380/1"


@pytest.mark.parametrize(
    ("value", "enabled"),
    [("false", False), ("0", False), ("FALSE", False), ("true", True), ("1", True)],
)
def test_circuit_breaker_enabled_env(
    value: str, enabled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CIRCUIT_BREAKER_ENABLED", value)
    assert Config().circuit_breaker.enabled is enabled


def test_nested_env_creates_a_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIRCUIT_BREAKER__SERVICES__SONA__FAILURE_THRESHOLD", "5")
    config = Config()
    assert config.circuit_breaker.services["sona"].failure_threshold == 5
    assert config.circuit_breaker.routes() == {"/sona": "sona"}


def test_nested_env_sets_redis_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS__POOL_SIZE", "3")
    monkeypatch.setenv("REDIS__KEY_PREFIX", "cb")
    config = Config()
    assert (config.redis.pool_size, config.redis.key_prefix) == (3, "cb")


def test_keyword_arguments_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://from-env:6379")
    assert Config(redis={"url": "redis://from-kwargs:6379"}).redis.url == "redis://from-kwargs:6379"


def test_bad_env_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIRCUIT_BREAKER__SERVICES__SONA__FAILURE_THRESHOLD", "lots")
    with pytest.raises(ConfigError, match=r"circuit_breaker\.services\.sona\.failure_threshold"):
        Config()


# -- defaults inheritance and prefixes -------------------------------------------------------


def test_services_inherit_circuit_breaker_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
circuit_breaker:
  defaults:
    timeout_seconds: 30
    failure_threshold: 8
    failure_status_codes: [502, 503, 504]
  services:
    auth: {}
    sona:
      failure_threshold: 2
""",
    )
    config = Config.from_yaml(path)
    auth, sona = (config.circuit_breaker.services[n] for n in ("auth", "sona"))
    assert (auth.timeout_seconds, auth.failure_threshold) == (30, 8)
    assert auth.failure_status_codes == {502, 503, 504}
    assert (sona.timeout_seconds, sona.failure_threshold) == (30, 2)  # its own key wins
    assert sona.min_calls == 20  # neither set it: the built-in default
    assert config.policy("unconfigured").timeout_seconds == 30


def test_defaults_from_env_reach_services_from_yaml(
    seed_yaml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CIRCUIT_BREAKER__DEFAULTS__MIN_CALLS", "4")
    config = Config.from_yaml(seed_yaml)
    assert config.circuit_breaker.services["sona"].min_calls == 4
    assert config.circuit_breaker.services["discovery"].min_calls == 4


def test_default_prefix_is_slash_name() -> None:
    config = Config(
        circuit_breaker={
            "services": {"sona": {}, "discovery": {"prefix": "/api/discovery/"}, "auth": {}}
        }
    )
    assert config.circuit_breaker.routes() == {
        "/sona": "sona",
        "/api/discovery": "discovery",
        "/auth": "auth",
    }


@pytest.mark.parametrize("prefix", ["sona", "/a?b", "/a#b", "/a//b"])
def test_bad_prefix_names_the_field(prefix: str) -> None:
    message = config_error(circuit_breaker={"services": {"sona": {"prefix": prefix}}})
    assert "circuit_breaker.services.sona.prefix" in message


def test_two_services_sharing_a_prefix_is_an_error() -> None:
    message = config_error(
        circuit_breaker={"services": {"a": {"prefix": "/x"}, "b": {"prefix": "/x/"}}}
    )
    assert "circuit_breaker.services" in message
    assert "'/x'" in message


# -- errors --------------------------------------------------------------------------------


def test_error_rate_above_one_names_the_field() -> None:
    message = config_error(circuit_breaker={"services": {"sona": {"error_rate_threshold": 1.5}}})
    assert "circuit_breaker.services.sona.error_rate_threshold" in message
    assert "1.5" in message


def test_error_rate_above_one_in_yaml_names_the_field_and_file(tmp_path: Path) -> None:
    path = write(
        tmp_path, "circuit_breaker:\n  services:\n    sona:\n      error_rate_threshold: 1.5\n"
    )
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path)
    assert "circuit_breaker.services.sona.error_rate_threshold" in str(info.value)
    assert str(path) in str(info.value)


def test_misspelled_key_names_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, "circuit_breaker:\n  services:\n    sona:\n      failure_treshold: 3\n")
    with pytest.raises(ConfigError, match=r"circuit_breaker\.services\.sona\.failure_treshold"):
        Config.from_yaml(path)


@pytest.mark.parametrize(
    ("section", "key"),
    [("redis", "pool_sise"), ("circuit_breaker", "enable"), ("circuit_breaker.defaults", "wndow")],
)
def test_unknown_keys_anywhere_are_errors(section: str, key: str) -> None:
    values: dict[str, object] = {key: 1}
    for part in reversed(section.split(".")):
        values = {part: values}
    message = config_error(**values)
    assert f"{section}.{key}" in message


def test_unknown_top_level_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "circuit_breakers:\n  enabled: true\n")
    with pytest.raises(ConfigError, match="circuit_breakers"):
        Config.from_yaml(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("failure_threshold", -1),
        ("failure_threshold", 0),
        ("min_calls", -5),
        ("timeout_seconds", -1),
        ("timeout_seconds", 0),
        ("window_seconds", 0),
        ("half_open_max_calls", 0),
        ("success_threshold", -2),
        ("slow_call_seconds", -0.5),
        ("error_rate_threshold", 0),
        ("error_rate_threshold", -0.1),
    ],
)
def test_out_of_range_values_name_the_field(field: str, value: float) -> None:
    message = config_error(circuit_breaker={"services": {"sona": {field: value}}})
    assert f"circuit_breaker.services.sona.{field}" in message


def test_out_of_range_default_names_the_field() -> None:
    message = config_error(circuit_breaker={"defaults": {"failure_threshold": -3}})
    assert "circuit_breaker.defaults.failure_threshold" in message


def test_nonexistent_config_path_names_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nowhere" / "gateway.yaml"
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(missing)
    assert str(missing) in str(info.value)
    monkeypatch.setenv("GATEWAY_BREAKER_CONFIG", str(missing))
    with pytest.raises(ConfigError) as info:
        Config()
    assert str(missing) in str(info.value)


def test_config_path_that_is_a_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=str(tmp_path)):
        Config.from_yaml(tmp_path)


def test_malformed_yaml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "circuit_breaker:\n  services: [unclosed\n  enabled: true\n")
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path)
    assert str(path) in str(info.value)


def test_malformed_yaml_from_env_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "redis: {url: [\n")
    monkeypatch.setenv("GATEWAY_BREAKER_CONFIG", str(path))
    with pytest.raises(ConfigError) as info:
        Config()
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["- just\n- a list\n", "42\n", "just a string\n"])
def test_yaml_that_is_not_a_mapping_is_an_error_naming_the_file(text: str, tmp_path: Path) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path)
    assert str(path) in str(info.value)


def test_empty_yaml_file_gives_the_defaults(tmp_path: Path) -> None:
    config = Config.from_yaml(write(tmp_path, ""))
    assert config.circuit_breaker.services == {}
    assert config.redis.url is None


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:6379",
        "https://localhost:6379",
        "localhost:6379",
        "mysql://localhost:3306",
        "redis://",
        "redis://localhost:notaport",
        "redis://localhost:70000",
        "unix://",
    ],
)
def test_bad_redis_url_names_the_field(url: str) -> None:
    assert "redis.url" in config_error(redis={"url": url})


def test_bad_redis_url_from_env_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "http://localhost:6379")
    with pytest.raises(ConfigError, match=r"redis\.url"):
        Config()


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379",
        "redis://localhost:6379/0",
        "redis://user:pass@localhost:6379/3",
        "rediss://cache.example.com:6380/0",
        "unix:///var/run/redis.sock",
        "redis+sentinel://:pw@h1:26379,h2:26379/mymaster",
        "redis+cluster://h1:7000,h2:7001,h3:7002",
    ],
)
def test_documented_redis_url_forms_are_accepted(url: str) -> None:
    assert Config(redis={"url": url}).redis.url == url


@pytest.mark.parametrize("name", ["bad name", "with/slash", "-leading-dash", "x" * 65, "a:b", ""])
def test_bad_service_name_names_the_services_field(name: str) -> None:
    message = config_error(circuit_breaker={"services": {name: {}}})
    assert "circuit_breaker.services" in message
    assert "service name" in message


@pytest.mark.parametrize("name", ["discovery", "auth-v2", "media.api", "svc_1", "A1"])
def test_good_service_names(name: str) -> None:
    assert name in Config(circuit_breaker={"services": {name: {}}}).circuit_breaker.services


def test_bad_upstream_names_the_field() -> None:
    message = config_error(circuit_breaker={"services": {"sona": {"upstream": "ftp://x"}}})
    assert "circuit_breaker.services.sona.upstream" in message


# -- secrets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"http://user:{PASSWORD}@localhost:6379",
        f"redis://user:{PASSWORD}@localhost:notaport/0",
        f"redis://:{PASSWORD}@",
        f"mysql://:{PASSWORD}@db:3306",
    ],
)
def test_password_of_a_bad_redis_url_is_not_in_the_error(url: str) -> None:
    message = config_error(redis={"url": url})
    assert "redis.url" in message
    assert PASSWORD not in message


def test_password_of_a_bad_redis_url_from_env_is_not_in_the_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", f"http://admin:{PASSWORD}@localhost:6379")
    with pytest.raises(ConfigError) as info:
        Config()
    assert PASSWORD not in str(info.value)
    assert PASSWORD not in repr(info.value)


def test_password_is_not_in_errors_about_other_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""\
redis:
  url: "redis://user:{PASSWORD}@localhost:6379/0"
  pool_size: 0
  key_prefix: "has space"
circuit_breaker:
  services:
    sona:
      failure_threshold: -1
""",
    )
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path)
    message = str(info.value)
    assert "redis.pool_size" in message
    assert "redis.key_prefix" in message
    assert PASSWORD not in message


def test_password_is_not_in_a_malformed_yaml_error(tmp_path: Path) -> None:
    path = write(tmp_path, f'redis:\n  url: "redis://user:{PASSWORD}@localhost:6379/0\n  pool: [\n')
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path)
    assert str(path) in str(info.value)
    assert PASSWORD not in str(info.value)


def test_password_is_not_in_the_error_when_redis_is_given_as_a_bare_url(tmp_path: Path) -> None:
    """`redis: redis://user:pass@host` (a URL where the section belongs) is a likely slip."""
    path = write(tmp_path, f'redis: "redis://user:{PASSWORD}@localhost:6379/0"\n')
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path)
    assert "redis" in str(info.value)
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        f"redis://user:{PASSWORD}@localhost:6379/0",
        f"redis://:{PASSWORD}@localhost:6379",
        f"rediss://default:{PASSWORD}@cache.example.com:6380/1",
        f"redis+sentinel://:{PASSWORD}@h1:26379,h2:26379/mymaster",
    ],
)
def test_password_is_not_in_repr_or_str_of_config(url: str) -> None:
    config = Config(redis={"url": url})
    assert config.redis.url == url  # the real value stays usable
    for text in (repr(config), str(config), repr(config.redis), str(config.redis)):
        assert PASSWORD not in text
        assert "***" in text


def test_sentinel_password_is_not_in_repr() -> None:
    config = Config(
        redis={"url": "redis+sentinel://h1:26379/mymaster", "sentinel_password": PASSWORD}
    )
    assert PASSWORD not in repr(config)


def test_password_from_redis_url_env_is_not_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://user:{PASSWORD}@localhost:6379/0")
    assert PASSWORD not in repr(Config())


# -- failure_status_codes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([500, 502, 503], {500, 502, 503}),
        (503, {503}),
        ("503", {503}),
        ("500-599", set(range(500, 600))),
        ("500 - 504", set(range(500, 505))),
        ("5xx", set(range(500, 600))),
        ("5XX", set(range(500, 600))),
        (["4xx", 500], {*range(400, 500), 500}),
        (["502-504", "429"], {502, 503, 504, 429}),
        ("599-599", {599}),
    ],
)
def test_failure_status_code_forms(value: object, expected: set[int]) -> None:
    policy = Policy(failure_status_codes=value)
    assert policy.failure_status_codes == expected


def test_failure_status_codes_from_yaml(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
circuit_breaker:
  services:
    a: {failure_status_codes: "5xx"}
    b: {failure_status_codes: "500-503"}
    c: {failure_status_codes: [502, 504, "429"]}
""",
    )
    services = Config.from_yaml(path).circuit_breaker.services
    assert services["a"].failure_status_codes == set(range(500, 600))
    assert services["b"].failure_status_codes == {500, 501, 502, 503}
    assert services["c"].failure_status_codes == {502, 504, 429}
    assert services["c"].is_failure_status(429)
    assert not services["c"].is_failure_status(500)


@pytest.mark.parametrize(
    "value",
    ["6xx", "0xx", "599-500", "600", "99", "5xx-", "abc", [], [True], 700, 1.5, None, ["500", "x"]],
)
def test_bad_failure_status_codes_name_the_field(value: object) -> None:
    message = config_error(circuit_breaker={"services": {"sona": {"failure_status_codes": value}}})
    assert "circuit_breaker.services.sona.failure_status_codes" in message
