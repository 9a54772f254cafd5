"""Per-backend request stats over a sliding window, fed only by the request events.

In-flight counts go up in `on_new`, move between backends in `on_retry` and go down in
`on_complete`, which the lifecycle pairs exactly, so they return to zero whatever mix of
outcomes the requests had. Windows are kept as
one-second buckets: memory depends on the window length, not on the request rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from router.flow import RequestFlow
from router.stats.window import Window

__all__ = ["RequestStats", "BackendRequestStats", "BackendSnapshot"]


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
        self.in_flight = 0
        self._clock = clock
        self._window = Window(window)
        self.window = self._window.seconds

    def started(self) -> None:
        self.in_flight += 1
        self._window.bucket(self._clock()).started += 1

    def moved_away(self) -> None:
        """A request left this backend for another one (a retry)."""
        self.in_flight -= 1

    def completed(self, flow: RequestFlow) -> None:
        self.in_flight -= 1
        bucket = self._window.bucket(self._clock())
        bucket.completed += 1
        if flow.ttft is not None:
            bucket.ttft_sum += flow.ttft
            bucket.ttft_count += 1
        bucket.latency_sum += flow.duration or 0.0

    def snapshot(self) -> BackendSnapshot:
        total = self._window.totals(self._clock())
        return BackendSnapshot(
            in_flight=self.in_flight,
            qps=total.started / self.window,
            avg_ttft=total.ttft_sum / total.ttft_count if total.ttft_count else None,
            avg_latency=total.latency_sum / total.completed if total.completed else None,
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
