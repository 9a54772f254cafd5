"""The headers of the request path: what goes up to a backend and back to the client.

Hop-by-hop headers (and those a `Connection` header names) never pass; the request id goes
both ways; the client's credentials reach a backend only under `--forward-client-auth`, and
never an external provider, which gets its own key instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy, istr

if TYPE_CHECKING:
    from router.backends.pool import Backend

__all__ = [
    "REQUEST_ID", "BACKEND_HEADER", "HOP_BY_HOP", "NOT_FORWARDED_UP", "NOT_FORWARDED_DOWN",
    "AUTO_HEADERS", "CLIENT_CREDENTIALS", "CLIENT_KEY_HEADERS", "X_API_KEY", "UpstreamAuth",
    "forward_headers",
    "upstream_headers", "backend_headers",
]

REQUEST_ID = istr("x-request-id")
BACKEND_HEADER = istr("x-router-backend")
HOP_BY_HOP = frozenset(
    istr(name)
    for name in (
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
        "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    )
)
# Also not forwarded upstream: aiohttp sets Host and Content-Length itself, an `Expect`
# was already answered by our own server, and a body is always sent decoded
# (`router.proxy.inbound.body_coding`).
NOT_FORWARDED_UP = HOP_BY_HOP | {
    hdrs.HOST, hdrs.CONTENT_LENGTH, hdrs.EXPECT, REQUEST_ID, hdrs.CONTENT_ENCODING,
}
NOT_FORWARDED_DOWN = HOP_BY_HOP | {REQUEST_ID}
SET_BY_ROUTER = frozenset({
    "connection", "content-length", "expect", "host", "keep-alive", "proxy-authorization",
    "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "x-request-id",
})
"""Headers the router or aiohttp set per request, which an external provider's configured
headers may not fix (a fixed value would break the exchange); lower-case."""
AUTHORIZATION = hdrs.AUTHORIZATION
X_API_KEY = istr("x-api-key")
"""Anthropic clients' key header: like `Authorization`, the client's credential for the router."""
CLIENT_KEY_HEADERS = frozenset({AUTHORIZATION, X_API_KEY})
"""Where a client presents its key; not sent to backends unless --forward-client-auth."""
AUTO_HEADERS = (hdrs.USER_AGENT, hdrs.ACCEPT_ENCODING, hdrs.CONTENT_TYPE)
"""Headers aiohttp would add for a client that did not send them: not ours to add."""
CLIENT_CREDENTIALS = frozenset(
    istr(name) for name in ("authorization", "api-key", "x-api-key", "cookie")
)
"""What a client may authenticate to the router (or the fleet) with: never sent to an
external provider, whatever --forward-client-auth says."""


def forward_headers(
    incoming: CIMultiDictProxy[str], drop: frozenset[istr], request_id: str
) -> CIMultiDict[str]:
    """Copy end-to-end headers, dropping hop-by-hop ones and those the Connection header names."""
    headers = CIMultiDict(incoming)
    named = incoming.get(hdrs.CONNECTION)
    if named:
        drop = drop | {istr(name.strip()) for name in named.split(",")}
    for name in drop:
        headers.popall(name, None)
    headers[REQUEST_ID] = request_id
    return headers


@dataclass(frozen=True)
class UpstreamAuth:
    """Which credentials go to backends: by default never the client's (they are the
    router's keys), and the router's own backend key when one is set."""

    forward_client_auth: bool = False
    backend_api_key: str | None = None


def upstream_headers(
    incoming: CIMultiDictProxy[str], request_id: str, auth: UpstreamAuth
) -> CIMultiDict[str]:
    """The headers every attempt of one request sends to its backend."""
    drop = NOT_FORWARDED_UP if auth.forward_client_auth else NOT_FORWARDED_UP | CLIENT_KEY_HEADERS
    headers = forward_headers(incoming, drop, request_id)
    if auth.backend_api_key and AUTHORIZATION not in headers:
        headers[AUTHORIZATION] = f"Bearer {auth.backend_api_key}"
    return headers


def backend_headers(headers: CIMultiDict[str], backend: Backend) -> CIMultiDict[str]:
    """The headers of one attempt on `backend`: an external provider gets its own key and
    custom headers, and none of the client's (or the fleet's) credentials."""
    if backend.kind != "external":
        return headers
    headers = CIMultiDict(headers)
    for name in CLIENT_CREDENTIALS:
        headers.popall(name, None)
    headers.update(backend.headers)
    return headers
