"""Request events: `on_new`, `on_retry`, `on_response`, `on_complete`, fanned out to subscribers.

A subscriber is any object with some of these methods; each is synchronous and cheap
(request stats, metrics, policies' load counters). When they fire:

- `on_new(flow)`: the request was routed (`flow.backend` is set), or it ended before routing
  (`flow.backend` is None: refused, or its client left while sending the body; `on_complete`
  follows at once).
- `on_response(flow)`: the backend's first body byte arrived (`flow.t_first_byte` is set).
  Not every flow gets one: a backend can fail before sending a byte.
- `on_retry(flow)`: an attempt failed before any byte reached the client and the request
  moves to another backend: `flow.attempts[-1]` is the failed try (its backend, error,
  outcome), `flow.backend` is already the new backend. Zero or more times between `on_new`
  and `on_response`/`on_complete`; counters keyed by backend move from the old to the new.
- `on_complete(flow)`: the request is over; `flow.outcome`, `flow.status` and `flow.t_end`
  are set. Exactly once per `on_new`.

A failing subscriber is logged and skipped: it never breaks a request or the other
subscribers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from router.flow import RequestFlow

__all__ = ["EVENT_NAMES", "Subscriber", "RequestEvents"]

log = logging.getLogger("router.events")

Handler = Callable[[RequestFlow], object]
EVENT_NAMES = ("on_new", "on_retry", "on_response", "on_complete")


class Subscriber(Protocol):
    """Documentation only: implement any subset of these methods."""

    def on_new(self, flow: RequestFlow) -> None: ...

    def on_retry(self, flow: RequestFlow) -> None: ...

    def on_response(self, flow: RequestFlow) -> None: ...

    def on_complete(self, flow: RequestFlow) -> None: ...


class RequestEvents:
    """Holds the subscribers and calls them; the lists are resolved once, at subscribe time."""

    def __init__(self, subscribers: Iterable[object] = ()) -> None:
        self._handlers: dict[str, list[Handler]] = {name: [] for name in EVENT_NAMES}
        for subscriber in subscribers:
            self.subscribe(subscriber)

    def subscribe(self, subscriber: object) -> None:
        for name in EVENT_NAMES:
            method = getattr(subscriber, name, None)
            if method is not None:
                self._handlers[name].append(method)

    def add_handler(self, name: str, handler: Handler) -> None:
        """Call `handler` on the event `name` (one of `EVENT_NAMES`), after those before."""
        self._handlers[name].append(handler)

    def replace(self, old: object, new: object) -> None:
        """Swap one subscriber for another in place (a reloaded routing policy)."""
        for name in EVENT_NAMES:
            old_method = getattr(old, name, None)
            new_method = getattr(new, name, None)
            handlers = self._handlers[name]
            position = handlers.index(old_method) if old_method in handlers else len(handlers)
            if old_method in handlers:
                handlers.remove(old_method)
            if new_method is not None:
                handlers.insert(position, new_method)

    def on_new(self, flow: RequestFlow) -> None:
        self._emit("on_new", flow)

    def on_retry(self, flow: RequestFlow) -> None:
        self._emit("on_retry", flow)

    def on_response(self, flow: RequestFlow) -> None:
        self._emit("on_response", flow)

    def on_complete(self, flow: RequestFlow) -> None:
        self._emit("on_complete", flow)

    def _emit(self, name: str, flow: RequestFlow) -> None:
        for handler in self._handlers[name]:
            try:
                handler(flow)
            except Exception:
                log.exception("event subscriber %r failed in %s for %r", handler, name, flow)
