"""`/v1/realtime`: vLLM's Realtime API, a WebSocket session relayed to one backend.

Its model: vLLM's server sends `session.created` as soon as it accepts the socket and reads
the model from the client's `session.update` after that, so the router cannot wait for that
event to choose a backend without speaking the protocol itself. It takes the model from the
query (`?model=`, which OpenAI's SDK sends); without one, a fleet serving a single model gets
that one, and any other is refused. `?id=` pins the session to one backend, as elsewhere.

Like every proxied request, a session is one flow in one `Lifecycle`, from its arrival
(rate limit, admission) to its close; a refusal before the upgrade (no backend, unknown
model, the backend refusing its own upgrade) is an OpenAI-style JSON error. The relay itself
is `router.proxy.websocket`'s.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from aiohttp import WSCloseCode, hdrs, web
from multidict import CIMultiDict

from router.api.limits import WayIn
from router.api.middleware import expect_handler, request_id
from router.api.openai import upstream_path
from router.backends.pool import BackendPool
from router.errors import BackendUnreachable, BadRequest, ClientGone, error_response
from router.flow import Attempt, RequestFlow
from router.keys import CHOOSER, CLIENT_SESSION, CONFIG, EVENTS, POOL, UPSTREAM_AUTH
from router.proxy.headers import BACKEND_HEADER, REQUEST_ID, upstream_headers
from router.proxy.inbound import InboundRequest, resolve_model
from router.proxy.lifecycle import Lifecycle
from router.proxy.sinks import CLIENT_CLOSED_REQUEST
from router.proxy.websocket import (
    CLOSE_TIMEOUT, WebSocketLimits, WebSocketSink, close, connect, relay, websocket_headers,
)

__all__ = ["REALTIME", "add_routes", "realtime_model"]

REALTIME = "/v1/realtime"

log = logging.getLogger("router.proxy")


def realtime_model(request: web.Request, pool: BackendPool) -> str:
    """The served model a session is for: the query's `model` (an alias followed), else the
    fleet's only model; raises the client's error otherwise."""
    model = request.query.get("model") if request.query_string else None
    if model is not None:
        return resolve_model(pool, model)
    models = pool.models()
    if len(models) == 1:
        return models[0]
    raise BadRequest(f"name the model in the query: {REALTIME}?model=<model> (this router "
                     f"serves {len(models)} models)")


def limits_of(app: web.Application) -> WebSocketLimits:
    config = app[CONFIG]
    return WebSocketLimits(
        max_message_size=config.websocket_max_message_size,
        heartbeat=config.websocket_heartbeat or None,
        idle_timeout=config.websocket_idle_timeout,
        handshake_timeout=config.connect_timeout + config.response_head_timeout,
    )


async def realtime(request: web.Request) -> web.StreamResponse:
    """The handler: the live requests track the session; the rate limit and admission let it
    in (its admission slot is held until it closes); `session` does the rest."""
    app = request.app
    flow = RequestFlow(id=request_id(request), endpoint=REALTIME, method=request.method,
                       stream=True)
    sink = WebSocketSink(request)
    with WayIn(request, flow) as way_in:
        async with Lifecycle(app[EVENTS], flow, sink) as lifecycle:
            await way_in.admit()
            flow.request = request
            await session(request, lifecycle, sink)
        if sink.socket is not None and sink.socket.prepared:
            return sink.socket
        if lifecycle.error is not None:
            return error_response(lifecycle.error, flow.id)
        return web.Response(status=CLIENT_CLOSED_REQUEST)  # the client left before its upgrade


async def session(request: web.Request, lifecycle: Lifecycle, sink: WebSocketSink) -> None:
    """Route the session, open the backend's socket, then answer the client's upgrade and
    relay until either side closes. The backend's socket is always closed."""
    app, flow = request.app, lifecycle.flow
    client = web.WebSocketResponse()
    if not client.can_prepare(request).ok:
        raise BadRequest(f"{REALTIME} is a WebSocket endpoint: connect with a WebSocket "
                         "client (ws:// or wss://)")
    flow.model = realtime_model(request, app[POOL])
    path, pinned = upstream_path(request, REALTIME)
    inbound = InboundRequest(model=flow.model, stream=True, headers=request.headers)
    flow.backend = app[CHOOSER].choose(inbound, pinned)
    headers = websocket_headers(upstream_headers(request.headers, flow.id, app[UPSTREAM_AUTH]))
    lifecycle.routed()
    limits = limits_of(app)
    offered = tuple(
        protocol.strip()
        for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
        for protocol in value.split(",") if protocol.strip()
    )
    upstream = await open_upstream(app, flow, inbound, pinned, path, headers, offered, limits)
    backend = flow.backend  # the one that answered
    assert backend is not None
    async with upstream:
        flow.t_headers = time.monotonic()
        chosen = upstream.protocol
        client = web.WebSocketResponse(
            protocols=(chosen,) if chosen else (), autoclose=False, autoping=False,
            heartbeat=limits.heartbeat, max_msg_size=limits.max_message_size,
            timeout=CLOSE_TIMEOUT,
        )
        client.headers[REQUEST_ID] = flow.id
        client.headers[BACKEND_HEADER] = backend.id
        sink.socket = client
        try:
            await client.prepare(request)
        except ConnectionError as error:
            raise ClientGone() from error
        flow.status = 101
        try:
            await relay(client, upstream, flow, app[EVENTS], limits.idle_timeout,
                        sink.client_gone)
        finally:  # cut short (cancelled): the backend hears why, not a plain 1000
            await close(upstream, WSCloseCode.GOING_AWAY, "")


async def open_upstream(
    app: web.Application, flow: RequestFlow, inbound: InboundRequest, pinned: str | None,
    path: str, headers: CIMultiDict[str], offered: tuple[str, ...], limits: WebSocketLimits,
) -> aiohttp.ClientWebSocketResponse:
    """The socket of `flow.backend`; one that cannot be reached (nothing of the session got
    there) gives way to another, up to --max-retries, as for other requests. A pinned
    session has only its backend."""
    config, chooser = app[CONFIG], app[CHOOSER]
    while True:
        assert flow.backend is not None
        try:
            return await connect(app[CLIENT_SESSION], flow.backend, path, headers, offered,
                                 limits)
        except BackendUnreachable as error:
            tried = {attempt.backend.id for attempt in flow.attempts} | {flow.backend.id}
            backend = (
                None if pinned is not None or len(flow.attempts) >= config.max_retries
                else chooser.choose_next(inbound, tried)
            )
            if backend is None:
                raise
            flow.attempts.append(Attempt(flow.backend, error.logged, error.outcome))
            log.warning("request %s: %s; retrying on backend %s", flow.id, error.logged,
                        backend.id)
            flow.backend = backend
            app[EVENTS].on_retry(flow)
            await asyncio.sleep(config.retry_backoff * 2 ** (len(flow.attempts) - 1))


def add_routes(app: web.Application) -> None:
    app.router.add_get(REALTIME, realtime, expect_handler=expect_handler)
