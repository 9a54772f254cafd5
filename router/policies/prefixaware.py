"""Prefix affinity: send a prompt where its beginning was sent before, so the engine's prefix
cache serves it (a multi-turn chat resends its whole history every turn), unless that would
pile work onto an overloaded backend.

For each request every candidate is scored by `router.policies.cache_score`, in characters:
the prefix of this prompt it received counts when it is at least `prefix_match_threshold` of
the prompt and `prefix_min_match_length` characters long (production-stack's
`--prefix-min-match-length`, which counts characters too), and the fleet is not imbalanced
(load gap over `balance_abs_threshold` and busiest over `balance_rel_threshold` × idlest);
against that, its load, `--load-cost-tokens` × `CHARS_PER_TOKEN` characters per request. The
lowest cost wins, ties at random, and the prompt is recorded for the chosen backend.

Only the first `max_prompt_chars` characters count, for the tree and for the share matched: a
prompt longer than that matches fully once its head matches. Backends that are not candidates
are never chosen: an unhealthy one's entries age out of the tree by LRU, a removed one's are
dropped at once (`forget_backend`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from router.policies.cache_score import CHARS_PER_TOKEN, CacheScore
from router.policies.features import ESC, prompt_text
from router.policies.load import load_scores, lowest
from router.policies.prefix_tree import PrefixTree

if TYPE_CHECKING:
    from router.backends.pool import Backend
    from router.proxy.inbound import InboundRequest
    from router.policies import PolicyContext

__all__ = ["PrefixAware"]

SALT = ESC + "s"
"""Ends a `cache_salt` put before the prompt text (see `_text`)."""


class PrefixAware:
    """Longest cached prefix among the candidates, with a load-imbalance escape."""

    def __init__(self, context: PolicyContext, max_prompt_chars: int = 4 * 4096) -> None:
        self._context = context
        config = context.config
        self._threshold = config.prefix_match_threshold
        self._min_length = config.prefix_min_match_length
        self._abs = config.balance_abs_threshold
        self._rel = config.balance_rel_threshold
        self._max_chars = config.prefix_cache_max_chars
        self._max_prompt_chars = min(max_prompt_chars, self._max_chars)
        self._score = CacheScore(config, self._threshold, CHARS_PER_TOKEN)
        self._trees: dict[str, PrefixTree] = {}
        """One per model: a prefix sent to one model says nothing about another's cache."""
        self._rng = random.Random()

    def choose(self, request: InboundRequest, candidates: Sequence[Backend]) -> Backend:
        text = self._text(request)
        scores = load_scores(self._context, candidates)
        if text is None:
            return lowest(candidates, scores, self._rng)
        tree = self._trees.get(request.model)
        if tree is None:
            tree = self._trees[request.model] = PrefixTree(self._max_chars,
                                                           self._max_prompt_chars)
        _, lengths = tree.match(text)
        high, low = max(scores), min(scores)
        if high - low > self._abs and high > self._rel * low:
            cached = [0] * len(candidates)  # imbalanced: load alone
        else:
            cached = [lengths.get(backend.id, 0) for backend in candidates]
        costs = self._score.costs(len(text), cached, scores)
        chosen = candidates[self._score.best(candidates, costs,
                                             lambda: self._rng.getrandbits(63))]
        tree.insert(text, chosen.id)
        return chosen

    def _text(self, request: InboundRequest) -> str | None:
        text = prompt_text(request, self._max_prompt_chars)
        if text is None or request.json is None:
            return text
        # vLLM shares cached blocks only between requests with the same `cache_salt`: a
        # prefix sent with another salt (or none) is no hit, so the salt leads the key.
        salt = request.json.get("cache_salt")
        if isinstance(salt, str) and salt:
            text = (salt.replace(ESC, ESC + ESC) + SALT + text)[: self._max_prompt_chars]
        return text

    def forget_backend(self, backend_id: str) -> None:
        """A backend left the pool: drop what only it held from every model's tree."""
        for tree in self._trees.values():
            tree.remove_backend(backend_id)

    def tree_chars(self) -> int:
        """Prompt characters held over all models' trees."""
        return sum(tree.chars for tree in self._trees.values())

    def tree(self, model: str) -> PrefixTree | None:
        return self._trees.get(model)

    def __repr__(self) -> str:
        return (f"<PrefixAware models={len(self._trees)} chars={self.tree_chars()} "
                f"threshold={self._threshold:g} min_length={self._min_length} "
                f"max_chars_per_model={self._max_chars}>")
