"""Prometheus metrics on a per-app registry: fed by the request events, completed at scrape time.

Names follow production-stack's router where it has one (`vllm:num_requests_running`,
`vllm:current_qps`, `vllm:request_latency_seconds`, `vllm:input_tokens_total`...), so its
Grafana dashboards keep working; the router's own are `router_*`. docs/observability.md lists
them all with their labels.

Cost per request (ARCHITECTURE.md's budget): counters and histograms are plain floats in dicts
keyed by label tuples (a histogram observation is one bisect and two additions), turned into
Prometheus families only when `/metrics` is scraped; prometheus_client's own objects (a lock
and several calls per increment) are used only under `--workers`, where their per-process
files are how workers add up (both in `router.observe.families`). In-flight counts and the
sliding windows behind the `vllm:` gauges are plain integers and floats per (server, model);
the gauges themselves, the breaker states and health are computed when `/metrics` is scraped
(`router.observe.gauges`). Token counts come from the `usage` object at the end of the
response body (`router.observe.usage`: `flow.tail`, the last bytes only; SSE chunks are never
parsed one by one).

Labels are bounded: `server` is a backend URL from the pool (`""` before routing), `model` a
model some backend serves (`""` otherwise), `endpoint` a route, `status` an HTTP status.
Series of a backend that left the pool are dropped once it has been gone for `retention`
seconds with nothing in flight, so a fleet whose pods come and go does not grow the
exposition for ever.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from router.backends.pool import Backend, BackendPool
from router.backends.tracker import HealthTracker
from router.flow import Outcome, RequestFlow
from router.observe.connect_timing import TimedConnector
from router.observe.families import Families
from router.observe.gauges import BackendCollector, EngineGauges, FleetGauges, Slot
from router.observe.process_usage import ProcessUsage
from router.observe.usage import usage_of
from router.stats.engine import EngineStats
from router.stats.requests import RequestStats

__all__ = ["Metrics", "error_kind"]

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


# --- the subscriber ---------------------------------------------------------------------------


class Metrics:
    """Subscriber: the router's Prometheus metrics; owns the app's registry.

    `health` gives the breaker states and `vllm:healthy_pods_total` (without it every backend
    counts as healthy and all breakers read closed); `engine_stats`, the engines' own figures
    (`vllm:num_requests_waiting`, the prefix cache). The proxy's session opens its
    connections through `connector()`, for `router_upstream_connect_seconds`. Call
    `sample_process()` before a scrape for the `router_*_usage_percent` gauges.
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
        engine_stats: EngineStats | None = None,
    ) -> None:
        self.pool = pool
        self.health = health
        self.window = max(1, math.ceil(stats.window))
        """Seconds of history behind `vllm:current_qps`, `avg_latency` and `avg_itl`."""
        self.retention = retention
        self._clock = clock
        self._slots: dict[tuple[str, str], Slot] = {}
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
        self._fleet = FleetGauges(pool, health, self._slots, self.window, clock)
        self.process = ProcessUsage()
        self._gauges: list[Collector] = [self._fleet, self.process]
        if engine_stats is not None:
            self._gauges.append(EngineGauges(pool, engine_stats))
        for collector in self._gauges:
            registry.register(collector)

    # -- labels --

    def _model(self, flow: RequestFlow, backend: Backend | None) -> str:
        """The model label: the flow's model when a backend of the pool serves it, else ""."""
        model = flow.model
        if model is None:
            return ""
        if backend is not None:
            return model if model in backend.models else ""
        return model if self.pool.candidates(model) else ""

    def _slot(self, server: str, model: str) -> Slot:
        key = (server, model)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = Slot(server, model, self.window)
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
        if flow.t_first_byte is not None and duration is not None:
            bucket.decode_sum += max(0.0, duration - (flow.t_first_byte - flow.t_start))
            bucket.decode_count += 1
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
        return TimedConnector(self._observe_connect, **kwargs)

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

    def add_gauges(self, collector: Collector) -> None:
        """More gauges computed at scrape time (published by each worker like the rest)."""
        self._gauges.append(collector)
        self.registry.register(collector)

    def collect_fleet(self) -> Iterator[Metric]:
        """Every gauge, computed now: per (server, model), breaker states and health, the
        engines' own figures and the process's use of CPU, memory and disk."""
        return itertools.chain.from_iterable(gauges.collect() for gauges in self._gauges)

    async def sample_process(self) -> None:
        """Read the process's CPU, memory and disk use, in a thread (`/proc` and the file
        system may block)."""
        await asyncio.to_thread(self.process.sample)

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
