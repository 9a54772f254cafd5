"""A raw-socket engine that answers each request with scripted bytes and delays.

Where the fake engine (`router.testing.engine`) speaks correct HTTP through aiohttp, this one
writes whatever a test tells it to, byte for byte: more headers than a client accepts, a
header line over 8 KiB, `Transfer-Encoding` with `Content-Length`, a bad chunk, a head that
trickles out a line at a time, a whole extra response on an idle keep-alive connection, a hang,
a close or a reset mid-body.

    def script(request: RawRequest) -> list[Step]:
        if request.index == 0:  # first request on this connection
            return [http_response(200, b"{}"), 0.3, http_response(200, b"stray")]
        return [http_response(200, b"{}")]

    async with RawEngine(script) as engine:
        ...  # point the router at engine.url; judge by engine.requests

The script gets each parsed request and returns the steps: `bytes` are written (and drained),
a `float` is a pause in seconds, `CLOSE` closes the connection (FIN), `RESET` resets it (RST),
and `HANG` waits until the peer closes. Without `CLOSE` or `RESET` the connection stays open
for the next request (keep-alive). Only loopback; every connection is cut on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
    "CLOSE",
    "HANG",
    "RESET",
    "RawEngine",
    "RawRequest",
    "Script",
    "Step",
    "chunk",
    "http_response",
    "reset",
    "trickle_lines",
]

LOOPBACK = "127.0.0.1"
MAX_HEAD = 1 << 20
"""Bytes of a request head (or chunk-size line) the engine reads before giving up on the
connection."""


class Marker(enum.Enum):
    CLOSE = "close"
    RESET = "reset"
    HANG = "hang"


CLOSE = Marker.CLOSE
"""Close the connection (FIN) and stop serving it."""
RESET = Marker.RESET
"""Reset the connection (RST) and stop serving it."""
HANG = Marker.HANG
"""Write nothing more until the peer closes the connection."""

Step = bytes | float | Marker
"""Bytes to write, seconds to wait, or a marker."""


@dataclass(frozen=True)
class RawRequest:
    """One request as the engine received it."""

    method: str
    path: str
    headers: CIMultiDictProxy[str]
    body: bytes
    connection: int
    """Which connection it came on: 0 for the engine's first, counting up."""
    index: int
    """Its place on that connection: 0 for the first request, 1 for the next keep-alive one."""
    number: int
    """Its place among all requests the engine received, from 0."""


Script = Callable[[RawRequest], Iterable[Step]]


def http_response(
    status: int = 200,
    body: bytes = b"",
    headers: Sequence[tuple[str, str]] = (("Content-Type", "application/json"),),
    *,
    reason: str = "OK",
    length: bool = True,
) -> bytes:
    """A whole HTTP/1.1 response; `Content-Length` is added unless `length` is False (the
    caller gives its own framing in `headers`)."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (`b""` gives the last chunk)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def trickle_lines(data: bytes, delay: float) -> list[Step]:
    """`data` written one line at a time, `delay` seconds apart (a slow head)."""
    lines = data.splitlines(keepends=True)
    steps: list[Step] = []
    for n, line in enumerate(lines):
        if n:
            steps.append(delay)
        steps.append(line)
    return steps


@dataclass
class RawEngine:
    """The server; an async context manager. What it saw is in `requests` and `connections`."""

    script: Script
    url: str = ""
    connections: int = 0
    """Connections accepted so far."""
    requests: list[RawRequest] = field(default_factory=list)
    """Every request received, in order."""
    open: int = 0
    """Connections open now."""
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _idle: dict[int, asyncio.StreamWriter] = field(default_factory=dict)

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> RawEngine:
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0, limit=MAX_HEAD)
        self.url = f"http://{LOOPBACK}:{self.port}"
        return self

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    def write_idle(self, data: bytes | Callable[[int], bytes]) -> int:
        """Write `data` (or `data(connection)`) now on every connection that waits for its
        next request with nothing of it received yet; return how many. For bytes that land
        on a keep-alive connection the peer holds idle, without racing its next request."""
        for connection, writer in self._idle.items():
            writer.write(data(connection) if callable(data) else data)
        return len(self._idle)

    async def __aenter__(self) -> RawEngine:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer, self.connections))
        self.connections += 1
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: int
    ) -> None:
        self.open += 1
        try:
            for index in range(1 << 30):
                self._idle[connection] = writer
                try:
                    first = await reader.read(1)
                finally:
                    self._idle.pop(connection, None)
                if not first:  # the peer closed between requests
                    return
                request = await _read_request(first, reader, connection, index,
                                              len(self.requests))
                self.requests.append(request)
                if not await _play(self.script(request), reader, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError):
            pass
        finally:
            self.open -= 1
            if not writer.transport.is_closing():
                writer.transport.abort()


async def _play(steps: Iterable[Step], reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter) -> bool:
    """Run the steps; False once the connection is done with."""
    for step in steps:
        if isinstance(step, bytes):
            writer.write(step)
            await writer.drain()
        elif isinstance(step, float | int):
            await asyncio.sleep(step)
        elif step is CLOSE:
            writer.close()
            return False
        elif step is RESET:
            reset(writer)
            return False
        else:  # HANG
            while await reader.read(65536):
                pass
            return False
    return True


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST: SO_LINGER with a zero timeout, then abort."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _read_request(
    first: bytes, reader: asyncio.StreamReader, connection: int, index: int, number: int
) -> RawRequest:
    """The request that starts with the byte `first`."""
    head = first + await reader.readuntil(b"\r\n\r\n")
    request_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    method, path, _version = request_line.split(" ", 2)
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    body = await _read_body(reader, headers)
    return RawRequest(method, path, CIMultiDictProxy(headers), body, connection, index, number)


async def _read_body(reader: asyncio.StreamReader, headers: CIMultiDict[str]) -> bytes:
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return bytes(body)
            body += await reader.readexactly(size + 2)
            del body[-2:]
    length = int(headers.get("Content-Length", "0"))
    return await reader.readexactly(length) if length else b""
