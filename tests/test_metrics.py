"""`/metrics`: production-stack's names and the router's own, fed by events, read at scrape time.

Two kinds of tests: `Metrics` driven by hand-made flows and a fake clock (exact values), and a
real router on loopback (what a scrape shows after real traffic, and `promtool`'s verdict).

Tests marked `needs_tail` need `RequestFlow.tail` (the proxy keeping the last 4 KiB of the
answer, docs/observability.md "Integration"): they skip until the field exists and then run
by themselves. Unit tests here set `tail` on a subclass of the flow meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client.parser import text_string_to_metric_families

from router import __version__
from router.backends.pool import Backend, BackendPool
from router.backends.tracker import HealthTracker
from router.flow import Attempt, Outcome, RequestFlow
from router.keys import CHOOSER, METRICS
from router.observe.metrics import Metrics, error_kind
from router.observe.process_usage import ProcessUsage
from router.observe.usage import find_usage
from router.stats.engine import EngineSnapshot, EngineStats
from router.stats.requests import RequestStats
from router.testing import RunningEngine

from .conftest import Clock, CHAT, RouterUnderTest, StartRouter, config_for, make_flow
from .test_usage import CHAT_JSON, CHUNK, USAGE_CHUNK, sse

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]

needs_tail = pytest.mark.skipif(
    "tail" not in RequestFlow.__dataclass_fields__,
    reason="needs RequestFlow.tail: the proxy keeping the end of the answer (integration)",
)

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def parse(text: str) -> Samples:
    """sample name -> {labels tuple: value}, from Prometheus text."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


