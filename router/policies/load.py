"""One load figure per backend, from the router's own counts and the engine's last scrape.

    score = max(in_flight, running + waiting) + (WAITING_WEIGHT - 1) * waiting
                                                                  (WAITING_WEIGHT = 2)

`in_flight` is this router's count of requests it sent there and has not seen end: exact and
fresh, it moves with every decision, so a burst between two scrapes spreads at once.
`running + waiting` is what the engine held at its last scrape: it includes the work other
router replicas sent. The router's own requests are part of both, so the larger of the two is
the best estimate of the requests at the engine, in requests (what the balance thresholds are
measured in). A waiting request then counts double: a new request queues behind it (its
first token waits for a prefill slot), while a running one only shares the batch.
A scrape older than `STALE_SCRAPES` intervals is ignored (its engine stopped answering
`/metrics`, or the scraper is down), and a figure the engine does not export counts 0.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from random import Random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.backends.pool import Backend
    from router.policies import PolicyContext

__all__ = [
    "load_score", "load_scores", "least_loaded", "lowest", "WAITING_WEIGHT", "STALE_SCRAPES",
]

WAITING_WEIGHT = 2.0
STALE_SCRAPES = 3.0
"""A scrape older than this many `engine_stats_interval`s is ignored."""


def load_score(context: PolicyContext, backend: Backend) -> float:
    """The backend's load (see the module docstring)."""
    return load_scores(context, (backend,))[0]


def load_scores(context: PolicyContext, candidates: Sequence[Backend]) -> list[float]:
    """Each candidate's load; lookups hoisted out of the loop, as this runs per request."""
    now = time.monotonic()
    oldest = now - STALE_SCRAPES * context.config.engine_stats_interval
    # `backends.get`, not `for_backend`: reading must not create stats entries.
    own = context.stats.backends.get
    engine = context.engines.get
    scores = []
    for backend in candidates:
        stats = own(backend.id)
        score = float(stats.in_flight) if stats is not None else 0.0
        snapshot = engine(backend.id)
        if snapshot is not None and snapshot.scraped_at >= oldest:
            waiting = snapshot.waiting or 0.0
            score = max(score, (snapshot.running or 0.0) + waiting)
            score += (WAITING_WEIGHT - 1) * waiting
        scores.append(score)
    return scores


def lowest(candidates: Sequence[Backend], scores: Sequence[float], rng: Random) -> Backend:
    """The candidate with the lowest score; ties broken at random, so an idle fleet (all 0)
    does not send everything to the first backend."""
    low = min(scores)
    tied = [backend for backend, score in zip(candidates, scores) if score == low]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def least_loaded(context: PolicyContext, candidates: Sequence[Backend], rng: Random) -> Backend:
    """The candidate with the lowest `load_score`, ties broken at random."""
    if len(candidates) == 1:
        return candidates[0]
    return lowest(candidates, load_scores(context, candidates), rng)
