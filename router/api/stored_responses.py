"""Follow-ups of a stored response reach the engine that stored it.

`GET`/`DELETE /v1/responses/{id}` and `POST /v1/responses/{id}/cancel` go to the backend
`ResponseHomes` learned for that id (pinned: no other backend is tried); an id the router does
not know is a 404, unless the client names the backend itself with `?id=<backend id>`. A new
response whose `previous_response_id` is known goes to the same backend; an unknown one is
routed as usual (the engine answers whether it has it).

Why not ask every engine for an unknown id: a DELETE or cancel would be sent to engines that
never had it, the answer would be the first engine's that claims it, and the cost grows with
the fleet; an explicit `?id=` does the same job when a client knows better than the router.
"""

from __future__ import annotations

from aiohttp import web

from router.errors import BadRequest, ResponseNotFound, shorten
from router.flow import RequestFlow
from router.keys import POOL, RESPONSE_HOMES
from router.proxy.inbound import InboundRequest

__all__ = ["pin_follow_up", "read_stored"]

CREATE = "/v1/responses"


async def read_stored(request: web.Request, flow: RequestFlow) -> InboundRequest:
    """A GET, DELETE or cancel of a stored response: no body, pinned to its engine."""
    app = request.app
    pool = app[POOL]
    response_id = request.match_info["response_id"]
    chosen = request.query.get("id") if request.query_string else None
    if chosen is not None:  # the client's own pin, applied by dispatch
        backend = next((b for b in pool.backends if b.id == chosen), None)
        if backend is None or not backend.models:
            raise BadRequest(f"no backend with id {shorten(chosen)!r}")
        model, pinned = backend.models[0], None
    else:
        home = app[RESPONSE_HOMES].home_of(response_id)
        if home is None:
            raise ResponseNotFound(
                f"no response with id {shorten(response_id)!r} was made through this router; "
                "name the engine that stored it with ?id=<backend id> (see /engines)"
            )
        if not any(b.id == home.backend_id for b in pool.backends):
            raise ResponseNotFound(
                f"the engine that stored response {shorten(response_id)!r} "
                f"({home.backend_id}) is no longer served"
            )
        model, pinned = home.model, home.backend_id
    stream = request.query.get("stream", "").lower() == "true"
    return InboundRequest(model=model, stream=stream, headers=request.headers, pinned=pinned)


def pin_follow_up(app: web.Application, endpoint: str, inbound: InboundRequest) -> None:
    """Pin a new response to the backend of its `previous_response_id`, when known and still
    served."""
    if endpoint != CREATE or inbound.json is None:
        return
    previous = inbound.json.get("previous_response_id")
    if not isinstance(previous, str):
        return
    home = app[RESPONSE_HOMES].home_of(previous)
    if home is not None and any(b.id == home.backend_id for b in app[POOL].backends):
        inbound.pinned = home.backend_id
