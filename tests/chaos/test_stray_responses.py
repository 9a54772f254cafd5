"""Engines that write answers nobody asked for: on idle keep-alive connections between bursts
of traffic (a whole response, two, a bare head, one byte), and glued to the end of a real
answer. Many clients with different API keys; none may ever get an answer that is not its
own (tests/test_upstream_pool.py has the single-request case).

Stray bytes go only onto connections the router holds idle (`RawEngine.write_idle`, between
bursts): one that lands while a request is already on its way is, for any HTTP/1.1 client,
indistinguishable from that request's answer, so it tests nothing about the pool."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from contextlib import AsyncExitStack

import aiohttp
import pytest

from router.testing.chaos.clients import ClientResult, Kind
from router.testing.raw_engine import RawEngine, RawRequest, Step, http_response

from ..conftest import CHAT, StartRouter
from .conftest import Scale, Scenario, chaos_config, expect_kinds, scales, settle

KEYS = tuple(f"key-{n}" for n in range(8))
STRAY = http_response(200, b'{"stray": true}', (
    ("Content-Type", "application/json"), ("X-Smuggled", "yes"),
))
IDLE_STRAYS = {
    "whole": STRAY,
    "two_whole": STRAY + STRAY,
    "head_only": STRAY[: STRAY.index(b"\r\n\r\n") + 4],
    "one_byte": b"H",
}
GLUED_SHARE = 0.25
"""Answers followed, in the same write, by a stray one."""


def answer(request: RawRequest) -> bytes:
    body = json.dumps({"answer_to": request.headers.get("x-request-id")}).encode()
    return http_response(200, body)


async def ask(session: aiohttp.ClientSession, url: str, request_id: str,
              key: str) -> ClientResult:
    """One client request; COMPLETE only when the answer is this request's own."""
    result = ClientResult(Kind.UNCLEAR, request_id)
    started = time.monotonic()
    try:
        async with asyncio.timeout(10):
            async with session.post(
                url, json={"model": CHAT, "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {key}", "x-request-id": request_id},
            ) as response:
                result.status = response.status
                result.backend = response.headers.get("x-router-backend")
                body = await response.read()
                smuggled = response.headers.get("X-Smuggled")
    except (aiohttp.ClientError, TimeoutError) as error:
        result.detail = repr(error)
        return result
    result.elapsed = time.monotonic() - started
    try:
        own = json.loads(body).get("answer_to") == request_id
    except (ValueError, AttributeError):
        own = False
    if response.status == 200 and own and smuggled is None:
        result.kind = Kind.COMPLETE
    else:
        result.detail = f"{response.status} X-Smuggled={smuggled} {body[:100]!r}"
    return result


@pytest.mark.parametrize("scale", scales())
async def test_stray_answers_never_reach_a_client(
    scale: Scale, start_router: StartRouter, scenario: Scenario, rng: random.Random,
) -> None:
    glue = random.Random(rng.random())

    def script(request: RawRequest) -> list[Step]:
        if glue.random() < GLUED_SHARE:
            scenario.fault("glued")
            return [answer(request) + STRAY]
        return [answer(request)]

    async with AsyncExitStack() as stack:
        engines = [await stack.enter_async_context(RawEngine(script)) for _ in range(2)]
        # Idle connections stay pooled from one burst to the next.
        router = await start_router(chaos_config(
            [engine.url for engine in engines], api_keys=KEYS, upstream_keepalive=30.0))
        url = router.url + "/v1/chat/completions"
        await scenario.begin(router)
        async with aiohttp.ClientSession() as session:
            async for round_ in scenario.rounds(scale.rounds):
                for burst in range(4):
                    gate = asyncio.Semaphore(scale.concurrency)
                    burst_size = max(1, scale.requests // 4)

                    async def one(n: int, tag: str = f"{round_}-{burst}") -> ClientResult:
                        async with gate:
                            return await ask(session, url, f"stray-{tag}-{n}",
                                             rng.choice(KEYS))

                    results = await asyncio.gather(*(one(n) for n in range(burst_size)))
                    scenario.results += results
                    expect_kinds(results, lambda result: {Kind.COMPLETE})
                    await settle(router)  # every upstream connection back in the pool
                    kinds = list(IDLE_STRAYS)
                    for engine in engines:
                        def pick(connection: int) -> bytes:
                            kind = rng.choice(kinds)
                            scenario.fault(kind)
                            return IDLE_STRAYS[kind]

                        engine.write_idle(pick)
                    await asyncio.sleep(0.05)  # the strays land while nothing is asked
        received = Counter(r.headers.get("x-request-id") for e in engines for r in e.requests)
        # Every request reached an engine exactly once: none was answered by a stray instead.
        assert set(received) == {r.request_id for r in scenario.results}
        assert set(received.values()) == {1}
        assert sum(scenario.faults.values()) > 0
        await scenario.finish(router, max_seconds=5.0,
                              flows_expected=len(scenario.results))
        connections = sum(engine.connections for engine in engines)
        print(f"[stray] {len(scenario.results)} requests over {connections} upstream "
              f"connections; strays {dict(scenario.faults)}")