async def scrape_text(session: aiohttp.ClientSession, router: RouterUnderTest) -> str:
    async with session.get(router.url + "/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        return await response.text()


async def scrape(session: aiohttp.ClientSession, router: RouterUnderTest) -> Samples:
    return parse(await scrape_text(session, router))


def by_label(series: dict[Any, float], *names: str) -> dict[tuple[str, ...], float]:
    """{labels: value} keyed by the values of `names` only (summed over the others)."""
    result: dict[tuple[str, ...], float] = {}
    for labels, value in series.items():
        found = dict(labels)
        key = tuple(found[name] for name in names)
        result[key] = result.get(key, 0.0) + value
    return result


async def post(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> int:
    async with session.post(url, **kwargs) as response:
        await response.read()
        return response.status


# --- Metrics driven by hand-made flows --------------------------------------------------------

WINDOW = 10.0
A = Backend("http://a:8000", ("m", "m2"))
B = Backend("http://b:8000", ("m",))


@pytest.fixture
def pool() -> BackendPool:
    return BackendPool([A, B])


@pytest.fixture
def health(clock: Clock) -> HealthTracker:
    return HealthTracker(failure_threshold=2, cooldown=30.0, clock=clock)


@pytest.fixture
def metrics(pool: BackendPool, health: HealthTracker, clock: Clock) -> Metrics:
    return Metrics(RequestStats(WINDOW, clock=clock), pool, health, clock=clock, retention=60.0)


def samples(metrics: Metrics) -> Samples:
    return parse(metrics.render().decode())


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get(name, {}).get(tuple(sorted(labels.items())))


def run(metrics: Metrics, clock: Clock, flow: RequestFlow, *, ttft: float | None = 0.1,
        duration: float = 1.0, status: int = 200, outcome: Outcome = Outcome.OK,
        tail: bytes = b"") -> None:
    """Events of one request from `on_new` (now) to `on_complete`, `duration` later."""
    metrics.on_new(flow)
    flow.status = status
    flow.t_headers = flow.t_start + (ttft or 0.0) / 2
    if ttft is not None:
        flow.t_first_byte = flow.t_start + ttft
        metrics.on_response(flow)
    flow.t_end = flow.t_start + duration
    clock.now = flow.t_end
    flow.outcome = outcome
    flow.tail = tail  # type: ignore[attr-defined]
    metrics.on_complete(flow)


def test_in_flight_gauges_follow_a_request_from_prefill_to_decoding_to_done(
    metrics: Metrics, clock: Clock
) -> None:
    flow = make_flow(A, clock.now, stream=True)
    metrics.on_new(flow)
    labels = {"server": A.url, "model": "m"}
    assert value(metrics, "vllm:num_requests_running", **labels) == 1
    assert value(metrics, "vllm:num_prefill_requests", **labels) == 1
    assert value(metrics, "vllm:num_decoding_requests", **labels) == 0
    flow.t_headers = flow.t_first_byte = clock.now + 0.2
    metrics.on_response(flow)
    assert value(metrics, "vllm:num_requests_running", **labels) == 1
    assert value(metrics, "vllm:num_prefill_requests", **labels) == 0
    assert value(metrics, "vllm:num_decoding_requests", **labels) == 1
    # every (server, model) of the pool is exported, at zero
    assert value(metrics, "vllm:num_requests_running", server=A.url, model="m2") == 0
    assert value(metrics, "vllm:num_requests_running", server=B.url, model="m") == 0
    flow.status, flow.outcome, flow.t_end = 200, Outcome.OK, clock.now + 1
    metrics.on_complete(flow)
    for name in ("vllm:num_requests_running", "vllm:num_prefill_requests",
                 "vllm:num_decoding_requests"):
        assert value(metrics, name, **labels) == 0, name
    assert metrics.in_flight() == 0


def test_a_retry_moves_the_request_and_is_counted_against_the_failed_backend(
    metrics: Metrics, clock: Clock
) -> None:
    flow = make_flow(A, clock.now)
    metrics.on_new(flow)
    flow.attempts.append(Attempt(A, "backend a failed", Outcome.BACKEND_ERROR))
    flow.backend = B
    metrics.on_retry(flow)
    assert value(metrics, "vllm:num_prefill_requests", server=A.url, model="m") == 0
    assert value(metrics, "vllm:num_prefill_requests", server=B.url, model="m") == 1
    assert value(metrics, "router_retries_total", server=A.url, model="m",
                 reason="backend_error") == 1
    flow.status, flow.outcome, flow.t_end = 502, Outcome.BACKEND_ERROR, clock.now + 1
    metrics.on_complete(flow)
    assert metrics.in_flight() == 0
    assert value(metrics, "vllm:request_errors_total", server=B.url, model="m",
                 error_type="backend_error") == 1
    assert value(metrics, "vllm:request_errors_total", server=A.url, model="m",
                 error_type="backend_error") is None


def test_refused_requests_count_under_an_empty_server_and_unknown_models_under_empty_model(
    metrics: Metrics, clock: Clock
) -> None:
    for model in ("m", "no-such-model", None):
        flow = make_flow(None, clock.now, model=model)
        metrics.on_new(flow)
        flow.status, flow.outcome, flow.t_end = 404, Outcome.REJECTED, clock.now
        metrics.on_complete(flow)
    incoming = samples(metrics)["vllm:num_incoming_requests_total"]
    assert by_label(incoming, "server", "model") == {("", "m"): 1.0, ("", ""): 2.0}
    errors = samples(metrics)["vllm:request_errors_total"]
    assert by_label(errors, "server", "model", "error_type") == {
        ("", "m", "rejected"): 1.0, ("", "", "rejected"): 2.0}
    assert value(metrics, "router_requests_total", endpoint=CHAT_PATH, status="404",
                 outcome="rejected") == 3
    assert metrics.in_flight() == 0


@pytest.mark.parametrize("outcome, status, kind", [
    (Outcome.OK, 200, None),
    (Outcome.OK, 304, None),
    (Outcome.OK, 429, "http_4xx"),
    (Outcome.OK, 503, "http_5xx"),
    (Outcome.TIMEOUT, 504, "timeout"),
    (Outcome.CLIENT_DISCONNECTED, 499, "client_disconnected"),
    (Outcome.CANCELLED, None, "cancelled"),
    (None, None, "unknown"),
])
def test_error_kind(outcome: Outcome | None, status: int | None, kind: str | None) -> None:
    flow = make_flow(A, 0.0)
    flow.outcome, flow.status = outcome, status
    assert error_kind(flow) == kind


def test_tokens_itl_and_tpot_come_from_the_usage_at_the_end_of_a_stream(
    metrics: Metrics, clock: Clock
) -> None:
    # 10 tokens: the first at 0.5 s, the last at 2.3 s -> 0.2 s between tokens
    run(metrics, clock, make_flow(A, clock.now, stream=True), ttft=0.5, duration=2.3,
        tail=sse(CHUNK, USAGE_CHUNK, "[DONE]"))
    labels = {"server": A.url, "model": "m"}
    assert value(metrics, "vllm:input_tokens_total", **labels) == 5
    assert value(metrics, "vllm:output_tokens_total", **labels) == 10
    assert value(metrics, "vllm:avg_itl", **labels) == pytest.approx(0.2)
    assert value(metrics, "router_time_per_output_token_seconds_count", **labels) == 1
    assert value(metrics, "router_time_per_output_token_seconds_sum", **labels) == (
        pytest.approx(0.2))


def test_a_json_answer_counts_tokens_but_gives_no_inter_token_latency(
    metrics: Metrics, clock: Clock
) -> None:
    run(metrics, clock, make_flow(A, clock.now), ttft=2.0, duration=2.01, tail=CHAT_JSON)
    labels = {"server": A.url, "model": "m"}
    assert value(metrics, "vllm:input_tokens_total", **labels) == 12
    assert value(metrics, "vllm:output_tokens_total", **labels) == 7
    assert value(metrics, "vllm:avg_itl", **labels) is None
    assert value(metrics, "router_time_per_output_token_seconds_count", **labels) is None


def test_no_tokens_from_an_error_answer_or_an_answer_without_usage(
    metrics: Metrics, clock: Clock
) -> None:
    run(metrics, clock, make_flow(A, clock.now), status=400, tail=CHAT_JSON)
    run(metrics, clock, make_flow(A, clock.now, stream=True), tail=sse(CHUNK, "[DONE]"))
    labels = {"server": A.url, "model": "m"}
    assert value(metrics, "vllm:input_tokens_total", **labels) == 0
    assert value(metrics, "vllm:output_tokens_total", **labels) == 0
    assert value(metrics, "vllm:avg_itl", **labels) is None


def test_qps_and_average_latency_over_the_window(metrics: Metrics, clock: Clock) -> None:
    for duration in (1.0, 3.0):
        run(metrics, clock, make_flow(A, clock.now), duration=duration)
    labels = {"server": A.url, "model": "m"}
    assert value(metrics, "vllm:current_qps", **labels) == pytest.approx(2 / WINDOW)
    assert value(metrics, "vllm:avg_latency", **labels) == pytest.approx(2.0)
    assert value(metrics, "vllm:current_qps", server=B.url, model="m") == 0
    assert value(metrics, "vllm:avg_latency", server=B.url, model="m") is None
    clock.now += WINDOW + 1
    assert value(metrics, "vllm:current_qps", **labels) == 0
    assert value(metrics, "vllm:avg_latency", **labels) is None


def test_histograms_by_server_model_endpoint_and_streaming(
    metrics: Metrics, clock: Clock
) -> None:
    run(metrics, clock, make_flow(A, clock.now, stream=True), ttft=0.3, duration=1.5)
    run(metrics, clock, make_flow(A, clock.now, model="m2"), ttft=0.7, duration=0.7)
    # headers, then no body: a time to first byte, no time to first token
    run(metrics, clock, make_flow(B, clock.now), ttft=None, duration=0.4, status=500)
    got = samples(metrics)
    route = ("server", "model", "endpoint", "streaming")
    assert by_label(got["router_time_to_first_token_seconds_count"], *route) == {
        (A.url, "m", CHAT_PATH, "true"): 1.0, (A.url, "m2", CHAT_PATH, "false"): 1.0}
    assert by_label(got["router_time_to_first_byte_seconds_count"], *route) == {
        (A.url, "m", CHAT_PATH, "true"): 1.0, (A.url, "m2", CHAT_PATH, "false"): 1.0,
        (B.url, "m", CHAT_PATH, "false"): 1.0}
    assert by_label(got["router_request_duration_seconds_sum"], "server") == {
        (A.url,): pytest.approx(2.2), (B.url,): pytest.approx(0.4)}
    assert by_label(got["vllm:request_latency_seconds_count"], "server", "model", "status") == {
        (A.url, "m", "200"): 1.0, (A.url, "m2", "200"): 1.0, (B.url, "m", "500"): 1.0}
    assert by_label(got["vllm:request_errors_total"], "server", "error_type") == {
        (B.url, "http_5xx"): 1.0}


def test_breaker_state_and_healthy_pods_come_from_the_health_tracker_at_scrape_time(
    metrics: Metrics, health: HealthTracker, clock: Clock
) -> None:
    assert value(metrics, "router_breaker_state", server=A.url, backend=A.id) == 0
    assert value(metrics, "vllm:healthy_pods_total", server=A.url, model="m2") == 1
    for _ in range(2):  # two backend failures open A's breaker
        flow = make_flow(A, clock.now)
        health.on_new(flow)
        flow.status, flow.outcome = 502, Outcome.BACKEND_ERROR
        health.on_complete(flow)
    assert value(metrics, "router_breaker_state", server=A.url, backend=A.id) == 2
    assert value(metrics, "vllm:healthy_pods_total", server=A.url, model="m") == 0
    assert value(metrics, "vllm:healthy_pods_total", server=A.url, model="m2") == 0
    assert value(metrics, "vllm:healthy_pods_total", server=B.url, model="m") == 1
    # A is m2's only backend: the ejection cap keeps routing m2 there; m has B.
    assert value(metrics, "router_ejection_cap_backends", model="m2") == 1
    assert value(metrics, "router_ejection_cap_backends", model="m") == 0
    clock.now += 30
    assert value(metrics, "router_breaker_state", server=A.url, backend=A.id) == 1
    health.record_probe(B.id, ok=False, error="HTTP 503")
    assert value(metrics, "vllm:healthy_pods_total", server=B.url, model="m") == 0
    assert value(metrics, "router_breaker_state", server=B.url, backend=B.id) == 0


def test_without_a_health_tracker_every_backend_counts_as_healthy(
    pool: BackendPool, clock: Clock
) -> None:
    metrics = Metrics(RequestStats(WINDOW, clock=clock), pool, clock=clock)
    assert value(metrics, "vllm:healthy_pods_total", server=B.url, model="m") == 1
    assert value(metrics, "router_breaker_state", server=B.url, backend=B.id) == 0


def test_series_of_a_backend_that_left_the_pool_go_after_the_retention_once_idle(
    metrics: Metrics, pool: BackendPool, clock: Clock
) -> None:
    run(metrics, clock, make_flow(A, clock.now))
    open_flow = make_flow(A, clock.now)
    metrics.on_new(open_flow)
    pool.replace([B])
    samples(metrics)  # A is noticed missing
    clock.now += 61
    assert A.url in metrics.servers()  # a request is still in flight there
    assert value(metrics, "vllm:num_requests_running", server=A.url, model="m") == 1
    open_flow.status, open_flow.outcome, open_flow.t_end = 200, Outcome.OK, clock.now
    metrics.on_complete(open_flow)
    text = metrics.render().decode()
    assert A.url not in text
    assert A.url not in metrics.servers()
    assert value(metrics, "router_requests_total", endpoint=CHAT_PATH, status="200",
                 outcome="ok") == 2  # route-level totals stay
    # it comes back: counting starts again
    pool.replace([A, B])
    run(metrics, clock, make_flow(A, clock.now))
    assert value(metrics, "vllm:num_incoming_requests_total", server=A.url, model="m") == 1


def test_a_backend_back_before_the_retention_keeps_its_series(
    metrics: Metrics, pool: BackendPool, clock: Clock
) -> None:
    run(metrics, clock, make_flow(A, clock.now))
    pool.replace([B])
    samples(metrics)
    clock.now += 30
    pool.replace([A, B])
    samples(metrics)
    pool.replace([B])
    clock.now += 40  # 70 s since first missing, but only 40 s since last seen
    samples(metrics)
    assert value(metrics, "vllm:num_incoming_requests_total", server=A.url, model="m") == 1


async def test_upstream_connect_time_is_measured_per_new_connection(
    engines: list[RunningEngine],
) -> None:
    engine = engines[0]
    pool = BackendPool([Backend(engine.url, (CHAT,))])
    metrics = Metrics(RequestStats(WINDOW), pool)
    async with aiohttp.ClientSession(connector=metrics.connector(limit=10)) as session:
        for _ in range(3):  # one connection, reused
            async with session.get(engine.url + "/v1/models") as response:
                await response.read()
        # a URL outside the pool is not labelled (the prober and scraper are elsewhere anyway)
        async with session.get(engines[1].url + "/v1/models") as response:
            await response.read()
    got = samples(metrics)
    assert by_label(got["router_upstream_connect_seconds_count"], "server") == {
        (engine.url,): 1.0}
    assert 0 < got["router_upstream_connect_seconds_sum"][(("server", engine.url),)] < 1


def test_server_of_picks_the_longest_base_url() -> None:
    root, prefixed = Backend("http://h:80", ("m",)), Backend("http://h:80/v2", ("m",))
    metrics = Metrics(RequestStats(WINDOW), BackendPool([root, prefixed]))
    assert metrics.server_of("http://h:80/v2/v1/chat/completions") == prefixed.url
    assert metrics.server_of("http://h:80/v1/chat/completions") == root.url
    assert metrics.server_of("http://h:80/v2x/v1/models") == root.url
    assert metrics.server_of("http://other:80/v1/models") is None


def cpu_per_call(calls: list[Callable[[], object]]) -> float:
    """µs of CPU per call, over all of `calls`."""
    started = time.process_time()
    for call in calls:
        call()
    return (time.process_time() - started) / len(calls) * 1e6


@pytest.mark.slow
def test_cost_per_request_of_the_metrics_subscriber(capsys: pytest.CaptureFixture[str]) -> None:
    """Not a pass/fail check: prints µs of CPU per request (on_new, on_response, on_complete)
    for a streamed chat answer, with and without usage in its tail, and the cost of one
    cached counter increment in the same run as a yardstick (the machine may be loaded)."""
    pool = BackendPool([A, B])
    metrics = Metrics(RequestStats(60.0), pool, HealthTracker(5, 30.0))
    tail = sse(*[CHUNK] * 30, USAGE_CHUNK, "[DONE]")[-4096:]
    tails = [bytes(bytearray(tail)) for _ in range(64)]  # distinct objects: parsed every time
    n = 100_000

    def flows(with_usage: bool) -> list[Callable[[], object]]:
        calls: list[Callable[[], object]] = []
        for i in range(n):
            flow = make_flow(A if i % 2 else B, 0.0, stream=True)
            flow.status, flow.outcome = 200, Outcome.OK
            flow.t_headers, flow.t_first_byte, flow.t_end = 0.05, 0.1, 2.0
            flow.tail = tails[i % len(tails)] if with_usage else b""  # type: ignore[attr-defined]

            def request(flow: RequestFlow = flow) -> None:
                metrics.on_new(flow)
                metrics.on_response(flow)
                metrics.on_complete(flow)

            calls.append(request)
        return calls

    without_usage = cpu_per_call(flows(False))
    with_usage = cpu_per_call(flows(True))
    child = PromCounter("yardstick", "", ["a"], registry=CollectorRegistry()).labels("x")
    inc = cpu_per_call([child.inc] * n)
    parse = cpu_per_call([functools.partial(find_usage, tails[i % 64]) for i in range(n)])
    assert metrics.in_flight() == 0
    assert value(metrics, "vllm:output_tokens_total", server=A.url, model="m") == n / 2 * 10
    with capsys.disabled():
        print(f"\nmetrics per request (on_new + on_response + on_complete, streamed): "
              f"{with_usage:.1f} µs with usage in the tail ({parse:.1f} µs of it the parse), "
              f"{without_usage:.1f} µs without; one cached Counter.inc() here: {inc:.2f} µs "
              f"(so {with_usage / inc:.0f} incs' worth)")


# --- a real router on loopback ----------------------------------------------------------------


async def test_metrics_count_requests_by_endpoint_status_and_outcome(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    sent: Counter[tuple[str, str, str]] = Counter()
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            assert await post(session, router.url + CHAT_PATH,
                              json={"model": CHAT, "messages": MESSAGES}) == 200
            sent[CHAT_PATH, "200", "ok"] += 1
        assert await post(session, router.url + CHAT_PATH,
                          json={"model": CHAT, "messages": MESSAGES, "stream": True}) == 200
        sent[CHAT_PATH, "200", "ok"] += 1
        assert await post(session, router.url + COMPLETIONS_PATH,
                          json={"model": CHAT, "prompt": "x"}) == 200
        sent[COMPLETIONS_PATH, "200", "ok"] += 1
        assert await post(session, router.url + CHAT_PATH, data=b"{oops",
                          headers={"Content-Type": "application/json"}) == 400
        sent[CHAT_PATH, "400", "rejected"] += 1
        assert await post(session, router.url + COMPLETIONS_PATH,
                          json={"model": "nope", "prompt": "x"}) == 404
        sent[COMPLETIONS_PATH, "404", "rejected"] += 1
        for engine in engines:
            engine.behaviour.fail_status = 429
        assert await post(session, router.url + COMPLETIONS_PATH,
                          json={"model": CHAT, "prompt": "x"}) == 429
        sent[COMPLETIONS_PATH, "429", "ok"] += 1
        await router.settled(7)
        samples = await scrape(session, router)

    requests = by_label(samples["router_requests_total"], "endpoint", "status", "outcome")
    assert requests == {key: float(count) for key, count in sent.items()}
    durations = by_label(samples["router_request_duration_seconds_count"], "endpoint")
    assert durations == {(CHAT_PATH,): 4.0, (COMPLETIONS_PATH,): 3.0}
    # Only answers that had a body from the backend have a time to first token.
    ttfts = by_label(samples["router_time_to_first_token_seconds_count"], "endpoint")
    assert ttfts == {(CHAT_PATH,): 3.0, (COMPLETIONS_PATH,): 2.0}
    ttft_sum = by_label(samples["router_time_to_first_token_seconds_sum"], "endpoint")
    duration_sum = by_label(samples["router_request_duration_seconds_sum"], "endpoint")
    assert 0 < ttft_sum[CHAT_PATH,] <= duration_sum[CHAT_PATH,]
    streaming = by_label(samples["router_time_to_first_token_seconds_count"], "streaming")
    assert streaming == {("true",): 1.0, ("false",): 4.0}

    backends = {engine.url for engine in engines}
    in_flight = by_label(samples["router_backend_in_flight_requests"], "url")
    assert in_flight == {(url,): 0.0 for url in backends}
    # Five requests were routed (2 + 1 + 1 + the 429), over a 60 s window.
    qps = by_label(samples["router_backend_qps"], "url")
    assert sum(qps.values()) == pytest.approx(5 / 60)
    current_qps = by_label(samples["vllm:current_qps"], "server", "model")
    assert set(current_qps) == {(url, model) for url in backends for model in ("chat-model",
                                                                               "whisper-model")}
    assert sum(current_qps.values()) == pytest.approx(5 / 60)

    incoming = by_label(samples["vllm:num_incoming_requests_total"], "server", "model")
    assert sum(incoming.values()) == 7
    assert incoming[("", "")] == 2  # the bad JSON and the unknown model
    assert sum(v for (server, _), v in incoming.items() if server in backends) == 5
    errors = by_label(samples["vllm:request_errors_total"], "error_type")
    assert errors == {("rejected",): 2.0, ("http_4xx",): 1.0}
    latency = by_label(samples["vllm:request_latency_seconds_count"], "status")
    assert latency == {("200",): 4.0, ("400",): 1.0, ("404",): 1.0, ("429",): 1.0}


async def test_in_flight_gauge_is_1_for_the_backend_serving_an_open_stream(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    for engine in engines:
        engine.behaviour.token_delay = 0.2
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + CHAT_PATH, json={
            "model": CHAT, "messages": MESSAGES, "max_tokens": 3, "stream": True,
        }) as response:
            assert response.status == 200
            serving = response.headers["x-router-backend"]
            await response.content.readline()  # the stream is open and under way
            assert sum(engine.state.open for engine in engines) == 1
            samples = await scrape(session, router)
            in_flight = by_label(samples["router_backend_in_flight_requests"], "backend")
            assert len(in_flight) == 2
            assert in_flight == {
                (backend,): 1.0 if backend == serving else 0.0 for (backend,) in in_flight
            }
            url = {b.id: b.url for b in router.app[METRICS].pool.backends}[serving]
            running = by_label(samples["vllm:num_requests_running"], "server", "model")
            assert running == {
                (b.url, model): 1.0 if (b.url, model) == (url, CHAT) else 0.0
                for b in router.app[METRICS].pool.backends for model in b.models
            }
            decoding = by_label(samples["vllm:num_decoding_requests"], "server")
            assert decoding[url,] == 1.0
            prefill = by_label(samples["vllm:num_prefill_requests"], "server")
            assert set(prefill.values()) == {0.0}
            async with session.get(router.url + "/health") as health:
                assert (await health.json())["in_flight"] == 1
            await response.read()
        await router.settled(1)
        samples = await scrape(session, router)
    in_flight = by_label(samples["router_backend_in_flight_requests"], "backend")
    assert set(in_flight.values()) == {0.0}
    assert set(samples["vllm:num_requests_running"].values()) == {0.0}


async def test_a_request_waiting_for_its_first_token_is_a_prefill_request(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    for engine in engines:
        engine.behaviour.first_token_delay = 0.5
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(post(session, router.url + CHAT_PATH, json={
            "model": CHAT, "messages": MESSAGES, "stream": True}))
        async with asyncio.timeout(2):
            while sum(engine.state.open for engine in engines) == 0:
                await asyncio.sleep(0.01)
        samples = await scrape(session, router)
        assert sum(by_label(samples["vllm:num_prefill_requests"], "server").values()) == 1
        assert sum(by_label(samples["vllm:num_decoding_requests"], "server").values()) == 0
        assert await task == 200
        await router.settled(1)


async def usage_from_stream(response: aiohttp.ClientResponse) -> dict[str, int]:
    usage: dict[str, int] = {}
    async for line in response.content:
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
    return usage


@needs_tail
async def test_token_counters_and_itl_from_real_answers_streamed_or_not(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    for engine in engines:
        engine.behaviour.token_delay = 0.01
    expected_in = expected_out = 0
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + CHAT_PATH, json={
            "model": CHAT, "messages": MESSAGES, "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True},
        }) as response:
            usage = await usage_from_stream(response)
        expected_in += usage["prompt_tokens"]
        expected_out += usage["completion_tokens"]
        async with session.post(router.url + CHAT_PATH, json={
            "model": CHAT, "messages": MESSAGES, "max_tokens": 4,
        }) as response:
            usage = (await response.json())["usage"]
        expected_in += usage["prompt_tokens"]
        expected_out += usage["completion_tokens"]
        # streamed without include_usage: no usage, nothing counted
        assert await post(session, router.url + CHAT_PATH, json={
            "model": CHAT, "messages": MESSAGES, "max_tokens": 4, "stream": True}) == 200
        await router.settled(3)
        samples = await scrape(session, router)
    assert sum(samples["vllm:input_tokens_total"].values()) == expected_in
    assert sum(samples["vllm:output_tokens_total"].values()) == expected_out
    assert sum(samples["router_time_per_output_token_seconds_count"].values()) == 1
    itl = [v for v in samples["vllm:avg_itl"].values()]
    assert len(itl) == 1 and 0.005 < itl[0] < 0.5


async def test_breaker_state_through_the_app(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    if router.app[METRICS].health is None:
        pytest.skip("needs app wiring: Metrics(stats, pool, health) in make_app (integration)")
    async with aiohttp.ClientSession() as session:
        samples = await scrape(session, router)
    states = by_label(samples["router_breaker_state"], "server")
    assert states == {(engine.url,): 0.0 for engine in engines}
    healthy = by_label(samples["vllm:healthy_pods_total"], "server")
    assert healthy == {(engine.url,): 2.0 for engine in engines}  # two models each


PROMTOOL_ACCEPTED = (
    "metric names should not contain ':'",
    # production-stack's name for a gauge; kept so its dashboards work (docs/observability.md)
    'vllm:healthy_pods_total non-counter metrics should not have "_total" suffix',
    'vllm:gpu_prefix_cache_hits_total non-counter metrics should not have "_total" suffix',
    'vllm:gpu_prefix_cache_queries_total non-counter metrics should not have "_total" suffix',
)


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (Debian: apt-get install prometheus)")
async def test_promtool_accepts_the_exposition(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    engines[0].behaviour.fail_status = 503
    async with aiohttp.ClientSession() as session:
        for body in (
            {"model": CHAT, "messages": MESSAGES},
            {"model": CHAT, "messages": MESSAGES, "stream": True,
             "stream_options": {"include_usage": True}},
            {"model": "nope", "messages": MESSAGES},
        ):
            for _ in range(2):
                await post(session, router.url + CHAT_PATH, json=body)
        await router.settled(6)
        text = await scrape_text(session, router)
    assert "vllm:num_requests_running" in text and "router_breaker_state" in text
    process = await asyncio.create_subprocess_exec(
        "promtool", "check", "metrics", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await process.communicate(text.encode())
    lines = [line for line in output.decode().splitlines() if line.strip()]
    problems = [line for line in lines if not any(ok in line for ok in PROMTOOL_ACCEPTED)]
    assert process.returncode in (0, 3), output  # 3: lint findings only
    assert problems == [], "\n".join(problems)


async def test_health_and_version_answer_json(router: RouterUnderTest) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(router.url + "/health") as response:
            assert response.status == 200
            assert await response.json() == {
                "status": "healthy", "backends": 2, "in_flight": 0,
                "routing": repr(router.app[CHOOSER].policy),
            }
        async with session.get(router.url + "/version") as response:
            assert response.status == 200
            assert await response.json() == {"version": __version__}


# --- production-stack's other names: engine figures, decoding time, the router process -------

PRODUCTION_STACK_NAMES = (
    # src/vllm_router/services/metrics_service and routers/metrics_router.py
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:num_requests_swapped",
    "vllm:gpu_prefix_cache_hit_rate", "vllm:gpu_prefix_cache_hits_total",
    "vllm:gpu_prefix_cache_queries_total", "vllm:current_qps", "vllm:avg_decoding_length",
    "vllm:num_prefill_requests", "vllm:num_decoding_requests",
    "vllm:num_incoming_requests_total", "vllm:healthy_pods_total", "vllm:avg_latency",
    "vllm:avg_itl", "vllm:input_tokens_total", "vllm:output_tokens_total",
    "vllm:request_errors_total", "vllm:request_latency_seconds_bucket",
    "router_cpu_usage_percent", "router_memory_usage_percent", "router_disk_usage_percent",
)


def test_avg_decoding_length_is_the_mean_time_from_first_byte_to_end(
    metrics: Metrics, clock: Clock
) -> None:
    run(metrics, clock, make_flow(A, clock.now), ttft=0.5, duration=2.5)  # decoding 2.0
    run(metrics, clock, make_flow(A, clock.now), ttft=0.2, duration=1.2)  # decoding 1.0
    run(metrics, clock, make_flow(A, clock.now), ttft=None, duration=3.0)  # no body: none
    labels = {"server": A.url, "model": "m"}
    assert value(metrics, "vllm:avg_decoding_length", **labels) == pytest.approx(1.5)
    assert value(metrics, "vllm:avg_decoding_length", server=B.url, model="m") is None
    clock.now += WINDOW + 1
    assert value(metrics, "vllm:avg_decoding_length", **labels) is None


def test_engine_gauges_come_from_the_last_scrape_of_each_engine(
    pool: BackendPool, clock: Clock
) -> None:
    store = EngineStats()
    metrics = Metrics(RequestStats(WINDOW, clock=clock), pool, clock=clock, engine_stats=store)
    assert value(metrics, "vllm:num_requests_waiting", server=A.url) is None  # not scraped
    store.update(A.id, EngineSnapshot(scraped_at=0.0, waiting=3.0, prefix_cache_hits=40.0,
                                      prefix_cache_queries=160.0))
    # vLLM V0 exports its own hit rate and the swapped requests.
    store.update(B.id, EngineSnapshot(scraped_at=0.0, waiting=0.0, swapped=2.0,
                                      prefix_cache_hit_rate=0.5))
    assert value(metrics, "vllm:num_requests_waiting", server=A.url) == 3.0
    assert value(metrics, "vllm:num_requests_waiting", server=B.url) == 0.0
    assert value(metrics, "vllm:num_requests_swapped", server=A.url) == 0.0  # V1: no swap
    assert value(metrics, "vllm:num_requests_swapped", server=B.url) == 2.0
    assert value(metrics, "vllm:gpu_prefix_cache_hit_rate", server=A.url) == 0.25
    assert value(metrics, "vllm:gpu_prefix_cache_hit_rate", server=B.url) == 0.5
    assert value(metrics, "vllm:gpu_prefix_cache_hits_total", server=A.url) == 40.0
    assert value(metrics, "vllm:gpu_prefix_cache_queries_total", server=A.url) == 160.0
    assert value(metrics, "vllm:gpu_prefix_cache_hits_total", server=B.url) is None


def test_process_usage_is_the_cpu_time_over_the_wall_time_since_the_last_sample() -> None:
    wall, cpu = Clock(), Clock()
    usage = ProcessUsage(clock=wall, cpu_clock=cpu)
    wall.now += 2.0
    cpu.now += 0.5
    usage.sample()
    assert usage.cpu_percent == pytest.approx(25.0)
    wall.now += 1.0
    cpu.now += 1.0
    usage.sample()
    assert usage.cpu_percent == pytest.approx(100.0)
    assert usage.disk_percent is not None and 0.0 < usage.disk_percent <= 100.0
    assert usage.memory_percent is not None and 0.0 < usage.memory_percent < 100.0


async def test_every_name_production_stack_exports_has_real_values(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    engines[0].behaviour.num_requests_waiting = 7  # before the router's first scrape
    for engine in engines:
        engine.behaviour.prefix_cache = True
    router = await start_router(config_for(engines))
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(router.url + CHAT_PATH, json={
                "model": CHAT, "messages": MESSAGES, "max_tokens": 3, "stream": True,
                "stream_options": {"include_usage": True},
            }) as response:
                assert response.status == 200
                await response.read()
        assert await post(session, router.url + CHAT_PATH, json={
            "model": "no-such-model", "messages": MESSAGES}) == 404
        await router.settled(3)
        samples = await scrape(session, router)
    missing = [name for name in PRODUCTION_STACK_NAMES if not samples.get(name)]
    assert missing == []
    waiting = by_label(samples["vllm:num_requests_waiting"], "server")
    assert waiting == {(engines[0].url,): 7.0, (engines[1].url,): 0.0}
    # The fake engines count 32 queried tokens a request, half of them hits after the first.
    queries = by_label(samples["vllm:gpu_prefix_cache_queries_total"], "server")
    assert set(queries) == {(engine.url,) for engine in engines}
    decoding = by_label(samples["vllm:avg_decoding_length"], "server", "model")
    assert all(seconds >= 0 for seconds in decoding.values()) and decoding
    for name in ("router_memory_usage_percent", "router_disk_usage_percent"):
        assert 0.0 < samples[name][()] <= 100.0, name
    assert samples["router_cpu_usage_percent"][()] >= 0.0
