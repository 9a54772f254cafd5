"""Follow-ups of a stored response reach the engine that stored it.

`GET`/`DELETE /v1/responses/{id}` and `POST /v1/responses/{id}/cancel` go to the backend
`ResponseHomes` learned for that id (pinned: no other backend is tried), and so does a new
response whose `previous_response_id` is known. The client's `?id=<backend id>` comes first.

An id the router did not see answered (made through another replica or `--workers` process,
or before a restart) is looked for: every engine is asked `GET /v1/responses/{id}` at once,
the one answering 200 is remembered, and the request goes there alone. Only that read-only
question reaches engines without the response: a DELETE or cancel is sent to its owner only.
No engine has it: a 404 (`response_not_found`) for the follow-up calls, while a new response
with that `previous_response_id` is routed as usual (its engine gives its own answer).
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import aiohttp
from aiohttp import web

from router.api.middleware import request_id
from router.backends.pool import Backend
from router.backends.response_homes import Home
from router.errors import BadRequest, ResponseNotFound, shorten
from router.flow import RequestFlow
from router.keys import CLIENT_SESSION, POOL, RESPONSE_HOMES, UPSTREAM_AUTH
from router.proxy.inbound import InboundRequest

__all__ = ["locate", "pin_follow_up", "read_stored"]

CREATE = "/v1/responses"
LOOKUP_TIMEOUT = aiohttp.ClientTimeout(total=5, sock_connect=2)
"""How long an engine has to say whether it stores a response the router does not know."""


async def home_of(request: web.Request, response_id: str) -> Home | None:
    """The backend storing `response_id`: known, or found by asking the engines."""
    app = request.app
    home = app[RESPONSE_HOMES].home_of(response_id)
    if home is not None and any(b.id == home.backend_id for b in app[POOL].backends):
        return home
    return await locate(request, response_id)


async def locate(request: web.Request, response_id: str) -> Home | None:
    """Ask every engine at once whether it stores `response_id`; remember the one that does."""
    app = request.app
    engines = [b for b in app[POOL].backends if b.kind == "engine" and b.models]
    headers = {"x-request-id": request_id(request)}
    if key := app[UPSTREAM_AUTH].backend_api_key:
        headers["Authorization"] = f"Bearer {key}"
    path = f"{CREATE}/{quote(response_id, safe='')}"
    session = app[CLIENT_SESSION]

    async def stores(backend: Backend) -> bool:
        try:
            async with session.get(backend.url + path, headers=headers,
                                   timeout=LOOKUP_TIMEOUT, allow_redirects=False) as answer:
                return answer.status == 200  # the body is not read: only who has it matters
        except (aiohttp.ClientError, TimeoutError):
            return False

    found = await asyncio.gather(*(stores(backend) for backend in engines))
    owner = next((backend for backend, has in zip(engines, found) if has), None)
    if owner is None:
        return None
    home = Home(owner.id, owner.models[0])
    app[RESPONSE_HOMES].remember(response_id, home)
    return home


async def read_stored(request: web.Request, flow: RequestFlow) -> InboundRequest:
    """A GET, DELETE or cancel of a stored response: no body, pinned to its engine."""
    pool = request.app[POOL]
    response_id = request.match_info["response_id"]
    chosen = request.query.get("id") if request.query_string else None
    if chosen is not None:  # the client's own pin, applied by dispatch
        backend = next((b for b in pool.backends if b.id == chosen), None)
        if backend is None or not backend.models:
            raise BadRequest(f"no backend with id {shorten(chosen)!r}")
        model, pinned = backend.models[0], None
    else:
        home = await home_of(request, response_id)
        if home is None:
            raise ResponseNotFound(f"no engine stores a response with id {shorten(response_id)!r}")
        model, pinned = home.model, home.backend_id
    stream = request.query.get("stream", "").lower() == "true"
    return InboundRequest(model=model, stream=stream, headers=request.headers, pinned=pinned)


async def pin_follow_up(request: web.Request, endpoint: str, inbound: InboundRequest) -> None:
    """Pin a new response to the backend of its `previous_response_id`, when one stores it."""
    if endpoint != CREATE or inbound.json is None or "id" in request.query:
        return  # the client's `?id=` wins: no need to look
    previous = inbound.json.get("previous_response_id")
    if not isinstance(previous, str) or not previous:
        return
    home = await home_of(request, previous)
    if home is not None:
        inbound.pinned = home.backend_id
