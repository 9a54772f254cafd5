"""Session affinity: a client's session key always goes to the same backend.

Consistent hashing on a ring: each backend owns `vnodes` points placed by a stable hash of its
URL, and a key belongs to the first point at or after its own hash. The hash is blake2b, not
Python's `hash()` (salted per process), so the same key maps to the same backend after a
restart and on every router replica that sees the same backends, in whatever order. Removing a
backend moves only its own keys (the other points stay put); adding one of N takes about 1/N of
the keys. Many virtual nodes per backend even out the arcs each backend owns.

Building a ring costs `vnodes` hashes per backend, so rings are cached per candidate set (the
ordered tuple of backend ids; a bounded LRU, as sets come and go with discovery and health).
Requests without a key go to the least loaded backend.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from router.policies.features import session_key
from router.policies.load import least_loaded

if TYPE_CHECKING:
    from router.backends.pool import Backend
    from router.proxy.inbound import InboundRequest
    from router.policies import PolicyContext

__all__ = ["Session", "HashRing"]


def stable_hash(data: bytes) -> bytes:
    """A 64-bit hash that is the same in every process and on every machine. Kept as bytes:
    they sort as the big-endian number would, without the cost of making an int."""
    return hashlib.blake2b(data, digest_size=8).digest()


class HashRing:
    """The ring for one candidate list: sorted points, and the index of each point's owner."""

    __slots__ = ("points", "owners")

    def __init__(self, candidates: Sequence[Backend], vnodes: int) -> None:
        placed = sorted(
            (stable_hash(f"{backend.url}#{n}".encode()), backend.url, index)
            for index, backend in enumerate(candidates)
            for n in range(vnodes)
        )
        self.points = [point for point, _, _ in placed]
        self.owners = [index for _, _, index in placed]

    def owner(self, key: str) -> int:
        """The index, in the candidate list the ring was built from, of the key's backend."""
        # surrogatepass: a JSON body or an odd header can carry lone surrogates.
        position = bisect_left(self.points, stable_hash(key.encode("utf-8", "surrogatepass")))
        return self.owners[position if position < len(self.points) else 0]


class Session:
    """Routes by `config.session_key` (header, then body field); keyless requests: least
    loaded."""

    def __init__(self, context: PolicyContext, vnodes: int = 160, max_rings: int = 64) -> None:
        self._context = context
        self._name = context.config.session_key
        self._vnodes = vnodes
        self._max_rings = max_rings
        self._rings: OrderedDict[tuple[str, ...], HashRing] = OrderedDict()
        self._rng = random.Random()

    def choose(self, request: InboundRequest, candidates: Sequence[Backend]) -> Backend:
        key = session_key(request, self._name)
        if key is None:
            return least_loaded(self._context, candidates, self._rng)
        if len(candidates) == 1:
            return candidates[0]
        return candidates[self.ring(candidates).owner(key)]

    def ring(self, candidates: Sequence[Backend]) -> HashRing:
        """The (cached) ring of this candidate list."""
        ids = tuple([backend.id for backend in candidates])
        ring = self._rings.get(ids)
        if ring is None:
            ring = self._rings[ids] = HashRing(candidates, self._vnodes)
            if len(self._rings) > self._max_rings:
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(ids)
        return ring

    def __repr__(self) -> str:
        return (f"<Session key={self._name} vnodes={self._vnodes} "
                f"rings={len(self._rings)}/{self._max_rings}>")
