"""The request lifecycle: exactly one `on_new` and one `on_complete` per flow, whatever happens.

`Lifecycle` is the context manager every proxied request runs in, from its arrival (before
the rate limit, admission and its body) to its answer: refused, answered by a plugin, client
gone, backend failure, timeout, cancellation, it sets the outcome and emits `on_complete`
once. `on_new` comes when the request is routed (`routed()`: subscribers count it in flight
from there, with `flow.backend` set), or at the exit of a flow that never was. It serves a
client's request and a batch line alike: what it needs of the receiver it asks the request's
`Sink` (`router.proxy.sinks.ClientSink`, `Collector`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import TracebackType

from aiohttp import web

from router.errors import ClientGone, InternalError, RouterError
from router.events import RequestEvents
from router.flow import Outcome, RequestFlow
from router.proxy.headers import REQUEST_ID
from router.proxy.sinks import CLIENT_CLOSED_REQUEST, Sink

__all__ = ["Lifecycle"]

log = logging.getLogger("router.lifecycle")


class Lifecycle:
    """Runs one request's events: `on_new` once routed, exactly one `on_complete` on exit.

    Router errors raised inside are turned into the request's outcome and `error` (for a
    client, the sink's OpenAI-style error answer), so the caller does not handle them again.
    """

    def __init__(self, events: RequestEvents, flow: RequestFlow, sink: Sink) -> None:
        self.events = events
        self.flow = flow
        self.sink = sink
        self.error: RouterError | None = None
        self._announced = False
        """`on_new` was emitted."""
        self._completed = False

    async def __aenter__(self) -> Lifecycle:
        return self

    def routed(self) -> None:
        """The flow has its backend: `on_new` (the events' subscribers count it from here)."""
        self._announced = True
        self.events.on_new(self.flow)

    def answered(self, response: web.StreamResponse) -> None:
        """Account for a request a plugin answered itself, before any backend was chosen."""
        flow = self.flow
        status = response.status
        flow.outcome, flow.status = (Outcome.OK if status < 400 else Outcome.REJECTED), status
        flow.error = None if status < 400 else "answered by a plugin"
        response.headers[REQUEST_ID] = flow.id

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
                # A refusal before routing is logged by its message alone, as the client
                # reads it; a backend's failure with its detail.
                flow.outcome, flow.status = exc.outcome, exc.status
                flow.error = exc.logged if self._announced else exc.message
                self.error, suppress = exc, True
            elif isinstance(exc, ClientGone):
                flow.outcome, suppress = Outcome.CLIENT_DISCONNECTED, True
            elif isinstance(exc, asyncio.CancelledError):
                # A watch that cut a stalled request set its outcome already.
                flow.outcome = flow.outcome or (
                    Outcome.CLIENT_DISCONNECTED if self.sink.client_gone() else Outcome.CANCELLED
                )
            else:
                log.error("request %s failed in the router", flow.id, exc_info=exc)
                self.error = InternalError("the router failed to handle the request")
                flow.outcome, suppress = Outcome.ROUTER_ERROR, True
                flow.error = repr(exc)
                if not self.sink.abort():
                    flow.status = 500
            if flow.outcome is Outcome.CLIENT_DISCONNECTED and flow.status is None:
                flow.status = CLIENT_CLOSED_REQUEST
        finally:
            if not self._announced:  # it ended before routing
                self._announced = True
                self.events.on_new(flow)
            flow.t_end = time.monotonic()
            self.events.on_complete(flow)
        return suppress
