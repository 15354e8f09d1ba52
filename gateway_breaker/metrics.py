"""Prometheus metrics: read the manager's own counters and views when scraped, never per request.

`BreakerCollector(manager)` is a prometheus-client collector; register it on any registry.
`metrics_app(manager)` is an ASGI app serving the text format; the middleware serves it at
`metrics.path` when `metrics.enabled`.

With several worker processes (`uvicorn --workers N`, gunicorn) and `PROMETHEUS_MULTIPROC_DIR`
set, each worker copies its readings into prometheus-client's multiprocess files every second
(`WorkerExporter`, a background task started by the ASGI lifespan), and every scrape, whichever
worker answers it, reports the sum of all workers' counters.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from starlette.types import Message, Receive, Scope, Send

from gateway_breaker.breaker import EFFECTIVE_STATES, OUTCOMES

if TYPE_CHECKING:
    from gateway_breaker.manager import CircuitBreakerManager
    from gateway_breaker.views import BreakerView, TransitionEvent

logger = logging.getLogger("gateway_breaker")

# The contract's label values (DESIGN.md, "Operations contracts"), from the state machine.
STATES = EFFECTIVE_STATES

EXPORT_INTERVAL_SECONDS = 1.0
"""How often each worker copies its readings into the multiprocess files."""

DELAY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Buckets of the propagation delay histogram (seconds)."""

GaugeMode = Literal["livemax", "livemin", "livesum"]

# The classic text format that `text_format` writes (prometheus-client names it
# CONTENT_TYPE_PLAIN_0_0_4 from 0.23 on, and CONTENT_TYPE_LATEST before).
TEXT_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Family:
    """One metric: its name (without `_total`), kind, help, labels, and how workers combine.

    `workers` is the prometheus-client multiprocess mode of a gauge: `livemax` (the highest of
    the live workers), `livemin`, or `livesum`. Counters always add up.
    """

    name: str
    kind: Literal["gauge", "counter"]
    doc: str
    labels: tuple[str, ...]
    workers: GaugeMode = "livemax"
    unit: str = ""


FAMILIES = (
    Family(
        "gateway_breaker_state",
        "gauge",
        "1 for the breaker's current state, 0 for the other five",
        ("service", "state"),
    ),
    Family(
        "gateway_breaker_calls",
        "counter",
        "Calls by outcome (success, failure, slow, rejected, shed, ignored) since start",
        ("service", "outcome"),
        unit="{call}",
    ),
    Family(
        "gateway_breaker_transitions",
        "counter",
        "State transitions seen by this instance; origin local (made here), fleet (adopted from"
        " another instance) or manual (an operator's command)",
        ("service", "from", "to", "origin"),
        unit="{transition}",
    ),
    Family(
        "gateway_breaker_failure_rate",
        "gauge",
        "Failure ratio of the rolling window (0 to 1); NaN until min_calls calls are in it",
        ("service",),
        unit="1",
    ),
    Family(
        "gateway_breaker_window_calls",
        "gauge",
        "Calls in the rolling window (sum them with window_failures for a fleet-wide rate)",
        ("service",),
        workers="livesum",
        unit="{call}",
    ),
    Family(
        "gateway_breaker_window_failures",
        "gauge",
        "Failures in the rolling window",
        ("service",),
        workers="livesum",
        unit="{call}",
    ),
    Family(
        "gateway_breaker_health",
        "gauge",
        "Success rate of the rolling window (the fleet's with Redis) over success_rate_target,"
        " at most 1; 1 until min_calls calls are in it",
        ("service",),
        workers="livemin",
        unit="1",
    ),
    Family(
        "gateway_breaker_rejection_probability",
        "gauge",
        "Share of calls the adaptive mode sheds now (computed, not applied, under metrics_only;"
        " 0 in classic mode)",
        ("service",),
        unit="1",
    ),
    Family(
        "gateway_breaker_consecutive_failures",
        "gauge",
        "Failures in a row (the failure_threshold rule's count)",
        ("service",),
        unit="{call}",
    ),
    Family(
        "gateway_breaker_retry_after_seconds",
        "gauge",
        "Seconds until the breaker lets a call through again (0 when it does now)",
        ("service",),
        unit="s",
    ),
    Family(
        "gateway_breaker_policy_overridden",
        "gauge",
        "1 while a policy override set at run time is in force",
        ("service",),
    ),
    Family(
        "gateway_breaker_store_up",
        "gauge",
        "1 while connected to the Redis store, 0 while not; absent in memory",
        (),
        workers="livemin",
    ),
    Family(
        "gateway_breaker_store_errors",
        "counter",
        "Failed store operations by kind (write, load, probe, events, connect, ...)",
        ("operation",),
        unit="{error}",
    ),
    Family(
        "gateway_breaker_store_rejected_values",
        "counter",
        "Unusable values read from Redis and ignored or repaired, by kind (registry, instance,"
        " history, policy, future_time)",
        ("kind",),
        unit="{value}",
    ),
    Family(
        "gateway_breaker_instance_info",
        "gauge",
        "1, labelled with this instance's id (as in the fleet view) and its store",
        ("instance_id", "store"),
    ),
)
BY_NAME = {family.name: family for family in FAMILIES}
DELAY_NAME = "gateway_breaker_propagation_delay_seconds"
DELAY_DOC = "Seconds from a breaker's opening on another instance to its adoption here"

