"""The flow: one object per proxied request, carried through every layer and every event.

The invariant, which `router.proxy.lifecycle.Lifecycle` guarantees: every flow gets exactly one
`on_new`, at most one `on_response`, and exactly one `on_complete`, whose `outcome` is set.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

    from router.backends.pool import Backend

__all__ = ["Outcome", "Attempt", "Usage", "RequestFlow", "HEAD_BYTES", "TAIL_BYTES", "MAX_BODY"]

HEAD_BYTES = 1024
"""How much of the start of a response body the proxy keeps (`RequestFlow.head`): where an
answer's `id` is (a stored response's, for the follow-ups that must reach its engine)."""

TAIL_BYTES = 4096
"""How much of the end of a response body the proxy keeps (`RequestFlow.tail`): where the
`usage` object is, for metrics and the access line."""
MAX_BODY = 16 * 1024 * 1024
"""Largest response body kept whole for plugins' `post_request` (`RequestFlow.response_body`);
a longer one is not kept."""


class Outcome(enum.Enum):
    """How a request ended; set once, just before `on_complete`."""

    OK = "ok"
    CLIENT_DISCONNECTED = "client_disconnected"
    BACKEND_ERROR = "backend_error"
    TIMEOUT = "timeout"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    """The handler was cancelled with its client still connected (e.g. shutdown)."""
    ROUTER_ERROR = "router_error"
    """A bug in the router (logged with its traceback)."""


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one answer; a count the answer did not give is None."""

    prompt_tokens: int | None
    completion_tokens: int | None


@dataclass(frozen=True, slots=True)
class Attempt:
    """A failed try on one backend, before any byte reached the client (then retried)."""

    backend: Backend
    error: str
    outcome: Outcome
    """`backend_error` or `timeout`."""


@dataclass(eq=False, slots=True)
class RequestFlow:
    """What the router knows about one request, from arrival to completion."""

    id: str
    """The request id: the client's valid `x-request-id`, or one we made; sent both ways."""
    endpoint: str
    """The route path, e.g. `/v1/chat/completions` (a bounded label, unlike the raw path)."""
    method: str = "POST"
    t_start: float = field(default_factory=time.monotonic)
    """`time.monotonic()` when the handler started."""
    model: str | None = None
    """The model the client asked for (after alias resolution: the served model)."""
    stream: bool = False
    """True when the client asked for a streamed answer."""
    backend: Backend | None = None
    """The backend serving the request; None when rejected before routing."""
    status: int | None = None
    """HTTP status sent to the client (the backend's, or the router's own error status)."""
    t_headers: float | None = None
    """When the backend's status and headers arrived."""
    t_first_byte: float | None = None
    """When the first body byte arrived from the backend (time to first token)."""
    t_end: float | None = None
    """When the request completed, successfully or not."""
    outcome: Outcome | None = None
    """How it ended; None until `on_complete`."""
    error: str | None = None
    """A short description of what went wrong, when something did."""
    bytes_down: int = 0
    """Response body bytes sent to the client."""
    reading_since: float | None = None
    """While a read of the backend's body waits, since when (a backstop for a stalled
    upstream connection that the client library's own read timeout misses)."""
    writing_since: float | None = None
    """While a write to the client waits (the client is not reading), since when."""
    head: bytes = b""
    """The first `HEAD_BYTES` of the response body's first chunk (set before `on_response`)."""
    tail: bytes = b""
    """The last few KiB of the response body, where the `usage` object is (for metrics)."""
    parsed_usage: tuple[Usage | None] | None = None
    """`router.observe.usage.usage_of`'s memo, so every subscriber shares one parse of `tail`."""
    request: web.Request | None = None
    """The client's request (for plugins: headers, address, path)."""
    request_json: dict[str, Any] | None = None
    """The parsed JSON body as it is sent on (after a rewrite); None for uploads."""
    request_body: bytes | None = None
    """The JSON body's bytes as they are sent on; None for uploads."""
    keep_body: bool = False
    """Collect the response body for plugins' `post_request` (only when one wants it)."""
    response_body: bytes | None = None
    """The whole response body, when `keep_body` and it fit `MAX_BODY`."""
    prefill_backend: Backend | None = None
    """With disaggregated prefill: the backend that computed the prompt's KV cache."""
    attempts: list[Attempt] = field(default_factory=list)
    """Failed tries on other backends before `backend`, oldest first (see `on_retry`)."""
    retry_refused: bool = False
    """The retry budget was spent when this request could have retried a 502/503/504: the
    backend's own answer went to the client."""
    trace_headers: dict[str, str] | None = None
    """Set by the tracer (`--otel-endpoint`) for each attempt: `traceparent`/`tracestate`
    sent to the backend in place of the client's."""

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the backend's first body byte."""
        return None if self.t_first_byte is None else self.t_first_byte - self.t_start

    @property
    def duration(self) -> float | None:
        return None if self.t_end is None else self.t_end - self.t_start

    def __repr__(self) -> str:
        backend = self.backend.id if self.backend else None
        outcome = self.outcome.value if self.outcome else "open"
        return (
            f"<RequestFlow {self.id} {self.endpoint} model={self.model!r} "
            f"backend={backend} status={self.status} {outcome}>"
        )
