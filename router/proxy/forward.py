"""The proxy: one request to one backend, streamed both ways.

`forward` moves a request that failed before its answer started to another backend;
`exchange` is one attempt: the body goes up as it arrives, then the answer goes to a `Sink`
(its status and headers at once, then every chunk as it arrives: `router.proxy.sinks`).
Which failures are retried, and the prefill hop, are `router.proxy.failover`'s; the headers
sent are `router.proxy.headers`'. The backend response is always released (read to the end)
or closed (anything else).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

import aiohttp
from aiohttp import hdrs
from multidict import CIMultiDict

from router.backends.pool import Backend
from router.errors import BackendStatus, ClientGone
from router.events import RequestEvents
from router.flow import HEAD_BYTES, MAX_BODY, TAIL_BYTES, Attempt, RequestFlow
from router.proxy.failover import (
    RETRIED_ERRORS, RETRIED_STATUSES, Failover, PrefillHop, prefill, same_again,
    upstream_error,
)
from router.proxy.headers import AUTO_HEADERS, backend_headers
from router.proxy.inbound import InboundRequest
from router.proxy.sinks import Sink
from router.proxy.timeouts import ProxyTimeout

__all__ = ["forward", "exchange"]

log = logging.getLogger("router.proxy")


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
                # Where an answer's `id` is; one slice per request, nothing per chunk.
                flow.head = chunk[:HEAD_BYTES]
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
