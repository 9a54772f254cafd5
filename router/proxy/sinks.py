"""Where a request's answer goes: `ClientSink` streams it to the client's connection,
`Collector` keeps it in memory for a caller with no client (a batch line).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy

from router.errors import AnswerTooLarge, ClientGone, RouterError, error_response, failure_detail
from router.flow import Outcome, RequestFlow
from router.proxy.failover import upstream_error
from router.proxy.headers import BACKEND_HEADER, NOT_FORWARDED_DOWN, forward_headers

__all__ = [
    "CLIENT_CLOSED_REQUEST", "Write", "Sink", "ClientSink", "Collector", "break_stream",
    "cut_client",
]

log = logging.getLogger("router.proxy")


Write = Callable[[bytes], Awaitable[None]]
"""Passes one chunk of the answer on; a `ConnectionError` means the client is gone."""

CLIENT_CLOSED_REQUEST = 499
"""nginx's status for a client that went away before the answer (never sent, only counted)."""


class Sink(Protocol):
    """Where a request's answer goes: a backend's, once its status and headers arrived, or a
    plugin's. The sink owns the answer; the request's `Lifecycle` asks it about its receiver."""

    async def start(self, flow: RequestFlow, upstream: aiohttp.ClientResponse) -> Write:
        """Take the status and headers; return what each body chunk is passed to (the one
        call per chunk on the streaming path: no wrapper around a client's write)."""
        ...

    async def end(self, last: bytes) -> None:
        """Pass on `last`, the body's last chunk (or b""), and end the body: one write for
        both, where a separate end of a chunked body would cost a system call of its own."""
        ...

    def broken(self, flow: RequestFlow, error: BaseException) -> None:
        """The backend failed after its answer started (`aiohttp.ClientError`, timeout)."""
        ...

    def answered(self, response: web.StreamResponse) -> None:
        """A plugin answered the request itself, before any backend was chosen."""
        ...

    def client_gone(self) -> bool:
        """Whether the receiver left (a client's closed connection)."""
        ...

    def abort(self) -> bool:
        """The router failed: cut an answer that already started going out (True); False
        when none did, so an error answer can still take its place."""
        ...


class ClientSink:
    """Streams the answer to the client: the backend's status and headers at once, then each
    chunk as it comes; `answer()` is what the handler returns. A broken client connection is
    `ClientGone`; a backend that breaks mid-answer cuts the client's connection
    (`break_stream`). Once streaming, writes wait for the client past `buffer_size` bytes
    (the backend is not read meanwhile).

    An answer whose whole body came with its headers (a typical JSON answer) is sent in one
    write, headers and body together: nothing is waited for, one system call is saved."""

    __slots__ = ("request", "buffer_size", "response", "status", "reason", "headers")

    def __init__(self, request: web.Request, buffer_size: int) -> None:
        self.request = request
        self.buffer_size = buffer_size
        self.response: web.StreamResponse | None = None
        """The client's answer: the backend's once it started, or a plugin's."""

    async def start(self, flow: RequestFlow, upstream: aiohttp.ClientResponse) -> Write:
        assert flow.backend is not None
        self.status, self.reason = upstream.status, upstream.reason
        self.headers = forward_headers(upstream.headers, NOT_FORWARDED_DOWN, flow.id)
        self.headers[BACKEND_HEADER] = flow.backend.id
        if upstream.content.is_eof():  # the whole answer is here: `end` sends it at once
            return self._start_and_write
        return await self._stream()

    async def _stream(self) -> Write:
        response = web.StreamResponse(status=self.status, reason=self.reason,
                                      headers=self.headers)
        await self._prepare(response)
        transport = self.request.transport
        if transport is not None:
            transport.set_write_buffer_limits(high=self.buffer_size)
        return response.write

    async def _start_and_write(self, chunk: bytes) -> None:
        write = await self._stream()
        await write(chunk)

    async def _prepare(self, response: web.StreamResponse) -> None:
        self.response = response
        try:
            await response.prepare(self.request)
        except ConnectionError as error:
            raise ClientGone() from error

    async def end(self, last: bytes) -> None:
        response = self.response
        try:
            if response is None:  # headers and body in one write (aiohttp's Response)
                response = web.Response(status=self.status, reason=self.reason,
                                        headers=self.headers, body=last)
                await self._prepare(response)
                await response.write_eof()
            else:
                await response.write_eof(last)
        except ConnectionError as error:
            raise ClientGone() from error

    def broken(self, flow: RequestFlow, error: BaseException) -> None:
        break_stream(self.request, flow, error)

    def answered(self, response: web.StreamResponse) -> None:
        self.response = response

    def client_gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    def abort(self) -> bool:
        if self.response is not None and self.response.prepared:
            cut_client(self.request)
            return True
        return False

    def answer(self, flow_id: str, error: RouterError | None) -> web.StreamResponse:
        """What the handler returns once the request is over: the request's `error` as an
        OpenAI-style answer while nothing was sent, else the answer that was."""
        if error is not None and (self.response is None or not self.response.prepared):
            return error_response(error, flow_id)
        if self.response is not None:
            return self.response
        # The client is gone and nothing was sent: aiohttp's write of this fails quietly.
        return web.Response(status=CLIENT_CLOSED_REQUEST)


