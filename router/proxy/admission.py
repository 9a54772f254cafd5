"""Admission control: a cap on concurrent proxied requests with a bounded wait queue, and
per-client token-bucket rate limits. Past either, the client gets a 429 with `Retry-After`
at once: nothing waits without bound, nothing is buffered for a request that will not run.
(Batch lines have no client to answer: they wait for the slot or the token instead.)"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from router.errors import TooManyRequests

__all__ = ["Admission", "RateLimiter"]


class Admission:
    """At most `limit` requests run; up to `queue_size` more wait up to `queue_timeout`."""

    def __init__(self, limit: int, queue_size: int, queue_timeout: float) -> None:
        self.limit = limit
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if there is room; else raise `TooManyRequests`."""
        if self.running < self.limit and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.queue_size:
            raise TooManyRequests(
                f"the router is at its limit of {self.limit} concurrent requests and its "
                "queue is full", retry_after=1,
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout)
        except BaseException as error:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just as we gave up: pass it on.
                self.release()
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(error, TimeoutError):
                raise TooManyRequests(
                    f"waited {self.queue_timeout:g} s in the queue for one of "
                    f"{self.limit} slots", retry_after=self.queue_timeout,
                ) from None
            raise

    def release(self) -> None:
        """Give the slot to the oldest waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves on; `running` stays the same
                return
        self.running -= 1

    def __repr__(self) -> str:
        return f"<Admission running={self.running}/{self.limit} waiting={len(self._waiters)}>"


class RateLimiter:
    """A token bucket per client key (`rate` requests/s, bursts of `burst`); the least
    recently seen keys are dropped past `max_keys`, so memory stays bounded."""

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> None:
        """Spend one token of `key`'s bucket, or raise `TooManyRequests`."""
        wait = self.try_take(key)
        if wait:
            raise TooManyRequests(f"rate limit of {self.rate:g} requests/s exceeded",
                                  retry_after=wait)

    def try_take(self, key: str) -> float:
        """Spend one token of `key`'s bucket and return 0, or return the seconds until the
        next token (spending nothing)."""
        now = self._clock()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return 0.0

    def __repr__(self) -> str:
        return f"<RateLimiter {self.rate:g}/s burst={self.burst:g} keys={len(self._buckets)}>"
