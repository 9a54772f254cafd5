"""Backend health: breakers driven by hand-made flows and a fake clock; probes against real
loopback engines and small misbehaving servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from router.backends.breaker import BreakerState, CircuitBreaker
from router.backends.pool import Backend, BackendPool
from router.backends.prober import HealthProber
from router.backends.tracker import HealthTracker, Verdict, classify
from router.flow import Attempt, Outcome, RequestFlow
from router.testing import RunningEngine
from router.testing.processes import free_port

from .conftest import Clock, MODELS, make_flow

THRESHOLD = 3
COOLDOWN = 30.0
A = Backend("http://a:8000", ("m",))
B = Backend("http://b:8000", ("m",))

AiohttpServer = Callable[..., Awaitable[TestServer]]


@pytest.fixture
def breaker(clock: Clock) -> CircuitBreaker:
    return CircuitBreaker(THRESHOLD, COOLDOWN, clock, name="a")


@pytest.fixture
def tracker(clock: Clock) -> HealthTracker:
    return HealthTracker(THRESHOLD, COOLDOWN, clock)


def start(tracker: HealthTracker, backend: Backend | None = A) -> RequestFlow:
    flow = make_flow(backend)
    tracker.on_new(flow)
    return flow


def finish(tracker: HealthTracker, flow: RequestFlow, outcome: Outcome, status: int | None) -> None:
    flow.outcome, flow.status, flow.t_end = outcome, status, time.monotonic()
    tracker.on_complete(flow)


def serve(
    tracker: HealthTracker, outcome: Outcome, status: int | None, backend: Backend = A
) -> RequestFlow:
    """One whole request on `backend`: on_new, then on_complete with this ending."""
    flow = start(tracker, backend)
    finish(tracker, flow, outcome, status)
    return flow


def fail(tracker: HealthTracker, times: int = 1, backend: Backend = A) -> None:
    for _ in range(times):
        serve(tracker, Outcome.OK, 500, backend)


def open_breaker(tracker: HealthTracker, backend: Backend = A) -> None:
    fail(tracker, THRESHOLD, backend)
    assert tracker.state(backend.id).breaker == "open"


# --------------------------------------------------------------------------- the breaker


def state(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state  # a call, so that type checkers do not narrow it between reads


def test_breaker_opens_after_threshold_consecutive_failures(breaker: CircuitBreaker) -> None:
    for _ in range(THRESHOLD - 1):
        breaker.failure()
        assert state(breaker) is BreakerState.CLOSED and breaker.allows()
    breaker.failure()
    assert state(breaker) is BreakerState.OPEN
    assert not breaker.allows()
    assert breaker.consecutive_failures == THRESHOLD


def test_success_in_closed_state_resets_the_failure_count(breaker: CircuitBreaker) -> None:
    for _ in range(THRESHOLD - 1):
        breaker.failure()
    breaker.success()
    assert breaker.consecutive_failures == 0
    for _ in range(THRESHOLD - 1):
        breaker.failure()
    assert state(breaker) is BreakerState.CLOSED


def test_open_breaker_turns_half_open_after_cooldown_with_exactly_one_trial(
    breaker: CircuitBreaker, clock: Clock
) -> None:
    for _ in range(THRESHOLD):
        breaker.failure()
    clock.advance(COOLDOWN - 0.1)
    assert state(breaker) is BreakerState.OPEN and not breaker.allows()
    assert not breaker.start_trial("early")
    clock.advance(0.1)
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.allows()
    assert breaker.start_trial("trial")
    assert not breaker.allows()
    assert not breaker.start_trial("second")
    assert breaker.trial_in_flight


def test_trial_success_closes_the_breaker(breaker: CircuitBreaker, clock: Clock) -> None:
    for _ in range(THRESHOLD):
        breaker.failure()
    clock.advance(COOLDOWN)
    breaker.start_trial("trial")
    breaker.success("trial")
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0 and breaker.opened_at is None
    assert breaker.allows()


def test_trial_failure_reopens_and_restarts_the_cooldown(
    breaker: CircuitBreaker, clock: Clock
) -> None:
    for _ in range(THRESHOLD):
        breaker.failure()
    clock.advance(COOLDOWN + 5)
    breaker.start_trial("trial")
    breaker.failure("trial")
    assert state(breaker) is BreakerState.OPEN
    assert breaker.opened_at == clock.now
    clock.advance(COOLDOWN - 1)
    assert not breaker.allows()
    clock.advance(1)
    assert state(breaker) is BreakerState.HALF_OPEN and breaker.allows()


def test_trial_without_verdict_lets_the_next_request_be_the_trial(
    breaker: CircuitBreaker, clock: Clock
) -> None:
    for _ in range(THRESHOLD):
        breaker.failure()
    clock.advance(COOLDOWN)
    breaker.start_trial("trial")
    breaker.release("trial")
    assert state(breaker) is BreakerState.HALF_OPEN and breaker.allows()
    assert breaker.start_trial("next")


def test_stragglers_do_not_move_an_open_or_half_open_breaker(
    breaker: CircuitBreaker, clock: Clock
) -> None:
    """Requests admitted before the breaker opened end later; only the trial decides."""
    for _ in range(THRESHOLD):
        breaker.failure()
    opened_at = breaker.opened_at
    breaker.success("straggler")
    breaker.failure("straggler")
    assert state(breaker) is BreakerState.OPEN and breaker.opened_at == opened_at
    clock.advance(COOLDOWN)
    breaker.start_trial("trial")
    breaker.success("straggler")
    breaker.failure("straggler")
    breaker.release("straggler")
    assert state(breaker) is BreakerState.HALF_OPEN and breaker.trial_in_flight


def test_breaker_repr_shows_its_state(breaker: CircuitBreaker, clock: Clock) -> None:
    assert repr(breaker) == "<CircuitBreaker a CLOSED failures=0/3>"
    for _ in range(THRESHOLD):
        breaker.failure()
    clock.advance(10)
    assert repr(breaker) == "<CircuitBreaker a OPEN failures=3/3 half_open_in=20.0s>"
    clock.advance(COOLDOWN)
    breaker.start_trial("trial")
    assert repr(breaker) == "<CircuitBreaker a HALF_OPEN failures=3/3 trial=in_flight>"


@pytest.mark.parametrize(("threshold", "cooldown"), [(0, 1.0), (1, -1.0)])
def test_bad_breaker_settings_are_refused(threshold: int, cooldown: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(threshold, cooldown)
    with pytest.raises(ValueError):
        HealthTracker(threshold, cooldown)


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize(("outcome", "status", "verdict"), [
    (Outcome.OK, 200, Verdict.SUCCESS),
    (Outcome.OK, 500, Verdict.FAILURE),
    (Outcome.OK, 502, Verdict.FAILURE),
    (Outcome.OK, 503, Verdict.FAILURE),
    (Outcome.OK, 504, Verdict.FAILURE),
    (Outcome.BACKEND_ERROR, 502, Verdict.FAILURE),
    (Outcome.BACKEND_ERROR, 503, Verdict.FAILURE),  # connection refused
    (Outcome.BACKEND_ERROR, 200, Verdict.FAILURE),  # broke mid-stream
    (Outcome.OK, 400, Verdict.NEUTRAL),  # prompt longer than the context
    (Outcome.OK, 404, Verdict.NEUTRAL),
    (Outcome.OK, 429, Verdict.NEUTRAL),
    (Outcome.CLIENT_DISCONNECTED, 499, Verdict.NEUTRAL),
    (Outcome.CLIENT_DISCONNECTED, 200, Verdict.NEUTRAL),
    (Outcome.CLIENT_DISCONNECTED, 503, Verdict.FAILURE),  # the backend did answer 503
    (Outcome.CANCELLED, None, Verdict.NEUTRAL),
    (Outcome.CANCELLED, 200, Verdict.NEUTRAL),
    (Outcome.REJECTED, 413, Verdict.NEUTRAL),
    (Outcome.ROUTER_ERROR, 500, Verdict.NEUTRAL),  # the router's bug, not the backend's
])
def test_classify(outcome: Outcome, status: int | None, verdict: Verdict) -> None:
    assert classify(make_flow(A, outcome=outcome, status=status)) is verdict


def test_a_timeout_waiting_for_the_answer_is_neutral_but_a_silent_stream_is_a_failure() -> None:
    # No head within --response-timeout: a busy engine.
    waited = make_flow(A, outcome=Outcome.TIMEOUT, status=504)
    assert classify(waited) is Verdict.NEUTRAL
    # The answer started, then went silent.
    silent = make_flow(A, outcome=Outcome.TIMEOUT, status=200)
    silent.t_headers = 1.0
    assert classify(silent) is Verdict.FAILURE
    # A head past its own deadline.
    trickled = make_flow(A, outcome=Outcome.BACKEND_ERROR, status=504)
    assert classify(trickled) is Verdict.FAILURE


@pytest.mark.parametrize(("outcome", "status"), [
    (Outcome.OK, 500), (Outcome.OK, 503), (Outcome.BACKEND_ERROR, 502),
    (Outcome.BACKEND_ERROR, 504),
])
def test_backend_failures_open_the_breaker(
    tracker: HealthTracker, outcome: Outcome, status: int
) -> None:
    for _ in range(THRESHOLD):
        assert tracker.available(A)
        serve(tracker, outcome, status)
    assert not tracker.available(A)
    assert tracker.available(B)
    health = tracker.state(A.id)
    assert (health.breaker, health.consecutive_failures) == ("open", THRESHOLD)


@pytest.mark.parametrize("status", [400, 401, 404, 408, 413, 422, 429])
def test_client_errors_never_count(tracker: HealthTracker, status: int) -> None:
    for _ in range(100):
        serve(tracker, Outcome.OK, status)
    assert tracker.available(A)
    assert tracker.state(A.id).consecutive_failures == 0


def test_client_disconnects_never_open_a_breaker_even_after_100(tracker: HealthTracker) -> None:
    for _ in range(100):
        serve(tracker, Outcome.CLIENT_DISCONNECTED, 499)
    for _ in range(100):
        serve(tracker, Outcome.CLIENT_DISCONNECTED, 200)  # left mid-stream
    assert tracker.available(A)
    assert tracker.state(A.id).consecutive_failures == 0


def test_neutral_endings_neither_count_nor_reset_failures(tracker: HealthTracker) -> None:
    fail(tracker, THRESHOLD - 1)
    serve(tracker, Outcome.OK, 429)
    serve(tracker, Outcome.CLIENT_DISCONNECTED, 499)
    serve(tracker, Outcome.CANCELLED, None)
    assert tracker.state(A.id).consecutive_failures == THRESHOLD - 1
    fail(tracker)
    assert not tracker.available(A)


def test_success_resets_the_failure_count(tracker: HealthTracker) -> None:
    fail(tracker, THRESHOLD - 1)
    serve(tracker, Outcome.OK, 200)
    fail(tracker, THRESHOLD - 1)
    assert tracker.available(A)


def test_flows_without_a_backend_are_ignored(tracker: HealthTracker) -> None:
    flow = start(tracker, None)
    finish(tracker, flow, Outcome.BACKEND_ERROR, 503)
    assert repr(tracker) == "<HealthTracker backends=0 unavailable=0>"


# --------------------------------------------------------------------------- the tracker's trial


def test_half_open_backend_takes_exactly_one_trial_request(
    tracker: HealthTracker, clock: Clock
) -> None:
    open_breaker(tracker)
    clock.advance(COOLDOWN)
    assert tracker.available(A)
    trial = start(tracker)
    assert not tracker.available(A)
    assert tracker.state(A.id).trial_in_flight
    finish(tracker, trial, Outcome.OK, 200)
    assert tracker.available(A)
    assert tracker.state(A.id).breaker == "closed"


def test_failed_trial_reopens_the_breaker(tracker: HealthTracker, clock: Clock) -> None:
    open_breaker(tracker)
    clock.advance(COOLDOWN)
    finish(tracker, start(tracker), Outcome.BACKEND_ERROR, 502)
    health = tracker.state(A.id)
    assert (health.breaker, health.opened_at) == ("open", clock.now)
    assert not tracker.available(A)


@pytest.mark.parametrize(("outcome", "status"), [
    (Outcome.CLIENT_DISCONNECTED, 499), (Outcome.OK, 400), (Outcome.OK, 429),
    (Outcome.CANCELLED, None),
])
def test_trial_without_verdict_frees_the_slot_for_the_next_request(
    tracker: HealthTracker, clock: Clock, outcome: Outcome, status: int | None
) -> None:
    open_breaker(tracker)
    clock.advance(COOLDOWN)
    finish(tracker, start(tracker), outcome, status)
    assert tracker.state(A.id).breaker == "half_open"
    assert tracker.available(A)
    start(tracker)
    assert not tracker.available(A)


def test_first_byte_of_a_good_answer_ends_the_trial(tracker: HealthTracker, clock: Clock) -> None:
    """A trial streaming a long generation need not hold the backend to one request."""
    open_breaker(tracker)
    clock.advance(COOLDOWN)
    trial = start(tracker)
    trial.status, trial.t_first_byte = 200, time.monotonic()
    tracker.on_response(trial)
    assert tracker.state(A.id).breaker == "closed"
    assert tracker.available(A)
    finish(tracker, trial, Outcome.OK, 200)
    assert tracker.state(A.id).consecutive_failures == 0


def test_first_byte_of_an_error_answer_does_not_end_the_trial(
    tracker: HealthTracker, clock: Clock
) -> None:
    open_breaker(tracker)
    clock.advance(COOLDOWN)
    trial = start(tracker)
    trial.status, trial.t_first_byte = 503, time.monotonic()
    tracker.on_response(trial)
    assert tracker.state(A.id).trial_in_flight
    finish(tracker, trial, Outcome.OK, 503)
    assert tracker.state(A.id).breaker == "open"


def test_request_let_through_during_a_trial_is_not_the_trial(
    tracker: HealthTracker, clock: Clock
) -> None:
    """A request that reaches a half-open backend anyway (pinned, or a policy that does not
    filter) neither takes the trial over nor ends it."""
    open_breaker(tracker)
    clock.advance(COOLDOWN)
    trial = start(tracker)
    other = start(tracker)
    finish(tracker, other, Outcome.OK, 200)
    assert tracker.state(A.id).breaker == "half_open"
    assert tracker.state(A.id).trial_in_flight
    finish(tracker, trial, Outcome.OK, 200)
    assert tracker.state(A.id).breaker == "closed"


# --------------------------------------------------------------------------- retries


def retry(tracker: HealthTracker, flow: RequestFlow, to: Backend, outcome: Outcome) -> None:
    assert flow.backend is not None
    flow.attempts.append(Attempt(flow.backend, "backend failed", outcome))
    flow.backend = to
    tracker.on_retry(flow)


def test_on_retry_counts_the_failed_attempt_on_its_backend(tracker: HealthTracker) -> None:
    for _ in range(THRESHOLD):
        flow = start(tracker, A)
        retry(tracker, flow, B, Outcome.BACKEND_ERROR)
        finish(tracker, flow, Outcome.OK, 200)
    assert not tracker.available(A)
    assert tracker.state(A.id).consecutive_failures == THRESHOLD
    assert tracker.available(B)
    assert tracker.state(B.id).consecutive_failures == 0


def test_on_retry_from_a_trial_reopens_and_the_new_half_open_backend_gets_the_trial(
    tracker: HealthTracker, clock: Clock
) -> None:
    open_breaker(tracker, A)
    open_breaker(tracker, B)
    clock.advance(COOLDOWN)
    flow = start(tracker, A)
    retry(tracker, flow, B, Outcome.BACKEND_ERROR)
    assert tracker.state(A.id).breaker == "open"
    assert tracker.state(B.id).trial_in_flight
    assert not tracker.available(B)
    finish(tracker, flow, Outcome.OK, 200)
    assert tracker.state(B.id).breaker == "closed"


# --------------------------------------------------------------------------- probe verdicts


def test_failing_probe_makes_a_backend_unavailable_at_once(tracker: HealthTracker) -> None:
    tracker.record_probe(A.id, False, "HTTP 503 from /health")
    assert not tracker.available(A)
    health = tracker.state(A.id)
    assert (health.probe_ok, health.last_probe_error) == (False, "HTTP 503 from /health")
    tracker.record_probe(A.id, True, None)
    assert tracker.available(A)
    health = tracker.state(A.id)
    assert health.probe_ok is True
    assert health.last_probe_error == "HTTP 503 from /health"


def test_passing_probe_does_not_close_an_open_breaker(
    tracker: HealthTracker, clock: Clock
) -> None:
    """`/health` can be green while every generation fails: the breaker's trial decides."""
    open_breaker(tracker)
    tracker.record_probe(A.id, True, None)
    assert not tracker.available(A)
    assert tracker.state(A.id).breaker == "open"
    clock.advance(COOLDOWN)
    assert tracker.available(A)


