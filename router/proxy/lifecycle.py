"""The request lifecycle: `on_new` on entry, exactly one `on_complete` on exit, whatever happens.

`Lifecycle` is the context manager every proxied request runs in (client gone, backend
failure, timeout, cancellation: it sets the outcome and emits `on_complete` once). It serves
a client's request, which it can answer and whose connection it can cut, and a batch line,
which has no client (`request=None`); `router.proxy.forward` runs inside it for both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import TracebackType

from aiohttp import web

from router.errors import ClientGone, InternalError, RouterError, error_response
from router.events import RequestEvents
from router.flow import Outcome, RequestFlow
from router.proxy.forward import REQUEST_ID, cut_client

__all__ = ["Lifecycle"]

log = logging.getLogger("router.lifecycle")

CLIENT_CLOSED_REQUEST = 499
"""nginx's status for a client that went away before the answer (never sent, only counted)."""


class Lifecycle:
    """Runs one request's events: `on_new` on entry, exactly one `on_complete` on exit.

    Router errors raised inside are turned into the request's outcome and `error` (for a
    client, an OpenAI-style error response: `result()`), so the caller does not handle them
    again. `request` is the client's; None for a batch line, which no client waits for.
    """

    def __init__(
        self, request: web.Request | None, events: RequestEvents, flow: RequestFlow
    ) -> None:
        self.request = request
        self.events = events
        self.flow = flow
        self.error: RouterError | None = None
        self.response: web.StreamResponse | None = None
        """The client's answer, once `router.proxy.forward.ClientSink` started it."""
        self._completed = False

    async def __aenter__(self) -> Lifecycle:
        self.events.on_new(self.flow)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._completed:
            return False
        self._completed = True
        flow = self.flow
        suppress = False
        try:
            if exc is None:
                flow.outcome = flow.outcome or Outcome.OK
            elif isinstance(exc, RouterError):
                flow.outcome, flow.status, flow.error = exc.outcome, exc.status, exc.logged
                self.error, suppress = exc, True
            elif isinstance(exc, ClientGone):
                flow.outcome, suppress = Outcome.CLIENT_DISCONNECTED, True
            elif isinstance(exc, asyncio.CancelledError):
                # A watch that cut a stalled request set its outcome already.
                flow.outcome = flow.outcome or (
                    Outcome.CLIENT_DISCONNECTED if self._client_gone() else Outcome.CANCELLED
                )
            else:
                log.error("request %s failed in the router", flow.id, exc_info=exc)
                self.error = InternalError("the router failed to handle the request")
                flow.outcome, suppress = Outcome.ROUTER_ERROR, True
                flow.error = repr(exc)
                if self.response is not None and self.response.prepared:
                    assert self.request is not None  # only a client's answer is prepared
                    cut_client(self.request)
                else:
                    flow.status = 500
            if flow.outcome is Outcome.CLIENT_DISCONNECTED and flow.status is None:
                flow.status = CLIENT_CLOSED_REQUEST
        finally:
            flow.t_end = time.monotonic()
            self.events.on_complete(flow)
        return suppress

    def _client_gone(self) -> bool:
        """Whether the client's connection is closed (never, for a batch line)."""
        if self.request is None:
            return False
        transport = self.request.transport
        return transport is None or transport.is_closing()

    def reject(self, error: RouterError) -> web.Response:
        """Account for a request refused before routing and return its error response."""
        self.end_unrouted(error.outcome, error.status, error.message)
        return error_response(error, self.flow.id)

    def answered(self, response: web.StreamResponse) -> web.StreamResponse:
        """Account for a request a plugin answered itself, before any backend was chosen."""
        status = response.status
        self.end_unrouted(Outcome.OK if status < 400 else Outcome.REJECTED, status,
                          None if status < 400 else "answered by a plugin")
        response.headers[REQUEST_ID] = self.flow.id
        return response

    def abandon(self) -> None:
        """Account for a request cancelled before routing (its client left mid-body)."""
        if self._client_gone():
            self.end_unrouted(Outcome.CLIENT_DISCONNECTED, CLIENT_CLOSED_REQUEST, None)
        else:
            self.end_unrouted(Outcome.CANCELLED, None, None)

    def end_unrouted(self, outcome: Outcome, status: int | None, error: str | None) -> None:
        """`on_new` then `on_complete` at once, for a flow that never got a backend."""
        flow = self.flow
        flow.outcome, flow.status, flow.error = outcome, status, error
        self.events.on_new(flow)
        self._completed = True
        flow.t_end = time.monotonic()
        self.events.on_complete(flow)

    def result(self) -> web.StreamResponse:
        """What a client's handler returns once the lifecycle is over."""
        if self.error is not None and (self.response is None or not self.response.prepared):
            return error_response(self.error, self.flow.id)
        if self.response is not None:
            return self.response
        # The client is gone and nothing was sent: aiohttp's write of this fails quietly.
        return web.Response(status=CLIENT_CLOSED_REQUEST)
