"""Prometheus metrics on a per-app registry: fed by the request events, completed at scrape time.

Names follow production-stack's router where it has one (`vllm:num_requests_running`,
`vllm:current_qps`, `vllm:request_latency_seconds`, `vllm:input_tokens_total`...), so its
Grafana dashboards keep working; the router's own are `router_*`. docs/observability.md lists
them all with their labels.

Cost per request (ARCHITECTURE.md's budget): counters and histograms are plain floats in dicts
keyed by label tuples (a histogram observation is one bisect and two additions), turned into
Prometheus families only when `/metrics` is scraped; prometheus_client's own objects (a lock
and several calls per increment) are used only under `--workers`, where their per-process
files are how workers add up. In-flight counts and the sliding windows behind the `vllm:`
gauges are plain integers and floats per (server, model); the gauges themselves, the breaker
states and health are computed when `/metrics` is scraped. Token counts come from the `usage`
object at the end of the response body (`flow.tail`, the last bytes only; SSE chunks are never
parsed one by one).

Labels are bounded: `server` is a backend URL from the pool (`""` before routing), `model` a
model some backend serves (`""` otherwise), `endpoint` a route, `status` an HTTP status.
Series of a backend that left the pool are dropped once it has been gone for `retention`
seconds with nothing in flight, so a fleet whose pods come and go does not grow the
exposition for ever.
"""

from __future__ import annotations

import json
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import accumulate
from typing import Any, Protocol

import aiohttp
from aiohttp import ClientRequest
from aiohttp.client_proto import ResponseHandler
from aiohttp.tracing import Trace
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from router.backends.pool import Backend, BackendPool
from router.flow import Outcome, RequestFlow, Usage
from router.backends.breaker import BreakerState
from router.backends.tracker import HealthTracker
from router.stats.requests import RequestStats
from router.stats.window import Window
from router.proxy.timeouts import HeadWatchingConnector

__all__ = ["Metrics", "Usage", "find_usage", "usage_of", "error_kind"]

Clock = Callable[[], float]

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
)
PS_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""production-stack's buckets for `vllm:request_latency_seconds`."""
TPOT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5,
)
CONNECT_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)
BREAKER_VALUES = {
    BreakerState.CLOSED.value: 0.0,
    BreakerState.HALF_OPEN.value: 1.0,
    BreakerState.OPEN.value: 2.0,
}
"""`router_breaker_state`: 0 closed, 1 half-open, 2 open."""


# --- usage: token counts from the end of the body ---------------------------------------------


_USAGE_KEY = b'"usage"'
_USAGE_SPAN = 1024
"""Bytes after the key that the object must fit in (vLLM's, with details, is ~250)."""
_USAGE_TRIES = 3
"""`"usage": null` keys skipped (earlier stream events) before giving up."""
_decoder = json.JSONDecoder()


def _count(usage: dict[str, object], *keys: str) -> int | None:
    for key in keys:
        value = usage.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def find_usage(tail: bytes) -> Usage | None:
    """The token counts of the last `"usage": {...}` object in `tail`, or None.

    `tail` is the end of a response body: a JSON answer (usage near its end), or an SSE stream
    whose last event before `[DONE]` carries usage (`stream_options.include_usage`, or
    `stream_include_usage` for transcriptions; with continuous usage every chunk has one and
    the last wins). Chat/completions name the counts `prompt_tokens`/`completion_tokens`, the
    Responses API `input_tokens`/`output_tokens`. Never raises.
    """
    end = len(tail)
    for _ in range(_USAGE_TRIES):
        at = tail.rfind(_USAGE_KEY, 0, end)
        if at < 0:
            return None
        end = at
        text = tail[at + len(_USAGE_KEY): at + len(_USAGE_KEY) + _USAGE_SPAN].decode(
            "utf-8", "replace")
        colon = text.find(":")
        if colon < 0 or text[:colon].strip():
            continue  # the word inside a string, not a key
        start = colon + 1
        while start < len(text) and text[start] in " \t\r\n":
            start += 1
        try:
            value, _ = _decoder.raw_decode(text, start)
        except ValueError:
            continue
        if not isinstance(value, dict):
            continue  # `"usage": null` in an earlier event of the stream
        prompt = _count(value, "prompt_tokens", "input_tokens")
        completion = _count(value, "completion_tokens", "output_tokens")
        if prompt is None and completion is None:
            return None  # e.g. a transcription's {"type": "duration", "seconds": 3}
        return Usage(prompt, completion)
    return None


