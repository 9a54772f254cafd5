"""The timeouts of a backend exchange, end to end: the wait for the answer, the response head
once started, and the silence of a body, each with its own bound; and a timeout is never
answered by sending the request to another engine."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from router.config.settings import Config, StaticBackend
from router.flow import Outcome
from router.keys import HEALTH
from router.testing import RunningEngine
from router.testing.chaos.backend import Fault, MisbehavingBackend

from .conftest import CHAT, MODELS, StartRouter, config_for

BODY = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def post(url: str, body: dict[str, Any] = BODY) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            return response.status, await response.json(), time.monotonic() - started


def seen(engines: list[RunningEngine]) -> int:
    return sum(engine.state.started for engine in engines)


async def test_a_long_non_streamed_answer_outlives_the_read_timeout_on_one_engine(
    start_router: StartRouter, three_engines: list[RunningEngine]
) -> None:
    # vLLM sends a non-streamed answer's head only when generation ends: the read timeout
    # (a silent stream) must not cut that wait, nor send the request to the other engines.
    for engine in three_engines:
        engine.behaviour.first_token_delay = 3.0
    router = await start_router(config_for(three_engines, read_timeout=1.0,
                                           health_check_interval=0))
    status, reply, elapsed = await post(router.url)
    assert status == 200 and reply["object"] == "chat.completion", reply
    assert elapsed >= 3.0
    assert seen(three_engines) == 1
    await router.settled(1)


async def test_no_answer_within_the_response_timeout_is_a_504_from_one_engine_only(
    start_router: StartRouter, three_engines: list[RunningEngine]
) -> None:
    for engine in three_engines:
        engine.behaviour.first_token_delay = 3.0
    router = await start_router(config_for(three_engines, response_timeout=1.0,
                                           health_check_interval=0, cb_failure_threshold=1))
    status, reply, elapsed = await post(router.url)
    assert status == 504 and reply["error"]["code"] == "gateway_timeout", reply
    assert 1.0 <= elapsed < 2.5
    assert seen(three_engines) == 1
    await router.settled(1)
    flow = router.log.only()
    assert flow.attempts == []
    # A busy engine, not a broken one: even a threshold of one failure leaves it in.
    assert flow.backend is not None
    assert router.app[HEALTH].state(flow.backend.id).breaker == "closed"


def backends_config(urls: list[str], **overrides: Any) -> Config:
    """Backends in this order (round robin starts with the first), no probes."""
    return Config(static_backends=tuple(StaticBackend(url, MODELS) for url in urls),
                  health_check_interval=0, engine_stats_interval=0, **overrides)


async def test_a_trickled_head_is_cut_at_the_head_deadline_and_not_retried(
    start_router: StartRouter, engine: RunningEngine
) -> None:
    # Eight bytes of head every 0.3 s: each byte restarts a read timeout, never the deadline.
    async with MisbehavingBackend([Fault.SLOW_HEADERS], slow_step=0.3) as trickler:
        router = await start_router(backends_config(
            [trickler.url, engine.url], response_head_timeout=1.0, read_timeout=5.0))
        status, reply, elapsed = await post(router.url)
        assert (status, reply["error"]["code"]) == (504, "gateway_timeout"), reply
        assert 1.0 <= elapsed < 3.0
        assert len(trickler.served) == 1 and engine.state.started == 0
        await router.settled(1)
        flow = router.log.only()
        assert flow.outcome is Outcome.BACKEND_ERROR and flow.attempts == []


async def test_a_head_that_came_in_pieces_leaves_no_deadline_on_the_pooled_connection(
    start_router: StartRouter,
) -> None:
    """The head deadline armed by a split head is disarmed when the head is complete: the
    next request on the same kept-alive connection may take longer than that deadline."""
    connections = 0
    delays = [0.0, 1.0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while delays:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                await asyncio.sleep(delays.pop(0))
                body = b'{"object": "chat.completion", "choices": []}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                await writer.drain()
                await asyncio.sleep(0.1)  # the head's first bytes, then the rest of it
                writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        router = await start_router(backends_config(
            [f"http://127.0.0.1:{port}"], response_head_timeout=0.5))
        assert (await post(router.url))[0] == 200
        status, reply, elapsed = await post(router.url)
        assert status == 200 and reply["object"] == "chat.completion", reply
        assert elapsed >= 1.0 and connections == 1
        await router.settled(2)
    finally:
        server.close()
        await server.wait_closed()
