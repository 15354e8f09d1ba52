"""Config: environment variables and a YAML file, validated, with errors that name the field."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
)

from gateway_breaker.errors import ConfigError, redact_secrets
from gateway_breaker.policy import Policy, ServicePolicy

CONFIG_PATH_ENV = "GATEWAY_BREAKER_CONFIG"
SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster")
# Flat env names the seed documents, mapped onto the nested fields they set.
ENV_ALIASES = {
    "REDIS_URL": ("redis", "url"),
    "CIRCUIT_BREAKER_ENABLED": ("circuit_breaker", "enabled"),
    "GATEWAY_BREAKER_ADMIN_TOKEN": ("admin", "token"),
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


def redact_url(url: str) -> str:
    """The URL with its credentials masked, safe to log: `redis://user:***@host:6379/0`.

    Everything up to the last '@' is credentials, even when a password holds an unencoded
    '/' or '@' that would confuse a URL parser.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, hosts = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***" if colon else "***"
    return f"{scheme}://{shown}@{hosts}"


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

    _check_path = field_validator("path")(classmethod(lambda cls, v: _check_mount_path(v)))


class AdminSettings(BaseModel):
    """The admin API and dashboard, served under `path` only when `token` is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: SecretStr | None = None
    """Bearer token every admin call must carry (env GATEWAY_BREAKER_ADMIN_TOKEN)."""
    path: str = "/_breakers"

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

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            source = _yaml_path.get() or os.environ.get(CONFIG_PATH_ENV)
            raise ConfigError.from_validation(exc, source=source) from None

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
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            _EnvAliasSource(settings_cls),
            env_settings,
        ]
        path = _yaml_path.get()
        if path is None and (named := os.environ.get(CONFIG_PATH_ENV)):
            path = _existing_file(Path(named))
        if path is not None:
            sources.append(_yaml_source(settings_cls, path))
        return tuple(sources)

    def policy(self, service: str) -> Policy:
        return self.circuit_breaker.policy(service)


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (from {CONFIG_PATH_ENV} or from_yaml)")
    return path


def _yaml_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {redact_secrets(str(exc))}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    _check_keys(data, path, "")
    return InitSettingsSource(settings_cls, init_kwargs=data)


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