def usage_of(flow: RequestFlow) -> Usage | None:
    """The usage of a completed 2xx answer, from `flow.tail`; None when it has none."""
    status = flow.status
    if status is None or not 200 <= status < 300:
        return None
    if flow.parsed_usage is None:
        flow.parsed_usage = (find_usage(flow.tail) if flow.tail else None,)
    return flow.parsed_usage[0]


def error_kind(flow: RequestFlow) -> str | None:
    """`vllm:request_errors_total`'s `error_type`: the outcome when it is not `ok`, else
    `http_4xx`/`http_5xx` for an error status the backend sent; None for a success."""
    outcome = flow.outcome
    if outcome is Outcome.OK:
        status = flow.status
        if status is None or status < 400:
            return None
        return "http_5xx" if status >= 500 else "http_4xx"
    return "unknown" if outcome is None else outcome.value


# --- counter and histogram families ------------------------------------------------------------

Labels = tuple[str, ...]


class Family(Protocol):
    """A labelled counter or histogram: what the subscriber records into."""

    def record(self, labels: Labels, value: float = 1.0) -> None: ...
    def servers(self) -> set[str]: ...
    def forget(self, servers: set[str]) -> None: ...


class _Series:
    """Which label is `server` (None when there is none), for `servers` and `forget`."""

    def __init__(self, server_index: int | None) -> None:
        self.server_index = server_index
        self.series: dict[Labels, Any] = {}

    def servers(self) -> set[str]:
        index = self.server_index
        return set() if index is None else {labels[index] for labels in self.series}

    def gone(self, servers: set[str]) -> list[Labels]:
        """Drop the series of these servers; their label sets."""
        index = self.server_index
        if index is None:
            return []
        dropped = [labels for labels in self.series if labels[index] in servers]
        for labels in dropped:
            del self.series[labels]
        return dropped


class PlainCounter(_Series):
    """A counter kept as plain floats and exposed at scrape time: an increment is a dict
    update (a prometheus_client `inc` takes a lock and several calls)."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str],
                 server_index: int | None = 0) -> None:
        super().__init__(server_index)
        self.name, self.documentation, self.labels = name, documentation, list(labels)
        self.series: dict[Labels, float] = {}

    def record(self, labels: Labels, value: float = 1.0) -> None:
        series = self.series
        series[labels] = series.get(labels, 0.0) + value

    def forget(self, servers: set[str]) -> None:
        self.gone(servers)

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, value in self.series.items():
            family.add_metric(labels, value)
        return family


class PlainHistogram(_Series):
    """A histogram kept as plain per-bucket counts (the `+Inf` bucket, then the sum, last) and
    made cumulative at scrape time: an observation is a bisect and two additions."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str],
                 buckets: Sequence[float], server_index: int | None = 0) -> None:
        super().__init__(server_index)
        self.name, self.documentation, self.labels = name, documentation, list(labels)
        self.bounds = tuple(float(bound) for bound in buckets)
        self.series: dict[Labels, list[float]] = {}

    def record(self, labels: Labels, value: float = 1.0) -> None:
        counts = self.series.get(labels)
        if counts is None:
            counts = self.series[labels] = [0.0] * (len(self.bounds) + 2)
        counts[bisect_left(self.bounds, value)] += 1  # le: value <= bound
        counts[-1] += value

    def forget(self, servers: set[str]) -> None:
        self.gone(servers)

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        edges = [floatToGoString(bound) for bound in self.bounds]  # type: ignore[no-untyped-call]
        edges.append("+Inf")
        for labels, counts in self.series.items():
            cumulative = list(accumulate(counts[:-1]))
            family.add_metric(labels, list(zip(edges, cumulative)), sum_value=counts[-1])
        return family


