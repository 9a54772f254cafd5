"""The OpenAI-compatible endpoints: proxied ones, and the router-local `/v1/models`.

A proxied request goes: read the inbound request (JSON or multipart) -> the policy picks a
backend among those serving the model -> the proxy lifecycle forwards it and streams back.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import time
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import hdrs, web

from router.api import expect_handler, request_id
from router.errors import RouterError, error_response
from router.flow import RequestFlow
from router.proxy.inbound import InboundRequest, read_json_request
from router.keys import (
    ADMISSION, API_KEYS, CHOOSER, CLIENT_SESSION, CONFIG, DRAIN, EVENTS, PLUGINS, POOL,
    PREFILL_HOP, RATE_LIMITER, RETRY_BUDGET, REWRITER, UPSTREAM_AUTH,
)
from router.proxy.lifecycle import Lifecycle
from router.proxy.multipart import read_multipart_request
from router.plugins import RequestRewriter
from router.proxy.forward import Failover, forward, upstream_headers

__all__ = [
    "JSON_ENDPOINTS", "MULTIPART_ENDPOINTS", "add_routes", "client_key", "spend_rate_limit",
]

JSON_ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/rerank",
    "/rerank",
    "/v1/score",
    "/score",
    "/tokenize",
    "/detokenize",
)
MULTIPART_ENDPOINTS = ("/v1/audio/transcriptions", "/v1/audio/translations")


log = logging.getLogger("router.api")


async def read_inbound(
    request: web.Request, multipart: bool, flow: RequestFlow
) -> InboundRequest:
    app = request.app
    config = app[CONFIG]
    if multipart:  # uploads are never rewritten
        return await read_multipart_request(
            request, app[POOL], config.max_body_size, config.spool_dir,
            config.client_body_timeout, config.max_inflate_ratio,
        )
    rewriter = app[REWRITER]
    return await read_json_request(
        request, app[POOL], config.max_json_body_size, config.client_body_timeout,
        None if rewriter is None else (lambda body: rewrite(rewriter, flow, body)),
        config.max_inflate_ratio,
    )


async def proxy(request: web.Request, endpoint: str, multipart: bool) -> web.StreamResponse:
    """The handler of every proxied endpoint (bound to its route by `add_routes`): the drain
    tracks it, then the rate limit and admission let it in and its body is read (or any of
    them refuses it, before a backend is chosen)."""
    app = request.app
    flow = RequestFlow(id=request_id(request), endpoint=endpoint, method=request.method)
    task = asyncio.current_task()
    assert task is not None
    drain = app[DRAIN]
    drain.enter(task, flow)
    admission = app[ADMISSION]
    admitted_in = False
    try:
        lifecycle = Lifecycle(request, app[EVENTS], flow)
        try:
            spend_rate_limit(request)
            if admission is not None:
                await admission.acquire()
                admitted_in = True
            inbound = await read_inbound(request, multipart, flow)
        except RouterError as error:
            return lifecycle.reject(error)
        except asyncio.CancelledError:
            lifecycle.abandon()
            raise
        return await admitted(request, endpoint, inbound, flow, lifecycle)
    finally:
        if admitted_in:
            assert admission is not None
            admission.release()
        drain.leave(task)


def without_parameter(raw_query: str, name: str) -> str:
    """`raw_query` without the parameter `name`, every other byte as the client sent it."""
    return "&".join(
        part for part in raw_query.split("&")
        if unquote_plus(part.partition("=")[0]) != name
    )


def spend_rate_limit(request: web.Request) -> None:
    """Take a token of the client's bucket under `--rate-limit`, or raise `TooManyRequests`:
    every endpoint of the API spends it, not only the proxied ones."""
    limiter = request.app[RATE_LIMITER]
    if limiter is not None:
        limiter.take(client_key(request))


def client_key(request: web.Request) -> str:
    """Whose rate limit a request spends: its API key when keys are required (the key, not
    the header's spelling), else its address (a header a client can vary is no identity)."""
    keys = request.app[API_KEYS]
    if keys.enabled:
        key = keys.identify(request.headers.get(hdrs.AUTHORIZATION))
        if key is not None:
            return "key:" + key
    return "addr:" + (request.remote or "unknown")


async def admitted(
    request: web.Request, endpoint: str, inbound: InboundRequest, flow: RequestFlow,
    lifecycle: Lifecycle,
) -> web.StreamResponse:
    app = request.app
    try:
        flow.request, flow.request_json, flow.request_body = request, inbound.json, inbound.body
        plugins = app[PLUGINS]
        answer = await extend(app, flow)
        if answer is not None:
            return lifecycle.answered(answer)
        flow.model, flow.stream = inbound.model, inbound.stream
        chooser = app[CHOOSER]
        pinned = request.query.get("id") if request.query_string else None
        try:
            flow.backend = chooser.choose(inbound, pinned)
            if pinned is None:  # a pinned request goes to that backend only
                flow.prefill_backend = chooser.choose_prefill(inbound, endpoint)
        except RouterError as error:
            return lifecycle.reject(error)
        if pinned is None:
            # The route's own path (not the client's, which may carry --root-path), and the
            # query as the client encoded it: decoded, `?a=%23b` would become a fragment.
            query = request.rel_url.raw_query_string
            path = f"{endpoint}?{query}" if query else endpoint
            config = app[CONFIG]
            failover: Failover | None = Failover(
                lambda tried: chooser.choose_next(inbound, tried),
                lambda tried: bool(chooser.candidates(inbound.model, tried)),
                config.max_retries,
                config.retry_backoff,
                app[RETRY_BUDGET],
            )
        else:  # pinned to one backend: no failover, and `id` is ours, not the backend's
            query = without_parameter(request.rel_url.raw_query_string, "id")
            path = f"{endpoint}?{query}" if query else endpoint
            failover = None
        headers = upstream_headers(request.headers, flow.id, app[UPSTREAM_AUTH])
        async with lifecycle:
            await forward(request, flow, inbound, app[CLIENT_SESSION], lifecycle, path, headers,
                          failover, prefill_hop=app[PREFILL_HOP])
        if plugins is not None and flow.response_body is not None:
            plugins.post_request(flow, flow.response_body)
        return lifecycle.result()
    finally:
        await inbound.aclose()


async def extend(app: web.Application, flow: RequestFlow) -> web.StreamResponse | None:
    """The plugins' `pre_request`, which may answer the request instead of a backend."""
    plugins = app[PLUGINS]
    if plugins is None:
        return None
    flow.keep_body = plugins.wants_body
    return await plugins.pre_request(flow)


def rewrite(
    rewriter: RequestRewriter, flow: RequestFlow, body: dict[str, Any]
) -> dict[str, Any] | None:
    """Run the rewriter on a copy; the new body, or None when it changed nothing (or failed:
    a failing rewriter is logged and the request goes on as received)."""
    original = copy.deepcopy(body)
    try:
        result: object = rewriter.rewrite(flow, body)
    except Exception:
        log.exception("request rewriter %r failed; the request goes on unchanged", rewriter)
        body.clear()
        body.update(original)
        return None
    if not isinstance(result, dict):
        log.error("request rewriter %r returned %s, not a dict; ignored", rewriter, type(result))
        body.clear()
        body.update(original)
        return None
    return None if result == original else result


async def list_models(request: web.Request) -> web.Response:
    """The union of the backends' models, with aliases (their `root` is the served model)."""
    try:
        spend_rate_limit(request)
    except RouterError as error:
        return error_response(error, request_id(request))
    pool = request.app[POOL]
    created = int(time.time())
    entries = [
        {"id": model, "object": "model", "created": created, "owned_by": "router", "root": model}
        for model in pool.models()
    ]
    entries += [
        {"id": alias, "object": "model", "created": created, "owned_by": "router", "root": model}
        for alias, model in pool.routable_aliases().items()
    ]
    return web.json_response({"object": "list", "data": entries})


def add_routes(app: web.Application) -> None:
    for endpoint in JSON_ENDPOINTS:
        app.router.add_post(endpoint, functools.partial(proxy, endpoint=endpoint,
                                                        multipart=False),
                            expect_handler=expect_handler)
    for endpoint in MULTIPART_ENDPOINTS:
        app.router.add_post(endpoint, functools.partial(proxy, endpoint=endpoint,
                                                        multipart=True),
                            expect_handler=expect_handler)
    app.router.add_get("/v1/models", list_models, expect_handler=expect_handler)