def test_half_open_backend_with_a_failing_probe_is_unavailable(
    tracker: HealthTracker, clock: Clock
) -> None:
    open_breaker(tracker)
    clock.advance(COOLDOWN)
    tracker.record_probe(A.id, False, "cannot connect")
    assert not tracker.available(A)


def test_state_of_an_unknown_backend_is_healthy(tracker: HealthTracker) -> None:
    health = tracker.state("nope")
    assert health.available and health.breaker == "closed" and health.probe_ok is None


def test_forget_drops_the_backend_and_late_completions_do_not_bring_it_back(
    tracker: HealthTracker,
) -> None:
    fail(tracker, THRESHOLD - 1)
    in_flight = start(tracker)
    tracker.forget(A.id)
    assert repr(tracker) == "<HealthTracker backends=0 unavailable=0>"
    finish(tracker, in_flight, Outcome.BACKEND_ERROR, 502)
    assert repr(tracker) == "<HealthTracker backends=0 unavailable=0>"
    assert tracker.available(A)


# --------------------------------------------------------------------------- the ejection cap


def backends(n: int, models: tuple[str, ...] = ("m",)) -> list[Backend]:
    return [Backend(f"http://10.0.0.{i}:8000", models) for i in range(n)]


def capped(percent: int, clock: Clock) -> HealthTracker:
    return HealthTracker(THRESHOLD, COOLDOWN, clock, max_ejection_percent=percent)


