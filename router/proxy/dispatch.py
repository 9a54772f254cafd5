"""Route and forward one request, for a client's request and a batch line alike.

`dispatch` runs the whole of one flow inside its `Lifecycle`: the caller's `receive` lets the
request in and reads it (a refusal there completes the flow like any other), the plugins'
`pre_request` may answer it, the policy chooses its backend (or the one it is pinned to),
and `forward` sends it there with failover, the answer going to the caller's `Sink`. The
plugins' `post_request` gets the answer's body once the flow completed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace

from aiohttp import web

from router.errors import RouterError
from router.flow import RequestFlow
from router.keys import (
    CHOOSER, CLIENT_SESSION, CONFIG, EVENTS, PLUGINS, PREFILL_HOP, RETRY_BUDGET, UPSTREAM_AUTH,
)
from router.proxy.failover import Failover
from router.proxy.forward import forward
from router.proxy.headers import upstream_headers
from router.proxy.inbound import InboundRequest
from router.proxy.lifecycle import Lifecycle
from router.proxy.sinks import Sink

__all__ = ["Receive", "dispatch", "pre_request"]

Receive = Callable[[], Awaitable[InboundRequest]]
"""Lets the request in (rate limit, admission) and reads it; raises a `RouterError` to
refuse it."""


async def dispatch(
    app: web.Application, flow: RequestFlow, sink: Sink, receive: Receive, path: str,
    pinned: str | None = None,
) -> RouterError | None:
    """Run `flow` from `receive` to its answer, which goes to `sink`; the error it ended
    with, if any (the sink's receiver has had nothing else). `path` is what the backend is
    sent to; a request `pinned` to a backend id goes there only, without failover."""
    inbound: InboundRequest | None = None
    try:
        async with Lifecycle(app[EVENTS], flow, sink) as lifecycle:
            inbound = await receive()
            await route(app, lifecycle, inbound, path, pinned)
        plugins = app[PLUGINS]
        if plugins is not None and flow.response_body is not None:
            plugins.post_request(flow, flow.response_body)
        return lifecycle.error
    finally:
        if inbound is not None:
            await inbound.aclose()


async def route(
    app: web.Application, lifecycle: Lifecycle, inbound: InboundRequest, path: str,
    pinned: str | None,
) -> None:
    flow, sink = lifecycle.flow, lifecycle.sink
    flow.request_json, flow.request_body = inbound.json, inbound.body
    answer = await pre_request(app, flow)
    if answer is not None:
        lifecycle.answered(answer)
        sink.answered(answer)
        return
    flow.model, flow.stream = inbound.model, inbound.stream
    if pinned is None:  # the client's `?id=` first, then what the body pins it to
        pinned = inbound.pinned
    chooser = app[CHOOSER]
    if pinned is None:
        await chooser.prepare(inbound, flow.endpoint)
    flow.backend = chooser.choose(inbound, pinned)
    failover: Failover | None = None
    prefill_hop = app[PREFILL_HOP]
    if pinned is None:  # a pinned request goes to that backend only
        flow.prefill_backend = chooser.choose_prefill(inbound, flow.endpoint)
        if flow.prefill_backend is not None:
            # What the decode hop takes from the prefill is the policy's (a reload may change
            # the policy, never the application's hop bounds).
            kv_handoff = bool(getattr(chooser.policy, "kv_handoff", False))
            prefill_hop = replace(prefill_hop, kv_handoff=kv_handoff)
        config = app[CONFIG]
        failover = Failover(
            lambda tried: chooser.choose_next(inbound, tried),
            lambda tried: bool(chooser.candidates(inbound.model, tried)),
            config.max_retries,
            config.retry_backoff,
            app[RETRY_BUDGET],
        )
    headers = upstream_headers(inbound.headers, flow.id, app[UPSTREAM_AUTH])
    lifecycle.routed()
    await forward(sink, flow, inbound, app[CLIENT_SESSION], app[EVENTS], path, headers,
                  failover, prefill_hop=prefill_hop)


async def pre_request(app: web.Application, flow: RequestFlow) -> web.StreamResponse | None:
    """The plugins' `pre_request`, which may answer the request instead of a backend."""
    plugins = app[PLUGINS]
    if plugins is None:
        return None
    flow.keep_body = plugins.wants_body
    return await plugins.pre_request(flow)
