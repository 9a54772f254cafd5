"""The raw-socket scripted engine: it parses what it receives and writes exactly its script."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp

from router.testing.raw_engine import (
    CLOSE, HANG, RawEngine, RawRequest, Step, chunk, http_response, trickle_lines,
)


def echo_path(request: RawRequest) -> list[Step]:
    return [http_response(200, f"{request.path} {len(request.body)}".encode())]


async def test_keep_alive_requests_are_parsed_and_recorded() -> None:
    async def chunked_body() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b"defg"

    async with RawEngine(echo_path) as engine, aiohttp.ClientSession() as session:
        async with session.post(engine.url + "/one", data=b"12345",
                                headers={"X-Api-Key": "k1"}) as response:
            assert await response.read() == b"/one 5"
        async with session.post(engine.url + "/two", data=chunked_body()) as response:
            assert await response.read() == b"/two 7"

    assert engine.connections == 1
    first, second = engine.requests
    assert (first.method, first.path, first.body, first.index) == ("POST", "/one", b"12345", 0)
    assert first.headers["x-api-key"] == "k1"
    assert (second.body, second.index, second.number, second.connection) == (b"abcdefg", 1, 1, 0)
    assert engine.open == 0


async def test_script_writes_raw_bytes_with_pauses_then_closes() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"

    def script(request: RawRequest) -> list[Step]:
        return [*trickle_lines(head, 0.1), chunk(b"hi"), CLOSE]

    async with RawEngine(script) as engine:
        reader, writer = await asyncio.open_connection("127.0.0.1", engine.port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: e\r\n\r\n")
        started = time.monotonic()
        received = await asyncio.wait_for(reader.read(), 5)  # until the engine's close
        took = time.monotonic() - started
        writer.close()

    assert received == head + b"2\r\nhi\r\n"
    assert took >= 0.25  # four head lines, 0.1 s apart
    assert [r.path for r in engine.requests] == ["/x"]


async def test_hang_holds_the_connection_until_the_peer_closes() -> None:
    async with RawEngine(lambda request: [HANG]) as engine:
        reader, writer = await asyncio.open_connection("127.0.0.1", engine.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: e\r\n\r\n")
        await writer.drain()
        try:
            await asyncio.wait_for(reader.read(1), 0.3)
            raise AssertionError("the engine answered")
        except TimeoutError:
            pass
        assert engine.open == 1
        writer.close()
        for _ in range(100):
            if engine.open == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.open == 0


async def test_write_idle_reaches_only_connections_waiting_for_a_request() -> None:
    async with RawEngine(echo_path) as engine:
        reader, writer = await asyncio.open_connection("127.0.0.1", engine.port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: e\r\n\r\n")
        answer = http_response(200, b"/a 0")
        assert await asyncio.wait_for(reader.readexactly(len(answer)), 5) == answer
        assert engine.write_idle(b"extra") == 1
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"extra"
        writer.close()