Reading = list[tuple[tuple[str, ...], float]]


def read(manager: CircuitBreakerManager) -> dict[str, Reading]:
    """Every family's samples, `name -> [(label values, value)]`, read from the manager now."""
    views = manager.views()
    out: dict[str, Reading] = {}
    out["gateway_breaker_state"] = [
        ((view.service, state), 1.0 if view.state == state else 0.0)
        for view in views
        for state in STATES
    ]
    out["gateway_breaker_calls"] = [
        ((view.service, outcome), float(view.calls.get(outcome, 0)))
        for view in views
        for outcome in OUTCOMES
    ]
    for name, reader in _PER_SERVICE.items():
        out[name] = [((view.service,), reader(view)) for view in views]
    for family in FAMILIES:
        if family.name not in out:
            out[family.name] = _readings(manager, family.name, views)
    return out


def _transitions(manager: CircuitBreakerManager, services: list[str]) -> Reading:
    counts = dict(manager.transition_counts)
    for service in services:
        # Present from the start at 0, so that increase() sees a breaker's first opening.
        for origin in ("local", "fleet"):
            counts.setdefault((service, "closed", "open", origin), 0)
    return [(key, float(n)) for key, n in sorted(counts.items())]


def adoption_delay(manager: CircuitBreakerManager, event: TransitionEvent) -> float | None:
    """For an opening adopted from the fleet: seconds since the other instance opened it.

    Both times are on the breaker's clock (the store translates Redis's clock to it). Run by
    the event loop just after the adoption (`on_transition` listeners), never per request.
    None for every other transition.
    """
    if event.origin != "fleet" or event.to_state != "open":
        return None
    breaker = manager.find(event.service)
    if breaker is None or not breaker.opened_at:
        return None
    return max(0.0, breaker.clock() - breaker.opened_at)


class PropagationDelay:
    """A histogram of `adoption_delay`: how long another instance's opening took to reach here.

    A transition counter says that the fleet followed; this says how fast.
    """

    def __init__(self, manager: CircuitBreakerManager) -> None:
        self.manager = manager
        self.counts = [0] * (len(DELAY_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0
        self.observed = 0

    def __call__(self, event: TransitionEvent) -> None:
        delay = adoption_delay(self.manager, event)
        if delay is not None:
            self.observe(delay)

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(DELAY_BUCKETS, seconds)] += 1
        self.total += seconds
        self.observed += 1

    def family(self) -> HistogramMetricFamily:
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound, count in zip((*DELAY_BUCKETS, math.inf), self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == math.inf else repr(bound), float(cumulative)))
        return HistogramMetricFamily(DELAY_NAME, DELAY_DOC, buckets=buckets, sum_value=self.total)


