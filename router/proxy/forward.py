"""The proxy: one request to one backend, streamed both ways.

`forward` moves a request that failed before its answer started to another backend;
`exchange` is one attempt: the body goes up as it arrives, then the answer goes to a `Sink`
(its status and headers at once, then every chunk as it arrives). Two sinks: `ClientSink`
streams to the client's connection, `Collector` keeps the answer in memory for a caller with
no client (a batch line). The backend response is always released (read to the end) or
closed (anything else).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy, istr

from router.errors import (
    AnswerTooLarge, BackendStatus, BackendUnreachable, ClientGone, PrefillFailed,
    ResponseHeadTimeout, RouterError, UpstreamError, UpstreamTimeout, error_response,
    failure_detail,
)
from router.backends.pool import Backend
from router.events import RequestEvents
from router.flow import MAX_BODY, TAIL_BYTES, Attempt, Outcome, RequestFlow
from router.proxy.inbound import InboundRequest, UploadBody
from router.proxy.retries import RetryBudget
from router.proxy.timeouts import HeadTimeout, ProxyTimeout
from router.proxy.upstream_read import read_bounded

__all__ = [
    "Failover", "PrefillHop", "UpstreamAuth", "upstream_headers", "forward", "exchange", "Sink",
    "ClientSink", "Collector",
]

log = logging.getLogger("router.proxy")

REQUEST_ID = istr("x-request-id")
BACKEND_HEADER = istr("x-router-backend")
HOP_BY_HOP = frozenset(
    istr(name)
    for name in (
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
        "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    )
)
# Also not forwarded upstream: aiohttp sets Host and Content-Length itself, an `Expect`
# was already answered by our own server, and a body is always sent decoded
# (`router.proxy.inbound.body_coding`).
NOT_FORWARDED_UP = HOP_BY_HOP | {
    hdrs.HOST, hdrs.CONTENT_LENGTH, hdrs.EXPECT, REQUEST_ID, hdrs.CONTENT_ENCODING,
}
NOT_FORWARDED_DOWN = HOP_BY_HOP | {REQUEST_ID}
AUTHORIZATION = hdrs.AUTHORIZATION
AUTO_HEADERS = (hdrs.USER_AGENT, hdrs.ACCEPT_ENCODING, hdrs.CONTENT_TYPE)
"""Headers aiohttp would add for a client that did not send them: not ours to add."""
CLIENT_CREDENTIALS = frozenset(
    istr(name) for name in ("authorization", "api-key", "x-api-key", "cookie")
)
"""What a client may authenticate to the router (or the fleet) with: never sent to an
external provider, whatever --forward-client-auth says."""


def forward_headers(
    incoming: CIMultiDictProxy[str], drop: frozenset[istr], request_id: str
) -> CIMultiDict[str]:
    """Copy end-to-end headers, dropping hop-by-hop ones and those the Connection header names."""
    headers = CIMultiDict(incoming)
    named = incoming.get(hdrs.CONNECTION)
    if named:
        drop = drop | {istr(name.strip()) for name in named.split(",")}
    for name in drop:
        headers.popall(name, None)
    headers[REQUEST_ID] = request_id
    return headers


@dataclass(frozen=True)
class UpstreamAuth:
    """Which credentials go to backends: by default never the client's (they are the
    router's keys), and the router's own backend key when one is set."""

    forward_client_auth: bool = False
    backend_api_key: str | None = None


def upstream_headers(
    incoming: CIMultiDictProxy[str], request_id: str, auth: UpstreamAuth
) -> CIMultiDict[str]:
    """The headers every attempt of one request sends to its backend."""
    drop = NOT_FORWARDED_UP if auth.forward_client_auth else NOT_FORWARDED_UP | {AUTHORIZATION}
    headers = forward_headers(incoming, drop, request_id)
    if auth.backend_api_key and AUTHORIZATION not in headers:
        headers[AUTHORIZATION] = f"Bearer {auth.backend_api_key}"
    return headers


def backend_headers(headers: CIMultiDict[str], backend: Backend) -> CIMultiDict[str]:
    """The headers of one attempt on `backend`: an external provider gets its own key and
    custom headers, and none of the client's (or the fleet's) credentials."""
    if backend.kind != "external":
        return headers
    headers = CIMultiDict(headers)
    for name in CLIENT_CREDENTIALS:
        headers.popall(name, None)
    headers.update(backend.headers)
    return headers


def backend_timeout(session: aiohttp.ClientSession, backend: Backend) -> aiohttp.ClientTimeout:
    """The session's timeouts (a `ProxyTimeout`); a backend with a read timeout of its own (an
    external provider's `timeout`) has it for the wait for its answer and for the body."""
    timeout = session.timeout
    if backend.read_timeout is None:
        return timeout
    head = timeout.head if isinstance(timeout, ProxyTimeout) else None
    return ProxyTimeout(
        total=timeout.total, connect=timeout.connect, sock_connect=timeout.sock_connect,
        sock_read=backend.read_timeout, ceil_threshold=timeout.ceil_threshold,
        body_read=backend.read_timeout, head=head,
    )


