"""Backend health: the tracker, a request-events subscriber that decides whether a backend may
take a request (`HealthTracker.routable`).

Two signals feed it:

- Real traffic, through a circuit breaker per backend (`router.backends.breaker`). What the
  backend caused (5xx, connection errors, timeouts) counts against it; what the client or the
  router caused (a client that left, a 400 for a too-long prompt, a 429) never counts
  (`classify`): a breaker that trips on those turns one bad client into an outage (a
  context-length 400 counted as a worker failure has emptied a fleet in production).
- The active probes (`router.backends.prober`), whose verdicts arrive through
  `HealthTracker.record_probe`.

The breakers may hold out at most `max_ejection_percent` of a model's backends that the
probes do not fail, and never the last one (`HealthTracker.routable`, as Envoy's
`max_ejection_percent`): faults of requests (a poison prompt answered with 500s, cut streams,
hangs) reach every engine alike and would otherwise open every breaker of a healthy fleet.
A backend the cap keeps routable closes at its first good answer, and that answer ends the
cooldown of the model's other open breakers (`HealthTracker._end_cooldowns`).

Neither touches load counters: health says yes or no, the policies weigh the load (a health
checker that zeroed load counters made cache-aware routing pile onto hot spots).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from router.backends.breaker import BreakerState, CircuitBreaker, Clock, check_settings
from router.backends.pool import Backend
from router.flow import Outcome, RequestFlow

__all__ = ["Verdict", "classify", "BackendHealth", "HealthTracker"]

log = logging.getLogger("router.health")


class Verdict(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"
    """Says nothing about the backend: neither counts, but a trial ends."""


BACKEND_FAULTS = frozenset({Outcome.BACKEND_ERROR, Outcome.TIMEOUT})
ROUTER_SIDE = frozenset({Outcome.REJECTED, Outcome.ROUTER_ERROR})


def classify(flow: RequestFlow) -> Verdict:
    """What a completed request says about the health of `flow.backend`."""
    outcome, status = flow.outcome, flow.status
    if outcome is Outcome.TIMEOUT and flow.t_headers is None:
        # The engine took the request and did not answer within --response-timeout: a long
        # generation or a long queue, which says it is busy, not broken (the prober catches
        # a dead one). Counted, it would open busy engines' breakers and pile their load on
        # the others exactly when there is none to spare.
        return Verdict.NEUTRAL
    if outcome in BACKEND_FAULTS:
        return Verdict.FAILURE
    if outcome in ROUTER_SIDE:
        # The router's own refusal or bug; its 500 is not the backend's.
        return Verdict.NEUTRAL
    if status is not None and status >= 500:
        # Only the backend sets a 5xx on the other outcomes (a client that left gets 499),
        # and its 503 stays true when the client leaves while reading it.
        return Verdict.FAILURE
    if outcome is Outcome.OK and status is not None and status < 400:
        return Verdict.SUCCESS
    # 4xx (a too-long prompt, a 429 under load) is the client's problem or load, not a dead
    # backend; a client that left or a shutdown tells nothing either.
    return Verdict.NEUTRAL


@dataclass(frozen=True, slots=True)
class BackendHealth:
    """One backend's health, for `/engines` and metrics."""

    backend_id: str
    available: bool
    """What the request path sees now (`HealthTracker.available`)."""
    breaker: str
    """`closed`, `open` or `half_open`."""
    consecutive_failures: int
    trial_in_flight: bool
    opened_at: float | None
    """Clock time (`time.monotonic()`) the breaker last opened; None while closed."""
    probe_ok: bool | None
    """The last probe verdict; None before the first one."""
    last_probe_error: str | None
    """Why the last failed probe failed; kept after a recovery, for diagnosis."""
    probed_at: float | None
    """Clock time of the last probe verdict."""


class _Entry:
    __slots__ = ("breaker", "models", "probe_ok", "probe_error", "probed_at")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        self.models: tuple[str, ...] = ()
        """The models the backend serves, as last routed to (for `_end_cooldowns`)."""
        self.probe_ok: bool | None = None
        self.probe_error: str | None = None
        self.probed_at: float | None = None


def _ejection(breaker: CircuitBreaker, backend: Backend) -> tuple[int, float, Backend]:
    return breaker.consecutive_failures, -(breaker.opened_at or 0.0), backend


def _put_back_order(item: tuple[int, float, Backend]) -> tuple[int, float]:
    return item[0], item[1]