class BreakerCollector:
    """A prometheus-client collector of one manager's breakers, read at scrape time.

    `registry.register(BreakerCollector(manager))` adds DESIGN.md's metrics (and a few more) to
    any registry. Nothing is counted per request: the breakers keep their counts anyway.
    """

    def __init__(self, manager: CircuitBreakerManager) -> None:
        self.manager = manager
        self.delay = PropagationDelay(manager)
        self._unsubscribe = manager.on_transition(self.delay)

    def close(self) -> None:
        """Stop listening to the manager's transitions."""
        self._unsubscribe()

    def describe(self) -> Iterable[Metric]:
        """The families without samples: lets a registry catch duplicate names cheaply."""
        yield from (_empty(family) for family in FAMILIES)
        yield HistogramMetricFamily(DELAY_NAME, DELAY_DOC)

    def collect(self) -> Iterable[Metric]:
        readings = read(self.manager)
        for family in FAMILIES:
            metric = _empty(family)
            for labels, value in readings[family.name]:
                metric.add_metric(labels, value)
            yield metric
        yield self.delay.family()


def text_format(collector: BreakerCollector) -> bytes:
    """The collector's families in Prometheus's text format (0.0.4), written directly.

    The same series and values as prometheus-client's `generate_latest` on a registry holding
    only the collector (the tests compare them), in a fraction of the time
    (benchmarks/metrics_cost.py): a scrape runs on the event loop, so its length is every
    request's wait while it runs.
    """
    manager = collector.manager
    views = manager.views()
    labels = [f'service="{_escape(view.service)}"' for view in views]
    out: list[str] = []
    add = out.append
    for family in FAMILIES:
        name = f"{family.name}_total" if family.kind == "counter" else family.name
        add(f"# HELP {name} {family.doc}\n# TYPE {name} {family.kind}\n")
        per_service = _PER_SERVICE.get(family.name)
        if per_service is not None:
            for label, view in zip(labels, views, strict=True):
                add(f"{name}{{{label}}} {_number(per_service(view))}\n")
        elif family.name == "gateway_breaker_state":
            for label, view in zip(labels, views, strict=True):
                add(_ONE_HOT.get(view.state, _NONE_HOT).replace("\0", label))
        elif family.name == "gateway_breaker_calls":
            for label, view in zip(labels, views, strict=True):
                calls = view.calls
                for outcome in OUTCOMES:
                    count = float(calls.get(outcome, 0))
                    add(f'{name}{{{label},outcome="{outcome}"}} {count!r}\n')
        else:
            keys = family.labels
            for values, value in _readings(manager, family.name, views):
                pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in zip(keys, values, strict=True))
                add(
                    f"{name}{{{pairs}}} {_number(value)}\n"
                    if pairs
                    else f"{name} {_number(value)}\n"
                )
    delay = collector.delay
    add(f"# HELP {DELAY_NAME} {DELAY_DOC}\n# TYPE {DELAY_NAME} histogram\n")
    cumulative = 0
    for bound, count in zip((*DELAY_BUCKETS, math.inf), delay.counts, strict=True):
        cumulative += count
        le = "+Inf" if bound == math.inf else repr(bound)
        add(f'{DELAY_NAME}_bucket{{le="{le}"}} {float(cumulative)!r}\n')
    add(f"{DELAY_NAME}_count {float(delay.observed)!r}\n{DELAY_NAME}_sum {delay.total!r}\n")
    return "".join(out).encode()


