"""A raw-socket backend that answers each proxied request with one chosen `Fault`.

`MisbehavingBackend` breaks HTTP on purpose: invalid HTTP, a truncated chunked body, a bad
chunk size, a short body, a close or a reset before the headers, silence, an oversized
header, a slow head, or a valid answer. It logs which request id met which fault, so a
test can say what each client should see. It listens on loopback only.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from router.testing.raw_engine import reset as reset_connection

__all__ = ["AFTER_HEADERS", "BEFORE_HEADERS", "Fault", "MisbehavingBackend", "Served"]

LOOPBACK = "127.0.0.1"
DONE = b"data: [DONE]"


class Fault(enum.Enum):
    """How `MisbehavingBackend` answers one request."""

    OK = "ok"
    """A valid answer: JSON, or an SSE stream ending with `data: [DONE]` when asked to stream."""
    SLOW_HEADERS = "slow_headers"
    """A valid answer whose status line and headers trickle out a few bytes at a time."""
    INVALID_HTTP = "invalid_http"
    """`this is not HTTP` instead of a status line."""
    BAD_STATUS_LINE = "bad_status_line"
    """`HTTP/1.1 2x0 OK`."""
    CONFLICTING_LENGTH = "conflicting_length"
    """Both `Content-Length` and `Transfer-Encoding: chunked` (a request-smuggling shape)."""
    OVERSIZED_HEADER = "oversized_header"
    """A 64 KiB header line."""
    CLOSE_BEFORE_HEADERS = "close_before_headers"
    """Reads the request, then closes without a byte of answer."""
    RESET_BEFORE_HEADERS = "reset_before_headers"
    """Reads the request, then resets the connection (RST)."""
    SILENT = "silent"
    """Reads the request, then says nothing until the peer gives up."""
    TRUNCATED_CHUNKED = "truncated_chunked"
    """200 and a chunked SSE body, then a clean close before the last (empty) chunk."""
    BAD_CHUNK_SIZE = "bad_chunk_size"
    """200 and one SSE chunk, then a chunk size that is not hexadecimal."""
    SHORT_BODY = "short_body"
    """200 with `Content-Length: 1000`, ten bytes, then a clean close."""
    RESET_MID_BODY = "reset_mid_body"
    """200 and two SSE chunks, then a reset."""
    STALL_MID_BODY = "stall_mid_body"
    """200 and one SSE chunk, then silence."""


BEFORE_HEADERS = frozenset({
    Fault.INVALID_HTTP, Fault.BAD_STATUS_LINE, Fault.CONFLICTING_LENGTH, Fault.OVERSIZED_HEADER,
    Fault.CLOSE_BEFORE_HEADERS, Fault.RESET_BEFORE_HEADERS, Fault.SILENT,
})
"""Faults that break the exchange before a status line reached the router."""
AFTER_HEADERS = frozenset({
    Fault.TRUNCATED_CHUNKED, Fault.BAD_CHUNK_SIZE, Fault.SHORT_BODY, Fault.RESET_MID_BODY,
    Fault.STALL_MID_BODY,
})
"""Faults that break the body after a 200 went out: the client's answer must be cut."""


@dataclass(frozen=True)
class Served:
    """One proxied request the raw backend answered."""

    fault: Fault
    request_id: str | None
    stream: bool


def _sse_event(n: int) -> bytes:
    payload = {"id": "chaos", "object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": {"content": f"tok{n}"}}]}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
             b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")


def _valid_answer(stream: bool) -> bytes:
    if stream:
        body = b"".join(_chunk(_sse_event(n)) for n in range(3))
        return _SSE_HEAD + body + _chunk(DONE + b"\n\n") + b"0\r\n\r\n"
    payload = json.dumps({"id": "chaos", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "tok0 tok1"},
         "finish_reason": "stop"}]}).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(payload), payload))


