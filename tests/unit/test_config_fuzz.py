"""Hostile configuration: random YAML-like documents (known and unknown keys at random depths,
wrong types, out-of-range and huge numbers, NaN, bad URLs carrying passwords) given to `Config`
as keyword arguments and as a YAML file. Each ends in a valid Config or a `ConfigError` whose
every line names a field path, never another exception, and no error ever shows a password."""

from __future__ import annotations

import string
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway_breaker import Config, ConfigError, Policy, RedisSettings, ServicePolicy

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEY_ALPHABET = string.ascii_lowercase + string.digits + "_-"
POLICY_FIELDS = sorted(Policy.model_fields)
SERVICE_FIELDS = sorted(ServicePolicy.model_fields)
REDIS_FIELDS = sorted(RedisSettings.model_fields)
SECTION_FIELDS = ["enabled", "defaults", "services"]
ALL_FIELDS = sorted({*POLICY_FIELDS, *SERVICE_FIELDS, *REDIS_FIELDS, *SECTION_FIELDS})
TOP = ("redis", "circuit_breaker")

# -- values ------------------------------------------------------------------------------------

# Random text never holds '~': the passwords below do, so one can only show up by leaking.
TEXT = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="~"), max_size=30)
NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 0.0, -0.0, 1e308, 2**63, 10**30, 86_401, 1_000_001]),
)
ODD_STRINGS = st.sampled_from(
    [
        "",
        " ",
        "5xx",
        "500-599",
        "599-500",
        "6xx",
        "/x",
        "x",
        "//x",
        "http://h",
        "redis://h:1",
        "-1",
        "1e9",
        "nan",
        "inf",
        "true",
        "no",
        "null",
        "{}",
        "[]",
    ]
)
LEAVES = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT, ODD_STRINGS)
KEYS = st.text(KEY_ALPHABET, min_size=1, max_size=10) | st.sampled_from(ALL_FIELDS)
ANYTHING = st.recursive(
    LEAVES,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=12,
)
# YAML also allows keys that are not strings.
YAML_KEYS = KEYS | st.integers(-2, 2) | st.none() | st.booleans()

SECONDS = st.floats(min_value=0.001, max_value=3600)
GOOD: dict[str, st.SearchStrategy[Any]] = {
    "failure_threshold": st.integers(1, 1_000_000),
    "error_rate_threshold": st.floats(min_value=0.01, max_value=1),
    "window_seconds": SECONDS,
    "min_calls": st.integers(1, 1_000_000),
    "timeout_seconds": SECONDS,
    "max_timeout_seconds": st.none() | SECONDS,
    "half_open_max_calls": st.integers(1, 10_000),
    "probe_lease_seconds": SECONDS,
    "success_threshold": st.integers(1, 10_000),
    "slow_call_seconds": st.none() | SECONDS,
    "failure_status_codes": st.sampled_from([500, "5xx", "500-599", [502, 503, "504"], ["4xx"]]),
    "prefix": st.sampled_from(["/a", "/b/c", "/api/v1", "/"]),
    "upstream": st.sampled_from(["http://127.0.0.1:9001", "https://up.example/x/"]),
    "url": st.sampled_from(
        [
            None,
            "redis://127.0.0.1:6379/0",
            "rediss://h:6380",
            "unix:///tmp/r.sock",
            "redis+sentinel://h1:26379,h2:26379/mymaster",
            "redis+cluster://h1:7000,h2:7001",
        ]
    ),
    "pool_size": st.integers(1, 1000),
    "key_prefix": st.sampled_from(["circuit_breaker", "cb", "team:gw"]),
    "state_ttl_seconds": st.integers(1, 30 * 86_400),
    "connect_timeout_seconds": st.floats(min_value=0.01, max_value=60),
    "socket_timeout_seconds": st.floats(min_value=0.01, max_value=60),
    "sync_interval_seconds": SECONDS,
    "enabled": st.booleans(),
}
SERVICE_NAMES = st.one_of(
    st.sampled_from(["discovery", "sona", "auth", "a.b-c_d"]),
    st.text(KEY_ALPHABET + ".", min_size=1, max_size=70),
    st.sampled_from(["", "a b", "../x", "*", "-x", "x" * 65, "sona/evil", "é"]),
)


def value_for(field: str, clean: bool = False) -> st.SearchStrategy[Any]:
    """A plausible value of `field` most of the time, anything now and then (never, if clean)."""
    good = GOOD.get(field)
    if good is None:
        return ANYTHING if not clean else st.none()
    return good if clean else st.one_of(good, good, good, ANYTHING)