def _readings(manager: CircuitBreakerManager, name: str, views: list[BreakerView]) -> Reading:
    """The samples of one of the families `text_format` has no fast path for."""
    if name == "gateway_breaker_transitions":
        return _transitions(manager, [view.service for view in views])
    if name == "gateway_breaker_store_up":
        up = manager.store_up
        return [] if up is None else [((), 1.0 if up else 0.0)]
    if name == "gateway_breaker_store_errors":
        return [((op,), float(n)) for op, n in sorted(manager.store_errors.items())]
    if name == "gateway_breaker_store_rejected_values":
        return [((kind,), float(n)) for kind, n in sorted(manager.store_rejected.items())]
    if name == "gateway_breaker_instance_info":
        return [((manager.instance_id, manager.store_kind), 1.0)]
    raise AssertionError(f"no reading for {name}")


_PER_SERVICE: dict[str, Callable[[BreakerView], float]] = {
    "gateway_breaker_failure_rate": lambda v: (
        math.nan if v.failure_rate is None else v.failure_rate
    ),
    "gateway_breaker_window_calls": lambda v: float(v.window_calls),
    "gateway_breaker_window_failures": lambda v: float(v.window_failures),
    "gateway_breaker_health": lambda v: float(v.health),
    "gateway_breaker_rejection_probability": lambda v: float(v.rejection_probability),
    "gateway_breaker_consecutive_failures": lambda v: float(v.failure_count),
    "gateway_breaker_retry_after_seconds": lambda v: float(v.retry_after),
    "gateway_breaker_policy_overridden": lambda v: 1.0 if v.policy_overridden else 0.0,
}
"""Families with one sample per service: how to read it from the service's view."""