class Collector:
    """Keeps the answer in memory, for a caller no client waits on (a batch line): its
    status, headers and body, up to `limit` body bytes. Past the limit it raises
    `AnswerTooLarge` before keeping the chunk, so the answer is cut (and its connection
    closed) at the limit, never read on. A backend that breaks mid-answer raises the error
    it would have raised before its answer."""

    __slots__ = ("limit", "status", "headers", "chunks", "size", "backend_id", "flow_id")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.status: int | None = None
        self.headers: CIMultiDictProxy[str] | None = None
        # Joined once at the end: one buffer grown chunk by chunk fragments the heap.
        self.chunks: list[bytes] = []
        self.size = 0
        self.backend_id = ""
        self.flow_id = ""

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    async def start(self, flow: RequestFlow, upstream: aiohttp.ClientResponse) -> Write:
        assert flow.backend is not None
        self.status, self.headers = upstream.status, upstream.headers
        self.backend_id, self.flow_id = flow.backend.id, flow.id
        declared = upstream.content_length
        if declared is not None and declared > self.limit:
            self._too_large()
        return self.write

    async def write(self, chunk: bytes) -> None:
        if self.size + len(chunk) > self.limit:
            self._too_large()
        self.size += len(chunk)
        self.chunks.append(chunk)

    def _too_large(self) -> None:
        error = AnswerTooLarge(f"backend {self.backend_id}", self.limit)
        log.warning("request %s: %s; cut, the connection closed (--batch-max-answer-size)",
                    self.flow_id, error.message)
        raise error

    async def end(self, last: bytes) -> None:
        if last:
            await self.write(last)

    def broken(self, flow: RequestFlow, error: BaseException) -> None:
        raise upstream_error(error, self.backend_id, None) from error

    def answered(self, response: web.StreamResponse) -> None:
        self.status = response.status
        body = response.body if isinstance(response, web.Response) else None
        self.chunks = [body] if isinstance(body, bytes) else []

    def client_gone(self) -> bool:
        return False  # no client waits on it

    def abort(self) -> bool:
        return False  # nothing went out: the caller gets the error


def break_stream(request: web.Request, flow: RequestFlow, error: BaseException) -> None:
    """The backend failed after the response started: the status is gone, so the only honest
    signal left is to cut the client's connection before the end of the body."""
    timed_out = isinstance(error, TimeoutError)
    flow.outcome = Outcome.TIMEOUT if timed_out else Outcome.BACKEND_ERROR
    flow.error = f"backend failed mid-stream ({failure_detail(error)})"
    log.warning("request %s: %s", flow.id, flow.error)
    cut_client(request)


def cut_client(request: web.Request) -> None:
    """Close the client's connection after what was already written, without ending the body:
    the client sees a truncated answer, never a falsely complete one."""
    if request.transport is not None:
        request.transport.close()
