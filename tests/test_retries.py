"""Failover sends a request to another engine only when no engine can have started it (the
connection failed, or the engine answered 502/503/504), and the retry budget caps how many
requests retry at once."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import pytest

from router.config.settings import Config, StaticBackend
from router.keys import RETRY_BUDGET
from router.proxy.retries import RetryBudget
from router.testing import RunningEngine
from router.testing.chaos.backend import Fault, MisbehavingBackend
from router.testing.processes import free_port

from .conftest import CHAT, MODELS, StartRouter

BODY = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def backends_config(urls: list[str], **overrides: Any) -> Config:
    """Backends in this order (round robin starts with the first), no probes or breakers."""
    settings: dict[str, Any] = dict(health_check_interval=0, engine_stats_interval=0,
                                    retry_backoff=0.01, cb_failure_threshold=10**6)
    return Config(static_backends=tuple(StaticBackend(url, MODELS) for url in urls),
                  **{**settings, **overrides})


async def post(session: aiohttp.ClientSession, url: str,
               body: dict[str, Any] = BODY) -> tuple[int, dict[str, Any]]:
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        return response.status, await response.json()


# --------------------------------------------------------------------------- the budget


def test_the_budget_allows_the_minimum_then_its_share_of_requests_in_flight() -> None:
    budget = RetryBudget(percent=20, minimum=3)
    tickets = [budget.ticket() for _ in range(20)]
    # max(3, 20% of 20 = 4): four requests may be retrying at once.
    assert [ticket.retry() for ticket in tickets[:5]] == [True] * 4 + [False]
    assert tickets[0].retry()  # a request already retrying keeps its slot for the next try
    assert (budget.retries, budget.denied) == (4, 1)
    for ticket in tickets[:10]:
        ticket.close()
    # 10 in flight: the minimum of 3 applies, and 1 retrying is below it.
    assert (budget.requests, budget.retries) == (10, 0)
    assert tickets[10].retry()


def test_a_ticket_gives_everything_back_once() -> None:
    budget = RetryBudget(percent=0, minimum=1)
    ticket = budget.ticket()
    assert ticket.retry()
    ticket.close()
    ticket.close()
    assert (budget.requests, budget.retries) == (0, 0)


def test_a_zero_budget_allows_no_retry() -> None:
    ticket = RetryBudget(percent=0, minimum=0).ticket()
    assert not ticket.retry()


# --------------------------------------------------------------------------- what is retried


async def test_a_refused_connection_is_retried_on_another_engine(
    start_router: StartRouter, three_engines: list[RunningEngine]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    router = await start_router(backends_config([dead, three_engines[0].url]))
    async with aiohttp.ClientSession() as session:
        status, reply = await post(session, router.url)
    assert status == 200 and reply["object"] == "chat.completion"
    await router.settled(1)
    assert "unreachable" in router.log.only().attempts[0].error


async def test_a_503_from_the_engine_is_retried_on_another_engine(
    start_router: StartRouter, three_engines: list[RunningEngine]
) -> None:
    draining, healthy, _ = three_engines
    draining.behaviour.fail_status = 503
    router = await start_router(backends_config([draining.url, healthy.url]))
    async with aiohttp.ClientSession() as session:
        status, _ = await post(session, router.url)
    assert status == 200
    assert (draining.state.started, healthy.state.completed) == (1, 1)
    await router.settled(1)


@pytest.mark.parametrize("fault", [
    Fault.CLOSE_BEFORE_HEADERS, Fault.RESET_BEFORE_HEADERS, Fault.INVALID_HTTP,
])
async def test_a_failure_after_the_request_was_sent_is_not_retried(
    fault: Fault, start_router: StartRouter, three_engines: list[RunningEngine]
) -> None:
    # The backend read the whole request, then broke without an answer: it may be working
    # on it, so it goes nowhere else and the client gets a 502.
    other = three_engines[0]
    async with MisbehavingBackend([fault]) as broken:
        router = await start_router(backends_config([broken.url, other.url]))
        async with aiohttp.ClientSession() as session:
            status, reply = await post(session, router.url)
        assert (status, reply["error"]["code"]) == (502, "bad_gateway"), reply
        assert len(broken.served) == 1 and other.state.started == 0
        await router.settled(1)
        assert router.log.only().attempts == []


# --------------------------------------------------------------------------- under a burst


async def burst(router_url: str, requests: int) -> list[int]:
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(*(post(session, router_url) for _ in range(requests)))
    return [status for status, _ in answers]


@pytest.mark.parametrize(("budget", "most_engine_requests"), [
    # No budget to speak of: every request tries all three engines.
    (dict(retry_budget_percent=100, retry_budget_min=1000), 90),
    # 20% of 30 in flight: six requests may retry (twice each); the rest get the 503.
    (dict(retry_budget_percent=20, retry_budget_min=3), 30 + 2 * 6),
])
async def test_the_retry_budget_caps_retries_under_a_burst_of_failures(
    budget: dict[str, Any], most_engine_requests: int, start_router: StartRouter,
    three_engines: list[RunningEngine],
) -> None:
    for engine in three_engines:  # every engine overloaded, answering 503 a moment later
        engine.behaviour.fail_status = 503
        engine.behaviour.headers_delay = 0.3
    router = await start_router(backends_config([e.url for e in three_engines], **budget))
    statuses = await burst(router.url, 30)
    assert statuses == [503] * 30
    engine_requests = sum(engine.state.started for engine in three_engines)
    assert 30 < engine_requests <= most_engine_requests
    if budget["retry_budget_min"] < 1000:
        assert engine_requests < 90 and router.app[RETRY_BUDGET].denied > 0
    await router.settled(30)
    # Every answer that went out for want of budget is counted, once per request.
    refused = sum(flow.retry_refused for flow in router.log.flows.values())
    assert (refused > 0) is (budget["retry_budget_min"] < 1000)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{router.url}/metrics") as response:
            exposition = await response.text()
    counted = sum(
        float(line.rsplit(" ", 1)[1]) for line in exposition.splitlines()
        if line.startswith("router_retry_budget_refusals_total{")
    )
    assert counted == refused
    assert (router.app[RETRY_BUDGET].requests, router.app[RETRY_BUDGET].retries) == (0, 0)


async def test_the_budget_is_given_back_on_every_ending(
    start_router: StartRouter, three_engines: list[RunningEngine]
) -> None:
    """Answers, 503s, refused connections, timeouts and clients that leave mid-wait, many
    times over: afterwards no request and no retry is left counted in flight."""
    failing, slow, good = three_engines
    failing.behaviour.fail_status = 503
    slow.behaviour.first_token_delay = 0.6
    dead = f"http://127.0.0.1:{free_port()}"
    router = await start_router(backends_config(
        [failing.url, dead, slow.url, good.url], response_timeout=0.4,
        retry_budget_min=2))
    rng = random.Random(5)

    async def one(session: aiohttp.ClientSession) -> None:
        try:
            async with asyncio.timeout(rng.choice([0.05, 0.2, 5.0])):  # some clients leave
                await post(session, router.url)
        except TimeoutError:
            pass

    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            await asyncio.gather(*(one(session) for _ in range(25)))
    await asyncio.sleep(0.3)  # a client that left while connecting made no flow at all
    await router.settled(len(router.log.events), timeout=5.0)
    budget = router.app[RETRY_BUDGET]
    assert (budget.requests, budget.retries) == (0, 0)
    assert budget.denied > 0 and any(flow.attempts for flow in router.log.flows.values())