# One service's six state lines for each current state, "\0" standing for its label.
_ONE_HOT = {
    current: "".join(
        f'gateway_breaker_state{{\0,state="{state}"}} {1.0 if state == current else 0.0!r}\n'
        for state in STATES
    )
    for current in STATES
}
_NONE_HOT = "".join(f'gateway_breaker_state{{\0,state="{state}"}} 0.0\n' for state in STATES)


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def _number(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _empty(family: Family) -> GaugeMetricFamily | CounterMetricFamily:
    if family.kind == "counter":
        return CounterMetricFamily(family.name, family.doc, labels=family.labels)
    return GaugeMetricFamily(family.name, family.doc, labels=family.labels)


def multiprocess_dir() -> str | None:
    """The directory of prometheus-client's multiprocess mode, if this process is in it."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class WorkerExporter:
    """Copies one worker's readings into prometheus-client's multiprocess files.

    Custom collectors are not aggregated across processes, so each worker writes its readings
    into ordinary multiprocess-mode Counters and Gauges (only the values that changed since the
    last write), from a background task every `interval` seconds and right before it answers a
    scrape. Counters add up over all workers; gauges combine as their family's `workers` mode
    says. At shutdown the worker's live gauges are removed (`mark_process_dead`).
    """

    def __init__(
        self, manager: CircuitBreakerManager, interval: float = EXPORT_INTERVAL_SECONDS
    ) -> None:
        self.manager = manager
        self.interval = interval
        self._metrics: dict[str, Counter | Gauge] = {}
        self._written: dict[tuple[str, tuple[str, ...]], float] = {}
        self._task: asyncio.Task[None] | None = None
        self._delay = _delay_histogram()
        self._unsubscribe = manager.on_transition(self._on_transition)

    def _on_transition(self, event: TransitionEvent) -> None:
        delay = adoption_delay(self.manager, event)
        if delay is not None:
            self._delay.observe(delay)

    def write(self) -> None:
        """Write what changed since the last call (memory only: an mmap'd file per worker)."""
        written = self._written
        for name, samples in read(self.manager).items():
            if not samples:
                continue  # created with the first sample: an unlabelled gauge would show 0
            metric = self._metrics.get(name) or self._create(BY_NAME[name])
            for labels, value in samples:
                key = (name, labels)
                last = written.get(key)
                if last == value or (last is not None and math.isnan(last) and math.isnan(value)):
                    continue
                child = metric.labels(*labels) if labels else metric
                if isinstance(child, Counter):
                    # A count that went down (its breaker was recreated) starts over: add it all.
                    child.inc(value - last if last is not None and value >= last else value)
                else:
                    child.set(value)
                written[key] = value

    def _create(self, family: Family) -> Counter | Gauge:
        metric: Counter | Gauge
        if family.kind == "counter":
            metric = Counter(family.name, family.doc, family.labels, registry=None)
        else:
            metric = Gauge(
                family.name,
                family.doc,
                family.labels,
                registry=None,
                multiprocess_mode=family.workers,
            )
        self._metrics[family.name] = metric
        return metric

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="gateway-breaker-metrics")

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                self.write()
                failing = False
            except Exception:  # a bad reading must not end the exports; logged once per run
                if not failing:
                    logger.exception("Failed to export circuit breaker metrics")
                failing = True
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._unsubscribe()
        self.write()
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def _delay_histogram() -> Histogram:
    return Histogram(
        DELAY_NAME.removesuffix("_seconds"),
        DELAY_DOC,
        unit="seconds",
        buckets=DELAY_BUCKETS,
        registry=None,
    )


class MetricsApp:
    """ASGI app answering GET/HEAD with the registry in Prometheus (or OpenMetrics) text format.

    `watch_lifespan(receive)` wraps a lifespan `receive` so that startup starts the worker
    exporter and shutdown stops it (multiprocess mode only; otherwise it changes nothing).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        path: str = "/metrics",
        exporter: WorkerExporter | None = None,
        collector: BreakerCollector | None = None,
    ) -> None:
        self.registry = registry
        self.path = path
        self.exporter = exporter
        self.collector = collector
        """Set when the registry holds nothing else: plain-text scrapes use `text_format`."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan_only(scope, self.watch_lifespan(receive), send)
            return
        if scope["type"] != "http":
            return
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await _respond(
                send, 405, b"Method Not Allowed\n", b"text/plain", [(b"allow", b"GET, HEAD")]
            )
            return
        if self.exporter is not None:
            self.exporter.write()  # this worker's own readings are fresh; the others' within 1 s
        accept = ""
        for name, value in scope["headers"]:
            if name == b"accept":
                accept = value.decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        if self.collector is not None and content_type == TEXT_0_0_4:
            body = text_format(self.collector)
        else:
            body = encoder(self.registry)
        await _respond(
            send, 200, b"" if method == "HEAD" else body, content_type.encode(), [], len(body)
        )

    def watch_lifespan(self, receive: Receive) -> Receive:
        exporter = self.exporter
        if exporter is None:
            return receive

        async def receive_watching() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                exporter.start()
            elif message["type"] == "lifespan.shutdown":
                await exporter.stop()
            return message

        return receive_watching


async def _lifespan_only(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer the lifespan protocol when the metrics app is served on its own."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    length: int | None = None,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body) if length is None else length).encode()),
                (b"cache-control", b"no-store"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def metrics_app(
    manager: CircuitBreakerManager,
    registry: CollectorRegistry | None = None,
    *,
    path: str = "/metrics",
) -> MetricsApp:
    """An ASGI app serving `manager`'s metrics (and whatever else `registry` holds).

    `registry=None`: a registry of its own. In multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`
    set) it serves the sum over all workers' files, which this worker keeps current through a
    `WorkerExporter` (started by the lifespan). Otherwise a `BreakerCollector` is registered on
    the registry (yours, when given: your own metrics are served beside the breakers').
    """
    directory = multiprocess_dir()
    if directory is not None:
        from prometheus_client import multiprocess

        if registry is None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        return MetricsApp(registry, path=path, exporter=WorkerExporter(manager))
    collector = BreakerCollector(manager)
    if registry is not None:
        registry.register(collector)
        return MetricsApp(registry, path=path)
    registry = CollectorRegistry()
    registry.register(collector)
    return MetricsApp(registry, path=path, collector=collector)


__all__ = [
    "FAMILIES",
    "OUTCOMES",
    "STATES",
    "BreakerCollector",
    "Family",
    "MetricsApp",
    "PropagationDelay",
    "WorkerExporter",
    "metrics_app",
    "read",
    "text_format",
]
