"""Clients for the chaos suite: one that sorts the router's answer into a `Kind`, and raw-
socket ones that go away at a chosen point.

- `call()`: one request through aiohttp, its answer sorted into a `Kind`: complete, a clear
  error, cut (the answer started and the connection ended before its end), or a failure
  (hung past its timeout, or unclear: e.g. a body that ends cleanly but incomplete).
- `leave_during_head()`, `leave_during_body()`, `leave_before_answer()`, `leave_mid_stream()`:
  raw-socket clients that go away at a chosen point, closing (FIN) or resetting (RST).

Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from router.testing.raw_engine import reset as reset_connection

__all__ = [
    "CLEAR",
    "ClientResult",
    "Kind",
    "call",
    "leave_before_answer",
    "leave_during_body",
    "leave_during_head",
    "leave_mid_stream",
    "request_head",
]

LOOPBACK = "127.0.0.1"
DONE = b"data: [DONE]"


class Kind(enum.Enum):
    """What a client got."""

    COMPLETE = "complete"
    """The whole answer: 2xx and a body that parses (JSON) or ends with `data: [DONE]`."""
    ERROR = "error"
    """An HTTP error status with an OpenAI-style JSON error body."""
    CUT = "cut"
    """The answer started, then the connection ended before the end of the body."""
    LEFT = "left"
    """The client went away on purpose."""
    HUNG = "hung"
    """Nothing decisive before the client's timeout: a failure."""
    UNCLEAR = "unclear"
    """Anything else (a body that ends cleanly but incomplete, a plain-text error...): a
    failure."""


CLEAR = frozenset({Kind.COMPLETE, Kind.ERROR, Kind.CUT, Kind.LEFT})


@dataclass
class ClientResult:
    kind: Kind
    request_id: str
    status: int | None = None
    backend: str | None = None
    """The `x-router-backend` header: which backend served the answer."""
    stream: bool = False
    events: int = 0
    """SSE `data:` lines received."""
    detail: str = ""
    elapsed: float = 0.0


def _error_body(body: bytes) -> bool:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str)


def _complete_json(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:
        return False


async def call(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes | Mapping[str, Any],
    *,
    request_id: str,
    timeout: float,
    headers: Mapping[str, str] | None = None,
) -> ClientResult:
    """POST `body` to `url` and sort the answer into a `Kind` (never raises for the answer)."""
    if isinstance(body, Mapping):
        stream = body.get("stream") is True
        data = json.dumps(body).encode()
    else:
        stream, data = False, body
    sent = {"Content-Type": "application/json", "x-request-id": request_id, **(headers or {})}
    result = ClientResult(Kind.UNCLEAR, request_id, stream=stream)
    started = time.monotonic()
    received = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async with session.post(url, data=data, headers=sent) as response:
                result.status = response.status
                result.backend = response.headers.get("x-router-backend")
                try:
                    async for piece in response.content.iter_any():
                        received += piece
                except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                        aiohttp.ClientConnectionError) as error:
                    result.kind, result.detail = Kind.CUT, repr(error)
    except TimeoutError:
        result.kind, result.detail = Kind.HUNG, f"no answer within {timeout} s"
    except aiohttp.ClientError as error:
        result.detail = f"before any answer: {error!r}"
    result.elapsed = time.monotonic() - started
    result.events = received.count(b"data: ")
    if result.kind is Kind.UNCLEAR and result.status is not None:
        result.kind = _judge(result.status, stream, bytes(received))
        if result.kind is Kind.UNCLEAR:
            result.detail = f"{result.status}: {bytes(received[-200:])!r}"
    return result


def _judge(status: int, stream: bool, body: bytes) -> Kind:
    if status >= 400:
        return Kind.ERROR if _error_body(body) else Kind.UNCLEAR
    if 200 <= status < 300:
        if stream and body.rstrip().endswith(DONE):
            return Kind.COMPLETE
        if not stream and _complete_json(body):
            return Kind.COMPLETE
    return Kind.UNCLEAR


def request_head(
    path: str, content_length: int | None, *, content_type: str = "application/json",
    request_id: str | None = None,
) -> bytes:
    """The head of a POST to the router, for raw-socket clients."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {LOOPBACK}", f"Content-Type: {content_type}"]
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    if request_id is not None:
        lines.append(f"x-request-id: {request_id}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _leave(writer: asyncio.StreamWriter, reset: bool) -> None:
    if reset:
        reset_connection(writer)
    else:
        writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def leave_during_head(
    host: str, port: int, head: bytes, cut: int, *, reset: bool = False, request_id: str = ""
) -> ClientResult:
    """Send the first `cut` bytes of a request head, then go away."""
    started = time.monotonic()
    _, writer = await asyncio.open_connection(host, port)
    writer.write(head[:cut])
    await writer.drain()
    await asyncio.sleep(0.005)
    await _leave(writer, reset)
    return ClientResult(Kind.LEFT, request_id, detail=f"after {cut} bytes of the head",
                        elapsed=time.monotonic() - started)


async def leave_during_body(
    host: str, port: int, head: bytes, body: bytes, cut: int, *, reset: bool = False,
    request_id: str = "",
) -> ClientResult:
    """Send a whole head (whose length promises all of `body`), `cut` body bytes, then go."""
    started = time.monotonic()
    _, writer = await asyncio.open_connection(host, port)
    writer.write(head + body[:cut])
    await writer.drain()
    await asyncio.sleep(0.02)
    await _leave(writer, reset)
    return ClientResult(Kind.LEFT, request_id, detail=f"after {cut} bytes of the body",
                        elapsed=time.monotonic() - started)


async def leave_before_answer(
    host: str, port: int, request: bytes, delay: float, *, reset: bool = False,
    request_id: str = "",
) -> ClientResult:
    """Send a whole request, wait `delay` seconds (the answer not begun), then go away."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)
    await writer.drain()
    try:
        async with asyncio.timeout(delay):
            first = await reader.read(1)
    except TimeoutError:
        first = b""
    await _leave(writer, reset)
    detail = "after the answer began" if first else f"{delay:.3f} s after the request"
    return ClientResult(Kind.LEFT, request_id, detail=detail,
                        elapsed=time.monotonic() - started)


async def leave_mid_stream(
    host: str, port: int, request: bytes, events: int, *, reset: bool = False,
    request_id: str = "", timeout: float = 10.0,
) -> ClientResult:
    """Send a streaming request, read until `events` SSE events arrived, then go away.

    A stream that ends before (its final chunk arrived) is `COMPLETE`; no answer in
    `timeout` is `HUNG`."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)
    await writer.drain()
    received = bytearray()
    kind = Kind.LEFT
    try:
        async with asyncio.timeout(timeout):
            while received.count(b"data: ") < events:
                piece = await reader.read(65536)
                if not piece:
                    break
                received += piece
                if received.endswith(b"\r\n0\r\n\r\n"):
                    kind = Kind.COMPLETE
                    break
    except TimeoutError:
        kind = Kind.HUNG
    await _leave(writer, reset)
    status = None
    if received.startswith(b"HTTP/1.1 "):
        status = int(received[9:12])
    return ClientResult(kind, request_id, status=status, stream=True,
                        events=received.count(b"data: "),
                        detail=f"after {events} events", elapsed=time.monotonic() - started)