class HealthTracker:
    """Subscriber: breakers and probe verdicts per backend id; the request path asks
    `routable(backends of the model)`.

    A backend it knows nothing about is available: health checks may be off, and a backend
    is assumed well until a probe or a request says otherwise.
    """

    def __init__(
        self, failure_threshold: int, cooldown: float, clock: Clock = time.monotonic,
        max_ejection_percent: int = 50,
    ) -> None:
        check_settings(failure_threshold, cooldown)
        if not 0 <= max_ejection_percent <= 100:
            raise ValueError(f"max_ejection_percent must be within 0..100, "
                             f"not {max_ejection_percent}")
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.max_ejection_percent = max_ejection_percent
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    def available(self, backend: Backend) -> bool:
        """True when `backend`'s own health admits a request now: its probe does not fail and
        its breaker admits one. Whether it is routed to is `routable`'s call."""
        entry = self._entries.get(backend.id)
        if entry is None:
            return True
        if entry.probe_ok is False:
            return False
        breaker = entry.breaker
        # The closed check inlined: it saves a method call on nearly every call.
        return breaker._state is BreakerState.CLOSED or breaker.allows()

    def routable(
        self, backends: Sequence[Backend], exclude: Collection[str] = ()
    ) -> list[Backend]:
        """The backends of one model (`backends`, in their order) that may take a request now,
        minus the ids in `exclude`.

        Those `available`, and the breaker-ejected ones the ejection cap puts back (see
        `kept_by_cap`). A backend whose probe fails stays out whatever the cap says. Runs on
        every request: one pass, and no allocation but the answer's while no breaker holds a
        backend out.
        """
        entries = self._entries
        chosen: list[Backend] = []
        ejected: list[tuple[int, float, Backend]] | None = None
        alive = 0
        for backend in backends:
            entry = entries.get(backend.id)
            if entry is not None:
                if entry.probe_ok is False:
                    continue
                breaker = entry.breaker
                if breaker._state is not BreakerState.CLOSED and not breaker.allows():
                    alive += 1
                    if ejected is None:
                        ejected = []
                    ejected.append(_ejection(breaker, backend))
                    continue
            alive += 1
            if backend.id not in exclude:
                chosen.append(backend)
        if ejected is None:
            return chosen
        kept = self._put_back(ejected, alive)
        if not kept:
            return chosen
        keep = set(chosen)
        keep.update(backend for backend in kept if backend.id not in exclude)
        return [backend for backend in backends if backend in keep]

    def kept_by_cap(self, backends: Sequence[Backend]) -> list[Backend]:
        """The backends of one model routed to although their breaker holds them out; empty
        while the cap does not bite.

        The cap: breakers may hold out at most `max_ejection_percent` (rounded down) of the
        model's backends that the probes do not fail (all of them while probes are off), so
        below 100 never the last one. Past it, as many are put back as it takes: first those
        with the fewest consecutive failures, then the latest ejected (the first to go is the
        likeliest to be really broken; the next ones often only took its load), then in pool
        order, so every request puts back the same ones.
        """
        alive = 0
        ejected: list[tuple[int, float, Backend]] = []
        for backend in backends:
            entry = self._entries.get(backend.id)
            if entry is not None and entry.probe_ok is False:
                continue
            alive += 1
            if entry is not None and not entry.breaker.allows():
                ejected.append(_ejection(entry.breaker, backend))
        return self._put_back(ejected, alive)

    def _put_back(self, ejected: list[tuple[int, float, Backend]], alive: int) -> list[Backend]:
        extra = len(ejected) - alive * self.max_ejection_percent // 100
        if extra <= 0:
            return []
        ejected.sort(key=_put_back_order)  # stable: ties stay in pool order
        return [item[2] for item in ejected[:extra]]

    # Entries are made only where the backend is known to be in the pool (routed to, probed):
    # a late `on_complete` after `forget` must not bring a removed backend back for good.

    def _entry(self, backend_id: str) -> _Entry:
        entry = self._entries.get(backend_id)
        if entry is None:
            breaker = CircuitBreaker(self.failure_threshold, self.cooldown, self._clock,
                                     name=backend_id)
            entry = self._entries[backend_id] = _Entry(breaker)
        return entry

    # A request that reaches a backend whose breaker is not closed and runs no trial is its
    # trial: after the cooldown, or before it when the ejection cap kept the backend routable
    # (nothing else routes to an open breaker), so a recovered backend closes at its first
    # good answer.

    def on_new(self, flow: RequestFlow) -> None:
        if flow.backend is not None:
            self._start(flow.backend, flow)

    def _start(self, backend: Backend, flow: RequestFlow) -> None:
        entry = self._entry(backend.id)
        entry.models = backend.models
        entry.breaker.start_trial(flow, early=True)

    def _succeed(self, entry: _Entry, flow: RequestFlow) -> None:
        breaker = entry.breaker
        # Read before `success` closes it: an open breaker's trial is one the cap sent.
        early = breaker.is_trial(flow) and breaker.state is BreakerState.OPEN
        breaker.success(flow)
        if early and flow.model is not None:
            self._end_cooldowns(flow.model)

    def _end_cooldowns(self, model: str) -> None:
        """A backend the ejection cap kept answered well before its cooldown ended: the
        faults that opened its breaker were the requests', and likely those that opened
        the other breakers of the model too. Each gets its trial now rather than after its
        cooldown, so the model is back to full capacity within a few requests; one that
        really is broken fails that one trial and starts a new cooldown."""
        for backend_id, entry in self._entries.items():
            if model in entry.models and entry.breaker.end_cooldown():
                log.info("circuit breaker %s half-open early: another backend of %s held out "
                         "with it answered again", backend_id, model)

    def on_retry(self, flow: RequestFlow) -> None:
        attempt = flow.attempts[-1]
        entry = self._entries.get(attempt.backend.id)
        if entry is not None:
            if attempt.outcome in BACKEND_FAULTS:
                entry.breaker.failure(flow)
            else:
                entry.breaker.release(flow)
        if flow.backend is not None:
            self._start(flow.backend, flow)

    def on_response(self, flow: RequestFlow) -> None:
        # A trial that is streaming a good answer has proved the point; waiting for the end
        # of a long generation would keep the backend to one request for minutes.
        if flow.backend is None or flow.status is None or flow.status >= 400:
            return
        entry = self._entries.get(flow.backend.id)
        if entry is not None and entry.breaker.is_trial(flow):
            self._succeed(entry, flow)

    def on_complete(self, flow: RequestFlow) -> None:
        if flow.backend is None:
            return
        entry = self._entries.get(flow.backend.id)
        if entry is None:
            return
        verdict = classify(flow)
        if verdict is Verdict.FAILURE:
            entry.breaker.failure(flow)
        elif verdict is Verdict.SUCCESS:
            self._succeed(entry, flow)
        else:
            entry.breaker.release(flow)

    def record_probe(self, backend_id: str, ok: bool, error: str | None = None) -> None:
        """The prober's verdict on `backend_id`.

        A failing probe vetoes the backend at once. A passing probe lifts only that veto and
        leaves an open breaker to its cooldown and trial: `/health` is good at saying a
        backend is dead (refused, 503) and poor at saying it serves (vLLM's answers 200 while
        every generation fails with a CUDA error). If a green probe closed the breaker, such a
        backend would cost `failure_threshold` failed requests every probe interval instead
        of one trial per cooldown.
        """
        entry = self._entry(backend_id)
        if ok != entry.probe_ok:
            if not ok:
                log.warning("backend %s failed its health probe: %s", backend_id, error)
            elif entry.probe_ok is False:
                log.info("backend %s passes its health probe again", backend_id)
        entry.probe_ok = ok
        entry.probed_at = self._clock()
        if not ok:
            entry.probe_error = error or "probe failed"

    def state(self, backend_id: str) -> BackendHealth:
        entry = self._entries.get(backend_id)
        if entry is None:
            return BackendHealth(
                backend_id=backend_id, available=True, breaker=BreakerState.CLOSED.value,
                consecutive_failures=0, trial_in_flight=False, opened_at=None, probe_ok=None,
                last_probe_error=None, probed_at=None,
            )
        breaker = entry.breaker
        return BackendHealth(
            backend_id=backend_id,
            available=entry.probe_ok is not False and breaker.allows(),
            breaker=breaker.state.value,
            consecutive_failures=breaker.consecutive_failures,
            trial_in_flight=breaker.trial_in_flight,
            opened_at=breaker.opened_at,
            probe_ok=entry.probe_ok,
            last_probe_error=entry.probe_error,
            probed_at=entry.probed_at,
        )

    def forget(self, backend_id: str) -> None:
        """Drop what is known about a backend that left the pool."""
        self._entries.pop(backend_id, None)

    def __repr__(self) -> str:
        down = sum(
            1 for entry in self._entries.values()
            if entry.probe_ok is False or not entry.breaker.allows()
        )
        return f"<HealthTracker backends={len(self._entries)} unavailable={down}>"
