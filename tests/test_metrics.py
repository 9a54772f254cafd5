"""`/metrics` counts what was sent; `/health` and `/version` answer JSON."""

from __future__ import annotations

from collections import Counter
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router import __version__
from router.testing import RunningEngine

from .conftest import CHAT, RouterUnderTest

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


async def scrape(session: aiohttp.ClientSession, router: RouterUnderTest) -> dict[str, Any]:
    """sample name -> {labels tuple: value}, from the router's Prometheus text."""
    async with session.get(router.url + "/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    samples: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def by_label(series: dict[Any, float], *names: str) -> dict[tuple[str, ...], float]:
    """{labels: value} keyed by the values of `names` only."""
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

    backends = {engine.url for engine in engines}
    in_flight = by_label(samples["router_backend_in_flight_requests"], "url")
    assert in_flight == {(url,): 0.0 for url in backends}
    # Five requests were routed (2 + 1 + 1 + the 429), over a 60 s window.
    qps = by_label(samples["router_backend_qps"], "url")
    assert sum(qps.values()) == pytest.approx(5 / 60)


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
            async with session.get(router.url + "/health") as health:
                assert (await health.json())["in_flight"] == 1
            await response.read()
        await router.settled(1)
        samples = await scrape(session, router)
    in_flight = by_label(samples["router_backend_in_flight_requests"], "backend")
    assert set(in_flight.values()) == {0.0}


async def test_health_and_version_answer_json(router: RouterUnderTest) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(router.url + "/health") as response:
            assert response.status == 200
            assert await response.json() == {"status": "ok", "backends": 2, "in_flight": 0}
        async with session.get(router.url + "/version") as response:
            assert response.status == 200
            assert await response.json() == {"version": __version__}