@st.composite
def section(draw: st.DrawFn, fields: list[str], clean: bool = False) -> dict[str, Any]:
    if clean:
        fields = [f for f in fields if f in GOOD]
    chosen = draw(st.lists(st.sampled_from(fields), unique=True, max_size=4))
    return {name: draw(value_for(name, clean)) for name in chosen}


@st.composite
def config_docs(draw: st.DrawFn, keys: st.SearchStrategy[Any] = KEYS) -> dict[Any, Any]:
    """Config-shaped, then a few random keys set to anything at random depths. A third of the
    documents are clean (plausible values only, no random keys), so that valid ones are common.
    """
    clean = draw(st.integers(0, 2)) == 0
    hostile: st.SearchStrategy[Any] = st.nothing() if clean else ANYTHING
    names = st.sampled_from(["discovery", "sona", "auth", "a.b-c_d"]) if clean else SERVICE_NAMES
    doc: dict[Any, Any] = {}
    if draw(st.booleans()):
        doc["redis"] = draw(section(REDIS_FIELDS, clean) | hostile)
    if draw(st.booleans()):
        breaker: dict[str, Any] = {}
        if draw(st.booleans()):
            breaker["enabled"] = draw(value_for("enabled", clean))
        if draw(st.booleans()):
            breaker["defaults"] = draw(section(POLICY_FIELDS, clean) | hostile)
        if draw(st.booleans()):
            breaker["services"] = draw(
                st.dictionaries(names, section(SERVICE_FIELDS, clean) | hostile, max_size=3)
                | hostile
            )
        doc["circuit_breaker"] = breaker
    for _ in range(0 if clean else draw(st.integers(0, 3))):
        target = doc
        for _ in range(draw(st.integers(0, 4))):
            children = [k for k, v in target.items() if isinstance(v, dict)]
            if not children:
                break
            target = target[draw(st.sampled_from(sorted(children, key=repr)))]
        target[draw(keys)] = draw(ANYTHING)
    return doc


# -- the two ways in ---------------------------------------------------------------------------


def from_kwargs(doc: dict[Any, Any]) -> Config:
    return Config(**doc)


def from_yaml(doc: dict[Any, Any]) -> Config:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gateway.yaml"
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        return Config.from_yaml(path)


def build(make: Callable[[dict[Any, Any]], Config], doc: dict[Any, Any]) -> ConfigError | None:
    """A valid Config (None) or the ConfigError; any other exception fails the test."""
    try:
        config = make(doc)
    except ConfigError as exc:
        return exc
    assert isinstance(config, Config)
    return None


def check_names_field_paths(error: ConfigError, doc: dict[Any, Any]) -> None:
    """Every problem is reported as `path: message`, the path going into the document."""
    lines = str(error).splitlines()
    problems = [line.strip() for line in lines[1:]]
    assert problems, f"no field named in {str(error)!r}"
    top = {str(k) for k in doc} | set(TOP)
    for line in problems:
        path, sep, message = line.partition(": ")
        assert sep, f"no 'path: message' in {line!r}"
        assert message, line
        assert path.split(".")[0] in top, f"{path!r} is not a path into the configuration"


@SETTINGS
@given(config_docs())
@example({"circuit_breaker": {"services": {"x": {"error_rate_threshold": float("nan")}}}})
@example({"circuit_breaker": {"defaults": {"failure_threshold": 10**40}, "services": {"x": None}}})
@example({"redis": {"pool_size": -(10**30), "url": "redis://h:99999"}})
def test_random_keyword_config_is_valid_or_names_the_field(doc: dict[str, Any]) -> None:
    error = build(from_kwargs, doc)
    if error is not None:
        check_names_field_paths(error, doc)


@SETTINGS
@given(config_docs(keys=YAML_KEYS))
@example({1: 2})
@example({None: {"redis": {}}})
@example({"redis": {True: 1}, "circuit_breaker": {"services": {7: {}}}})
def test_random_yaml_config_is_valid_or_names_the_field(doc: dict[Any, Any]) -> None:
    error = build(from_yaml, doc)
    if error is not None:
        check_names_field_paths(error, doc)


# -- passwords ---------------------------------------------------------------------------------

