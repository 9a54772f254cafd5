"""Routing policies: one module each, behind one small interface.

A policy picks one backend among the candidates that serve the request's model. It may also
implement the request events (`on_new`, `on_complete`...) to keep its own load figures: the
app subscribes it. A new policy is a new module plus one line in `POLICIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from router.config.settings import Config
from router.policies.disaggregated import (
    DisaggregatedPrefill, DisaggregatedPrefillOrchestrated,
)
from router.policies.kvaware import KvAware
from router.policies.leastload import LeastLoad
from router.policies.prefixaware import PrefixAware
from router.policies.roundrobin import RoundRobin
from router.policies.session import Session
from router.stats.engine import EngineStats
from router.stats.requests import RequestStats

if TYPE_CHECKING:
    from router.backends.pool import Backend
    from router.kvcache.state import KvCache
    from router.proxy.inbound import InboundRequest

__all__ = [
    "RoutingPolicy", "PreparingPolicy", "TwoStagePolicy", "PolicyContext", "POLICIES",
    "make_policy",
]


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may read besides the request: settings and the fleet's load figures."""

    config: Config
    stats: RequestStats
    """The router's own in-flight counts: `stats.for_backend(backend.id).in_flight`."""
    engines: EngineStats
    """The engines' last scraped figures: `engines.get(backend.id)` (None before a scrape)."""
    kv: KvCache | None = None
    """What the engines' KV cache events say they hold (`kvaware`)."""


class RoutingPolicy(Protocol):
    def choose(self, request: InboundRequest, candidates: Sequence[Backend]) -> Backend:
        """Return one of `candidates` (never empty; all healthy) for `request`."""
        ...


class PreparingPolicy(RoutingPolicy, Protocol):
    """A policy that learns something about the request before choosing (`kvaware`: the
    prompt's tokens), kept in `request.prepared` for the choice and its retries."""

    async def prepare(
        self, request: InboundRequest, candidates: Sequence[Backend], endpoint: str,
    ) -> None:
        ...


class TwoStagePolicy(RoutingPolicy, Protocol):
    """A policy that also picks a prefill backend for generation requests."""

    kv_handoff: bool
    """Whether the decode request carries the prefill answer's `kv_transfer_params`."""

    def choose_prefill(self, request: InboundRequest, candidates: Sequence[Backend]) -> Backend:
        ...


POLICIES: dict[str, Callable[[PolicyContext], RoutingPolicy]] = {
    "roundrobin": RoundRobin,
    "session": Session,
    "leastload": LeastLoad,
    "prefixaware": PrefixAware,
    "kvaware": KvAware,
    "disaggregated_prefill": DisaggregatedPrefill,
    "disaggregated_prefill_orchestrated": DisaggregatedPrefillOrchestrated,
}


def make_policy(name: str, context: PolicyContext) -> RoutingPolicy:
    return POLICIES[name](context)