def test_breaker_never_takes_the_last_backend_of_a_model_out(clock: Clock) -> None:
    tracker = capped(50, clock)
    open_breaker(tracker, A)
    assert not tracker.available(A)
    assert tracker.routable([A]) == [A]
    assert tracker.kept_by_cap([A]) == [A]


def test_at_most_the_capped_share_of_a_models_backends_is_held_out(clock: Clock) -> None:
    """50 %, rounded down: 1 of 2 or 3, 2 of 4 or 5, whatever the breakers say."""
    for n in range(1, 6):
        tracker = capped(50, clock)
        fleet = backends(n)
        for backend in fleet:
            open_breaker(tracker, backend)
        routable = tracker.routable(fleet)
        assert len(routable) == n - n // 2, n
        assert routable == [b for b in fleet if b in routable]  # pool order kept


def test_one_open_breaker_of_two_backends_still_ejects(tracker: HealthTracker) -> None:
    open_breaker(tracker, A)
    assert tracker.routable([A, B]) == [B]
    assert tracker.kept_by_cap([A, B]) == []


def test_cap_puts_back_the_fewest_failures_first_then_the_latest_ejected(
    clock: Clock,
) -> None:
    tracker = capped(50, clock)
    open_breaker(tracker, A)
    clock.advance(1)
    open_breaker(tracker, B)
    assert tracker.routable([A, B]) == [B]  # same failures: B went out last
    clock.advance(COOLDOWN)
    finish(tracker, start(tracker, B), Outcome.OK, 500)  # B's trial fails: one more failure
    assert tracker.state(B.id).consecutive_failures == THRESHOLD + 1
    assert tracker.routable([A, B]) == [A]


