"""The inbound request: what routing needs to know, parsed once, plus the body to forward.

JSON bodies are forwarded as received (re-serialised only when an alias renames the model).
Multipart bodies are forwarded as a stream (see `router.multipart`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from multidict import CIMultiDictProxy

from router.backends import BackendPool
from router.errors import BadRequest, ModelNotFound, PayloadTooLarge, RequestTimeout

__all__ = [
    "InboundRequest", "UploadBody", "check_header_bytes", "read_json_request", "resolve_model",
]


class UploadBody(Protocol):
    """A request body forwarded as a stream of chunks, with its own cleanup."""

    content_length: int | None
    error: Exception | None
    """Set when the stream failed on the client's side (too large, client gone)."""

    @property
    def replayable(self) -> bool:
        """True while `chunks()` can (still) produce the whole body from its start."""
        ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class InboundRequest:
    """A parsed client request, ready to route and forward."""

    model: str
    """The served model name (an alias already resolved)."""
    stream: bool
    """The client asked for a streamed answer (for multipart: when `stream` preceded the file)."""
    headers: CIMultiDictProxy[str]
    json: dict[str, Any] | None = None
    """The parsed JSON body; None for multipart requests."""
    body: bytes | None = None
    """The JSON body to forward."""
    upload: UploadBody | None = None
    """The multipart body to forward."""

    @property
    def replayable(self) -> bool:
        """The body can be sent again to another backend."""
        return self.upload is None or self.upload.replayable

    async def aclose(self) -> None:
        if self.upload is not None:
            await self.upload.aclose()


def resolve_model(pool: BackendPool, model: object) -> str:
    """Validate the requested model and follow an alias; raise the client's error if unknown."""
    if model is None or model == "":
        raise BadRequest("the request has no 'model'")
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string")
    served = pool.resolve(model)
    if not pool.candidates(served):
        known = sorted({*pool.models(), *pool.routable_aliases()})
        raise ModelNotFound(
            f"The model `{model}` does not exist. Known models: {', '.join(known) or 'none'}."
        )
    return served


Rewrite = Callable[[dict[str, Any]], dict[str, Any] | None]
"""Changes a parsed body before routing; returns the new body, or None when unchanged."""


async def read_json_request(
    request: web.Request, pool: BackendPool, limit: int, timeout: float,
    rewrite: Rewrite | None = None,
) -> InboundRequest:
    """Read and check a JSON body; `limit` is the app's `client_max_size`, which aiohttp
    enforces while reading; the client has `timeout` seconds to send it all. The body is
    serialised again only when `rewrite` or an alias changed it."""
    try:
        if request.content.is_eof():  # it came with the headers: nothing to wait for
            raw = await request.read()
        else:
            async with asyncio.timeout(timeout):
                raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"the JSON body is over the limit of {limit} bytes") from None
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {timeout:g} s") from None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    changed = False
    if rewrite is not None and (rewritten := rewrite(body)) is not None:
        body, changed = rewritten, True
    requested = body.get("model")
    served = resolve_model(pool, requested)
    if served != requested:
        body["model"] = served
        changed = True
    if changed:
        raw = json.dumps(body).encode()
    return InboundRequest(
        model=served, stream=body.get("stream") is True, headers=request.headers,
        json=body, body=raw,
    )


def check_header_bytes(raw_headers: tuple[tuple[bytes, bytes], ...]) -> None:
    """Refuse a header value that is not UTF-8 (an obsolete Latin-1 byte): aiohttp decodes
    it with surrogates and its writer silently drops them, so the engine would get another
    value than the client sent. The router forwards a header byte for byte, or not at all."""
    for name, value in raw_headers:
        if not value.isascii():
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                shown = name[:64].decode("ascii", "replace")
                raise BadRequest(
                    f"the value of header {shown} is not UTF-8; send it as UTF-8 or ASCII"
                ) from None
