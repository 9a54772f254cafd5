"""An engine process SIGKILLed mid-stream and before its headers, then started again.

The doomed engine runs in a child process (`router.testing.chaos.engine.EngineProcess`) beside an
in-process engine. Killed streams must end cut (never complete-looking, never hanging), the
requests that arrive while it is dead must be served by the other engine, those it took to
its grave before answering get a 502 (sent once, never twice), and once it is back it must
get traffic again."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from router.testing import RunningEngine
from router.testing.chaos.clients import ClientResult, Kind, call
from router.testing.chaos.engine import EngineProcess

from ..conftest import MODELS, StartRouter
from .conftest import (
    CHAOS_SETTINGS, Scale, Scenario, bounded_gather, chaos_config, chat_body,
    expect_kinds, id_of, scales, served_by, traffic,
)

READ_TIMEOUT = CHAOS_SETTINGS["read_timeout"]


async def wait_open(doomed: EngineProcess, count: int, timeout: float = 5.0) -> None:
    """Until the child holds `count` requests open."""
    async with asyncio.timeout(timeout):
        while (await doomed.state())["open"] < count:
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("scale", scales())
async def test_engine_killed_mid_stream_and_before_headers(
    scale: Scale, start_router: StartRouter, engine: RunningEngine, scenario: Scenario,
    rng: random.Random,
) -> None:
    async with EngineProcess(MODELS, name="doomed") as doomed:
        router = await start_router(chaos_config([doomed.url, engine.url]))
        await scenario.begin(router)
        doomed_id = id_of(doomed.url)
        streams = max(4, scale.concurrency // 2)
        async for round_ in scenario.rounds(scale.rounds):
            tag = f"crash-{round_}"
            # 1. Streams in flight on both engines; SIGKILL the child once it holds some.
            await doomed.configure(token_delay=0.05, headers_delay=0.0)
            engine.behaviour.token_delay = 0.005
            async with aiohttp.ClientSession() as session:
                running = asyncio.gather(*(
                    call(session, router.url + "/v1/chat/completions",
                         chat_body(rng, stream=True, max_tokens=60),
                         request_id=f"{tag}-stream-{n}", timeout=10)
                    for n in range(streams)))
                await wait_open(doomed, 1)
                await asyncio.sleep(0.15)  # some events have gone out
                await doomed.kill()
                scenario.fault("engine_sigkill_mid_stream")
                killed: list[ClientResult] = list(await running)
            expect_kinds(killed, lambda r: {Kind.CUT} if r.backend == doomed_id
                         else {Kind.COMPLETE})
            assert any(r.backend == doomed_id for r in killed)
            scenario.fault("streams_cut_by_crash",
                           sum(r.backend == doomed_id for r in killed))
            # 2. While it is dead: refused connections, retried on the other engine.
            dead = await traffic(router, rng, f"{tag}-dead", scale.requests,
                                 concurrency=scale.concurrency, timeout=10)
            expect_kinds(dead, lambda r: {Kind.COMPLETE})
            # 3. Killed while computing its first answer: the request was sent and no answer
            # came. The router cannot tell a dead engine from one still generating behind a
            # broken connection, so those clients get a 502 and the request goes nowhere else.
            await doomed.start()
            await doomed.configure(token_delay=0.0, headers_delay=5.0)
            async with aiohttp.ClientSession() as session:
                jobs = [
                    (lambda n=n: call(session, router.url + "/v1/chat/completions",
                                      chat_body(rng, stream=rng.random() < 0.5),
                                      request_id=f"{tag}-early-{n}", timeout=10))
                    for n in range(streams)
                ]
                waiting = asyncio.ensure_future(bounded_gather(jobs, streams))
                await wait_open(doomed, 1)
                await doomed.kill()
                scenario.fault("engine_sigkill_before_headers")
                early = await waiting
            expect_kinds(early, lambda r: {Kind.ERROR} if served_by(router, r) == doomed_id
                         else {Kind.COMPLETE})
            assert {r.status for r in early if r.kind is Kind.ERROR} == {502}
            # 4. Back again: the router sends it traffic once its breaker lets a trial through.
            await doomed.start()
            await doomed.configure(headers_delay=0.0, token_delay=0.0)
            back: list[ClientResult] = []
            async with asyncio.timeout(10):
                while not any(r.backend == doomed_id for r in back):
                    back += await traffic(router, rng, f"{tag}-back-{len(back)}", 4,
                                          concurrency=4, timeout=10)
                    await asyncio.sleep(0.05)
            expect_kinds(back, lambda r: {Kind.COMPLETE})
            scenario.results += killed + dead + early + back
        await scenario.finish(router, [engine], max_seconds=READ_TIMEOUT * 3 + 6)