def test_probe_confirmed_deaths_stay_out_and_do_not_count(tracker: HealthTracker) -> None:
    """The cap is a share of the backends the probes do not fail: a failing probe is a clear
    no, and the last live backend stays in even when the breaker opened on it too."""
    tracker.record_probe(A.id, False, "cannot connect")
    open_breaker(tracker, B)
    assert tracker.routable([A, B]) == [B]
    tracker.record_probe(B.id, False, "HTTP 503 from /health")
    assert tracker.routable([A, B]) == []


def test_without_probes_every_backend_counts_as_alive(tracker: HealthTracker) -> None:
    open_breaker(tracker, A)
    open_breaker(tracker, B)
    assert tracker.state(A.id).probe_ok is None
    assert len(tracker.routable([A, B])) == 1


def test_cap_of_100_lets_breakers_take_every_backend_out(clock: Clock) -> None:
    tracker = capped(100, clock)
    open_breaker(tracker, A)
    open_breaker(tracker, B)
    assert tracker.routable([A, B]) == []


def test_cap_of_0_keeps_every_live_backend_routable(clock: Clock) -> None:
    tracker = capped(0, clock)
    open_breaker(tracker, A)
    tracker.record_probe(B.id, False, "cannot connect")
    assert tracker.routable([A, B]) == [A]