def upstream_error(error: BaseException, backend: str, upload: UploadBody | None) -> Exception:
    """Translate a failure of the backend's answer into our own exception: a message in our
    words naming the backend by its id, and aiohttp's account of it for the log only."""
    if upload is not None and upload.error is not None:
        # The body stream failed on the client's side, not the backend's.
        return upload.error if isinstance(upload.error, RouterError) else ClientGone()
    detail = failure_detail(error)
    if isinstance(error, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return BackendUnreachable(f"backend {backend} is unreachable", detail)
    if isinstance(error, HeadTimeout):
        return ResponseHeadTimeout(f"backend {backend} did not finish its response head in "
                                   "time", detail)
    if isinstance(error, TimeoutError):
        return UpstreamTimeout(f"backend {backend} did not answer in time", detail)
    if isinstance(error, aiohttp.ClientResponseError):
        return UpstreamError(f"backend {backend} sent an invalid response", detail)
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return UpstreamError(f"backend {backend} closed the connection before answering",
                             detail)
    return UpstreamError(f"backend {backend} failed", detail)


@dataclass(frozen=True)
class Failover:
    """How a request that failed before its answer started moves to another backend."""

    reroute: Callable[[Collection[str]], Backend | None]
    """Another backend, given the ids already tried; None when there is none."""
    alternatives: Callable[[Collection[str]], bool]
    """Whether another backend could take the request (asks no policy: no side effect)."""
    max_retries: int
    backoff: float
    """Seconds before the first retry, doubled for each next one."""
    budget: RetryBudget
    """The application's: retries at most a share of the requests in flight."""


@dataclass(frozen=True)
class PrefillHop:
    """Bounds of the prefill hop of disaggregated prefill, whose answer is read whole."""

    timeout: float
    """Seconds for the whole hop: connect, the prefill itself and the answer's last byte."""
    max_answer: int
    """Bytes of answer read; past them the hop fails (the answer is one token)."""


RETRIED_STATUSES = frozenset({502, 503, 504})
"""Backend answers worth another backend: a gateway in front of it failed, or it is
overloaded or shutting down (vLLM answers 503 while draining)."""


RETRIED_ERRORS = (BackendUnreachable, BackendStatus)
"""Failures no engine can have started work on: no connection was made, or the engine
answered "not me". Anything else happened after the request was sent (a timeout, a reset,
a broken answer): the engine may be generating it, so it is never sent to another one.
Only a status retry is subject to the retry budget."""


async def forward(
    sink: Sink,
    flow: RequestFlow,
    inbound: InboundRequest,
    session: aiohttp.ClientSession,
    events: RequestEvents,
    path: str,
    headers: CIMultiDict[str],
    failover: Failover | None,
    *,
    prefill_hop: PrefillHop,
) -> None:
    """`exchange` with failover: a request no backend can have started (`RETRIED_ERRORS`)
    is retried on another backend while the body can be sent again (and, after a 502/503/504
    answer, while the retry budget allows). The answer goes to `sink`."""
    if flow.prefill_backend is not None:
        await prefill(flow, inbound, session, path, headers, prefill_hop)
    if failover is None:
        await exchange(sink, flow, inbound, session, events, path, headers)
        return
    ticket = failover.budget.ticket()
    try:
        while True:
            assert flow.backend is not None
            tried = {attempt.backend.id for attempt in flow.attempts} | {flow.backend.id}

            def retry_status(tried: set[str] = tried) -> bool:
                # A retryable status is only turned into a retry when one can happen:
                # otherwise the backend's own answer goes to the client untouched. Asked
                # only when the status is retryable (it consults the policy's candidates);
                # the budget is asked last, as it counts a refusal.
                if not (
                    len(flow.attempts) < failover.max_retries
                    and inbound.replayable
                    and failover.alternatives(tried)
                ):
                    return False
                if ticket.retry():
                    return True
                flow.retry_refused = True
                log.warning("request %s: the retry budget is spent (%r): the answer of "
                            "backend %s goes to the client", flow.id, failover.budget,
                            flow.backend.id if flow.backend else None)
                return False

            try:
                await exchange(sink, flow, inbound, session, events, path, headers,
                               retry_status)
                return
            except RETRIED_ERRORS as error:
                if (
                    flow.t_headers is not None
                    or len(flow.attempts) >= failover.max_retries
                    or not inbound.replayable
                ):
                    raise
                # A status retry took its share of the budget in `retry_status`; a failed
                # connection reached no engine and costs none, so it takes none.
                backend = failover.reroute(tried) or same_again(flow)
                if backend is None:
                    raise
                flow.attempts.append(Attempt(flow.backend, error.logged, error.outcome))
                log.warning("request %s: %s; retrying on backend %s (attempt %d)",
                            flow.id, error.logged, backend.id, len(flow.attempts) + 1)
                flow.backend = backend
                events.on_retry(flow)
                await asyncio.sleep(failover.backoff * 2 ** (len(flow.attempts) - 1))
    finally:
        ticket.close()


def same_again(flow: RequestFlow) -> Backend | None:
    """The backend that just failed, when it has retries of its own (an external provider)
    not used up yet; else None."""
    backend = flow.backend
    assert backend is not None
    used = sum(1 for attempt in flow.attempts if attempt.backend is backend)
    return backend if used < backend.max_retries else None


async def prefill(
    flow: RequestFlow,
    inbound: InboundRequest,
    session: aiohttp.ClientSession,
    path: str,
    headers: CIMultiDict[str],
    hop: PrefillHop,
) -> None:
    """Disaggregated prefill, first hop: `flow.prefill_backend` computes the prompt's KV cache
    (one token, no stream); the decode request then carries the `kv_transfer_params` it
    returned, so the decode backend fetches the cache instead of recomputing it.

    The answer is read whole, so the hop is bounded in time (`hop.timeout`, all of it) and
    size (`hop.max_answer`): a prefill backend that answers without end is cut there."""
    assert flow.prefill_backend is not None and inbound.json is not None
    backend = flow.prefill_backend
    body = {key: value for key, value in inbound.json.items() if key != "stream_options"}
    body.update(stream=False, max_tokens=1, kv_transfer_params={
        "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
        "remote_block_ids": None, "remote_host": None, "remote_port": None,
    })
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = 1
    if flow.trace_headers:
        headers.update(flow.trace_headers)
    timeout = session.timeout
    timeout = aiohttp.ClientTimeout(
        total=hop.timeout, connect=timeout.connect, sock_connect=timeout.sock_connect,
        sock_read=timeout.sock_read, ceil_threshold=timeout.ceil_threshold,
    )
    try:
        async with session.post(backend.url + path, json=body, headers=headers,
                                timeout=timeout, allow_redirects=False) as response:
            answer = await read_bounded(response, hop.max_answer,
                                        f"prefill backend {backend.id}")
    except AnswerTooLarge as error:
        log.warning("request %s: %s; cut, the connection closed", flow.id, error.message)
        raise
    except (aiohttp.ClientError, TimeoutError) as error:
        raise upstream_error(error, backend.id, inbound.upload) from error
    if response.status != 200:
        raise PrefillFailed(response.status, answer, backend.id)
    try:
        params = json.loads(answer).get("kv_transfer_params")
    except (ValueError, AttributeError):
        params = None
    if not isinstance(params, dict):
        raise UpstreamError(f"prefill backend {backend.id} returned no kv_transfer_params")
    inbound.body = json.dumps({**inbound.json, "kv_transfer_params": params}).encode()


async def exchange(
    sink: Sink,
    flow: RequestFlow,
    inbound: InboundRequest,
    session: aiohttp.ClientSession,
    events: RequestEvents,
    path: str,
    headers: CIMultiDict[str],
    retry_status: Callable[[], bool] | None = None,
) -> None:
    """Forward the request to `flow.backend` and pass the answer to `sink` as it comes; a
    502/503/504 answer raises `BackendStatus` instead (for a retry) when `retry_status()`."""
    assert flow.backend is not None
    if flow.trace_headers:
        headers.update(flow.trace_headers)
    data: object = inbound.body
    if inbound.upload is not None:
        data = inbound.upload.chunks()
        if inbound.upload.content_length is not None:
            headers = CIMultiDict(headers)
            headers[hdrs.CONTENT_LENGTH] = str(inbound.upload.content_length)
    try:
        # A backend's redirect goes to the client as it is: the router never follows one to
        # a host discovery did not give it.
        upstream = await session.request(
            flow.method, flow.backend.url + path, data=data,
            headers=backend_headers(headers, flow.backend),
            timeout=backend_timeout(session, flow.backend), allow_redirects=False,
            skip_auto_headers=[name for name in AUTO_HEADERS if name not in headers] or None,
        )
    except (aiohttp.ClientError, TimeoutError) as error:
        raise upstream_error(error, flow.backend.id, inbound.upload) from error
    if upstream.status in RETRIED_STATUSES and retry_status is not None and retry_status():
        upstream.close()
        raise BackendStatus(upstream.status, flow.backend.id)
    released = False
    # The last chunks, kept by reference (no copy per chunk): `usage` is in the last ones.
    last_chunks: deque[bytes] = deque(maxlen=3)
    kept: list[bytes] | None = [] if flow.keep_body else None
    last = b""
    try:
        flow.t_headers = time.monotonic()
        flow.status = upstream.status
        write = await sink.start(flow, upstream)
        content = upstream.content
        while True:
            flow.reading_since = time.monotonic()
            try:
                chunk = await content.readany()
            except (aiohttp.ClientError, TimeoutError) as error:
                sink.broken(flow, error)
                return
            flow.reading_since = None
            if not chunk:
                break
            if flow.t_first_byte is None:
                flow.t_first_byte = time.monotonic()
                events.on_response(flow)
            flow.bytes_down += len(chunk)
            # A big chunk would be pinned here long after it was written: keep its tail only.
            last_chunks.append(chunk if len(chunk) <= TAIL_BYTES else chunk[-TAIL_BYTES:])
            if kept is not None:
                kept.append(chunk)
                if flow.bytes_down > MAX_BODY:
                    kept = None
            if content.at_eof():  # the last chunk: it goes with the end of the body
                last = chunk
                break
            flow.writing_since = time.monotonic()
            try:
                await write(chunk)
            except ConnectionError as error:
                raise ClientGone() from error
            flow.writing_since = None
        flow.writing_since = time.monotonic()
        await sink.end(last)
        flow.writing_since = None
        upstream.release()
        released = True
        if kept is not None:
            flow.response_body = b"".join(kept)
    finally:
        flow.tail = b"".join(chunk[-TAIL_BYTES:] for chunk in last_chunks)[-TAIL_BYTES:]
        if not released:
            upstream.close()


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
