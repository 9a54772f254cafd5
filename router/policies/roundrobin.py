"""Round robin, per model: each model's backends take turns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.backends.pool import Backend
    from router.proxy.inbound import InboundRequest
    from router.policies import PolicyContext

__all__ = ["RoundRobin"]


class RoundRobin:
    def __init__(self, context: PolicyContext) -> None:
        self._turn: dict[str, int] = {}

    def choose(self, request: InboundRequest, candidates: Sequence[Backend]) -> Backend:
        turn = self._turn.get(request.model, 0)
        self._turn[request.model] = turn + 1
        return candidates[turn % len(candidates)]

    def __repr__(self) -> str:
        return f"<RoundRobin models={len(self._turn)}>"