def test_cap_counts_per_model(tracker: HealthTracker) -> None:
    """A backend serving two models is one of two for the first and the only one for the
    second: its open breaker takes it out of the first only."""
    shared = Backend("http://shared:8000", ("m", "solo"))
    other = Backend("http://other:8000", ("m",))
    open_breaker(tracker, shared)
    assert tracker.routable([shared, other]) == [other]
    assert tracker.routable([shared]) == [shared]


def test_exclude_applies_after_the_cap(tracker: HealthTracker) -> None:
    """A retry's tried backends are still the model's: they do not make room for more."""
    open_breaker(tracker, A)
    open_breaker(tracker, B)
    kept = tracker.routable([A, B])
    assert len(kept) == 1
    assert tracker.routable([A, B], exclude={kept[0].id}) == []
    assert tracker.routable([A, B], exclude={"x"}) == kept


def test_request_routed_by_the_cap_is_the_trial_and_closes_on_success(
    tracker: HealthTracker, clock: Clock
) -> None:
    open_breaker(tracker, A)
    assert tracker.routable([A]) == [A]
    first, second = start(tracker, A), start(tracker, A)
    assert tracker.state(A.id).trial_in_flight
    finish(tracker, second, Outcome.OK, 200)  # not the trial: says nothing
    assert tracker.state(A.id).breaker == "open"
    finish(tracker, first, Outcome.OK, 200)
    assert tracker.state(A.id).breaker == "closed"
    assert tracker.available(A)


