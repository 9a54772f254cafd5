"""Routing policies: one module each, behind one small interface.

A policy picks one backend among the candidates that serve the request's model. It may also
implement the request events (`on_new`, `on_complete`...) to keep its own load figures: the
app subscribes it. A new policy is a new module plus one line in `POLICIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from router.policies.roundrobin import RoundRobin

if TYPE_CHECKING:
    from router.backends import Backend
    from router.inbound import InboundRequest

__all__ = ["RoutingPolicy", "POLICIES", "make_policy"]


class RoutingPolicy(Protocol):
    def choose(self, request: InboundRequest, candidates: Sequence[Backend]) -> Backend:
        """Return one of `candidates` (never empty) for `request`."""
        ...


POLICIES: dict[str, Callable[[], RoutingPolicy]] = {
    "roundrobin": RoundRobin,
}


def make_policy(name: str) -> RoutingPolicy:
    return POLICIES[name]()
