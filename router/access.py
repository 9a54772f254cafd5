"""Access control: API keys checked on every request before anything else runs.

Keys are compared as SHA-256 digests with `hmac.compare_digest` against every configured
key, so the time taken says nothing about how close a guess was. The keys themselves are
never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from router.api import request_id
from router.errors import Unauthorized, error_response

__all__ = ["ApiKeys", "OPEN_PATHS", "ADMIN_PATHS", "auth_middleware"]

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

    def accepts(self, authorization: str | None) -> bool:
        """True for `Bearer <one of the keys>`."""
        if not authorization or not authorization.startswith("Bearer "):
            return False
        presented = hashlib.sha256(authorization[7:].strip().encode()).digest()
        matched = False
        for digest in self._digests:  # no early exit: every key is compared
            matched |= hmac.compare_digest(digest, presented)
        return matched

    def __repr__(self) -> str:
        return f"<ApiKeys keys={len(self._digests)}>"


def auth_middleware(keys: ApiKeys, protect_admin: bool) -> Middleware:
    """Refuse requests without a valid key with a 401 OpenAI-style error."""
    exempt = OPEN_PATHS if protect_admin else OPEN_PATHS | ADMIN_PATHS

    @web.middleware
    async def check_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in exempt or not keys.enabled:
            return await handler(request)
        if keys.accepts(request.headers.get(hdrs.AUTHORIZATION)):
            return await handler(request)
        return error_response(
            Unauthorized("a valid API key is required: Authorization: Bearer <key>"),
            request_id(request),
        )

    return check_api_key