def test_failed_early_trial_reopens_and_hands_the_trial_on(
    tracker: HealthTracker, clock: Clock
) -> None:
    open_breaker(tracker, A)
    clock.advance(5)
    finish(tracker, start(tracker, A), Outcome.BACKEND_ERROR, 502)
    health = tracker.state(A.id)
    assert (health.breaker, health.opened_at, health.trial_in_flight) == ("open", clock.now, False)
    assert health.consecutive_failures == THRESHOLD + 1
    start(tracker, A)
    assert tracker.state(A.id).trial_in_flight


def test_good_answer_from_a_kept_backend_ends_the_models_other_cooldowns(
    tracker: HealthTracker, clock: Clock
) -> None:
    """The cap's backend answering well shows the faults were the requests': the other
    backends of its model get their trial at once, one each; a broken one fails it and waits
    a whole cooldown again."""
    other_model = Backend("http://c:8000", ("other",))
    for backend in (A, other_model, B):
        open_breaker(tracker, backend)
        clock.advance(1)
    assert tracker.routable([A, B]) == [B]  # the latest opened
    finish(tracker, start(tracker, B), Outcome.OK, 200)
    assert [tracker.state(b.id).breaker for b in (A, B, other_model)] == [
        "half_open", "closed", "open"]
    assert tracker.routable([A, B]) == [A, B]
    trial = start(tracker, A)
    assert tracker.routable([A, B]) == [B]  # one trial at a time
    finish(tracker, trial, Outcome.OK, 500)
    health = tracker.state(A.id)
    assert (health.breaker, health.opened_at) == ("open", clock.now)
    assert tracker.routable([A, B]) == [B]


def test_only_an_early_trial_ends_other_cooldowns(tracker: HealthTracker, clock: Clock) -> None:
    """A trial after a cooldown is one backend's own recovery: it says nothing of others."""
    open_breaker(tracker, A)
    open_breaker(tracker, B)
    clock.advance(COOLDOWN)
    finish(tracker, start(tracker, A), Outcome.OK, 200)
    assert tracker.state(B.id).breaker == "half_open"  # its own cooldown, not A's doing
    open_breaker(tracker, B)
    finish(tracker, start(tracker, A), Outcome.OK, 200)
    assert tracker.state(B.id).breaker == "open"


def test_bad_max_ejection_percent_is_refused(clock: Clock) -> None:
    for percent in (-1, 101):
        with pytest.raises(ValueError, match="max_ejection_percent"):
            capped(percent, clock)


# --------------------------------------------------------------------------- the prober


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def backend_for(url: str) -> Backend:
    return Backend(url, MODELS)


