"""Per-backend request stats over a sliding window, fed only by the request events.

In-flight counts go up in `on_new`, move between backends in `on_retry` and go down in
`on_complete`, which the lifecycle pairs exactly, so they return to zero whatever mix of
outcomes the requests had. Windows are kept as
one-second buckets: memory depends on the window length, not on the request rate.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from router.flow import RequestFlow

__all__ = ["RequestStats", "BackendRequestStats", "BackendSnapshot"]


class Bucket:
    __slots__ = ("second", "started", "completed", "ttft_sum", "ttft_count", "latency_sum")

    def __init__(self, second: int) -> None:
        self.second = second
        self.started = 0
        self.completed = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.latency_sum = 0.0


@dataclass(frozen=True, slots=True)
class BackendSnapshot:
    in_flight: int
    qps: float
    """Requests started per second over the window."""
    avg_ttft: float | None
    """Mean seconds to the first body byte over the window; None without data."""
    avg_latency: float | None
    """Mean request duration over the window; None without data."""


class BackendRequestStats:
    def __init__(self, window: float, clock: Callable[[], float]) -> None:
        # Whole one-second buckets: a window of 2.5 s is kept, and divided by, as 3 s.
        self.window = max(1, math.ceil(window))
        self.in_flight = 0
        self._clock = clock
        self._buckets: deque[Bucket] = deque()

    def _bucket(self) -> Bucket:
        second = int(self._clock())
        buckets = self._buckets
        if not buckets or buckets[-1].second != second:
            buckets.append(Bucket(second))
            self._expire(second)
        return buckets[-1]

    def _expire(self, now: int) -> None:
        oldest = now - self.window
        while self._buckets and self._buckets[0].second <= oldest:
            self._buckets.popleft()

    def started(self) -> None:
        self.in_flight += 1
        self._bucket().started += 1

    def moved_away(self) -> None:
        """A request left this backend for another one (a retry)."""
        self.in_flight -= 1

    def completed(self, flow: RequestFlow) -> None:
        self.in_flight -= 1
        bucket = self._bucket()
        bucket.completed += 1
        if flow.ttft is not None:
            bucket.ttft_sum += flow.ttft
            bucket.ttft_count += 1
        bucket.latency_sum += flow.duration or 0.0

    def snapshot(self) -> BackendSnapshot:
        self._expire(int(self._clock()))
        started = completed = ttft_count = 0
        ttft_sum = latency_sum = 0.0
        for bucket in self._buckets:
            started += bucket.started
            completed += bucket.completed
            ttft_sum += bucket.ttft_sum
            ttft_count += bucket.ttft_count
            latency_sum += bucket.latency_sum
        return BackendSnapshot(
            in_flight=self.in_flight,
            qps=started / self.window,
            avg_ttft=ttft_sum / ttft_count if ttft_count else None,
            avg_latency=latency_sum / completed if completed else None,
        )


class RequestStats:
    """Subscriber: in-flight, QPS, average TTFT and latency per backend id."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self.backends: dict[str, BackendRequestStats] = {}

    def for_backend(self, backend_id: str) -> BackendRequestStats:
        stats = self.backends.get(backend_id)
        if stats is None:
            stats = self.backends[backend_id] = BackendRequestStats(self.window, self._clock)
        return stats

    def on_new(self, flow: RequestFlow) -> None:
        if flow.backend is not None:
            self.for_backend(flow.backend.id).started()

    def on_retry(self, flow: RequestFlow) -> None:
        assert flow.backend is not None
        self.for_backend(flow.attempts[-1].backend.id).moved_away()
        self.for_backend(flow.backend.id).started()  # a retry is a request to that backend

    def on_complete(self, flow: RequestFlow) -> None:
        if flow.backend is not None:
            self.for_backend(flow.backend.id).completed(flow)

    def total_in_flight(self) -> int:
        return sum(stats.in_flight for stats in self.backends.values())

    def __repr__(self) -> str:
        return f"<RequestStats backends={len(self.backends)} in_flight={self.total_in_flight()}>"
