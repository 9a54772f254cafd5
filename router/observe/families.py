"""Labelled counters and histograms for the metrics subscriber, behind one `Family` interface.

In one process they are plain floats in dicts keyed by label tuples (a histogram observation
is one bisect and two additions), turned into Prometheus families only when `/metrics` is
scraped; prometheus_client's own objects (a lock and several calls per increment) are used
only under `--workers`, where their per-process files are how workers add up. Either kind
knows which label is `server`, so the series of a backend that left the pool can be dropped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import accumulate
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["Families", "Family", "Labels", "PlainCounter", "PlainHistogram", "SharedFamily"]

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