class _PlainCollector(Collector):
    def __init__(self, families: Iterable[PlainCounter | PlainHistogram]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return (family.collect() for family in self._families)


class SharedFamily(_Series):
    """A prometheus_client counter or histogram, for `--workers`: its values live in
    prometheus_client's per-process files, which a scrape of any worker adds up."""

    def __init__(self, metric: Counter | Histogram, server_index: int | None = 0) -> None:
        super().__init__(server_index)
        self._metric = metric
        self._record = "inc" if isinstance(metric, Counter) else "observe"
        self.series: dict[Labels, Callable[[float], None]] = {}

    def record(self, labels: Labels, value: float = 1.0) -> None:
        record = self.series.get(labels)
        if record is None:
            record = self.series[labels] = getattr(self._metric.labels(*labels), self._record)
        record(value)

    def forget(self, servers: set[str]) -> None:
        for labels in self.gone(servers):
            self._metric.remove(*labels)


class Families:
    """Makes the subscriber's families: plain ones in one process, prometheus_client's in
    multiprocess mode (`--workers`)."""

    def __init__(self, registry: CollectorRegistry, multiprocess: bool) -> None:
        self.registry = registry
        self.multiprocess = multiprocess
        self.plain: list[PlainCounter | PlainHistogram] = []

    def counter(self, name: str, documentation: str, labels: Sequence[str],
                server_index: int | None = 0) -> Family:
        if self.multiprocess:
            return SharedFamily(Counter(name, documentation, labels, registry=self.registry),
                                server_index)
        family = PlainCounter(name, documentation, labels, server_index)
        self.plain.append(family)
        return family

    def histogram(self, name: str, documentation: str, labels: Sequence[str],
                  buckets: Sequence[float], server_index: int | None = 0) -> Family:
        if self.multiprocess:
            return SharedFamily(Histogram(name, documentation, labels, buckets=buckets,
                                          registry=self.registry), server_index)
        family = PlainHistogram(name, documentation, labels, buckets, server_index)
        self.plain.append(family)
        return family

    def register(self) -> None:
        """Expose the plain families (call once, after making them all)."""
        if self.plain:
            self.registry.register(_PlainCollector(self.plain))


# --- per (server, model) state ----------------------------------------------------------------


class _Slot:
    """One (server, model): requests in flight and a window of one-second buckets for the
    `vllm:` averages."""

    __slots__ = ("server", "model", "labels", "prefill", "decoding", "recent")

    def __init__(self, server: str, model: str, window: int) -> None:
        self.server = server
        self.model = model
        self.labels = (server, model)
        self.prefill = 0
        """In flight, no body byte from the backend yet."""
        self.decoding = 0
        """In flight, the answer is coming."""
        self.recent = Window(window)

    def averages(self, now: float) -> tuple[float, float | None, float | None]:
        """QPS, mean latency and mean inter-token latency over the window."""
        total = self.recent.totals(now)
        return (
            total.started / self.recent.seconds,
            total.latency_sum / total.completed if total.completed else None,
            total.itl_sum / total.itl_count if total.itl_count else None,
        )


# --- scrape-time collectors -------------------------------------------------------------------


class BackendCollector(Collector):
    """Per-backend gauges computed from the request stats when scraped."""

    def __init__(self, stats: RequestStats, pool: BackendPool) -> None:
        self._stats = stats
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        labels = ["backend", "url"]
        in_flight = GaugeMetricFamily(
            "router_backend_in_flight_requests",
            "Requests being served by the backend.",
            labels=labels,
        )
        qps = GaugeMetricFamily(
            "router_backend_qps", "Requests per second over the stats window.", labels=labels
        )
        ttft = GaugeMetricFamily(
            "router_backend_avg_ttft_seconds",
            "Mean time to first token over the stats window.",
            labels=labels,
        )
        latency = GaugeMetricFamily(
            "router_backend_avg_latency_seconds",
            "Mean request duration over the stats window.",
            labels=labels,
        )
        for backend in self._pool.backends:
            snapshot = self._stats.for_backend(backend.id).snapshot()
            values = [backend.id, backend.url]
            in_flight.add_metric(values, snapshot.in_flight)
            qps.add_metric(values, snapshot.qps)
            if snapshot.avg_ttft is not None:
                ttft.add_metric(values, snapshot.avg_ttft)
            if snapshot.avg_latency is not None:
                latency.add_metric(values, snapshot.avg_latency)
        yield from (in_flight, qps, ttft, latency)


class _FleetCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.collect_fleet()


class _TimedConnector(HeadWatchingConnector):
    """Times `_create_connection` (aiohttp's hook for opening a new connection; stable through
    3.x). Should aiohttp rename it, the metric goes missing (tests/test_metrics.py notices);
    requests are unaffected."""

    def __init__(self, observe: Callable[[str, float], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._observe = observe

    async def _create_connection(
        self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> ResponseHandler:
        started = time.perf_counter()
        protocol = await super()._create_connection(req, traces, timeout)
        self._observe(str(req.url), time.perf_counter() - started)
        return protocol


# --- the subscriber ---------------------------------------------------------------------------


class Metrics:
    """Subscriber: the router's Prometheus metrics; owns the app's registry.

    `health` gives the breaker states and `vllm:healthy_pods_total` (without it every backend
    counts as healthy and all breakers read closed). The proxy's session opens its connections
    through `connector()`, for `router_upstream_connect_seconds`.
    """

    def __init__(
        self,
        stats: RequestStats,
        pool: BackendPool,
        health: HealthTracker | None = None,
        *,
        clock: Clock = time.monotonic,
        retention: float = 300.0,
        multiprocess: bool = False,
    ) -> None:
        self.pool = pool
        self.health = health
        self.window = max(1, math.ceil(stats.window))
        """Seconds of history behind `vllm:current_qps`, `avg_latency` and `avg_itl`."""
        self.retention = retention
        self._clock = clock
        self._slots: dict[tuple[str, str], _Slot] = {}
        self._absent: dict[str, float] = {}
        """Server -> when it was first seen missing from the pool."""
        registry = self.registry = CollectorRegistry(auto_describe=True)
        families = Families(registry, multiprocess)
        sm = ["server", "model"]
        route = ["server", "model", "endpoint", "streaming"]

        # production-stack's names (vllm_router/services/metrics_service).
        self._incoming = families.counter(
            "vllm:num_incoming_requests",
            "Requests received, refused ones included (server is empty before routing).",
            sm,
        )
        self._input_tokens = families.counter(
            "vllm:input_tokens_total", "Prompt tokens, from the answers' usage.",
            sm,
        )
        self._output_tokens = families.counter(
            "vllm:output_tokens_total", "Generated tokens, from the answers' usage.",
            sm,
        )
        self._errors = families.counter(
            "vllm:request_errors_total",
            "Requests that did not end well, by error type: the outcome (backend_error, "
            "timeout, client_disconnected, rejected, cancelled, router_error) or http_4xx/"
            "http_5xx for an error status from the backend.",
            ["server", "model", "error_type"],
        )
        self._latency = families.histogram(
            "vllm:request_latency_seconds",
            "End-to-end request latency observed at the router.",
            ["server", "model", "status"], PS_LATENCY_BUCKETS,
        )

        # The router's own.
        self._requests = families.counter(
            "router_requests",
            "Requests by endpoint, status and outcome.",
            ["endpoint", "status", "outcome"], server_index=None,
        )
        self._duration = families.histogram(
            "router_request_duration_seconds",
            "Time from arrival to the end of the answer.",
            route, LATENCY_BUCKETS,
        )
        self._ttft = families.histogram(
            "router_time_to_first_token_seconds",
            "Time from arrival to the backend's first body byte.",
            route, LATENCY_BUCKETS,
        )
        self._ttfb = families.histogram(
            "router_time_to_first_byte_seconds",
            "Time from arrival to the backend's status and headers.",
            route, LATENCY_BUCKETS,
        )
        self._tpot = families.histogram(
            "router_time_per_output_token_seconds",
            "Streamed answers with usage: (duration - TTFT) / (completion tokens - 1).",
            sm, TPOT_BUCKETS,
        )
        self._connect = families.histogram(
            "router_upstream_connect_seconds",
            "Time to open a new connection to a backend (DNS, TCP, TLS); reused pooled "
            "connections are not counted.",
            ["server"], CONNECT_BUCKETS,
        )
        self._retries = families.counter(
            "router_retries",
            "Attempts that failed before the answer started and were retried on another "
            "backend; server is the backend that failed, reason the attempt's outcome.",
            ["server", "model", "reason"],
        )
        self._budget_refusals = families.counter(
            "router_retry_budget_refusals",
            "Answers of 502/503/504 that could have been retried on another backend but went "
            "to the client because the retry budget (--retry-budget-percent) was spent.",
            ["server", "model"],
        )
        self._unauthorized = families.counter(
            "router_unauthorized_requests",
            "Requests refused for want of a valid API key (401).", [], server_index=None,
        )
        self._all = (
            self._incoming, self._input_tokens, self._output_tokens, self._errors,
            self._latency, self._duration, self._ttft, self._ttfb, self._tpot, self._connect,
            self._retries, self._budget_refusals,
        )
        families.register()
        registry.register(BackendCollector(stats, pool))
        registry.register(_FleetCollector(self))

    # -- labels --

    def _model(self, flow: RequestFlow, backend: Backend | None) -> str:
        """The model label: the flow's model when a backend of the pool serves it, else ""."""
        model = flow.model
        if model is None:
            return ""
        if backend is not None:
            return model if model in backend.models else ""
        return model if self.pool.candidates(model) else ""

    def _slot(self, server: str, model: str) -> _Slot:
        key = (server, model)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(server, model, self.window)
            for counter in (self._incoming, self._input_tokens, self._output_tokens):
                counter.record(key, 0)  # a known pair's counters start at 0, not absent
        return slot

    # -- events --

    def on_new(self, flow: RequestFlow) -> None:
        backend = flow.backend
        model = self._model(flow, backend)
        if backend is None:
            self._incoming.record(("", model))
            return
        slot = self._slot(backend.url, model)
        self._incoming.record(slot.labels)
        slot.prefill += 1
        slot.recent.bucket(self._clock()).started += 1

    def on_retry(self, flow: RequestFlow) -> None:
        attempt = flow.attempts[-1]
        failed = attempt.backend
        model = self._model(flow, failed)
        self._retries.record((failed.url, model, attempt.outcome.value))
        self._slot(failed.url, model).prefill -= 1
        backend = flow.backend
        if backend is not None:
            slot = self._slot(backend.url, self._model(flow, backend))
            slot.prefill += 1
            slot.recent.bucket(self._clock()).started += 1

    def on_response(self, flow: RequestFlow) -> None:
        backend = flow.backend
        if backend is None:
            return
        server, model = backend.url, self._model(flow, backend)
        slot = self._slot(server, model)
        slot.prefill -= 1
        slot.decoding += 1
        labels = (server, model, flow.endpoint, "true" if flow.stream else "false")
        t_start = flow.t_start
        if flow.t_first_byte is not None:
            self._ttft.record(labels, flow.t_first_byte - t_start)
        if flow.t_headers is not None:
            self._ttfb.record(labels, flow.t_headers - t_start)

    def on_complete(self, flow: RequestFlow) -> None:
        backend = flow.backend
        model = self._model(flow, backend)
        server = "" if backend is None else backend.url
        status = "none" if flow.status is None else str(flow.status)
        outcome = flow.outcome
        self._requests.record(
            (flow.endpoint, status, "unknown" if outcome is None else outcome.value))
        kind = error_kind(flow)
        if kind is not None:
            self._errors.record((server, model, kind))
        if flow.retry_refused:
            self._budget_refusals.record((server, model))
        duration = flow.duration
        route = (server, model, flow.endpoint, "true" if flow.stream else "false")
        if duration is not None:
            self._duration.record(route, duration)
            self._latency.record((server, model, status), duration)
        if backend is None:
            return
        slot = self._slot(server, model)
        if flow.t_first_byte is None:
            slot.prefill -= 1
            if flow.t_headers is not None:  # headers, then no body: TTFB was not seen yet
                self._ttfb.record(route, flow.t_headers - flow.t_start)
        else:
            slot.decoding -= 1
        bucket = slot.recent.bucket(self._clock())
        bucket.completed += 1
        bucket.latency_sum += duration or 0.0
        usage = usage_of(flow)
        if usage is None:
            return
        if usage.prompt_tokens:
            self._input_tokens.record(slot.labels, usage.prompt_tokens)
        completion = usage.completion_tokens
        if completion:
            self._output_tokens.record(slot.labels, completion)
            ttft = flow.ttft
            # Only a stream shows when its tokens came; a JSON answer's first byte is its end.
            if flow.stream and completion > 1 and ttft is not None and duration is not None:
                itl = (duration - ttft) / (completion - 1)
                bucket.itl_sum += itl
                bucket.itl_count += 1
                self._tpot.record(slot.labels, itl)

    # -- upstream connect time --

    def connector(self, **kwargs: Any) -> aiohttp.TCPConnector:
        """A `GuardedConnector(**kwargs)` (no stray answers from the pool) for the proxy's
        session, that times every new connection (DNS, TCP, TLS) into
        `router_upstream_connect_seconds`. Nothing runs per request for the timing:
        a request on a pooled connection costs nothing (an `aiohttp.TraceConfig` would cost
        ~5-10 µs on every request for the same figure). It also watches response heads
        (`router.proxy.timeouts.HeadWatchingConnector`)."""
        return _TimedConnector(self._observe_connect, **kwargs)

    def _observe_connect(self, url: str, seconds: float) -> None:
        server = self.server_of(url)
        if server is not None:
            self._connect.record((server,), seconds)

    def server_of(self, url: str) -> str | None:
        """The pool backend whose base URL `url` is under (the longest), or None."""
        found: str | None = None
        for backend in self.pool.backends:
            base = backend.url
            if (url == base or url.startswith(base + "/") or url.startswith(base + "?")) and (
                    found is None or len(base) > len(found)):
                found = base
        return found

    # -- scrape time --

    def collect_fleet(self) -> Iterator[Metric]:
        """The per-(server, model) gauges, breaker states and health, computed now."""
        now = self._clock()
        sm = ["server", "model"]
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Requests in flight through the router.", labels=sm)
        prefill = GaugeMetricFamily(
            "vllm:num_prefill_requests",
            "Requests in flight without a body byte from the backend yet.", labels=sm)
        decoding = GaugeMetricFamily(
            "vllm:num_decoding_requests",
            "Requests in flight whose answer is coming.", labels=sm)
        qps = GaugeMetricFamily(
            "vllm:current_qps",
            f"Requests sent to the server per second over the last {self.window} s "
            "(retries included).", labels=sm)
        latency = GaugeMetricFamily(
            "vllm:avg_latency",
            f"Mean end-to-end latency (seconds) over the last {self.window} s.", labels=sm)
        itl = GaugeMetricFamily(
            "vllm:avg_itl",
            f"Mean inter-token latency (seconds) over the last {self.window} s, estimated from "
            "streamed answers with usage; absent without any.", labels=sm)
        healthy = GaugeMetricFamily(
            "vllm:healthy_pods_total",
            "1 when the backend takes requests (probe and breaker agree), else 0; one series "
            "per model it serves.", labels=sm)
        breaker = GaugeMetricFamily(
            "router_breaker_state",
            "Circuit breaker per backend: 0 closed, 1 half-open, 2 open.",
            labels=["server", "backend"])
        capped = GaugeMetricFamily(
            "router_ejection_cap_backends",
            "Backends of the model routed to although their breaker is open, because the "
            "breakers hold out more than --max-ejection-percent of its backends.",
            labels=["model"])

        pairs: dict[tuple[str, str], _Slot | None] = {}
        for backend in self.pool.backends:
            available, state = self._health_of(backend)
            breaker.add_metric([backend.url, backend.id], BREAKER_VALUES.get(state, 0.0))
            for model in backend.models:
                healthy.add_metric([backend.url, model], 1.0 if available else 0.0)
                pairs[backend.url, model] = None
        if self.health is not None:
            for model in self.pool.models():
                kept = self.health.kept_by_cap(self.pool.candidates(model))
                capped.add_metric([model], float(len(kept)))
        pairs.update(self._slots)
        for (server, model), slot in pairs.items():
            labels = [server, model]
            if slot is None:
                for family in (running, prefill, decoding, qps):
                    family.add_metric(labels, 0.0)
                continue
            running.add_metric(labels, slot.prefill + slot.decoding)
            prefill.add_metric(labels, slot.prefill)
            decoding.add_metric(labels, slot.decoding)
            rate, avg_latency, avg_itl = slot.averages(now)
            qps.add_metric(labels, rate)
            if avg_latency is not None:
                latency.add_metric(labels, avg_latency)
            if avg_itl is not None:
                itl.add_metric(labels, avg_itl)
        yield from (running, prefill, decoding, qps, latency, itl, healthy, breaker, capped)

    def _health_of(self, backend: Backend) -> tuple[bool, str]:
        if self.health is None:
            return True, BreakerState.CLOSED.value
        state = self.health.state(backend.id)
        return state.available, state.breaker

    def _prune(self, now: float) -> None:
        """Forget servers gone from the pool for `retention` seconds with nothing in flight."""
        current = {backend.url for backend in self.pool.backends}
        known = {server for server, _ in self._slots} | self._connect.servers()
        known.discard("")
        for server in list(self._absent):
            if server in current or server not in known:
                del self._absent[server]
        gone: set[str] = set()
        for server in known - current:
            since = self._absent.setdefault(server, now)
            if now - since >= self.retention and not any(
                slot.prefill or slot.decoding
                for (slot_server, _), slot in self._slots.items() if slot_server == server
            ):
                gone.add(server)
        if not gone:
            return
        for children in self._all:
            children.forget(gone)
        for key in [key for key in self._slots if key[0] in gone]:
            del self._slots[key]
        for server in gone:
            del self._absent[server]

    def in_flight(self, server: str | None = None) -> int:
        """Requests in flight (on `server`, or on all), as the router counts them."""
        return sum(
            slot.prefill + slot.decoding for slot in self._slots.values()
            if server is None or slot.server == server
        )

    def servers(self) -> Iterable[str]:
        """Every server with series in the exposition (for tests and `/engines`)."""
        return {server for server, _ in self._slots} | self._connect.servers()

    def count_unauthorized(self) -> None:
        self._unauthorized.record(())

    def render(self) -> bytes:
        """The exposition; series of servers gone for `retention` are dropped first."""
        self._prune(self._clock())
        return generate_latest(self.registry)