def prober_for(
    tracker: HealthTracker, backends: list[Backend], session: aiohttp.ClientSession,
    timeout: float = 1.0, interval: float = 10.0,
) -> HealthProber:
    return HealthProber(tracker, BackendPool(backends), session, interval=interval,
                        path="/health", timeout=timeout)


async def test_probe_follows_the_engines_health_status(
    engines: list[RunningEngine], session: aiohttp.ClientSession, tracker: HealthTracker
) -> None:
    sick, well = (backend_for(engine.url) for engine in engines)
    prober = prober_for(tracker, [sick, well], session)
    await prober.probe_once()
    assert tracker.state(sick.id).probe_ok and tracker.state(well.id).probe_ok

    engines[0].behaviour.health_status = 503
    await prober.probe_once()
    assert not tracker.available(sick)
    assert tracker.state(sick.id).last_probe_error == "HTTP 503 from /health"
    assert tracker.available(well)

    engines[0].behaviour.health_status = 200
    await prober.probe_once()
    assert tracker.available(sick)


async def test_unreachable_backend_fails_its_first_probe(
    session: aiohttp.ClientSession, tracker: HealthTracker
) -> None:
    nowhere = backend_for(f"http://127.0.0.1:{free_port()}")
    prober = prober_for(tracker, [nowhere], session, timeout=2.0)
    started = time.monotonic()
    await prober.probe_once()
    assert time.monotonic() - started < 2.0
    assert not tracker.available(nowhere)
    error = tracker.state(nowhere.id).last_probe_error
    assert error is not None and error.startswith("cannot connect")


async def test_hanging_health_fails_within_the_timeout_and_ejects_on_the_second_probe(
    aiohttp_server: AiohttpServer, session: aiohttp.ClientSession, tracker: HealthTracker
) -> None:
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/health", hang)
    server = await aiohttp_server(app)
    stuck = backend_for(str(server.make_url("")))
    prober = prober_for(tracker, [stuck], session, timeout=0.2)
    try:
        for probe in (1, 2):
            started = time.monotonic()
            await prober.probe_once()
            assert time.monotonic() - started < 1.0
            # One missed deadline is noise (a busy engine); two in a row eject.
            assert tracker.available(stuck) is (probe == 1)
        assert tracker.state(stuck.id).last_probe_error == "no answer within 0.2s"
    finally:
        release.set()


async def test_an_answer_between_silent_probes_resets_the_count(
    aiohttp_server: AiohttpServer, session: aiohttp.ClientSession, tracker: HealthTracker
) -> None:
    release = asyncio.Event()
    hanging = True

    async def health(request: web.Request) -> web.Response:
        if hanging:
            await release.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/health", health)
    server = await aiohttp_server(app)
    flaky = backend_for(str(server.make_url("")))
    prober = prober_for(tracker, [flaky], session, timeout=0.2)
    try:
        await prober.probe_once()
        hanging = False
        await prober.probe_once()
        hanging = True
        await prober.probe_once()
        assert tracker.available(flaky)
    finally:
        release.set()


