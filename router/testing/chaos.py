"""Fault injection for the chaos suite: backends and clients that misbehave on purpose.

Backends:

- `MisbehavingBackend`: a raw-socket HTTP/1.1 server that answers each request with one
  `Fault`: invalid HTTP, a truncated chunked body, a bad chunk size, a short body, a close or
  a reset before the headers, silence, an oversized header, a slow head, or a valid answer.
  It logs which request id met which fault, so a test can say what each client should see.
- `EngineProcess`: the fake engine (`router.testing.engine`) in a child process, steered over
  HTTP (`/_chaos/behaviour`, `/_chaos/state`), that can be SIGKILLed mid-stream and started
  again on the same port. `python -m router.testing.chaos --port P` is that child.

Clients:

- `call()`: one request through aiohttp, its answer sorted into a `Kind`: complete, a clear
  error, cut (the answer started and the connection ended before its end), or a failure
  (hung past its timeout, or unclear: e.g. a body that ends cleanly but incomplete).
- `leave_during_head()`, `leave_during_body()`, `leave_before_answer()`, `leave_mid_stream()`:
  raw-socket clients that go away at a chosen point, closing (FIN) or resetting (RST).

And `Tally`, the suite's counts, and `open_fds()` / `rss_kib()` for leak checks.
Everything listens and connects on loopback only, and every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import enum
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from router.testing.engine import ENGINE_BEHAVIOUR, ENGINE_STATE, EngineBehaviour, make_engine_app
from router.testing.processes import free_port, wait_until_healthy
from router.testing.raw_engine import reset as reset_connection

__all__ = [
    "AFTER_HEADERS",
    "BEFORE_HEADERS",
    "CLEAR",
    "ClientResult",
    "EngineProcess",
    "Fault",
    "Kind",
    "MisbehavingBackend",
    "Tally",
    "call",
    "leave_before_answer",
    "leave_during_body",
    "leave_during_head",
    "leave_mid_stream",
    "open_fds",
    "request_head",
    "rss_kib",
]

LOOPBACK = "127.0.0.1"
DONE = b"data: [DONE]"


# --------------------------------------------------------------------------- process figures


def open_fds() -> int:
    """File descriptors this process holds now (blocking: call it through a thread)."""
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    """This process's resident memory now, in KiB (blocking: call it through a thread)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise LookupError("VmRSS")


# --------------------------------------------------------------------------- the raw backend


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


# --------------------------------------------------------------------------- engine process


class EngineProcess:
    """A fake engine in a child process: steer it at run time, SIGKILL it, start it again.

    Use as `async with EngineProcess(models) as engine:`; the child is always killed and
    waited for on exit. Knobs set with `configure()` are applied again after a restart.
    """

    def __init__(
        self, models: Sequence[str], *, name: str = "engine", port: int | None = None
    ) -> None:
        self.models = tuple(models)
        self.name = name
        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.kills = 0
        self.knobs: dict[str, Any] = {}
        self.process: asyncio.subprocess.Process | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self, timeout: float = 20.0) -> None:
        """Start the child (on the same port as before) and wait until it is healthy."""
        if self.alive:
            raise RuntimeError(f"engine process {self.name} is already running")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router.testing.chaos", "--host", LOOPBACK,
            "--port", str(self.port), "--models", ",".join(self.models), "--name", self.name,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        )
        try:
            async with aiohttp.ClientSession() as session:
                await wait_until_healthy(session, self.url, self.process, timeout)
                if self.knobs:
                    await self._post(session, self.knobs)
        except BaseException:
            await self.kill()
            raise

    async def configure(self, **knobs: Any) -> None:
        """Set `EngineBehaviour` fields in the child (kept for restarts)."""
        self.knobs.update(knobs)
        async with aiohttp.ClientSession() as session:
            await self._post(session, knobs)

    async def _post(self, session: aiohttp.ClientSession, knobs: Mapping[str, Any]) -> None:
        async with session.post(self.url + "/_chaos/behaviour", json=dict(knobs),
                                timeout=aiohttp.ClientTimeout(total=5)) as response:
            if response.status != 200:
                raise RuntimeError(f"{self.name}: {response.status} {await response.text()}")

    async def state(self) -> dict[str, int]:
        """The child's `EngineState` counters."""
        async with aiohttp.ClientSession() as session:
            async with session.get(self.url + "/_chaos/state",
                                   timeout=aiohttp.ClientTimeout(total=5)) as response:
                result: dict[str, int] = await response.json()
                return result

    async def kill(self) -> None:
        """SIGKILL the child (no goodbye to its connections) and reap it."""
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
            self.kills += 1
        async with asyncio.timeout(10):
            await process.wait()

    async def __aenter__(self) -> EngineProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.kill()


