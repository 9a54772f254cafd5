"""Thin HTTP handlers: the OpenAI endpoints (`openai`) and the router's own (`admin`)."""

from __future__ import annotations

import logging
import random
import re

from aiohttp import web
from aiohttp.typedefs import Handler

from router.errors import InternalError, RouterError, error_response

__all__ = ["request_id", "json_errors"]

log = logging.getLogger("router.api")

_random_bits = random.Random().getrandbits
"""Request ids: a generator of our own, seeded from the OS, that no `random.seed()` resets."""
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id(request: web.BaseRequest) -> str:
    """The client's `x-request-id` when it is safe to echo (length, charset), else a new one."""
    given = request.headers.get("x-request-id")
    if given and VALID_REQUEST_ID.fullmatch(given):
        return given
    # Unique, not secret (nothing authenticates with it): a Mersenne Twister costs a fifth of
    # an os.urandom system call.
    return _random_bits(128).to_bytes(16).hex()


class HTTPStatusError(RouterError):
    """aiohttp's own 404/405/413... re-dressed as OpenAI-style errors."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = "invalid_request_error" if status < 500 else "internal_error"
        self.code = str(status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer aiohttp's routing errors (unknown path, wrong method) and the router's own bugs
    as OpenAI-style JSON instead of aiohttp's plain text."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = HTTPStatusError(exc.status, f"{exc.reason}: {request.method} {request.path}")
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(error, request_id(request), headers)
    except Exception:
        log.exception("unhandled error for %s %s", request.method, request.path)
        return error_response(InternalError("internal router error"), request_id(request))
