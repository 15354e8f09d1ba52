"""OpenTelemetry metrics: the Prometheus families of `gateway_breaker.metrics` as observable
instruments, read from the manager when the SDK collects. Needs the `otel` extra:
`pip install 'gateway-breaker[otel]'`.

```python
from gateway_breaker.otel import instrument
instruments = instrument(manager)            # the global MeterProvider, or meter_provider=...
```

Names are the Prometheus names with a dot after the prefix and no unit suffix
(`gateway_breaker.calls`, unit `{call}`; `gateway_breaker.retry_after`, unit `s`), so an OTel
Prometheus exporter gives back the same series. `failure_rate` is left out until `min_calls`
(OTel has no NaN convention), as is `store_up` in memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

try:
    from opentelemetry import metrics as otel_metrics
    from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without the package
    raise ImportError(
        "gateway_breaker.otel needs OpenTelemetry: install the extra with"
        " pip install 'gateway-breaker[otel]'"
    ) from exc

from gateway_breaker import __version__
from gateway_breaker.metrics import DELAY_DOC, FAMILIES, Family, Reading, adoption_delay, read

if TYPE_CHECKING:
    from gateway_breaker import TransitionEvent
    from gateway_breaker.manager import CircuitBreakerManager

# One collection calls every instrument's callback in turn: they share one reading of the
# manager taken within this many seconds.
SHARED_READING_SECONDS = 0.5


def otel_name(family: Family) -> str:
    """`gateway_breaker_retry_after_seconds` -> `gateway_breaker.retry_after`."""
    name = family.name.replace("gateway_breaker_", "gateway_breaker.", 1)
    return name.removesuffix("_seconds") if family.unit == "s" else name


class Instruments:
    """The observable instruments made by `instrument()`, by name (for tests and inspection)."""

    def __init__(self, manager: CircuitBreakerManager, meter: Meter) -> None:
        self.manager = manager
        self.meter = meter
        self._lock = threading.Lock()
        self._taken = -1.0
        self._readings: dict[str, Reading] = {}
        self.by_name = {otel_name(family): self._make(family) for family in FAMILIES}
        # Recorded when an opening made elsewhere is adopted here (run by the event loop).
        self.delay = meter.create_histogram(
            "gateway_breaker.propagation_delay", unit="s", description=DELAY_DOC
        )
        self._unsubscribe = manager.on_transition(self._on_transition)

    def close(self) -> None:
        """Stop recording the propagation delay (the observable instruments stay registered)."""
        self._unsubscribe()

    def _on_transition(self, event: TransitionEvent) -> None:
        delay = adoption_delay(self.manager, event)
        if delay is not None:
            self.delay.record(delay)

    def _make(self, family: Family) -> object:
        callbacks = [self._callback(family)]
        create = (
            self.meter.create_observable_counter
            if family.kind == "counter"
            else self.meter.create_observable_gauge
        )
        return create(
            otel_name(family), callbacks=callbacks, unit=family.unit, description=family.doc
        )

    def _callback(self, family: Family) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(value, dict(zip(family.labels, labels, strict=True)))
                for labels, value in self._reading(family.name)
                if value == value  # NaN: not yet known, so not reported
            ]

        return observe

    def _reading(self, name: str) -> Reading:
        # The SDK may collect from its own thread: one reader at a time.
        with self._lock:
            now = time.monotonic()
            if now - self._taken > SHARED_READING_SECONDS:
                self._readings = _read_retrying(self.manager)
                self._taken = now
            return self._readings.get(name, [])


def _read_retrying(manager: CircuitBreakerManager) -> dict[str, Reading]:
    """`read()`, again if the event loop changed a mapping while another thread read it."""
    for _ in range(3):
        try:
            return read(manager)
        except RuntimeError:  # "dictionary changed size during iteration"
            continue
    return read(manager)


def instrument(
    manager: CircuitBreakerManager, meter_provider: MeterProvider | None = None
) -> Instruments:
    """Register the breakers' instruments with `meter_provider` (default: the global one)."""
    provider = meter_provider if meter_provider is not None else otel_metrics.get_meter_provider()
    meter = provider.get_meter("gateway_breaker", __version__)
    return Instruments(manager, meter)


__all__ = ["Instruments", "instrument", "otel_name"]