class MisbehavingBackend:
    """A backend that answers proxied requests with the faults it is given, in turn.

    `faults` is cycled (a list), or consumed (any other iterable: `Fault.OK` once it runs
    out). GET requests (`/health`, `/metrics`, `/v1/models`) always get a plain 200, so
    probes and scrapes see a live server. Every answer closes its connection.
    """

    def __init__(self, faults: Iterable[Fault], *, slow_step: float = 0.01) -> None:
        self._faults: Iterator[Fault] = (
            itertools.cycle(faults) if isinstance(faults, (list, tuple)) else iter(faults)
        )
        self.slow_step = slow_step
        """Seconds between two pieces of a `SLOW_HEADERS` head."""
        self.served: list[Served] = []
        self.url = ""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def faults_injected(self) -> int:
        return sum(served.fault is not Fault.OK for served in self.served)

    def fault_of(self, request_id: str) -> Fault | None:
        """The fault the request with this id met here (its last try), if it came here."""
        found = [served.fault for served in self.served if served.request_id == request_id]
        return found[-1] if found else None

    async def start(self) -> MisbehavingBackend:
        self._server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://{LOOPBACK}:{port}"
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> MisbehavingBackend:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await _read_body(reader, headers)
        if request_line.startswith("GET "):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            return
        try:
            stream = json.loads(body).get("stream") is True
        except (ValueError, AttributeError):
            stream = False
        fault = next(self._faults, Fault.OK)
        self.served.append(Served(fault, headers.get("x-request-id"), stream))
        await self._answer(fault, stream, reader, writer)

    async def _answer(
        self, fault: Fault, stream: bool, reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if fault is Fault.OK:
            writer.write(_valid_answer(stream))
        elif fault is Fault.SLOW_HEADERS:
            answer = _valid_answer(stream)
            split = answer.index(b"\r\n\r\n") + 4
            for start in range(0, split, 8):
                writer.write(answer[start : min(start + 8, split)])
                await writer.drain()
                await asyncio.sleep(self.slow_step)
            writer.write(answer[split:])
        elif fault is Fault.INVALID_HTTP:
            writer.write(b"this is not HTTP\r\n\r\n")
        elif fault is Fault.BAD_STATUS_LINE:
            writer.write(b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n")
        elif fault is Fault.CONFLICTING_LENGTH:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + _chunk(b"hello") + b"0\r\n\r\n")
        elif fault is Fault.OVERSIZED_HEADER:
            writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n")
        elif fault is Fault.CLOSE_BEFORE_HEADERS:
            pass
        elif fault is Fault.RESET_BEFORE_HEADERS:
            reset_connection(writer)
            return
        elif fault is Fault.SILENT:
            await reader.read()  # until the router gives up and closes
        elif fault is Fault.TRUNCATED_CHUNKED:
            writer.write(_SSE_HEAD + _chunk(_sse_event(0)) + _chunk(_sse_event(1)))
        elif fault is Fault.BAD_CHUNK_SIZE:
            writer.write(_SSE_HEAD + _chunk(_sse_event(0)))
            await writer.drain()
            await asyncio.sleep(0.01)  # the headers are through before the nonsense
            writer.write(b"zz\r\n" + _sse_event(1))
        elif fault is Fault.SHORT_BODY:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\nConnection: close\r\n\r\n{\"id\": \"ch")
        elif fault is Fault.RESET_MID_BODY:
            writer.write(_SSE_HEAD + _chunk(_sse_event(0)) + _chunk(_sse_event(1)))
            await writer.drain()
            await asyncio.sleep(0.01)
            reset_connection(writer)
            return
        elif fault is Fault.STALL_MID_BODY:
            writer.write(_SSE_HEAD + _chunk(_sse_event(0)))
            await writer.drain()
            await reader.read()
        await writer.drain()
        writer.close()


async def _read_body(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> bytes:
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() != "chunked":
        return b""
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return bytes(body)
        body += await reader.readexactly(size + 2)
        del body[-2:]
