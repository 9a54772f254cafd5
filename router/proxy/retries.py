"""The retry budget: retries at most a fraction of the requests in flight (Envoy's
`retry_budget`), so that a bad minute (every engine answering 503) cannot turn each client
request into `--max-retries` more and multiply the requests a fleet with no room to spare
must turn away. It applies to retries after a 502/503/504 answer: a connection that failed
reached no engine, and its retry is the failover that keeps clients from noticing a dead one.

One `RetryBudget` per application. Every request that may fail over holds one `Ticket` while
it runs; the ticket holds a retry slot from its first retry until it ends. A retry is allowed
while the retries in flight are fewer than `max(minimum, percent x requests in flight)`.
"""

from __future__ import annotations

__all__ = ["RetryBudget", "Ticket"]


class RetryBudget:
    """Counts of requests and retries in flight, and whether one more retry may start."""

    __slots__ = ("fraction", "minimum", "requests", "retries", "denied")

    def __init__(self, percent: float, minimum: int) -> None:
        if percent < 0 or minimum < 0:
            raise ValueError(f"a retry budget is not negative: {percent}%, minimum {minimum}")
        self.fraction = percent / 100
        self.minimum = minimum
        self.requests = 0
        """Requests in flight that may fail over."""
        self.retries = 0
        """Of those, the ones that were retried at least once."""
        self.denied = 0
        """Retries refused since the start (the original error went to the client)."""

    def ticket(self) -> Ticket:
        """Count one request in flight until its ticket's `close()`."""
        self.requests += 1
        return Ticket(self)

    def allows(self, holding: bool) -> bool:
        """Whether a request may retry now; `holding`: it already holds a retry slot."""
        if holding:
            return True
        return self.retries < max(self.minimum, self.fraction * self.requests)

    def __repr__(self) -> str:
        return (f"<RetryBudget {self.fraction * 100:g}% min={self.minimum} "
                f"requests={self.requests} retries={self.retries} denied={self.denied}>")


class Ticket:
    """One request's share of the budget; `close()` (idempotent) gives everything back."""

    __slots__ = ("budget", "retrying", "closed")

    def __init__(self, budget: RetryBudget) -> None:
        self.budget = budget
        self.retrying = False
        self.closed = False

    def retry(self) -> bool:
        """Take a retry slot (kept until `close`), or count a refusal: whether it may retry."""
        budget = self.budget
        if not budget.allows(self.retrying):
            budget.denied += 1
            return False
        if not self.retrying:
            self.retrying = True
            budget.retries += 1
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        budget = self.budget
        budget.requests -= 1
        if self.retrying:
            budget.retries -= 1
