"""Access control: API keys checked on every request before anything else runs.

Keys are compared as SHA-256 digests with `hmac.compare_digest` against every configured
key, so the time taken says nothing about how close a guess was. The keys themselves are
never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from router.api.middleware import request_id
from router.errors import Forbidden, Unauthorized, error_response
from router.keys import API_KEYS
from router.proxy.headers import X_API_KEY

__all__ = ["ApiKeys", "OPEN_PATHS", "ADMIN_PATHS", "auth_middleware", "bearer_token",
           "presented_key"]

log = logging.getLogger("router.access")

OPEN_PATHS = frozenset({"/health", "/ready"})
"""Liveness and readiness: probes carry no keys."""
ADMIN_PATHS = frozenset({"/metrics", "/engines", "/dashboard", "/version"})
"""Open unless `--protect-admin`."""


class ApiKeys:
    """The accepted keys (replaceable on a config reload)."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self.replace(keys)

    def replace(self, keys: Iterable[str]) -> None:
        self._digests = tuple(hashlib.sha256(key.encode()).digest() for key in keys if key)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, headers: Mapping[str, str]) -> str | None:
        """For a request presenting one of the keys (`presented_key`), a stable id of that key
        (a digest prefix, for rate limits and logs: never the key); None for anything else."""
        token = presented_key(headers)
        if token is None:
            return None
        presented = hashlib.sha256(token.encode()).digest()
        matched = False
        for digest in self._digests:  # no early exit: every key is compared
            matched |= hmac.compare_digest(digest, presented)
        return presented.hex()[:16] if matched else None

    def accepts(self, headers: Mapping[str, str]) -> bool:
        return self.identify(headers) is not None

    def __repr__(self) -> str:
        return f"<ApiKeys keys={len(self._digests)}>"


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a client presents: `Authorization: Bearer <key>` as OpenAI clients send it, else
    `x-api-key: <key>` as Anthropic clients (Claude Code on `/v1/messages`) send it."""
    token = bearer_token(headers.get(hdrs.AUTHORIZATION))
    if token is None:
        token = headers.get(X_API_KEY, "").strip() or None
    return token


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (the scheme in any case)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def auth_middleware(
    keys: ApiKeys, protect_admin: bool, refused: Callable[[], None]
) -> Middleware:
    """Refuse requests without a valid key with a 401 OpenAI-style error. Installed whenever
    keys may exist, so a reload can add keys to a running router; `refused` counts refusals
    (each is also logged), so guessing keys does not go unseen."""
    exempt = OPEN_PATHS if protect_admin else OPEN_PATHS | ADMIN_PATHS

    @web.middleware
    async def check_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not keys.enabled or request.path in exempt:
            return await handler(request)
        if keys.accepts(request.headers):
            return await handler(request)
        refused()
        rid = request_id(request)
        log.info("refused request_id=%s remote=%s path=%s: no valid API key",
                 rid, request.remote, request.path)
        return error_response(
            Unauthorized("a valid API key is required: Authorization: Bearer <key> "
                         "(or x-api-key: <key>)"), rid
        )

    return check_api_key


def from_this_host(request: web.BaseRequest) -> bool:
    """Whether the caller is a loopback client (or a Unix socket, which has no address)."""
    try:
        return ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        return not request.remote


def require_key_or_this_host(request: web.Request, refusal: str) -> None:
    """For calls that change the fleet (add an engine, put one to sleep): without API keys
    there is no telling callers apart, so only this host may make them; `Forbidden` with
    `refusal` for anyone else."""
    if not request.app[API_KEYS].enabled and not from_this_host(request):
        raise Forbidden(refusal)