_KNOBS = {f.name for f in dataclasses.fields(EngineBehaviour)}


async def _set_behaviour(request: web.Request) -> web.Response:
    knobs = await request.json()
    behaviour = request.app[ENGINE_BEHAVIOUR]
    unknown = set(knobs) - _KNOBS
    if unknown:
        return web.json_response({"error": f"unknown knobs: {sorted(unknown)}"}, status=400)
    for name, value in knobs.items():
        setattr(behaviour, name, value)
    return web.json_response(dataclasses.asdict(behaviour))


async def _get_state(request: web.Request) -> web.Response:
    state = request.app[ENGINE_STATE]
    counters = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
                if isinstance(getattr(state, f.name), int)}
    return web.json_response(counters)


def make_controlled_engine_app(models: Sequence[str], name: str) -> web.Application:
    """The fake engine plus `/_chaos/behaviour` (POST knobs) and `/_chaos/state`."""
    app = make_engine_app(models, name)
    app.router.add_post("/_chaos/behaviour", _set_behaviour)
    app.router.add_get("/_chaos/state", _get_state)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m router.testing.chaos",
        description="A fake engine whose behaviour can be steered over HTTP (chaos tests).",
    )
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--models", default="demo-llm")
    parser.add_argument("--name", default="engine")
    args = parser.parse_args(argv)
    app = make_controlled_engine_app([m for m in args.models.split(",") if m], args.name)
    web.run_app(app, host=args.host, port=args.port, handler_cancellation=True,
                access_log=None, print=None, shutdown_timeout=0.25)


# --------------------------------------------------------------------------- clients


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


# --------------------------------------------------------------------------- counts


@dataclass
class Tally:
    """What the chaos suite did, for its summary line."""

    scenarios: int = 0
    requests: int = 0
    """HTTP requests sent to a router."""
    scanner_inputs: int = 0
    """Bodies fed to the multipart scanner directly (property tests)."""
    faults: Counter[str] = field(default_factory=Counter)
    results: Counter[str] = field(default_factory=Counter)
    flows: int = 0
    lost: int = 0
    """Requests without a clear end: hung, unclear, or a flow without exactly one
    `on_complete`. Must stay 0."""
    recoveries: list[float | None] = field(default_factory=list)
    """Seconds from the end of a fleet-wide fault burst to the first complete answer (None:
    none came)."""

    def add_results(self, results: Iterable[ClientResult]) -> None:
        for result in results:
            self.requests += 1
            self.results[result.kind.value] += 1
            if result.kind not in CLEAR:
                self.lost += 1

    def add_faults(self, faults: Mapping[str, int]) -> None:
        for name, count in faults.items():
            if count:
                self.faults[name] += count

    def lines(self) -> list[str]:
        faults = ", ".join(f"{name} {count}" for name, count in sorted(self.faults.items()))
        results = ", ".join(f"{name} {count}" for name, count in sorted(self.results.items()))
        return [
            f"scenarios run: {self.scenarios}; requests sent: {self.requests}; "
            f"router flows checked: {self.flows}; "
            f"multipart bodies scanned: {self.scanner_inputs}",
            f"faults injected: {sum(self.faults.values())} ({faults or 'none'})",
            f"client results: {results or 'none'}",
            f"lost (hung, unclear or unbalanced): {self.lost}",
        ] + ([self.recovery_line()] if self.recoveries else [])

    def recovery_line(self) -> str:
        seen = [r for r in self.recoveries if r is not None]
        worst = f"{max(seen):.3f} s" if seen else "-"
        return (f"time to recover after fleet-wide fault bursts: {len(self.recoveries)} bursts, "
                f"{len(self.recoveries) - len(seen)} never recovered, worst {worst}")

    def as_dict(self) -> dict[str, Any]:
        return {"scenarios": self.scenarios, "requests": self.requests, "flows": self.flows,
                "scanner_inputs": self.scanner_inputs,
                "faults": dict(self.faults), "faults_total": sum(self.faults.values()),
                "results": dict(self.results), "lost": self.lost,
                "recoveries": self.recoveries}


if __name__ == "__main__":
    main()
