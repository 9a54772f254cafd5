"""One score for cache and load, for the cache-aware policies (`kvaware`, `prefixaware`).

For each candidate engine, in prompt tokens (characters for `prefixaware`, whose tree counts
characters: `CHARS_PER_TOKEN` to a token):

    cost = (prompt - cached) + load_cost * load

- `cached`: how much of the prompt's beginning the engine holds; counted only when it is at
  least `--prefix-min-match-length` long (and, for `prefixaware`, `--prefix-match-threshold`
  of the prompt); below that, load alone decides.
- `load`: `router.policies.load` (requests running and waiting at the engine, or in flight
  from this router, a waiting one counting double).
- `load_cost`: `--load-cost-tokens`, the prompt tokens one request of load is worth.

The engine with the lowest cost wins. A hot prefix thus stays where it is cached until that
engine carries `cached / load_cost` requests more than another, then spreads (rather than
piling onto one engine, the "death spiral" of cache-first routing), and a cold engine takes
the work the busy ones cannot absorb. Ties (a cold fleet, a new conversation) are broken by
rendezvous hashing on a key of the prompt: spread over the engines like random draws, but
every router replica breaks the same tie the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from router.policies.session import stable_hash

if TYPE_CHECKING:
    from router.backends.pool import Backend
    from router.config.settings import Config

__all__ = ["CacheScore", "mix", "CHARS_PER_TOKEN"]

CHARS_PER_TOKEN = 4.0
"""About what English text and code take per token with common tokenizers."""

MASK = (1 << 64) - 1


def mix(value: int) -> int:
    """splitmix64's finaliser: every input bit moves about half the output bits, so the
    weights of one key over the engines are as good as independent draws."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & MASK
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & MASK
    return value ^ (value >> 31)


class CacheScore:
    """The cost formula with its knobs from the config."""

    def __init__(self, config: Config, min_share: float = 0.0, unit: float = 1.0) -> None:
        self.load_cost = config.load_cost_tokens * unit
        """In the policy's unit of prompt: tokens, or characters (`unit` per token)."""
        self.min_length = config.prefix_min_match_length
        self.min_share = min_share
        self._backend_codes: dict[str, int] = {}

    def counted(self, cached: int, prompt: int) -> int:
        """What of a cached prefix counts: 0 below the minimum length or share."""
        if cached < self.min_length or cached < self.min_share * prompt:
            return 0
        return cached

    def costs(self, prompt: int, cached: Sequence[int], loads: Sequence[float]) -> list[float]:
        load_cost = self.load_cost
        return [prompt - self.counted(hit, prompt) + load_cost * load
                for hit, load in zip(cached, loads)]

    def best(self, candidates: Sequence[Backend], costs: Sequence[float],
             key: Callable[[], int]) -> int:
        """The index of the lowest cost; ties go to the highest rendezvous weight of the
        prompt's `key()` (asked for only when there is a tie)."""
        low = min(costs)
        tied = [index for index, cost in enumerate(costs) if cost == low]
        if len(tied) == 1:
            return tied[0]
        prompt = key()
        return max(tied, key=lambda index: mix(prompt ^ self._code(candidates[index])))

    def _code(self, backend: Backend) -> int:
        """A stable number for the backend (its URL), the same on every replica."""
        code = self._backend_codes.get(backend.url)
        if code is None:
            if len(self._backend_codes) > 65_536:
                self._backend_codes.clear()
            code = self._backend_codes[backend.url] = int.from_bytes(
                stable_hash(backend.url.encode()), "big")
        return code
