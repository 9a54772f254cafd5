"""A sliding window of one-second buckets: request counts and sums over the last N seconds.

Memory depends on the window's length, not on the request rate. The request stats (per
backend) and the `vllm:` averages (per server and model) both keep their windows this way.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["Bucket", "Window"]


class Bucket:
    """What happened in one second (or, from `Window.totals`, over the whole window)."""

    __slots__ = ("second", "started", "completed", "ttft_sum", "ttft_count", "latency_sum",
                 "itl_sum", "itl_count", "decode_sum", "decode_count")

    def __init__(self, second: int = 0) -> None:
        self.second = second
        self.started = 0
        self.completed = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.latency_sum = 0.0
        self.itl_sum = 0.0
        self.itl_count = 0
        self.decode_sum = 0.0
        """Seconds from the first body byte to the end, of answers that had one."""
        self.decode_count = 0


class Window:
    def __init__(self, seconds: float) -> None:
        # Whole one-second buckets: a window of 2.5 s is kept, and divided by, as 3 s.
        self.seconds = max(1, math.ceil(seconds))
        self._buckets: deque[Bucket] = deque()

    def bucket(self, now: float) -> Bucket:
        """The bucket of the second `now` falls in."""
        second = int(now)
        buckets = self._buckets
        if not buckets or buckets[-1].second != second:
            buckets.append(Bucket(second))
            self._expire(second)
        return buckets[-1]

    def totals(self, now: float) -> Bucket:
        """The sums over the window ending at `now`."""
        self._expire(int(now))
        total = Bucket()
        for bucket in self._buckets:
            total.started += bucket.started
            total.completed += bucket.completed
            total.ttft_sum += bucket.ttft_sum
            total.ttft_count += bucket.ttft_count
            total.latency_sum += bucket.latency_sum
            total.itl_sum += bucket.itl_sum
            total.itl_count += bucket.itl_count
            total.decode_sum += bucket.decode_sum
            total.decode_count += bucket.decode_count
        return total

    def __len__(self) -> int:
        """Buckets held: at most one per second of the window, whatever the traffic."""
        return len(self._buckets)

    def _expire(self, now: int) -> None:
        oldest = now - self.seconds
        buckets = self._buckets
        while buckets and buckets[0].second <= oldest:
            buckets.popleft()
