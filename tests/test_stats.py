"""`RequestStats` driven by hand-made flows and a fake clock: in-flight, QPS, TTFT, latency."""

from __future__ import annotations


import pytest

from router.backends.pool import Backend
from router.flow import Outcome, RequestFlow
from router.stats.requests import BackendSnapshot, RequestStats

from .conftest import Clock, make_flow

WINDOW = 10.0
A = Backend("http://a:8000", ("m",))
B = Backend("http://b:8000", ("m",))


@pytest.fixture
def stats(clock: Clock) -> RequestStats:
    return RequestStats(WINDOW, clock=clock)


def start(stats: RequestStats, clock: Clock, backend: Backend | None = A) -> RequestFlow:
    flow = make_flow(backend, clock.now)
    stats.on_new(flow)
    return flow


def finish(
    stats: RequestStats, clock: Clock, flow: RequestFlow, *, ttft: float | None,
    duration: float, outcome: Outcome = Outcome.OK, status: int = 200,
) -> None:
    """Complete `flow` `duration` seconds after its start (the clock moves there)."""
    clock.now = flow.t_start + duration
    if ttft is not None:
        flow.t_first_byte = flow.t_start + ttft
    flow.t_end, flow.outcome, flow.status = clock.now, outcome, status
    stats.on_complete(flow)


def snapshot(stats: RequestStats, backend: Backend = A) -> BackendSnapshot:
    return stats.for_backend(backend.id).snapshot()


def test_in_flight_goes_up_on_new_and_down_on_complete(
    stats: RequestStats, clock: Clock
) -> None:
    first, second = start(stats, clock), start(stats, clock)
    other = start(stats, clock, B)
    assert (snapshot(stats).in_flight, snapshot(stats, B).in_flight) == (2, 1)
    assert stats.total_in_flight() == 3
    finish(stats, clock, first, ttft=0.1, duration=0.5)
    assert snapshot(stats).in_flight == 1
    finish(stats, clock, second, ttft=0.1, duration=0.6)
    finish(stats, clock, other, ttft=0.1, duration=0.7)
    assert (snapshot(stats).in_flight, snapshot(stats, B).in_flight) == (0, 0)
    assert stats.total_in_flight() == 0


def test_qps_ttft_and_latency_are_averaged_over_the_window(
    stats: RequestStats, clock: Clock
) -> None:
    assert snapshot(stats) == BackendSnapshot(in_flight=0, qps=0.0, avg_ttft=None,
                                              avg_latency=None)
    flows = [start(stats, clock) for _ in range(3)]
    clock.advance(2)
    flows += [start(stats, clock) for _ in range(2)]
    for flow, ttft, duration in zip(flows, [0.1, 0.2, 0.3, 0.4, 0.5], [1, 2, 3, 4, 5]):
        finish(stats, clock, flow, ttft=ttft, duration=duration)
    shot = snapshot(stats)
    assert shot.in_flight == 0
    assert shot.qps == pytest.approx(5 / WINDOW)
    assert shot.avg_ttft == pytest.approx(0.3)
    assert shot.avg_latency == pytest.approx(3.0)
    # The other backend saw none of it.
    assert snapshot(stats, B) == BackendSnapshot(0, 0.0, None, None)


def test_a_flow_without_first_byte_counts_for_latency_not_ttft(
    stats: RequestStats, clock: Clock
) -> None:
    ok, failed = start(stats, clock), start(stats, clock)
    finish(stats, clock, ok, ttft=0.2, duration=1.0)
    finish(stats, clock, failed, ttft=None, duration=3.0, outcome=Outcome.BACKEND_ERROR,
           status=503)
    shot = snapshot(stats)
    assert shot.avg_ttft == pytest.approx(0.2)
    assert shot.avg_latency == pytest.approx(2.0)


