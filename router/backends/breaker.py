"""The circuit breaker of one backend: it sees real traffic.

Consecutive failures the backend caused open it; after a cooldown it lets one trial request
through, whose result closes it again or restarts the cooldown. Which results count as the
backend's failures is `router.backends.tracker.classify`'s call; the tracker feeds the breakers.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

__all__ = ["BreakerState", "CircuitBreaker", "Clock", "check_settings"]

log = logging.getLogger("router.health")

Clock = Callable[[], float]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    """Requests flow; consecutive failures are counted."""
    OPEN = "open"
    """No request goes through until the cooldown has passed."""
    HALF_OPEN = "half_open"
    """One trial request at a time goes through; its result decides."""


def check_settings(failure_threshold: int, cooldown: float) -> None:
    if failure_threshold < 1:
        raise ValueError(f"failure_threshold must be at least 1, not {failure_threshold}")
    if cooldown < 0:
        raise ValueError(f"cooldown must not be negative, not {cooldown}")


class CircuitBreaker:
    """The breaker of one backend.

    Results carry a token (the request's flow) so that a trial is recognised when it ends:
    while open or half-open, only the trial's result moves the breaker. The others are
    stragglers, admitted before the breaker opened, and say nothing about the backend now.
    """

    __slots__ = (
        "name", "failure_threshold", "cooldown", "consecutive_failures", "opened_at",
        "_state", "_trial", "_clock",
    )

    def __init__(
        self, failure_threshold: int, cooldown: float, clock: Clock = time.monotonic,
        name: str = "",
    ) -> None:
        check_settings(failure_threshold, cooldown)
        self.name = name
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        """Clock time the breaker last opened; None while closed."""
        self._state = BreakerState.CLOSED
        self._trial: object | None = None
        self._clock = clock

    @property
    def state(self) -> BreakerState:
        """The state now: an open breaker whose cooldown has passed reads as half-open."""
        if self._state is BreakerState.OPEN:
            self._refresh()
        return self._state

    @property
    def trial_in_flight(self) -> bool:
        return self._trial is not None

    def allows(self) -> bool:
        """True when a request may go through now: closed, or half-open with no trial."""
        if self._state is BreakerState.CLOSED:
            return True
        return self.state is BreakerState.HALF_OPEN and self._trial is None

    def start_trial(self, token: object, early: bool = False) -> bool:
        """Make the request `token` the trial if the breaker is half-open without one.

        `early`: while still open too. A request sent to an open backend anyway (the ejection
        cap keeps it routable) tells as much as one sent after the cooldown, so its answer may
        as well close the breaker."""
        if self._trial is not None:
            return False
        state = self.state
        if state is not BreakerState.HALF_OPEN and not (early and state is BreakerState.OPEN):
            return False
        self._trial = token
        return True

    def is_trial(self, token: object) -> bool:
        return self._trial is not None and self._trial is token

    def success(self, token: object = None) -> None:
        state = self.state
        if state is BreakerState.CLOSED:
            self.consecutive_failures = 0
        elif self.is_trial(token):
            self._trial = None
            self._state = BreakerState.CLOSED
            self.consecutive_failures = 0
            self.opened_at = None
            log.info("circuit breaker %s closed: the trial request succeeded", self.name)

    def failure(self, token: object = None) -> None:
        state = self.state
        if state is BreakerState.CLOSED:
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.failure_threshold:
                self._open()
                log.warning("circuit breaker %s opened after %d consecutive failures",
                            self.name, self.consecutive_failures)
        elif self.is_trial(token):
            self._trial = None
            self.consecutive_failures += 1
            self._open()
            log.warning("circuit breaker %s reopened: the trial request failed", self.name)

    def release(self, token: object) -> None:
        """The request `token` ended with no verdict: if it was the trial, the next one is."""
        if self.is_trial(token):
            self._trial = None

    def end_cooldown(self) -> bool:
        """Turn an open breaker without a trial half-open now; True if it was one."""
        if self.state is not BreakerState.OPEN or self._trial is not None:
            return False
        self._state = BreakerState.HALF_OPEN
        return True

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self.opened_at = self._clock()

    def _refresh(self) -> None:
        assert self.opened_at is not None
        if self._clock() - self.opened_at >= self.cooldown:
            self._state = BreakerState.HALF_OPEN

    def __repr__(self) -> str:
        state = self.state
        detail = f"failures={self.consecutive_failures}/{self.failure_threshold}"
        if state is BreakerState.OPEN:
            assert self.opened_at is not None
            left = self.cooldown - (self._clock() - self.opened_at)
            detail += f" half_open_in={left:.1f}s"
            if self._trial is not None:
                detail += " trial=in_flight"
        elif state is BreakerState.HALF_OPEN:
            detail += " trial=" + ("in_flight" if self._trial is not None else "none")
        name = f" {self.name}" if self.name else ""
        return f"<CircuitBreaker{name} {state.name} {detail}>"
