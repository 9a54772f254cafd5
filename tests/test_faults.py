"""Faults on both sides: clients that leave, backends that fail. Each one must end with
balanced events, zero in-flight, nothing left in the connection pool, and the engine seeing
its connection close."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router.config.settings import Config, StaticBackend
from router.flow import Outcome
from router.testing import RunningEngine

from .conftest import CHAT, WHISPER, RouterUnderTest, StartRouter, config_for
from .test_multipart import BOUNDARY, content_type

CHAT_BODY = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}]}


async def wait_for(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def raw_post(
    router: RouterUnderTest, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a plain socket to the router and send a request head and `body`."""
    host, port = router.server.host, router.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection(host, port)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
    fields = {"Content-Type": "application/json", "Content-Length": str(len(body)),
              **(headers or {})}
    head += "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    writer.write(head.encode() + b"\r\n" + body)
    await writer.drain()
    return reader, writer


async def test_client_disconnect_before_first_token_reaches_engine(
    solo_router: RouterUnderTest, engine: RunningEngine
) -> None:
    engine.behaviour.first_token_delay = 30
    _, writer = await raw_post(solo_router, "/v1/chat/completions", json.dumps(CHAT_BODY).encode())
    await wait_for(lambda: engine.state.started == 1)
    writer.close()
    await asyncio.wait_for(engine.state.disconnected.wait(), 1.0)
    await solo_router.settled(1)
    assert solo_router.log.only().outcome is Outcome.CLIENT_DISCONNECTED
    assert (engine.state.cancelled, engine.state.open) == (1, 0)


async def test_client_disconnect_mid_stream_closes_backend(
    solo_router: RouterUnderTest, engine: RunningEngine
) -> None:
    engine.behaviour.token_delay = 0.1
    body = json.dumps({**CHAT_BODY, "stream": True, "max_tokens": 100}).encode()
    reader, writer = await raw_post(solo_router, "/v1/chat/completions", body)
    assert b"data: " in await reader.readuntil(b"data: ")
    writer.close()
    await asyncio.wait_for(engine.state.disconnected.wait(), 1.0)
    await solo_router.settled(1)
    flow = solo_router.log.only()
    assert (flow.outcome, flow.status) == (Outcome.CLIENT_DISCONNECTED, 200)
    assert solo_router.log.events[flow.id] == ["new", "response", "complete"]


async def test_client_disconnect_during_upload_reaches_engine(
    solo_router: RouterUnderTest, engine: RunningEngine
) -> None:
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{WHISPER}"
            f"\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"a.wav\"\r\n\r\n").encode() + b"\0" * 100_000
    _, writer = await raw_post(
        solo_router, "/v1/audio/transcriptions", head,
        {"Content-Type": content_type(), "Content-Length": str(50_000_000)},
    )
    await wait_for(lambda: engine.state.started == 1)
    writer.close()
    await asyncio.wait_for(engine.state.disconnected.wait(), 1.0)
    await solo_router.settled(1)
    assert solo_router.log.only().outcome is Outcome.CLIENT_DISCONNECTED
    assert engine.state.uploads == []


async def test_backend_reset_mid_stream_truncates_the_client_stream(
    solo_router: RouterUnderTest, engine: RunningEngine
) -> None:
    engine.behaviour.reset_after_chunks = 2
    async with aiohttp.ClientSession() as session:
        async with session.post(solo_router.url + "/v1/chat/completions",
                                json={**CHAT_BODY, "stream": True}) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    await solo_router.settled(1)
    flow = solo_router.log.only()
    assert (flow.outcome, flow.status) == (Outcome.BACKEND_ERROR, 200)
    assert "mid-stream" in (flow.error or "")


async def test_backend_silent_mid_stream_times_out(
    start_router: StartRouter, engine: RunningEngine
) -> None:
    router = await start_router(config_for([engine], read_timeout=0.3))
    engine.behaviour.hang_after_headers = True
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/v1/chat/completions",
                                json={**CHAT_BODY, "stream": True}) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    await asyncio.wait_for(engine.state.disconnected.wait(), 1.0)
    await router.settled(1)
    assert router.log.only().outcome is Outcome.TIMEOUT


async def test_slow_chunks_within_the_read_timeout_are_fine(
    start_router: StartRouter, engine: RunningEngine
) -> None:
    # Only the gap between chunks is limited: a stream longer than read_timeout in total passes.
    router = await start_router(config_for([engine], read_timeout=0.3))
    engine.behaviour.token_delay = 0.1
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/v1/chat/completions",
                                json={**CHAT_BODY, "stream": True, "max_tokens": 8}) as response:
            text = await response.text()
    assert text.rstrip().endswith("data: [DONE]")
    await router.settled(1)
    assert router.log.only().outcome is Outcome.OK


