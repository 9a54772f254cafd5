"""What the router knows of the engines' KV caches (`kvaware`), one series per engine
(`server`, its URL), beside the engines' own `vllm:gpu_prefix_cache_hits_total` and
`..._queries_total`: the predicted share of prompt tokens cached should follow theirs."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router.backends.pool import BackendPool
from router.kvcache.state import KvCache

__all__ = ["KvGauges"]


class KvGauges(Collector):
    def __init__(self, pool: BackendPool, kv: KvCache) -> None:
        self.pool = pool
        self.kv = kv

    def collect(self) -> Iterator[Metric]:
        server = ["server"]
        blocks = GaugeMetricFamily(
            "router_kv_index_blocks",
            "KV cache blocks the router believes the engine holds, from its KV events.",
            labels=server)
        cached = GaugeMetricFamily(
            "router_kv_predicted_cached_tokens_total",
            "Prompt tokens of the requests routed to the engine that the router expected "
            "in its cache (compare with vllm:gpu_prefix_cache_hits_total).", labels=server)
        prompt = GaugeMetricFamily(
            "router_kv_predicted_prompt_tokens_total",
            "Prompt tokens of the requests routed to the engine with known tokens (compare "
            "with vllm:gpu_prefix_cache_queries_total).", labels=server)
        batches = GaugeMetricFamily(
            "router_kv_event_batches_total", "KV event batches applied from the engine.",
            labels=server)
        gaps = GaugeMetricFamily(
            "router_kv_event_gaps_total",
            "Breaks in the engine's event sequence: replayed (filled from its buffer), lost "
            "(what the router knew was dropped and relearned) or restart.",
            labels=["server", "kind"])
        skipped = GaugeMetricFamily(
            "router_kv_events_skipped_total",
            "Malformed messages and events from the engine, logged and skipped.", labels=server)
        lag = GaugeMetricFamily(
            "router_kv_event_lag_seconds",
            "Seconds from the engine publishing its last batch to the router applying it "
            "(the two clocks' difference included).", labels=server)
        index = self.kv.index
        feeds = self.kv.feeds
        for backend in self.pool.backends:
            labels = [backend.url]
            engine = index.engines.get(backend.id)
            if engine is not None:
                blocks.add_metric(labels, len(engine))
            predicted = self.kv.predicted.get(backend.id)
            if predicted is not None:
                cached.add_metric(labels, predicted.cached_tokens)
                prompt.add_metric(labels, predicted.prompt_tokens)
            stats = feeds.stats.get(backend.id) if feeds is not None else None
            if stats is None:
                continue
            batches.add_metric(labels, stats.batches)
            gaps.add_metric([backend.url, "replayed"], stats.gaps_replayed)
            gaps.add_metric([backend.url, "lost"], stats.gaps_lost)
            gaps.add_metric([backend.url, "restart"], stats.restarts)
            skipped.add_metric(labels, stats.malformed + stats.events_skipped)
            if stats.lag is not None:
                lag.add_metric(labels, stats.lag)
        # Without kvaware there is nothing to say: no empty families on every /metrics.
        yield from (family for family in (blocks, cached, prompt, batches, gaps, skipped, lag)
                    if family.samples)