def test_requests_older_than_the_window_expire(stats: RequestStats, clock: Clock) -> None:
    clock.now = 1000.0
    finish(stats, clock, start(stats, clock), ttft=0.1, duration=0.5)
    clock.now = 1005.0
    finish(stats, clock, start(stats, clock), ttft=0.3, duration=0.5)
    clock.now = 1009.9
    shot = snapshot(stats)
    assert shot.qps == pytest.approx(2 / WINDOW) and shot.avg_ttft == pytest.approx(0.2)
    clock.now = 1010.0  # the second-1000 bucket is now `window` seconds old
    shot = snapshot(stats)
    assert shot.qps == pytest.approx(1 / WINDOW) and shot.avg_ttft == pytest.approx(0.3)
    clock.now = 1015.0
    assert snapshot(stats) == BackendSnapshot(0, 0.0, None, None)


@pytest.mark.parametrize("window", [10.0, 3.0, 2.5, 0.5])
def test_qps_of_steady_traffic_is_its_rate_for_any_window(clock: Clock, window: float) -> None:
    stats = RequestStats(window, clock=clock)
    for second in range(30):  # one request a second, at the start of each second
        clock.now = 1000.0 + second
        finish(stats, clock, start(stats, clock), ttft=0.01, duration=0.02)
        clock.now = 1000.0 + second
        if second >= window:  # the window is full of traffic
            assert snapshot(stats).qps == pytest.approx(1.0), (second, window)


def test_expiry_keeps_in_flight_of_long_requests(stats: RequestStats, clock: Clock) -> None:
    long = start(stats, clock)
    clock.advance(3 * WINDOW)
    shot = snapshot(stats)
    assert (shot.in_flight, shot.qps) == (1, 0.0)
    finish(stats, clock, long, ttft=1.0, duration=3 * WINDOW)
    shot = snapshot(stats)
    assert shot.in_flight == 0
    assert shot.avg_latency == pytest.approx(3 * WINDOW)


def test_memory_is_bounded_by_the_window_not_the_traffic(
    stats: RequestStats, clock: Clock
) -> None:
    for _ in range(200):  # 200 seconds of 5 requests a second, never scraped
        for _ in range(5):
            finish(stats, clock, start(stats, clock), ttft=0.01, duration=0.02)
        clock.now = int(clock.now) + 1.0
    # Private, but it is the point: one bucket per second of the window, at most.
    assert len(stats.for_backend(A.id)._window) <= WINDOW + 1
    # At second 1200 the window holds seconds 1191..1199: 45 requests.
    assert snapshot(stats).qps == pytest.approx(45 / WINDOW)


def test_rejected_flow_without_backend_changes_nothing(
    stats: RequestStats, clock: Clock
) -> None:
    flow = start(stats, clock, backend=None)
    finish(stats, clock, flow, ttft=None, duration=0.001, outcome=Outcome.REJECTED, status=400)
    assert stats.backends == {}
    assert stats.total_in_flight() == 0
    assert snapshot(stats) == BackendSnapshot(0, 0.0, None, None)


def test_in_flight_returns_to_zero_after_any_mix_of_outcomes(
    stats: RequestStats, clock: Clock
) -> None:
    endings = [
        (Outcome.OK, 200, 0.1),
        (Outcome.OK, 429, 0.1),
        (Outcome.CLIENT_DISCONNECTED, 499, None),
        (Outcome.BACKEND_ERROR, 503, None),
        (Outcome.BACKEND_ERROR, 200, 0.1),
        (Outcome.TIMEOUT, 504, None),
        (Outcome.CANCELLED, None, None),
        (Outcome.ROUTER_ERROR, 500, None),
        (Outcome.REJECTED, 400, None),
    ]
    open_flows = []
    for n, ending in enumerate(endings):
        backend = None if ending[0] is Outcome.REJECTED else (A, B)[n % 2]
        open_flows.append((start(stats, clock, backend), ending))
        clock.advance(0.3)
    assert stats.total_in_flight() == len(endings) - 1
    # Complete in a different order from the one they started in.
    for flow, (outcome, status, ttft) in reversed(open_flows):
        finish(stats, clock, flow, ttft=ttft, duration=clock.now - flow.t_start + 0.1,
               outcome=outcome, status=status or 0)
    assert stats.total_in_flight() == 0
    assert {backend_id: s.in_flight for backend_id, s in stats.backends.items()} == {
        A.id: 0, B.id: 0,
    }
