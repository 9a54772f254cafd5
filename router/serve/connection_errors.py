"""The handler of each client connection: aiohttp's, answering what its HTTP parser refuses
with an OpenAI-style JSON error (and one log line) instead of plain text and a traceback."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, ContentEncodingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from router.api.middleware import request_id
from router.errors import (
    HeadersTooLarge, HTTPStatusError, MalformedRequest, RouterError, UnsupportedEncoding,
    error_response,
)

__all__ = ["JsonErrorsHandler"]

log = logging.getLogger("router.server")


class JsonErrorsHandler(RequestHandler):
    """A `RequestHandler` whose `handle_error` (aiohttp's answer to a request its parser
    refused, or to a handler timeout) is the router's JSON error. Same slots as its base, so
    `adopt` can give an aiohttp-made handler this class."""

    __slots__ = ()

    @classmethod
    def adopt(cls, handler: RequestHandler) -> JsonErrorsHandler:
        # web.Server makes its handlers itself and takes no handler class: swapping the
        # class of the one it made is the only hook (tests/test_errors.py notices a change).
        handler.__class__ = cls
        return handler  # type: ignore[return-value]

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had started; the connection is closed instead")
        error = refusal(status, exc)
        detail = (message or str(exc or "") or "-").splitlines()[0][:120]
        log.info("refused a request from %s: %s (%s)", request.remote, error.message, detail)
        response = error_response(error, request_id(request))
        response.force_close()
        return response


def refusal(status: int, exc: BaseException | None) -> RouterError:
    if isinstance(exc, ContentEncodingError):  # `br` or `zstd` without their library
        return UnsupportedEncoding("the request's Content-Encoding is not supported: send the "
                                   "body uncompressed, or with gzip or deflate")
    if isinstance(exc, LineTooLong) or (
        isinstance(exc, BadHttpMessage) and "too many headers" in str(exc).lower()
    ):
        return HeadersTooLarge("the request line or headers are too large")
    if isinstance(exc, BadHttpMessage):
        return MalformedRequest("the request is not valid HTTP")
    if status == 504:
        return HTTPStatusError(504, "the request timed out in the router")
    return HTTPStatusError(status, "the router could not handle the request")
