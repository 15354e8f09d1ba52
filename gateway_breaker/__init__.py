"""Fleet-wide circuit breakers for FastAPI and Starlette API gateways."""

from typing import TYPE_CHECKING, Any

from gateway_breaker.breaker import (
    EFFECTIVE_STATES,
    MANUAL_MODES,
    OUTCOMES,
    BreakerSnapshot,
    CircuitBreaker,
    CircuitState,
    ManualMode,
    Permit,
)
from gateway_breaker.config import (
    AdminSettings,
    CircuitBreakerSettings,
    Config,
    MetricsSettings,
    RedisSettings,
)
from gateway_breaker.errors import (
    CircuitOpenError,
    ConfigError,
    GatewayBreakerError,
    PolicyError,
    StoreError,
)
from gateway_breaker.manager import CircuitBreakerManager
from gateway_breaker.middleware import CircuitBreakerMiddleware
from gateway_breaker.policy import Policy, ServicePolicy
from gateway_breaker.routing import RouteTable
from gateway_breaker.views import BreakerView, FleetView, InstanceView, TransitionEvent

if TYPE_CHECKING:
    from gateway_breaker.outbound import (
        BreakerTransport,
        CircuitOpenTransportError,
        route_by_origin,
    )

_OUTBOUND = ("BreakerTransport", "CircuitOpenTransportError", "route_by_origin")


def __getattr__(name: str) -> Any:
    # The outbound names import httpx: only when asked for, not with the middleware.
    if name in _OUTBOUND:
        from gateway_breaker import outbound

        return getattr(outbound, name)
    raise AttributeError(f"module 'gateway_breaker' has no attribute {name!r}")


__all__ = [
    "EFFECTIVE_STATES",
    "MANUAL_MODES",
    "OUTCOMES",
    "AdminSettings",
    "BreakerSnapshot",
    "BreakerTransport",
    "BreakerView",
    "CircuitBreaker",
    "CircuitBreakerManager",
    "CircuitBreakerMiddleware",
    "CircuitBreakerSettings",
    "CircuitOpenError",
    "CircuitOpenTransportError",
    "CircuitState",
    "Config",
    "ConfigError",
    "FleetView",
    "GatewayBreakerError",
    "InstanceView",
    "ManualMode",
    "MetricsSettings",
    "Permit",
    "Policy",
    "PolicyError",
    "RedisSettings",
    "RouteTable",
    "ServicePolicy",
    "StoreError",
    "TransitionEvent",
    "route_by_origin",
]
__version__ = "0.1.0"