async def test_dropped_connection_counts_as_silence(
    session: aiohttp.ClientSession, tracker: HealthTracker
) -> None:
    async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(slam, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    rude = backend_for(f"http://127.0.0.1:{port}")
    prober = prober_for(tracker, [rude], session)
    try:
        await prober.probe_once()
        assert tracker.available(rude)
        await prober.probe_once()
        assert not tracker.available(rude)
        error = tracker.state(rude.id).last_probe_error
        assert error is not None and error.startswith("connection lost")
    finally:
        server.close()
        await server.wait_closed()


async def test_backend_removed_during_a_probe_is_not_recorded(
    engines: list[RunningEngine], session: aiohttp.ClientSession, tracker: HealthTracker
) -> None:
    gone, stays = (backend_for(engine.url) for engine in engines)
    pool = BackendPool([gone, stays])
    prober = HealthProber(tracker, pool, session, interval=10.0, path="/health", timeout=1.0)
    probing = asyncio.create_task(prober.probe_once())
    await asyncio.sleep(0)
    pool.replace([stays])
    await probing
    assert tracker.state(gone.id).probe_ok is None
    assert tracker.state(stays.id).probe_ok is True


async def test_run_probes_every_interval_and_stops_on_cancel(
    aiohttp_server: AiohttpServer, session: aiohttp.ClientSession, tracker: HealthTracker
) -> None:
    hits = 0

    async def health(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.Response()

    app = web.Application()
    app.router.add_get("/health", health)
    server = await aiohttp_server(app)
    prober = prober_for(tracker, [backend_for(str(server.make_url("")))], session,
                        interval=0.02)
    task = asyncio.create_task(prober.run())
    async with asyncio.timeout(2.0):
        while hits < 3:
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    stopped_at = hits
    await asyncio.sleep(0.1)
    assert hits == stopped_at


async def test_cancel_during_a_probe_ends_run_at_once(
    aiohttp_server: AiohttpServer, session: aiohttp.ClientSession, tracker: HealthTracker
) -> None:
    release = asyncio.Event()
    entered = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/health", hang)
    server = await aiohttp_server(app)
    stuck = backend_for(str(server.make_url("")))
    prober = prober_for(tracker, [stuck], session, timeout=30.0)
    task = asyncio.create_task(prober.run())
    try:
        await asyncio.wait_for(entered.wait(), 2.0)
        task.cancel()
        async with asyncio.timeout(1.0):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert tracker.state(stuck.id).probe_ok is None
    finally:
        release.set()


# --------------------------------------------------------------------------- cost


@pytest.mark.slow
def test_available_costs_a_lookup(tracker: HealthTracker, clock: Clock) -> None:
    """`available()` runs per candidate per request: measure it for each breaker state."""
    backends = [Backend(f"http://10.0.0.{n}:8000", ("m",)) for n in range(16)]
    for backend in backends:
        serve(tracker, Outcome.OK, 200, backend)
    open_breaker(tracker, backends[2])
    clock.advance(COOLDOWN)
    start(tracker, backends[2])  # half-open with its trial in flight
    open_breaker(tracker, backends[1])
    cases = {"closed": backends[0], "open": backends[1], "half_open_trial": backends[2],
             "unknown": Backend("http://10.0.1.1:8000", ("m",))}
    n = 200_000
    available = tracker.available
    for name, backend in cases.items():
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                available(backend)
            best = min(best, (time.perf_counter() - t0) / n)
        print(f"available() {name}: {best * 1e9:.0f} ns")
        assert best < 10e-6  # generous: shared CI machines; a scan or allocation is far slower


@pytest.mark.slow
def test_routable_costs_one_pass() -> None:
    """`routable()` runs per request over the model's backends: cheap while nothing is held
    out, and not much dearer while the cap puts backends back (measured here: 2-3 us for 8
    backends with nothing ejected, as the filter it replaced; 13-15 us with the cap biting)."""
    tracker = HealthTracker(THRESHOLD, 3600.0)  # the real clock, as in the router
    fleet = backends(8)
    for backend in fleet:
        serve(tracker, Outcome.OK, 200, backend)
    n = 50_000
    routable = tracker.routable
    for case in ("nothing_ejected", "one_ejected", "cap_bites"):
        if case == "one_ejected":
            open_breaker(tracker, fleet[3])
        elif case == "cap_bites":
            for backend in fleet[4:]:
                open_breaker(tracker, backend)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                routable(fleet)
            best = min(best, (time.perf_counter() - t0) / n)
        print(f"routable() of 8, {case}: {best * 1e6:.2f} us")
        assert best < (60e-6 if case == "cap_bites" else 20e-6)  # generous: shared machines


@pytest.mark.parametrize("model_type", ["chat", "completion", "embeddings", "rerank", "score",
                                        "transcription"])
async def test_model_type_probes_send_a_real_minimal_request(
    engine: RunningEngine, model_type: str
) -> None:
    pool = BackendPool([Backend(engine.url, ("chat-model",), model_type=model_type)])
    tracker = HealthTracker(3, 30.0)
    async with aiohttp.ClientSession() as session:
        prober = HealthProber(tracker, pool, session, 10, "/health", 5)
        await prober.probe_once()
        assert tracker.state(pool.backends[0].id).probe_ok is True
        assert engine.state.completed == 1  # a real request, not GET /health
        engine.behaviour.fail_status = 500
        await prober.probe_once()
    state = tracker.state(pool.backends[0].id)
    assert state.probe_ok is False and "HTTP 500" in (state.last_probe_error or "")
