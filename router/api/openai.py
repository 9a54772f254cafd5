"""The OpenAI-compatible endpoints: proxied ones, and the router-local `/v1/models`.

A proxied request's handler is thin: its id, the live requests, the rate limit and admission,
reading its body (JSON or multipart); `router.proxy.dispatch` routes and forwards it, and its
`ClientSink` streams the answer back.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, unquote_plus

from aiohttp import web

from router.api.limits import WayIn, openai_errors
from router.api.middleware import expect_handler, request_id
from router.api.stored_responses import pin_follow_up, read_stored
from router.backends.response_homes import CANCEL, STORED
from router.flow import RequestFlow
from router.keys import CONFIG, POOL, REWRITER
from router.proxy.dispatch import dispatch
from router.proxy.inbound import (
    JSON_ENDPOINTS, LIVE_JSON_ENDPOINTS, UPLOAD_FIELDS, InboundRequest, read_json_request,
    rewriting,
)
from router.proxy.multipart import read_multipart_request
from router.proxy.sinks import ClientSink

__all__ = ["add_routes"]


Read = Callable[[web.Request, RequestFlow], Awaitable[InboundRequest]]
"""Reads one endpoint's request (its body, if any) into an `InboundRequest`."""


async def read_json(request: web.Request, flow: RequestFlow) -> InboundRequest:
    app = request.app
    config = app[CONFIG]
    inbound = await read_json_request(
        request, app[POOL], config.max_json_body_size, config.client_body_timeout,
        rewriting(app[REWRITER], flow), config.max_inflate_ratio,
    )
    await pin_follow_up(request, flow.endpoint, inbound)
    return inbound


async def read_upload(
    request: web.Request, flow: RequestFlow, file_names: tuple[str, ...]
) -> InboundRequest:
    """An upload; never rewritten."""
    config = request.app[CONFIG]
    return await read_multipart_request(
        request, request.app[POOL], config.max_body_size, config.spool_dir,
        config.client_body_timeout, config.max_inflate_ratio, file_names,
    )


async def proxy(request: web.Request, endpoint: str, read: Read) -> web.StreamResponse:
    """The handler of every proxied endpoint (bound to its route by `add_routes`): the live
    requests track it; the rate limit and admission let it in and its body is read (or any
    of them refuses it, before a backend is chosen); `dispatch` does the rest."""
    app = request.app
    flow = RequestFlow(id=request_id(request), endpoint=endpoint, method=request.method)
    with WayIn(request, flow) as way_in:

        async def receive() -> InboundRequest:
            await way_in.admit()
            inbound = await read(request, flow)
            flow.request = request
            return inbound

        sink = ClientSink(request, app[CONFIG].stream_buffer_size)
        path, pinned = upstream_path(request, endpoint)
        error = await dispatch(app, flow, sink, receive, path, pinned)
        return sink.answer(flow.id, error)


def upstream_path(request: web.Request, endpoint: str) -> tuple[str, str | None]:
    """Where the backend is sent the request, and the backend id it is pinned to (`?id=`).
    `endpoint` may name the route's variables (`/v1/responses/{response_id}`)."""
    if request.match_info:
        endpoint = endpoint.format_map(
            {name: quote(value, safe="") for name, value in request.match_info.items()}
        )
    pinned = request.query.get("id") if request.query_string else None
    if pinned is None:
        # The route's own path, and the query as the client encoded it: decoded, `?a=%23b`
        # would become a fragment.
        query = request.rel_url.raw_query_string
    else:  # pinned to one backend: `id` is ours, not the backend's
        query = without_parameter(request.rel_url.raw_query_string, "id")
    return (f"{endpoint}?{query}" if query else endpoint), pinned


def without_parameter(raw_query: str, name: str) -> str:
    """`raw_query` without the parameter `name`, every other byte as the client sent it."""
    return "&".join(
        part for part in raw_query.split("&")
        if unquote_plus(part.partition("=")[0]) != name
    )


async def list_models(request: web.Request) -> web.Response:
    """The union of the backends' models, each with the card its engine gave (every field
    kept, LoRA adapters' `parent` included), then the aliases (`root`: the served model).

    A model whose engine's card is not known yet (its `/v1/models` not read yet, or an
    external provider) gets a minimal card."""
    pool = request.app[POOL]
    created = int(time.time())

    def card_of(model: str) -> dict[str, Any]:
        card = pool.card(model)
        if card is None:
            return {"id": model, "object": "model", "created": created, "owned_by": "router",
                    "root": model, "parent": None}
        return dict(card)

    entries = [card_of(model) for model in pool.models()]
    for alias, model in pool.routable_aliases().items():
        entries.append({**card_of(model), "id": alias, "root": model})
    return web.json_response({"object": "list", "data": entries})


def add_routes(app: web.Application) -> None:
    def post(endpoint: str, read: Read) -> None:
        app.router.add_post(endpoint, functools.partial(proxy, endpoint=endpoint, read=read),
                            expect_handler=expect_handler)

    for endpoint in (*JSON_ENDPOINTS, *LIVE_JSON_ENDPOINTS):
        post(endpoint, read_json)
    for endpoint, file_names in UPLOAD_FIELDS.items():
        post(endpoint, functools.partial(read_upload, file_names=file_names))
    stored = functools.partial(proxy, endpoint=STORED, read=read_stored)
    app.router.add_get(STORED, stored, allow_head=False, expect_handler=expect_handler)
    app.router.add_delete(STORED, stored, expect_handler=expect_handler)
    post(CANCEL, read_stored)
    app.router.add_get("/v1/models", openai_errors(list_models), expect_handler=expect_handler)
