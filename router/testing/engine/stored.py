"""The fake engine's stored responses (`GET`/`DELETE /v1/responses/{id}`,
`POST /v1/responses/{id}/cancel`: each engine knows only the responses it made) and vLLM's
sleep mode admin calls (`/sleep`, `/wake_up`, `/is_sleeping`)."""

from __future__ import annotations

from aiohttp import web

from router.testing.engine.replies import BadRequest, json_reply, proxied, reply
from router.testing.engine.state import ENGINE_STATE, JsonDict

__all__ = ["cancel_response", "delete_response", "get_response", "is_sleeping", "sleep",
           "stored_response", "wake_up"]


def stored_response(request: web.Request) -> JsonDict:
    """The response named in the path, as this engine stored it; 404 when it has none."""
    response_id = request.match_info["response_id"]
    stored = request.app[ENGINE_STATE].responses.get(response_id)
    if stored is None:
        raise BadRequest(404, f"Response with id '{response_id}' not found.")
    return stored


@proxied
async def get_response(request: web.Request) -> web.StreamResponse:
    return await reply(request, stored_response(request))


@proxied
async def delete_response(request: web.Request) -> web.StreamResponse:
    stored = stored_response(request)
    del request.app[ENGINE_STATE].responses[stored["id"]]
    return await reply(request, {"id": stored["id"], "object": "response", "deleted": True})


@proxied
async def cancel_response(request: web.Request) -> web.StreamResponse:
    stored = stored_response(request)
    stored["status"] = "cancelled"
    return await reply(request, stored)


async def sleep(request: web.Request) -> web.Response:
    level = request.query.get("level", "1")
    if level not in ("1", "2"):
        return web.json_response({"error": "level must be 1 or 2"}, status=400)
    request.app[ENGINE_STATE].sleep_level = int(level)
    return web.Response()


async def wake_up(request: web.Request) -> web.Response:
    request.app[ENGINE_STATE].sleep_level = 0
    return web.Response()


async def is_sleeping(request: web.Request) -> web.Response:
    return json_reply({"is_sleeping": request.app[ENGINE_STATE].sleep_level > 0})
