"""What every HTTP request passes first: its id, the header guard, JSON errors, `Expect`."""

from __future__ import annotations

import logging
import random
import re

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_urldispatcher import _default_expect_handler

from router.errors import (
    BadRequest, HeadersTooLarge, HTTPStatusError, InternalError, RouterError, error_response,
    shorten,
)
from router.proxy.headers import REQUEST_ID

__all__ = ["request_id", "json_errors", "expect_handler", "guard"]

log = logging.getLogger("router.api")

_random_bits = random.Random().getrandbits
"""Request ids: a generator of our own, seeded from the OS, that no `random.seed()` resets."""
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id(request: web.BaseRequest) -> str:
    """The client's `x-request-id` when it is safe to echo (length, charset), else a new one."""
    given = request.headers.get(REQUEST_ID)
    if given and VALID_REQUEST_ID.fullmatch(given):
        return given
    # Unique, not secret (nothing authenticates with it): a Mersenne Twister costs a fifth of
    # an os.urandom system call.
    return _random_bits(128).to_bytes(16).hex()


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer aiohttp's routing errors (unknown path, wrong method) and the router's own bugs
    as OpenAI-style JSON instead of aiohttp's plain text."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = HTTPStatusError(exc.status,
                                f"{exc.reason}: {request.method} {shorten(request.path)}")
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(error, request_id(request), headers)
    except Exception:
        log.exception("unhandled error for %s %s", request.method, request.path)
        return error_response(InternalError("internal router error"), request_id(request))


async def expect_handler(request: web.Request) -> web.StreamResponse | None:
    """Every route's `Expect` handler (aiohttp runs it before any middleware): `100-continue`
    is answered as aiohttp does, any other expectation gets a JSON 417, not plain text."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version != HttpVersion11 or expect.lower() == "100-continue":
        await _default_expect_handler(request)
        return None
    error = HTTPStatusError(417, "only 'Expect: 100-continue' is supported")
    drop_unread_body(request)  # no middleware runs after an expect handler's answer
    return error_response(error, request_id(request))


HEADER_LINE_OVERHEAD = 4
"""`: ` and CRLF around each header's name and value."""


class BodyLeftUnread(TimeoutError):
    """Set on a request body the handler left unread when aiohttp must not read the rest.

    After the answer aiohttp reads what is left of the body for up to 10 s (lingering), and
    decodes a compressed one as it does: compressed bytes already received decode without
    ever waiting, so the event loop would be held for as long as the bomb lasts. Reading this
    error instead, aiohttp stops and closes the connection; a `TimeoutError` because aiohttp
    takes that one (its lingering timer's) without a log line."""


def guard(max_headers_total: int) -> Middleware:
    """The outermost middleware, for what aiohttp's server does not bound: a request whose
    request line and headers together are over `max_headers_total` bytes is refused (431)
    before anything looks at it (aiohttp limits each line and the number of headers only:
    128 headers of 8 KiB would be 1 MiB), a header value that is not UTF-8 is refused (400:
    see `not_utf8`), and a compressed or broken body left unread is not read after the
    answer (`BodyLeftUnread`)."""

    @web.middleware
    async def guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        total = len(request.method) + len(request.raw_path) + 11  # " HTTP/1.1\r\n"
        refusal: RouterError | None = None
        for name, value in request.raw_headers:
            total += len(name) + len(value) + HEADER_LINE_OVERHEAD
            if not value.isascii() and refusal is None:
                refusal = not_utf8(name, value)
        try:
            if total > max_headers_total:
                refusal = HeadersTooLarge(
                    f"the request line and headers are over {max_headers_total} bytes"
                )
            if refusal is not None:
                return error_response(refusal, request_id(request))
            return await handler(request)
        finally:
            drop_unread_body(request)

    return guarded


def not_utf8(name: bytes, value: bytes) -> BadRequest | None:
    """The refusal of a header value that is not UTF-8 (an obsolete Latin-1 byte), else
    None: aiohttp decodes it with surrogates and its writer silently drops them, so an engine
    would get another value than the client sent. A header goes on byte for byte, or not at
    all."""
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        shown = name[:64].decode("ascii", "replace")
        return BadRequest(f"the value of header {shown} is not UTF-8; send it as UTF-8 or ASCII")
    return None


def drop_unread_body(request: web.BaseRequest) -> None:
    """Have aiohttp close the connection after the answer instead of reading the rest of a
    compressed body (or one that failed already)."""
    body = request.content
    if not body.is_eof() and (
        body.total_compressed_bytes is not None or body.exception() is not None
    ):
        body.set_exception(BodyLeftUnread())
