"""Metrics across `--workers` processes (prometheus_client's multiprocess mode).

Counters and histograms already aggregate: in multiprocess mode prometheus_client keeps
their values in files under `PROMETHEUS_MULTIPROC_DIR`, one per process. The router learns of
the mode from `Config.metrics_dir` (`router.config.load` reads the variable); prometheus_client
reads the variable itself when imported, which is why the supervisor starts its workers with
it in their environment. The fleet gauges (in flight, QPS, averages, health, breakers) are
computed from a process's own state, so each worker publishes its figures into multiprocess
gauges every second, and a scrape adds them up (in flight, QPS, each worker's CPU and memory)
or takes the worst (health, breakers; the engines' figures, which every worker scrapes).
"""

from __future__ import annotations

import asyncio
from typing import Literal

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from router.observe.metrics import Metrics

__all__ = ["FleetPublisher", "render"]

Mode = Literal["livesum", "livemax", "livemin"]
MODES: dict[str, Mode] = {
    "vllm:num_requests_running": "livesum",
    "vllm:num_prefill_requests": "livesum",
    "vllm:num_decoding_requests": "livesum",
    "vllm:current_qps": "livesum",
    "vllm:avg_latency": "livemax",
    "vllm:avg_itl": "livemax",
    "vllm:avg_decoding_length": "livemax",
    "vllm:num_requests_waiting": "livemax",
    "vllm:num_requests_swapped": "livemax",
    "vllm:gpu_prefix_cache_hit_rate": "livemax",
    "vllm:gpu_prefix_cache_hits_total": "livemax",
    "vllm:gpu_prefix_cache_queries_total": "livemax",
    "router_cpu_usage_percent": "livesum",
    "router_memory_usage_percent": "livesum",
    "router_disk_usage_percent": "livemax",
    "vllm:healthy_pods_total": "livemin",
    "router_breaker_state": "livemax",
    "router_ejection_cap_backends": "livemax",
}
"""How each fleet gauge combines across workers (`live*`: dead workers drop out)."""
PUBLISH_INTERVAL = 1.0


class FleetPublisher:
    """Copies this worker's fleet gauges into multiprocess gauges."""

    def __init__(self, metrics: Metrics, directory: str) -> None:
        self._metrics = metrics
        self.directory = directory
        self._gauges: dict[str, Gauge] = {}
        self._published: dict[str, set[tuple[str, ...]]] = {}

    def publish(self) -> None:
        for family in self._metrics.collect_fleet():
            gauge = self._gauges.get(family.name)
            seen: set[tuple[str, ...]] = set()
            for sample in family.samples:
                labels = tuple(sample.labels.values())
                if gauge is None:
                    gauge = self._gauges[family.name] = Gauge(
                        family.name, family.documentation, list(sample.labels),
                        multiprocess_mode=MODES.get(family.name, "livesum"), registry=None,
                    )
                (gauge.labels(*labels) if labels else gauge).set(sample.value)
                seen.add(labels)
            if gauge is not None:
                for gone in self._published.get(family.name, set()) - seen:
                    if gone:
                        gauge.remove(*gone)
            self._published[family.name] = seen

    async def run(self) -> None:
        while True:
            await self._metrics.sample_process()
            self.publish()
            await asyncio.sleep(PUBLISH_INTERVAL)


async def render(publisher: FleetPublisher) -> bytes:
    """The exposition summed over every worker, this worker's gauges fresh; the files are
    read in a thread."""
    publisher.publish()
    return await asyncio.to_thread(read_all, publisher.directory)


def read_all(directory: str) -> bytes:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry)
