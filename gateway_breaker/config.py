"""Config: environment variables and a YAML file, validated, with errors that name the field."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from redis.connection import URL_QUERY_ARGUMENT_PARSERS, parse_url

from gateway_breaker.errors import SECRET_QUERY, ConfigError, redact_secrets
from gateway_breaker.policy import Policy, ServicePolicy

CONFIG_PATH_ENV = "GATEWAY_BREAKER_CONFIG"
SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster")
# Flat env names the seed documents, mapped onto the nested fields they set.
ENV_ALIASES = {
    "REDIS_URL": ("redis", "url"),
    "CIRCUIT_BREAKER_ENABLED": ("circuit_breaker", "enabled"),
    "GATEWAY_BREAKER_ADMIN_TOKEN": ("admin", "token"),
    "GATEWAY_BREAKER_ADMIN_PORT": ("admin", "port"),
    "GATEWAY_BREAKER_ADMIN_HOST": ("admin", "host"),
}

_yaml_path: ContextVar[Path | None] = ContextVar("gateway_breaker_yaml_path", default=None)


def check_service_name(name: str) -> str:
    """Service names become Redis key parts: letters, digits, '_', '.', '-' only."""
    if not isinstance(name, str) or not SERVICE_NAME.match(name):
        raise ValueError(
            f"invalid service name {name!r}: use 1-64 letters, digits, '_', '.' or '-',"
            " starting with a letter or digit"
        )
    return name


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/*")
# Query options redis-py reads from a URL (beyond its typed ones), all passed to connections.
_STRING_OPTIONS = frozenset(
    {
        "username",
        "password",
        "client_name",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_password",
        "ssl_ciphers",
    }
)
_POSITIVE_OPTIONS = ("socket_timeout", "socket_connect_timeout", "timeout")
# Typed options that make no sense here (a list parsed from a string, client-side decoding).
_REFUSED_OPTIONS = frozenset({"retry_on_error", "decode_responses", "encoding"})


def redact_url(url: str) -> str:
    """The URL with its credentials masked, safe to log: `redis://user:***@host:6379/0`.

    Everything between the scheme and the last '@' is credentials, even when a password holds
    an unencoded '/' or '@' that would confuse a URL parser, or the scheme is spelled
    `unix:/`; secret query options (`?password=...`) are masked too.
    """
    match = _SCHEME.match(url)
    head = match.group(0) if match else ""
    rest = url[len(head) :]
    if "@" in rest:
        userinfo, _, hosts = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        shown = f"{user}:***" if colon and "?" not in user else "***"
        rest = f"{shown}@{hosts}"
    return SECRET_QUERY.sub(r"\1***", head + rest)


def url_secrets(url: str | None, *more: str | None) -> list[str]:
    """Every secret a URL (and `more`) carries, as written and percent-decoded, longest first."""
    found: set[str] = {m for m in more if m}
    if url:
        match = _SCHEME.match(url)
        userinfo = url[match.end() if match else 0 :].rpartition("@")[0]
        password = userinfo.partition(":")[2] if ":" in userinfo else userinfo
        found.update({password, unquote(password)})
        for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
            if SECRET_QUERY.match(f"?{name}="):
                found.update({value, quote(value, safe="")})
    return sorted((s for s in found if s), key=len, reverse=True)


def _check_query(scheme: str, url: str) -> None:
    """URL query options are settings too: checked now, named in the error, never echoed."""
    query = urlsplit(url).query
    if not query:
        return
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"query options are not read from {scheme}:// URLs; use the redis.* settings"
        )
    for name, _ in parse_qsl(query, keep_blank_values=True):
        if name in _REFUSED_OPTIONS or (
            name not in URL_QUERY_ARGUMENT_PARSERS and name not in _STRING_OPTIONS
        ):
            raise ValueError(f"unknown or unsupported URL query option {name[:40]!r}")
    try:
        options = parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        # redis-py's message names the option ("Invalid value for 'socket_timeout' ...").
        raise ValueError(redact_secrets(str(exc))) from None
    for name in _POSITIVE_OPTIONS:
        value = options.get(name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"URL query option {name!r} must be a positive number of seconds")
    for name in ("db", "max_connections", "health_check_interval", "socket_read_size"):
        value = options.get(name)
        if value is not None and value < (1 if name == "max_connections" else 0):
            raise ValueError(f"URL query option {name!r} is out of range")


class RedisSettings(BaseModel):
    """Where breaker state is shared. `url=None` keeps every breaker in memory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = None
    pool_size: int = Field(10, ge=1, le=1_000)
    key_prefix: str = Field("circuit_breaker", min_length=1, max_length=128)
    state_ttl_seconds: int = Field(3600, ge=1, le=30 * 86_400)
    connect_timeout_seconds: float = Field(1.0, gt=0, le=60)
    socket_timeout_seconds: float = Field(1.0, gt=0, le=60)
    """Bound on every Redis round trip made by the background tasks."""
    sync_interval_seconds: float = Field(1.0, gt=0, le=3600)
    """How often each instance re-reads the versions of its services (missed messages heal)."""
    evidence_flush_seconds: float = Field(0.05, gt=0, le=60)
    """With fleet counting: how often an instance that sees new failures sends its counts."""
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    sentinel_password: str | None = None

    @field_validator("url", mode="before")
    @classmethod
    def _check_url(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not isinstance(value, str):
            raise ValueError("must be a string such as redis://host:6379/0")
        parts = urlsplit(value.strip())
        if parts.scheme not in REDIS_SCHEMES:
            # Never echo the value: it may carry a password.
            raise ValueError(f"scheme must be one of {', '.join(REDIS_SCHEMES)}")
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError("unix:// URL needs a socket path")
        else:
            try:
                hosts = parts.netloc.rsplit("@", 1)[-1]
                if not hosts:
                    raise ValueError
                for host in hosts.split(","):
                    name, _, port = host.rpartition(":") if ":" in host else (host, "", "")
                    if port and not (port.isdigit() and 0 < int(port) < 65536):
                        raise ValueError
                    if not (name or host):
                        raise ValueError
            except ValueError:
                raise ValueError(
                    "malformed Redis URL: expected scheme://[user:pass@]host:port"
                ) from None
        _check_query(parts.scheme, value.strip())
        return value.strip()

    @field_validator("key_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if any(c in value for c in "*?[]{} \t\r\n"):
            raise ValueError("must not contain glob, brace or space characters")
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            if name == "url" and isinstance(value, str):
                yield name, redact_url(value)
            elif name == "sentinel_password" and value is not None:
                yield name, "***"
            else:
                yield name, value


class CircuitBreakerSettings(BaseModel):
    """Whether breakers run, the policy every service starts from, and the services."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    defaults: Policy = Policy()
    services: dict[str, ServicePolicy] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _inherit_defaults(cls, data: Any) -> Any:
        # A service's own keys win over `defaults`, which win over the built-in defaults.
        if not isinstance(data, Mapping):
            return data
        defaults = data.get("defaults") or {}
        if isinstance(defaults, BaseModel):
            defaults = defaults.model_dump(exclude_unset=True)
        services = data.get("services")
        if not isinstance(defaults, Mapping) or not isinstance(services, Mapping):
            return data
        merged: dict[str, Any] = {}
        for name, own in services.items():
            if own is None:
                own = {}
            if isinstance(own, BaseModel):
                own = own.model_dump(exclude_unset=True)
            merged[name] = {**defaults, **own} if isinstance(own, Mapping) else own
        return {**data, "services": merged}

    @field_validator("services")
    @classmethod
    def _check_services(cls, services: dict[str, ServicePolicy]) -> dict[str, ServicePolicy]:
        prefixes: dict[str, str] = {}
        for name, service in services.items():
            check_service_name(name)
            prefix = service.prefix or f"/{name}"
            if prefix in prefixes:
                raise ValueError(
                    f"services {prefixes[prefix]!r} and {name!r} share prefix {prefix!r}"
                )
            prefixes[prefix] = name
        return services

    def policy(self, service: str) -> Policy:
        """The policy of a service; `defaults` for a service that is not configured."""
        return self.services.get(service, self.defaults)

    def routes(self) -> dict[str, str]:
        """Route prefix -> service name for every configured service."""
        return {(s.prefix or f"/{name}"): name for name, s in self.services.items()}


def _check_mount_path(value: str) -> str:
    if not value.startswith("/") or any(c in value for c in "?#* \t"):
        raise ValueError(f"must be a path starting with '/': {value!r}")
    return value.rstrip("/") or "/"


class MetricsSettings(BaseModel):
    """Prometheus metrics served by the middleware (off unless enabled)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    path: str = "/metrics"
    admin_port: bool = False
    """Serve /metrics on the admin listener (`admin.port`) instead of the gateway's port."""

    _check_path = field_validator("path")(classmethod(lambda cls, v: _check_mount_path(v)))


class AdminSettings(BaseModel):
    """The admin API and dashboard, served under `path` only when `token` is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: SecretStr | None = None
    """Bearer token every admin call must carry (env GATEWAY_BREAKER_ADMIN_TOKEN)."""
    path: str = "/_breakers"
    port: int | None = Field(None, ge=1, le=65_535)
    """A listener of its own for the admin API and dashboard (env GATEWAY_BREAKER_ADMIN_PORT):
    then they are not served on the gateway's port at all."""
    host: str = Field("127.0.0.1", min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.:_-]+$")
    """Address of that listener (env GATEWAY_BREAKER_ADMIN_HOST)."""

    _check_path = field_validator("path")(classmethod(lambda cls, v: _check_mount_path(v)))

    @field_validator("token", mode="before")
    @classmethod
    def _check_token(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not isinstance(value, str | SecretStr):
            raise ValueError("must be a string")
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if len(text) < 16:
            raise ValueError("must be at least 16 characters")  # never echo the value
        if not (text.isascii() and text.isprintable()):
            # An HTTP header carries no other characters: such a token could never be sent.
            raise ValueError("must be printable ASCII (no accents, no control characters)")
        return value


class _EnvAliasSource(PydanticBaseSettingsSource):
    """Reads the seed's flat names (REDIS_URL, CIRCUIT_BREAKER_ENABLED) into nested fields."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for env, (section, key) in ENV_ALIASES.items():
            value = os.environ.get(env)
            if value is not None:
                data.setdefault(section, {})[key] = value
        return data


class Config(BaseSettings):
    """Root settings. `Config()` reads env vars and the YAML file named by GATEWAY_BREAKER_CONFIG.

    Precedence: keyword arguments > environment > YAML file > defaults. Nested fields are set from
    the environment with `__`, e.g. `CIRCUIT_BREAKER__SERVICES__SONA__FAILURE_THRESHOLD=5`.
    Invalid values raise `ConfigError` naming the field.
    """

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_nested_delimiter="__",
        case_sensitive=False,
        nested_model_default_partial_update=True,
    )

    redis: RedisSettings = RedisSettings()
    circuit_breaker: CircuitBreakerSettings = CircuitBreakerSettings()
    metrics: MetricsSettings = MetricsSettings()
    admin: AdminSettings = AdminSettings()

    @model_validator(mode="after")
    def _check_listeners(self) -> Config:
        if self.metrics.admin_port and self.admin.port is None:
            raise ValueError("metrics.admin_port: needs admin.port (the admin listener)")
        return self

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            source = _yaml_path.get() or os.environ.get(CONFIG_PATH_ENV)
            env = {
                i: name for i, e in enumerate(exc.errors()) if (name := _env_name(e["loc"], values))
            }
            raise ConfigError.from_validation(exc, source=source, env=env) from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], **overrides: Any) -> Config:
        """Settings from the given YAML file, with the environment and `overrides` on top."""
        token = _yaml_path.set(_existing_file(Path(path)))
        try:
            return cls(**overrides)
        finally:
            _yaml_path.reset(token)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _yaml_path.get()
        if path is None and (named := os.environ.get(CONFIG_PATH_ENV)):
            path = _existing_file(Path(named))
        yaml_source = None if path is None else _yaml_source(settings_cls, path)
        # Service names as the file and the keywords spell them: the environment is read
        # case-insensitively and must override those services, not add look-alikes.
        names: list[str] = []
        for source in (init_settings, yaml_source):
            if isinstance(source, InitSettingsSource):
                names += _service_names(source.init_kwargs)
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            _EnvAliasSource(settings_cls),
            _EnvSource(settings_cls, env_settings, names),
        ]
        if yaml_source is not None:
            sources.append(yaml_source)
        return tuple(sources)

    def policy(self, service: str) -> Policy:
        return self.circuit_breaker.policy(service)


def _env_name(loc: tuple[int | str, ...], given: Mapping[str, Any]) -> str | None:
    """The environment variable a bad value came from (not a keyword argument), if any."""
    parts = [str(part) for part in loc]
    here: Any = given
    for part in parts:  # keyword arguments win over the environment
        if isinstance(here, BaseModel):
            here = here.model_dump(exclude_unset=True)
        if not isinstance(here, Mapping) or part not in here:
            break
        here = here[part]
    else:
        return None
    for env, target in ENV_ALIASES.items():
        if tuple(parts[:2]) == target and env in os.environ:
            return env
    by_lower = {name.lower(): name for name in os.environ}
    for n in range(len(parts), 0, -1):
        if (name := by_lower.get("__".join(parts[:n]).lower())) is not None:
            return name
    return None


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (from {CONFIG_PATH_ENV} or from_yaml)")
    return path


def _yaml_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    try:
        data = _load_yaml(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {_yaml_error(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    _check_keys(data, path, "")
    return InitSettingsSource(settings_cls, init_kwargs=data)


def _yaml_error(exc: BaseException) -> str:
    """What is wrong and where, never the text of the file: PyYAML quotes the offending line,
    and that line may hold a token or a password."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(part for part in (exc.context, exc.problem) if part)
        return where + _CONTROL_CHARS.sub("?", redact_secrets(what))[:160]
    if isinstance(exc, yaml.YAMLError):
        return "not valid YAML"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 (byte {exc.start})"
    return redact_secrets(str(exc))


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _check_keys(data: Any, path: Path, where: str) -> None:
    """Every mapping key in the file is a string (YAML also allows numbers, lists, ...)."""
    if isinstance(data, dict):
        for key, value in data.items():
            here = f"{where}.{key}" if where else str(key)
            if not isinstance(key, str):
                shown = redact_secrets(here)[:80]
                raise ConfigError(
                    f"invalid configuration in {path}:\n  {shown}: keys must be strings"
                )
            _check_keys(value, path, here)
    elif isinstance(data, list):
        for i, item in enumerate(data):
            _check_keys(item, path, f"{where}.{i}")


class _EnvSource(PydanticBaseSettingsSource):
    """The environment (nested `__` names), with two defences.

    A service the file or the keywords name is overridden under that spelling
    (`..._SERVICES__DISCOVERY__...` sets `Discovery`, it does not add `discovery`); a variable
    holding malformed JSON is a ConfigError that names it.
    """

    def __init__(
        self, settings_cls: type[BaseSettings], env: PydanticBaseSettingsSource, names: list[str]
    ) -> None:
        super().__init__(settings_cls)
        self._env = env
        by_lower: dict[str, list[str]] = {}
        for name in names:
            by_lower.setdefault(name.lower(), []).append(name)
        self._spelling = {k: v[0] for k, v in by_lower.items() if len(set(v)) == 1}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        try:
            data = self._env()
        except SettingsError as exc:
            raise ConfigError(_bad_env_message(exc)) from None
        section = data.get("circuit_breaker")
        services = section.get("services") if isinstance(section, dict) else None
        if isinstance(services, dict) and self._spelling:
            renamed: dict[Any, Any] = {}
            for key, value in services.items():
                name = self._spelling.get(key.lower(), key) if isinstance(key, str) else key
                if isinstance(renamed.get(name), dict) and isinstance(value, dict):
                    value = {**renamed[name], **value}
                renamed[name] = value
            assert isinstance(section, dict)
            data = {**data, "circuit_breaker": {**section, "services": renamed}}
        return data


def _service_names(values: Mapping[str, Any]) -> list[str]:
    section = values.get("circuit_breaker")
    if isinstance(section, BaseModel):
        section = section.model_dump(exclude_unset=True)
    services = section.get("services") if isinstance(section, Mapping) else None
    return [k for k in services if isinstance(k, str)] if isinstance(services, Mapping) else []


def _bad_env_message(exc: SettingsError) -> str:
    """Name the variable whose value pydantic-settings could not parse (never echo it)."""
    field = re.search(r'field "([^"]+)"', str(exc))
    prefix = field.group(1).lower() if field else ""
    suspects: list[tuple[str, str]] = []
    for name, value in os.environ.items():
        lower = name.lower()
        if not prefix or not (lower == prefix or lower.startswith(prefix + "__")):
            continue
        try:
            json.loads(value)
        except ValueError as bad:
            if value.lstrip()[:1] in ("{", "["):
                suspects.insert(0, (name, str(bad)))
            else:
                suspects.append((name, str(bad)))
    if not suspects:
        return (
            f"invalid configuration: an environment variable for {prefix or 'a field'}"
            " holds a value that cannot be parsed"
        )
    name, why = suspects[0]
    return f"invalid configuration: environment variable {name}: not valid JSON ({why})"


MAX_CONFIG_BYTES = 1 << 20
"""A config file is a few KB; anything over 1 MiB is refused before it is read."""
MAX_YAML_NODES = 100_000
"""Values in a config file once its aliases are expanded: far above any real file, far below
what an alias bomb (a few lines that expand to billions of values) needs."""


def _load_yaml(path: Path) -> Any:
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config file {path} is {size} bytes, more than the {MAX_CONFIG_BYTES} allowed"
        )
    with path.open("rb") as f:
        text = f.read(MAX_CONFIG_BYTES + 1)
    if len(text) > MAX_CONFIG_BYTES:  # grew since the stat
        raise ConfigError(f"config file {path} is more than the {MAX_CONFIG_BYTES} bytes allowed")
    loader = yaml.SafeLoader(text.decode("utf-8"))
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"config file {path} is nested too deeply") from None
        if node is None:
            return None
        _check_expansion(node, path)
        _check_numbers(node, path)
        try:
            return loader.construct_document(node)
        except RecursionError:
            raise ConfigError(f"config file {path} is nested too deeply") from None
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node, path: Path) -> None:
    """Refuse a file whose aliases expand to more than MAX_YAML_NODES values, or loop."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        children = _children(node)
        if finished:
            open_nodes.discard(key)
            total = 1 + sum(sizes[id(c)] for c in children)
            if total > MAX_YAML_NODES:
                if _distinct_nodes(root) > MAX_YAML_NODES:
                    raise ConfigError(
                        f"config file {path} holds more than {MAX_YAML_NODES} values"
                        " (keys and values): too large, refused"
                    )
                raise ConfigError(
                    f"config file {path} expands to more than {MAX_YAML_NODES} values"
                    " (YAML aliases): refused"
                )
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise ConfigError(f"config file {path} has a YAML alias that refers to itself")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)


MAX_NUMBER_CHARS = 100
"""Digits in one number of the file: Python refuses to read an int of over 4,300 digits."""
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


def _distinct_nodes(root: yaml.Node) -> int:
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            stack.extend(_children(node))
    return len(seen)


def _check_numbers(root: yaml.Node, path: Path) -> None:
    """Refuse a number too long to be a setting, naming its field (before it is converted)."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, where = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            if node.tag in _NUMBER_TAGS and len(node.value) > MAX_NUMBER_CHARS:
                shown = redact_secrets(where or "(root)")[:120]
                raise ConfigError(
                    f"invalid configuration in {path}:\n  {shown}: a number of"
                    f" {len(node.value)} characters is out of range"
                )
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(
                (child, f"{where}.{i}" if where else str(i)) for i, child in enumerate(node.value)
            )
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                stack.append((key, where))
                stack.append((value, f"{where}.{name}" if where else str(name)))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []
