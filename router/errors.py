"""The router's exceptions and their one rendering: OpenAI-style JSON errors.

Every failure the router itself produces crosses layers as a `RouterError` subclass, which
knows its HTTP status, OpenAI error type and code. `error_response` turns one into the
`{"error": {"message", "type", "code"}}` body with an `x-request-id` header.
"""

from __future__ import annotations

import json
import os
import re

import aiohttp
from aiohttp import web

from router.flow import Outcome
from router.proxy.headers import REQUEST_ID

__all__ = [
    "RouterError",
    "ClientGone",
    "BackendStatus",
    "PrefillFailed",
    "HTTPStatusError",
    "InternalError",
    "BadRequest",
    "ModelNotFound",
    "ResponseNotFound",
    "PayloadTooLarge",
    "UnsupportedEncoding",
    "Unauthorized",
    "RequestTimeout",
    "TooManyRequests",
    "NoBackendAvailable",
    "BackendUnreachable",
    "UpstreamError",
    "UpstreamTimeout",
    "ResponseHeadTimeout",
    "AnswerTooLarge",
    "error_response",
    "error_body",
    "failure_detail",
    "shorten",
]

SHORTEN_LIMIT = 200
"""Characters of a client-chosen value (a model name, a file id) an error message echoes."""


def shorten(text: str, limit: int = SHORTEN_LIMIT) -> str:
    """`text` cut to `limit` characters (marked with "..."), for echoing a value a client chose:
    a 100 KB model name must not come back whole in the answer and the access line."""
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


class RouterError(Exception):
    """A failure with an HTTP status, answered to the client as OpenAI-style JSON."""

    status = 500
    error_type = "internal_error"
    code: str | None = "internal_error"
    outcome = Outcome.REJECTED
    """How a request that fails with this error is counted."""
    headers: dict[str, str] = {}
    """Extra response headers (`Retry-After`, `WWW-Authenticate`)."""

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        """What the client reads: our words, a backend named by its id, never an address or
        a header value."""
        self.detail = detail
        """What only the log reads besides `message` (the underlying failure, e.g. aiohttp's
        own words), already free of header values and addresses."""

    @property
    def logged(self) -> str:
        """The message with its detail, for the log and the access line."""
        return f"{self.message} ({self.detail})" if self.detail else self.message


class InternalError(RouterError):
    """A bug in the router; the traceback is logged, the client gets a JSON 500."""

    outcome = Outcome.ROUTER_ERROR


class BadRequest(RouterError):
    status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class ModelNotFound(RouterError):
    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class ResponseNotFound(RouterError):
    """A stored response the router does not know the engine of."""

    status = 404
    error_type = "invalid_request_error"
    code = "response_not_found"


class Forbidden(RouterError):
    status = 403
    error_type = "permission_error"
    code = "forbidden"


class Unauthorized(RouterError):
    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"
    headers = {"WWW-Authenticate": "Bearer"}


class RequestTimeout(RouterError):
    """The client sent its body too slowly."""

    status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"
    outcome = Outcome.CLIENT_DISCONNECTED


class TooManyRequests(RouterError):
    """Admission control or a rate limit refused the request; retry after `retry_after`."""

    status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, round(retry_after)))}


class PayloadTooLarge(RouterError):
    status = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class UnsupportedEncoding(RouterError):
    """The body's Content-Encoding is one the router does not decode."""

    status = 415
    error_type = "invalid_request_error"
    code = "unsupported_content_encoding"


class NoBackendAvailable(RouterError):
    """No backend could be reached (none configured, or every connect attempt failed)."""

    status = 503
    error_type = "service_unavailable"
    code = "no_backend_available"
    outcome = Outcome.BACKEND_ERROR


class BackendUnreachable(NoBackendAvailable):
    """The chosen backend refused the connection or did not accept it in time: nothing of
    the request reached it (so another backend may take it)."""


class UpstreamError(RouterError):
    """The backend failed before the response started (reset, invalid HTTP)."""

    status = 502
    error_type = "upstream_error"
    code = "bad_gateway"
    outcome = Outcome.BACKEND_ERROR


class UpstreamTimeout(RouterError):
    """The backend did not answer within the response timeout, or its answer went silent
    for longer than the read timeout."""

    status = 504
    error_type = "upstream_timeout"
    code = "gateway_timeout"
    outcome = Outcome.TIMEOUT


class ResponseHeadTimeout(UpstreamTimeout):
    """The backend began its response head and did not finish it within the head timeout:
    a broken (or hostile) upstream, not a busy one, so it counts as a backend error."""

    outcome = Outcome.BACKEND_ERROR


class AnswerTooLarge(UpstreamError):
    """An answer the router reads whole (a prefill hop, a batch line, a scrape, a Kubernetes
    list) is over its limit: it is cut there, the connection closed, and a client waiting on
    it gets a 502."""

    code = "upstream_answer_too_large"

    def __init__(self, source: str, limit: int) -> None:
        super().__init__(f"{source} answered more than {limit} bytes")
        self.limit = limit


def error_body(status: int, message: str, error_type: str, code: str | int | None) -> bytes:
    payload = {"error": {"message": message, "type": error_type, "code": code}}
    return json.dumps(payload).encode()


def error_response(
    error: RouterError, request_id: str, headers: dict[str, str] | None = None
) -> web.Response:
    response = web.Response(
        status=error.status,
        body=error_body(error.status, error.message, error.error_type, error.code),
        content_type="application/json",
    )
    response.headers[REQUEST_ID] = request_id
    response.headers.update(error.headers)
    if headers:
        response.headers.update(headers)
    return response


class HeadersTooLarge(RouterError):
    """The request line or a header is over `--max-header-size`, or there are too many
    headers: refused by aiohttp's parser before any handler runs."""

    status = 431
    error_type = "invalid_request_error"
    code = "request_header_fields_too_large"


class MalformedRequest(BadRequest):
    """Not HTTP aiohttp's parser can read (a bad method, line or chunk size)."""

    code = "malformed_request"


QUOTED_BYTES = re.compile(r":(?:\s|\\n)*(?:b['\"]|\\n|$)|\n")
"""Where aiohttp's message stops being its own words: the offending bytes it quotes after a
colon (a header value the backend sent), or the next line."""


def failure_detail(error: BaseException) -> str:
    """The failure's class and aiohttp's own words, at most 200 characters, for the log.

    Never `repr()` or `str()` of a `ClientResponseError`: they hold the backend's address and
    the whole `RequestInfo`, every header sent upstream (the backend key, a provider's key,
    the client's cookies) included. Nor the address of a failed connect (`strerror` names it),
    nor the bytes aiohttp quotes from a malformed answer."""
    if isinstance(error, aiohttp.ClientResponseError):
        text = error.message
    elif isinstance(error, aiohttp.ClientConnectorError):
        number = error.os_error.errno
        text = os.strerror(number) if isinstance(number, int) and number > 0 else ""
    elif isinstance(error, OSError):
        text = os.strerror(error.errno) if isinstance(error.errno, int) and error.errno > 0 else ""
    else:
        text = str(error)
    text = QUOTED_BYTES.split(text, 1)[0].rstrip(": ")[:200]
    name = type(error).__name__
    return f"{name}: {text}" if text else name


class ClientGone(Exception):
    """The client's connection broke while we wrote to it."""


class BackendStatus(RouterError):
    """The backend answered a retryable 5xx before anything reached the client."""

    error_type = "upstream_error"
    code = "backend_unavailable"
    outcome = Outcome.BACKEND_ERROR

    def __init__(self, status: int, backend_id: str) -> None:
        super().__init__(f"backend {backend_id} answered {status}")
        self.status = status


class PrefillFailed(RouterError):
    """The prefill backend answered with an error: its status and message go to the client."""

    error_type = "upstream_error"

    def __init__(self, status: int, answer: bytes, backend_id: str) -> None:
        try:
            message = str(json.loads(answer)["error"]["message"])
        except (ValueError, KeyError, TypeError):
            message = answer[:SHORTEN_LIMIT].decode("utf-8", "replace")
        super().__init__(f"prefill backend {backend_id} answered {status}: {shorten(message)}")
        self.status = status
        self.code = "prefill_failed"
        self.outcome = Outcome.REJECTED if status < 500 else Outcome.BACKEND_ERROR


class HTTPStatusError(RouterError):
    """aiohttp's own 404/405/413... re-dressed as OpenAI-style errors."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = "invalid_request_error" if status < 500 else "internal_error"
        self.code = str(status)
