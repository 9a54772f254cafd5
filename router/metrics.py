"""Prometheus metrics on a per-app registry, fed by the request events and the request stats.

Labelled children are resolved once per label set and cached, so a request costs a dict
lookup and an increment per metric. Per-backend gauges are read from `RequestStats` at scrape
time and cost nothing per request.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from router.backends import BackendPool
from router.flow import RequestFlow
from router.stats.requests import RequestStats

__all__ = ["Metrics"]

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
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


MetricT = TypeVar("MetricT", Counter, Histogram)


class Children(Generic[MetricT]):
    """A metric's labelled children, resolved once per label set."""

    def __init__(self, metric: MetricT) -> None:
        self._metric: MetricT = metric
        self._cache: dict[tuple[str, ...], MetricT] = {}

    def get(self, *labels: str) -> MetricT:
        child = self._cache.get(labels)
        if child is None:
            child = self._cache[labels] = self._metric.labels(*labels)
        return child


class Metrics:
    """Subscriber: request counters and latency histograms; owns the app's registry."""

    def __init__(self, stats: RequestStats, pool: BackendPool) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Children(Counter(
            "router_requests",
            "Requests by endpoint, status and outcome.",
            ["endpoint", "status", "outcome"],
            registry=self.registry,
        ))
        self._duration = Children(Histogram(
            "router_request_duration_seconds",
            "Time from arrival to the end of the answer.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        ))
        self._ttft = Children(Histogram(
            "router_time_to_first_token_seconds",
            "Time from arrival to the backend's first body byte.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        ))
        self.registry.register(BackendCollector(stats, pool))

    def on_response(self, flow: RequestFlow) -> None:
        ttft = flow.ttft
        if ttft is not None:
            self._ttft.get(flow.endpoint).observe(ttft)

    def on_complete(self, flow: RequestFlow) -> None:
        outcome = flow.outcome.value if flow.outcome else "unknown"
        status = "none" if flow.status is None else str(flow.status)
        self._requests.get(flow.endpoint, status, outcome).inc()
        if flow.duration is not None:
            self._duration.get(flow.endpoint).observe(flow.duration)

    def render(self) -> bytes:
        return generate_latest(self.registry)
