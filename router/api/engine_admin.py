"""vLLM's per-engine admin calls through the router: `POST /sleep`, `POST /wake_up`,
`GET /is_sleeping`.

`?id=<backend id>` (the id `/engines` lists, the same pin as on proxied routes) sends the call
to that engine only, and its answer comes back as it is (status and body). Without `id` the
call goes to every engine at once, and the answer lists each one's result:

    {"engines": [{"engine_id": "...", "status": 200, "answer": {"is_sleeping": false}}]}

with status 200 when every engine answered 2xx, else 502 (a failed engine has `"error"` in
place of `"answer"`). Every other query parameter (`level=1`, `tags=weights`) is passed on.
Hosted providers (`--external-providers`) are never called.

These are router-local calls, not proxied requests: they take no admission slot and count
in no request metric (like `/engines`). With API keys configured they need a key, with or
without `--protect-admin`. Without keys, `/sleep` and `/wake_up` are taken from this host
(a loopback client) only, as the worker API's changes are: with no key to tell callers
apart, any client could put the whole fleet to sleep.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
from aiohttp import web

from router.api.auth import require_key_or_this_host
from router.api.middleware import expect_handler, request_id
from router.api.openai import without_parameter
from router.backends.pool import Backend
from router.errors import AnswerTooLarge, BadRequest, RouterError, error_response, shorten
from router.keys import CLIENT_SESSION, POOL, UPSTREAM_AUTH
from router.proxy.upstream_read import read_bounded

__all__ = ["ENGINE_CALLS", "add_routes"]

log = logging.getLogger("router.admin")

ENGINE_CALLS = {"/sleep": "POST", "/wake_up": "POST", "/is_sleeping": "GET"}
"""vLLM's admin paths and their methods."""
CHANGING = frozenset({"/sleep", "/wake_up"})
MAX_ANSWER = 64 * 1024
"""Bytes of one engine's answer read (these answers are a few bytes)."""
CALL_TIMEOUT = aiohttp.ClientTimeout(total=600, sock_connect=10)
"""Sleeping offloads or drops the weights and waking reloads them: it can take minutes."""


async def call_engine(
    request: web.Request, backend: Backend, method: str, path: str
) -> tuple[int, bytes, str | None]:
    """One engine's status, body and content type; status 0 with a reason when it could
    not answer (the reason names no address)."""
    app = request.app
    headers = {"x-request-id": request_id(request)}
    key = app[UPSTREAM_AUTH].backend_api_key
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        async with app[CLIENT_SESSION].request(
            method, backend.url + path, headers=headers, timeout=CALL_TIMEOUT,
            allow_redirects=False,
        ) as response:
            body = await read_bounded(response, MAX_ANSWER, f"engine {backend.id}")
            return response.status, body, response.content_type
    except TimeoutError:
        return 0, b"no answer in time", None
    except AnswerTooLarge:
        return 0, b"answer too large", None
    except aiohttp.ClientError:
        return 0, b"cannot reach the engine", None


def listed(backend: Backend, status: int, body: bytes) -> dict[str, Any]:
    entry: dict[str, Any] = {"engine_id": backend.id, "status": status}
    if status == 0:
        entry["error"] = body.decode()
        return entry
    try:
        entry["answer"] = json.loads(body) if body else None
    except ValueError:
        entry["answer"] = shorten(body.decode("utf-8", "replace"))
    return entry


async def engine_call(request: web.Request, path: str, method: str) -> web.StreamResponse:
    if path in CHANGING:
        try:
            require_key_or_this_host(
                request, f"without --api-keys, {path} is accepted from this host only; set "
                "--api-keys to call it from elsewhere")
        except RouterError as refused:
            return error_response(refused, request_id(request))
    engines = [b for b in request.app[POOL].backends if b.kind == "engine"]
    raw_query = request.rel_url.raw_query_string
    chosen = request.query.get("id") if raw_query else None
    query = without_parameter(raw_query, "id") if chosen is not None else raw_query
    target = f"{path}?{query}" if query else path
    if chosen is not None:
        engine = next((b for b in engines if b.id == chosen), None)
        if engine is None:
            return error_response(BadRequest(f"no engine with id {shorten(chosen)!r}"),
                                  request_id(request))
        status, body, content_type = await call_engine(request, engine, method, target)
        log.info("%s %s on engine %s: %s", method, path, engine.id, status or body.decode())
        if status == 0:
            return web.json_response({"engines": [listed(engine, status, body)]}, status=502)
        return web.Response(status=status, body=body, content_type=content_type)
    results = await asyncio.gather(*(call_engine(request, b, method, target) for b in engines))
    entries = [listed(b, status, body) for b, (status, body, _) in zip(engines, results)]
    failed = [e["engine_id"] for e in entries if not 200 <= e["status"] < 300]
    log.info("%s %s on %d engines; failed: %s", method, path, len(entries),
             ", ".join(failed) or "none")
    return web.json_response({"engines": entries}, status=502 if failed else 200)


def add_routes(app: web.Application) -> None:
    for path, method in ENGINE_CALLS.items():
        async def handler(request: web.Request, path: str = path,
                          method: str = method) -> web.StreamResponse:
            return await engine_call(request, path, method)
        app.router.add_route(method, path, handler, expect_handler=expect_handler)