PASSWORDS = st.text(string.ascii_letters + string.digits, min_size=6, max_size=12).map(
    lambda s: f"pw~{s}"
)
# Passwords as people write them into URLs unencoded (base64 ones hold '/' and '+').
RAW_PASSWORDS = st.builds(
    lambda a, sep, b: f"pw~{a}{sep}{b}",
    st.text(string.ascii_letters + string.digits, min_size=3, max_size=8),
    st.sampled_from(["/", "+", "=", "#", "?", "%2F", "!", "$"]),
    st.text(string.ascii_letters + string.digits, min_size=3, max_size=8),
)


@st.composite
def urls(draw: st.DrawFn, password: str) -> str:
    scheme = draw(
        st.sampled_from(
            [
                "redis",
                "rediss",
                "unix",
                "redis+sentinel",
                "redis+cluster",
                "http",
                "ftp",
                "REDIS",
                "redis+",
                "",
            ]
        )
    )
    sep = draw(st.sampled_from(["://", "://", ":/", ":///"]))
    user = draw(st.sampled_from(["", "user", "gateway"]))
    host = draw(
        st.sampled_from(
            [
                "127.0.0.1:6379",
                "localhost",
                "h:99999",
                "h:x",
                "[::1",
                "[::1]:6379",
                "h1:1,h2:2",
                "",
                "/tmp/redis.sock",
                "h:6379:1",
            ]
        )
    )
    tail = draw(st.sampled_from(["", "/0", "/mymaster", "/mymaster/x", "?db=1", "#f", " "]))
    return f"{scheme}{sep}{user}:{password}@{host}{tail}"


PLACES = (
    "redis.url",
    "redis.key_prefix",
    "redis.sentinel_password",
    "redis.ssl_ca_certs",
    "redis.pool_size",
    "redis.<key>",
    "<key>",
    "circuit_breaker.enabled",
    "circuit_breaker.defaults.failure_status_codes",
    "circuit_breaker.services.<key>",
    "circuit_breaker.services.sona.prefix",
    "circuit_breaker.services.sona.upstream",
    "circuit_breaker.services.sona.failure_status_codes",
    "circuit_breaker.services.sona.<key>",
)


@st.composite
def docs_with_a_password(
    draw: st.DrawFn, passwords: st.SearchStrategy[str] = PASSWORDS
) -> tuple[dict[Any, Any], str, str]:
    """A random document with a URL carrying a password put in one place (maybe the wrong
    one: a misplaced value, or even a key)."""
    doc = draw(config_docs())
    password = draw(passwords)
    url = draw(urls(password))
    place = draw(st.sampled_from(PLACES))
    target = doc
    *parents, last = place.split(".")
    for part in parents:
        child = target.get(part)
        if not isinstance(child, dict):
            child = target[part] = {}
        target = child
    if last == "<key>":
        target[url] = draw(ANYTHING)
    elif last == "failure_status_codes":
        target[last] = [500, url]
    else:
        target[last] = url
    return doc, password, place


def check_hidden(
    make: Callable[[dict[Any, Any]], Config], doc: dict[Any, Any], secret: str, place: str
) -> None:  # fmt: skip
    try:
        config = make(doc)
    except ConfigError as exc:
        shown = "".join(traceback.format_exception(exc))
        assert secret not in shown, f"the password put at {place} shows in:\n{shown}"
    else:
        if place == "redis.url":
            assert secret not in repr(config)
            assert secret not in str(config)


@SETTINGS
@given(docs_with_a_password())
@example(({"redis": {"redis://user:pw~s3cret@host:6379/0": 1}}, "pw~s3cret", "redis.<key>"))
@example(
    (
        {"circuit_breaker": {"services": {"sona": {"prefix": "redis://u:pw~s3cret@h:1/0"}}}},
        "pw~s3cret",
        "circuit_breaker.services.sona.prefix",
    )
)
def test_config_errors_never_show_a_password(case: tuple[dict[Any, Any], str, str]) -> None:
    doc, password, place = case
    check_hidden(from_kwargs, doc, password, place)
    check_hidden(from_yaml, doc, password, place)


@SETTINGS
@given(docs_with_a_password(RAW_PASSWORDS))
@example(
    (
        {"circuit_breaker": {"services": {"sona": {"upstream": "redis://u:pw~ab/cd@h:1/0"}}}},
        "pw~ab/cd",
        "circuit_breaker.services.sona.upstream",
    )
)
def test_unencoded_passwords_never_show_either(case: tuple[dict[Any, Any], str, str]) -> None:
    doc, password, place = case
    check_hidden(from_kwargs, doc, password, place)
    check_hidden(from_yaml, doc, password, place)
