"""The gauges of `/metrics`, computed when it is scraped, not on every request.

Per (server, model), a `Slot` keeps the requests in flight and a window of one-second buckets
that the metrics subscriber updates on each event; `FleetGauges` turns the slots, the pool and
the health tracker into production-stack's `vllm:` gauges (in flight, QPS, averages, healthy
pods) and the router's breaker and ejection-cap gauges. `BackendCollector` gives the
per-backend `router_backend_*` gauges from the request stats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from router.backends.breaker import BreakerState
from router.backends.pool import Backend, BackendPool
from router.backends.tracker import HealthTracker
from router.stats.engine import EngineStats
from router.stats.requests import RequestStats
from router.stats.window import Window

__all__ = ["BREAKER_VALUES", "BackendCollector", "EngineGauges", "FleetGauges", "Slot"]

Clock = Callable[[], float]

BREAKER_VALUES = {
    BreakerState.CLOSED.value: 0.0,
    BreakerState.HALF_OPEN.value: 1.0,
    BreakerState.OPEN.value: 2.0,
}
"""`router_breaker_state`: 0 closed, 1 half-open, 2 open."""


class Slot:
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

    def averages(self, now: float) -> tuple[float, float | None, float | None, float | None]:
        """QPS, mean latency, mean inter-token latency and mean decoding time (first body
        byte to the end) over the window."""
        total = self.recent.totals(now)
        return (
            total.started / self.recent.seconds,
            total.latency_sum / total.completed if total.completed else None,
            total.itl_sum / total.itl_count if total.itl_count else None,
            total.decode_sum / total.decode_count if total.decode_count else None,
        )


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


class FleetGauges(Collector):
    """The per-(server, model) gauges, breaker states and health, computed at scrape time.

    `slots` is the subscriber's own dict (shared, not copied). Without `health` every backend
    counts as healthy and all breakers read closed."""

    def __init__(self, pool: BackendPool, health: HealthTracker | None,
                 slots: dict[tuple[str, str], Slot], window: int, clock: Clock) -> None:
        self.pool = pool
        self.health = health
        self.window = window
        self._slots = slots
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
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
        decoding_length = GaugeMetricFamily(
            "vllm:avg_decoding_length",
            f"Mean seconds from the backend's first body byte to the end of the answer over "
            f"the last {self.window} s; absent without any.", labels=sm)
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

        pairs: dict[tuple[str, str], Slot | None] = {}
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
            rate, avg_latency, avg_itl, avg_decoding = slot.averages(now)
            qps.add_metric(labels, rate)
            if avg_latency is not None:
                latency.add_metric(labels, avg_latency)
            if avg_itl is not None:
                itl.add_metric(labels, avg_itl)
            if avg_decoding is not None:
                decoding_length.add_metric(labels, avg_decoding)
        yield from (running, prefill, decoding, qps, latency, itl, decoding_length, healthy,
                    breaker, capped)

    def _health_of(self, backend: Backend) -> tuple[bool, str]:
        if self.health is None:
            return True, BreakerState.CLOSED.value
        state = self.health.state(backend.id)
        return state.available, state.breaker


class EngineGauges(Collector):
    """What the engines said about themselves at their last scrape (`router.stats.engine`),
    under production-stack's names, one series per engine (`server`, its URL): the figures
    are the engine's, whatever model the requests were for. An engine not scraped yet, or
    an external provider, has no series."""

    def __init__(self, pool: BackendPool, engine_stats: EngineStats) -> None:
        self.pool = pool
        self.engine_stats = engine_stats

    def collect(self) -> Iterator[Metric]:
        server = ["server"]
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting",
            "Requests waiting in the engine's queue, from its last /metrics scrape.",
            labels=server)
        swapped = GaugeMetricFamily(
            "vllm:num_requests_swapped",
            "Requests swapped out to CPU, from the engine's last scrape (0 for an engine that "
            "does not report it: vLLM V1 does not swap).", labels=server)
        hit_rate = GaugeMetricFamily(
            "vllm:gpu_prefix_cache_hit_rate",
            "Share of prefix-cache queries that hit, since the engine started (its own "
            "gauge where it exports one, else hits / queries; 0 before any query).",
            labels=server)
        hits = GaugeMetricFamily(
            "vllm:gpu_prefix_cache_hits_total",
            "Prefix-cache hits (tokens) the engine counted since it started.", labels=server)
        queries = GaugeMetricFamily(
            "vllm:gpu_prefix_cache_queries_total",
            "Prefix-cache queries (tokens) the engine counted since it started.",
            labels=server)
        for backend in self.pool.backends:
            snapshot = self.engine_stats.get(backend.id)
            if snapshot is None:
                continue
            labels = [backend.url]
            if snapshot.waiting is not None:
                waiting.add_metric(labels, snapshot.waiting)
            swapped.add_metric(labels, snapshot.swapped or 0.0)
            rate = snapshot.prefix_cache_hit_rate
            hit, asked = snapshot.prefix_cache_hits, snapshot.prefix_cache_queries
            if rate is None and hit is not None and asked is not None:
                rate = hit / asked if asked else 0.0  # no query yet: no hit either
            if rate is not None:
                hit_rate.add_metric(labels, rate)
            if snapshot.prefix_cache_hits is not None:
                hits.add_metric(labels, snapshot.prefix_cache_hits)
            if snapshot.prefix_cache_queries is not None:
                queries.add_metric(labels, snapshot.prefix_cache_queries)
        yield from (waiting, swapped, hit_rate, hits, queries)
