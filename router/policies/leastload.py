"""Least load by the power of two choices: the less loaded of two backends drawn at random.

Why not simply the least loaded of all: engine figures are seconds old and other router
replicas decide on the same figures, so "the minimum" is the same backend for everyone until
the next scrape, and it gets flooded (herding). Two random draws still steer clear of a busy
backend (it loses every draw it is in), spread ties without favouring the first backend, and
cost two scores whatever the fleet size. See `router.policies.load` for the score.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from router.policies.load import STALE_SCRAPES, load_scores

if TYPE_CHECKING:
    from router.backends.pool import Backend
    from router.proxy.inbound import InboundRequest
    from router.policies import PolicyContext

__all__ = ["LeastLoad"]


class LeastLoad:
    """Power of two choices on `load_score`."""

    def __init__(self, context: PolicyContext) -> None:
        self._context = context
        self._rng = random.Random()

    def choose(self, request: InboundRequest, candidates: Sequence[Backend]) -> Backend:
        count = len(candidates)
        if count == 1:
            return candidates[0]
        first = self._rng.randrange(count)
        second = self._rng.randrange(count - 1)
        if second >= first:  # two distinct draws, each pair equally likely
            second += 1
        a, b = candidates[first], candidates[second]
        load_a, load_b = load_scores(self._context, (a, b))
        return b if load_b < load_a else a  # on a tie `a`, itself a random draw

    def __repr__(self) -> str:
        stale = STALE_SCRAPES * self._context.config.engine_stats_interval
        return f"<LeastLoad two-choices engine_stats_stale_after={stale:g}s>"
