"""Fleet-wide circuit breakers for FastAPI and Starlette API gateways."""

from gateway_breaker.breaker import BreakerSnapshot, CircuitBreaker, CircuitState, Permit
from gateway_breaker.config import CircuitBreakerSettings, Config, RedisSettings
from gateway_breaker.errors import CircuitOpenError, ConfigError, GatewayBreakerError, StoreError
from gateway_breaker.manager import CircuitBreakerManager
from gateway_breaker.middleware import CircuitBreakerMiddleware
from gateway_breaker.policy import Policy, ServicePolicy
from gateway_breaker.routing import RouteTable

__all__ = [
    "BreakerSnapshot",
    "CircuitBreaker",
    "CircuitBreakerManager",
    "CircuitBreakerMiddleware",
    "CircuitBreakerSettings",
    "CircuitOpenError",
    "CircuitState",
    "Config",
    "ConfigError",
    "GatewayBreakerError",
    "Permit",
    "Policy",
    "RedisSettings",
    "RouteTable",
    "ServicePolicy",
    "StoreError",
]
__version__ = "0.1.0"
