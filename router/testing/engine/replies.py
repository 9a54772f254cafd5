"""How every proxied endpoint of the fake engine answers: errors in vLLM's shape, JSON or
SSE replies that honour the `EngineBehaviour` knobs, and `proxied`, the wrapper that counts
each request in `EngineState` and injects failures."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web

from router.testing.engine.state import ENGINE_BEHAVIOUR, ENGINE_CONFIG, ENGINE_STATE, JsonDict

__all__ = [
    "BadRequest",
    "Handler",
    "MAX_CHUNKS",
    "Sse",
    "dumps",
    "json_reply",
    "model_of",
    "n_tokens",
    "proxied",
    "read_json",
    "reply",
]

MAX_CHUNKS = 10_000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _ConnectionGone(Exception):
    """The stream's connection ended: aborted by us (reset), closed by us before the end of
    the body (truncated), or lost (client went away)."""

    def __init__(
        self, response: web.StreamResponse, *, reset: bool, truncated: bool = False
    ) -> None:
        super().__init__("connection gone")
        self.response = response
        self.reset = reset
        self.truncated = truncated


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _error_type(status: int) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "Error"
    return "".join(phrase.replace("-", " ").split()) + "Error"


def _error(status: int, message: str) -> web.Response:
    body = {
        "error": {
            "message": message,
            "type": _error_type(status),
            "param": None,
            "code": status,
        }
    }
    return web.Response(status=status, text=dumps(body), content_type="application/json")


def json_reply(obj: Any) -> web.Response:
    return web.Response(text=dumps(obj), content_type="application/json")


async def read_json(request: web.Request) -> JsonDict:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(400, f"Invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "The request body must be a JSON object.")
    request.app[ENGINE_STATE].last_json = body
    return body


def model_of(request: web.Request, requested: Any) -> str:
    models = request.app[ENGINE_CONFIG].models
    if requested is None:
        return models[0]
    if not isinstance(requested, str) or requested not in models:
        raise BadRequest(404, f"The model `{requested}` does not exist.")
    return requested


def n_tokens(request: web.Request, body: JsonDict, *keys: str) -> int:
    for key in keys:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return max(0, min(value, MAX_CHUNKS))
    return max(0, min(request.app[ENGINE_BEHAVIOUR].chunks, MAX_CHUNKS))


async def _forever() -> None:
    await asyncio.get_running_loop().create_future()


async def _headers_delay(request: web.Request) -> None:
    delay = request.app[ENGINE_BEHAVIOUR].headers_delay
    if delay > 0:
        await asyncio.sleep(delay)


def _injected_failure(request: web.Request) -> int | None:
    """The status to fail this request with, if a failure is due (counts a burst down)."""
    behaviour = request.app[ENGINE_BEHAVIOUR]
    status = behaviour.fail_status
    if status is None:
        return None
    if behaviour.fail_burst is not None:
        if behaviour.fail_burst <= 0:
            return None
        behaviour.fail_burst -= 1
    request.app[ENGINE_STATE].failures_injected += 1
    return status


# --------------------------------------------------------------------------- streaming


class Sse:
    """Writes one server-sent-event stream, honouring the behaviour knobs."""

    __slots__ = ("request", "behaviour", "response", "sent")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.behaviour = request.app[ENGINE_BEHAVIOUR]
        self.response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        self.sent = 0

    async def start(self) -> None:
        await _headers_delay(self.request)
        await self.response.prepare(self.request)
        if self.behaviour.hang_after_headers:
            self.request.app[ENGINE_STATE].hangs += 1
            await _forever()
        if self.behaviour.first_token_delay > 0:
            await asyncio.sleep(self.behaviour.first_token_delay)

    async def send(self, data: str, *, delay: bool = False, pad: bool = True) -> None:
        """Send ``data`` (one or more complete SSE lines, without the blank line)."""
        behaviour = self.behaviour
        if delay and behaviour.token_delay > 0:
            await asyncio.sleep(behaviour.token_delay)
        limit = behaviour.reset_after_chunks
        if limit is not None and self.sent >= limit:
            transport = self.request.transport
            if transport is not None:
                transport.abort()
            raise _ConnectionGone(self.response, reset=True)
        limit = behaviour.truncate_after_chunks
        if limit is not None and self.sent >= limit:
            transport = self.request.transport
            if transport is not None:
                transport.close()  # what was written goes out, then FIN: no last chunk
            raise _ConnectionGone(self.response, reset=False, truncated=True)
        if pad and behaviour.chunk_padding > 0:
            data += "\n: " + "x" * behaviour.chunk_padding
        raw = (data + "\n\n").encode()
        try:
            await self.response.write(raw)
        except ConnectionResetError:
            raise _ConnectionGone(self.response, reset=False) from None
        self.request.app[ENGINE_STATE].bytes_sent += len(raw)
        self.sent += 1

    async def data(self, payload: str, *, delay: bool = False) -> None:
        await self.send("data: " + payload, delay=delay)

    async def done(self) -> web.StreamResponse:
        await self.send("data: [DONE]", pad=False)
        return self.response


async def reply(request: web.Request, obj: Any) -> web.StreamResponse:
    """Non-stream reply: honours hang_after_headers and first_token_delay."""
    behaviour = request.app[ENGINE_BEHAVIOUR]
    await _headers_delay(request)
    if behaviour.hang_after_headers:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        request.app[ENGINE_STATE].hangs += 1
        await _forever()
    if behaviour.first_token_delay > 0:
        await asyncio.sleep(behaviour.first_token_delay)
    if isinstance(obj, web.StreamResponse):
        return obj
    return json_reply(obj)


# --------------------------------------------------------------------------- proxied wrapper


def proxied(handler: Handler) -> Handler:
    async def wrapper(request: web.Request) -> web.StreamResponse:
        state = request.app[ENGINE_STATE]
        state.started += 1
        state.arrivals.append(time.monotonic())
        state.open += 1
        state.last_headers = request.headers
        state.last_path = request.path_qs
        if request.app[ENGINE_BEHAVIOUR].record_request_ids:
            state.request_ids.append(request.headers.get("x-request-id", ""))
        try:
            fail_status = _injected_failure(request)
            if fail_status is not None:
                name = request.app[ENGINE_CONFIG].name
                response: web.StreamResponse = _error(
                    fail_status, f"Injected failure from engine {name}."
                )
            else:
                try:
                    response = await handler(request)
                except BadRequest as exc:
                    response = _error(exc.status, exc.message)
                except RecursionError:  # deeply nested JSON, like vLLM's 400
                    response = _error(400, "The request body is nested too deeply.")
        except asyncio.CancelledError:
            state.cancelled += 1
            state.disconnected.set()
            raise
        except _ConnectionGone as gone:
            if gone.truncated:
                state.truncated += 1
            elif gone.reset:
                state.resets += 1
            else:
                state.cancelled += 1
                state.disconnected.set()
            return gone.response
        else:
            state.completed += 1
            return response
        finally:
            state.open -= 1

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper
