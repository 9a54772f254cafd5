"""Disaggregated prefill: one backend computes the prompt's KV cache, another decodes.

Backends carry labels (`--static-model-labels`): those with a prefill label take the first
hop (`choose_prefill`), those with a decode label the second (`choose`); each side takes
turns per model. The two hops themselves run in `router.proxy.failover.prefill`, inside the client
request's one lifecycle.

The two policies differ only in `kv_handoff`, what the decode hop takes from the prefill:
`disaggregated_prefill` (engines that share the KV cache themselves, e.g. through LMCache)
sends the decode backend the client's body untouched; `disaggregated_prefill_orchestrated`
(vLLM's own KV connectors, e.g. NIXL) asks the prefill for `kv_transfer_params` and hands
them to the decode request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from router.errors import NoBackendAvailable

if TYPE_CHECKING:
    from router.backends.pool import Backend
    from router.proxy.inbound import InboundRequest
    from router.policies import PolicyContext

__all__ = ["DisaggregatedPrefill", "DisaggregatedPrefillOrchestrated", "PREFILL_ENDPOINTS"]

PREFILL_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions"})
"""Generation endpoints, the only ones with a prefill to split off."""


class DisaggregatedPrefill:
    kv_handoff = False
    """Whether the decode request carries the prefill answer's `kv_transfer_params`."""

    def __init__(self, context: PolicyContext) -> None:
        self.prefill_labels = frozenset(context.config.prefill_model_labels)
        self.decode_labels = frozenset(context.config.decode_model_labels)
        self._turns: dict[tuple[str, str], int] = {}

    def choose(self, request: InboundRequest, candidates: Sequence[Backend]) -> Backend:
        """The decode backend (for any endpoint: decode backends serve everything)."""
        return self._take_turn("decode", request.model, candidates, self.decode_labels)

    def choose_prefill(self, request: InboundRequest, candidates: Sequence[Backend]) -> Backend:
        return self._take_turn("prefill", request.model, candidates, self.prefill_labels)

    def _take_turn(
        self, role: str, model: str, candidates: Sequence[Backend], labels: frozenset[str]
    ) -> Backend:
        group = [backend for backend in candidates if labels.intersection(backend.labels)]
        if not group:
            raise NoBackendAvailable(f"no healthy {role} backend serves {model} right now")
        key = (role, model)
        turn = self._turns.get(key, 0)
        self._turns[key] = turn + 1
        return group[turn % len(group)]

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} prefill={sorted(self.prefill_labels)} "
                f"decode={sorted(self.decode_labels)}>")


class DisaggregatedPrefillOrchestrated(DisaggregatedPrefill):
    kv_handoff = True