BrokenServer = Callable[[bytes], Awaitable[str]]


@pytest.fixture
async def broken_server() -> AsyncIterator[BrokenServer]:
    """A backend that answers every request with fixed raw bytes, then closes."""
    servers: list[asyncio.Server] = []

    async def start(answer: bytes) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_backend_truncating_its_body_truncates_the_client_body(
    start_router: StartRouter, broken_server: BrokenServer
) -> None:
    url = await broken_server(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    router = await start_router(Config(static_backends=(StaticBackend(url, (CHAT,)),)))
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/v1/completions",
                                json={"model": CHAT, "prompt": "x"}) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    await router.settled(1)
    assert router.log.only().outcome is Outcome.BACKEND_ERROR


async def test_backend_sending_invalid_http_gets_502(
    start_router: StartRouter, broken_server: BrokenServer
) -> None:
    url = await broken_server(b"this is not HTTP\r\n\r\n")
    router = await start_router(Config(static_backends=(StaticBackend(url, (CHAT,)),)))
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/v1/completions",
                                json={"model": CHAT, "prompt": "x"}) as response:
            assert response.status == 502
            assert (await response.json())["error"]["type"] == "upstream_error"
            assert response.headers["x-request-id"]
    await router.settled(1)
    assert router.log.only().outcome is Outcome.BACKEND_ERROR


async def test_mixed_traffic_with_random_disconnects_leaves_nothing_behind(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    for engine in engines:
        engine.behaviour.token_delay = 0.005
    rng = random.Random(7)

    async def one(session: aiohttp.ClientSession, n: int) -> None:
        body = {**CHAT_BODY, "stream": n % 2 == 0, "max_tokens": rng.randint(1, 30)}
        request = session.post(router.url + "/v1/chat/completions", json=body)
        if n % 3 == 0:
            task = asyncio.ensure_future(request.__aenter__())
            await asyncio.sleep(rng.uniform(0, 0.05))
            task.cancel()
            try:
                response = await task
            except asyncio.CancelledError:
                return
            response.close()
            return
        async with request as response:
            await response.read()

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, n) for n in range(60)))
    await wait_for(lambda: sum(e.state.open for e in engines) == 0)
    await router.settled(len(router.log.flows))
    outcomes = router.log.outcomes()
    assert outcomes.count(Outcome.OK) >= 40
    assert set(outcomes) <= {Outcome.OK, Outcome.CLIENT_DISCONNECTED}


async def test_client_leaving_while_sending_its_body_is_counted_once(
    solo_router: RouterUnderTest, engine: RunningEngine
) -> None:
    body = json.dumps(CHAT_BODY).encode()
    _, writer = await raw_post(solo_router, "/v1/chat/completions", body[:10],
                               {"Content-Length": str(len(body))})
    await asyncio.sleep(0.1)  # the handler is now waiting for the rest of the body
    writer.close()
    await solo_router.settled(1)
    flow = solo_router.log.only()
    assert (flow.outcome, flow.status, flow.backend) == (Outcome.CLIENT_DISCONNECTED, 499, None)
    assert engine.state.started == 0


async def test_a_client_that_stops_reading_is_cut_off_and_the_backend_freed(
    start_router: StartRouter, aiohttp_server: Any
) -> None:
    cancelled = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            while True:  # far more than any socket buffer holds
                await response.write(b"data: " + b"x" * 65536 + b"\n\n")
        except asyncio.CancelledError:
            cancelled.set()
            raise

    backend = web.Application()
    backend.router.add_post("/v1/chat/completions", endless)
    server = await aiohttp_server(backend)
    router = await start_router(Config(
        static_backends=(StaticBackend(str(server.make_url("")).rstrip("/"), (CHAT,)),),
        client_write_timeout=0.5, health_check_interval=0,
    ))
    body = json.dumps({**CHAT_BODY, "stream": True}).encode()
    _, writer = await raw_post(router, "/v1/chat/completions", body)  # and never read
    await asyncio.wait_for(cancelled.wait(), 10)
    await router.settled(1)
    flow = router.log.only()
    assert flow.outcome is Outcome.CLIENT_DISCONNECTED
    assert "read nothing" in (flow.error or "")
    writer.close()
