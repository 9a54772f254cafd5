"""The metrics' counter and histogram families: plain ones in one process, prometheus_client's
under `--workers`, exposed alike."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram
from prometheus_client.parser import text_string_to_metric_families

from router.observe.families import Families


@pytest.mark.parametrize("multiprocess", [False, True], ids=["plain", "prometheus_client"])
def test_plain_families_expose_what_prometheus_client_would(multiprocess: bool) -> None:
    """The plain counters and histograms (and, under --workers, the prometheus_client ones
    behind the same interface) render the same samples as prometheus_client's own objects
    fed the same values: bucket edges (a value equal to a bound counts in that bucket),
    cumulative counts, +Inf, _count, _sum; and forgetting a server drops its series."""
    buckets = (0.1, 1, 5)
    values = [0.05, 0.1, 0.1000001, 1, 3, 5, 7, 1e9]
    registry = CollectorRegistry()
    families = Families(registry, multiprocess)
    counter = families.counter("c_total", "doc", ["server", "k"])
    histogram = families.histogram("h_seconds", "doc", ["server"], buckets)
    families.register()
    reference = CollectorRegistry()
    ref_counter = PromCounter("c_total", "doc", ["server", "k"], registry=reference)
    ref_histogram = PromHistogram("h_seconds", "doc", ["server"], buckets=buckets,
                                  registry=reference)
    for server in ("a", "b"):
        for value in values:
            histogram.record((server,), value)
            ref_histogram.labels(server).observe(value)
        counter.record((server, "x"), 2.5)
        ref_counter.labels(server, "x").inc(2.5)

    def exposed(registry: CollectorRegistry) -> dict[tuple[str, tuple[Any, ...]], float]:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for sample in family.samples if not sample.name.endswith("_created")
        }

    ours, theirs = exposed(registry), exposed(reference)
    assert ours == theirs
    assert ours["h_seconds_bucket", (("le", "0.1"), ("server", "a"))] == 2.0
    counter.forget({"a"})
    histogram.forget({"a"})
    assert {labels for _, labels in exposed(registry)} == {
        labels for _, labels in theirs if ("server", "b") in labels}
    assert counter.servers() == histogram.servers() == {"b"}
