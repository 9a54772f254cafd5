"""A server whose answers are huge or never end, made lazily (it holds one chunk, never the
answer): for tests and measurements of the router's bounds on what it reads whole."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiohttp import web

__all__ = ["FloodState", "RunningFlood", "start_flood", "FILLER"]

FILLER = b"# flood: a comment line that no parser keeps, repeated to fill the answer\n"
MIB = 1024 * 1024


@dataclass
class FloodState:
    """What the flood server did."""

    requests: int = 0
    bytes_sent: int = 0
    cut: int = 0
    """Answers whose reader closed the connection (or went away) before their end."""
    cut_event: asyncio.Event = field(default_factory=asyncio.Event)
    paused: bool = False
    """While set, every answer is one `FILLER` line (a baseline before the flood)."""


@dataclass(frozen=True)
class _Answer:
    total: int | None
    chunk: bytes
    delay: float
    declare_length: bool


FLOOD_STATE = web.AppKey("flood_state", FloodState)
_ANSWER = web.AppKey("flood_answer", _Answer)


async def _flood(request: web.Request) -> web.StreamResponse:
    state, answer = request.app[FLOOD_STATE], request.app[_ANSWER]
    await request.read()
    if state.paused:
        return web.Response(body=FILLER, content_type="text/plain")
    state.requests += 1
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    if answer.declare_length and answer.total is not None:
        response.content_length = answer.total
    try:
        await response.prepare(request)
        left = answer.total
        while left is None or left > 0:
            chunk = answer.chunk if left is None or left >= len(answer.chunk) \
                else answer.chunk[:left]
            await response.write(chunk)
            state.bytes_sent += len(chunk)
            if left is not None:
                left -= len(chunk)
            if answer.delay:
                await asyncio.sleep(answer.delay)
        await response.write_eof()
    except (ConnectionError, asyncio.CancelledError):
        state.cut += 1
        state.cut_event.set()
        raise
    return response


@dataclass
class RunningFlood:
    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def state(self) -> FloodState:
        return self.app[FLOOD_STATE]

    async def close(self) -> None:
        await self.runner.cleanup()

    async def __aenter__(self) -> RunningFlood:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def start_flood(
    paths: Iterable[str] = ("/metrics",),
    *,
    total: int | None = None,
    chunk_size: int = MIB,
    delay: float = 0.0,
    declare_length: bool = False,
    host: str = "127.0.0.1",
    port: int = 0,
) -> RunningFlood:
    """Serve GET and POST on `paths` with `total` bytes of `FILLER` lines (None: without
    end), `chunk_size` bytes a write, `delay` seconds between writes; `declare_length` sends
    a Content-Length (else the body is chunked)."""
    app = web.Application()
    app[FLOOD_STATE] = FloodState()
    chunk = (FILLER * (chunk_size // len(FILLER) + 1))[:chunk_size]
    app[_ANSWER] = _Answer(total, chunk, delay, declare_length)
    for path in paths:
        app.router.add_route("*", path, _flood)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=0.25)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return RunningFlood(f"http://{host}:{runner.addresses[0][1]}", app, runner)
