"""KV-aware routing: send a prompt to the engine that already holds most of it in its KV
cache, as the engines' own KV cache events tell (`router.kvcache`), weighed against load.

Per request (`prepare`, before the choice): when any candidate engine has published events,
the prompt's token ids are asked of an engine (`router.kvcache.prompt_tokens`) and hashed
into blocks the way the index hashes what engines store. `choose` then scores every
candidate with `router.policies.cache_score` (cached blocks against load). Without tokens
(no events yet, a prompt that cannot be tokenized, `/tokenize` failing or slow) load alone
decides; routing never waits on the event streams. For a model none of whose engines
publish events (vLLM without `--kv-events-config`, or before the first event), requests go
as `prefixaware` sends them, on the prompts this router saw.

A client's session key (header or body field `--session-key`, and `x-session-id`) keeps a
conversation on its home engine: the consistent-hash owner of the key among the candidates
(`router.policies.session`), the same on every router replica. The home counts as holding
the whole prompt plus one request's worth of load, so it keeps the session until it is that
much busier than another engine; an unhealthy home leaves the candidates and the ring moves
only its sessions, to the next engine of the ring.

Every replica decides alike: the index is built from the same events, tie-breaks hash the
prompt (`CacheScore.best`), and the home is a consistent hash. Load is what each replica sees.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from router.kvcache.index import extra_code, prompt_hashes
from router.policies.cache_score import CacheScore
from router.policies.features import session_key
from router.policies.load import load_scores, lowest
from router.policies.prefixaware import PrefixAware
from router.policies.session import Session

if TYPE_CHECKING:
    from router.backends.pool import Backend
    from router.kvcache.state import KvCache
    from router.policies import PolicyContext
    from router.proxy.inbound import InboundRequest

__all__ = ["KvAware", "PromptBlocks"]

DEFAULT_SESSION_KEY = "x-session-id"


class PromptBlocks:
    """A prompt's token ids and, per block size, its block hashes (made when first asked)."""

    __slots__ = ("tokens", "lora", "salt", "_key", "_hashes")

    def __init__(self, tokens: list[int], lora: str | None, salt: str | None) -> None:
        self.tokens = tokens
        self.lora = lora
        self.salt = salt
        self._key: int | None = None
        self._hashes: dict[int, list[int]] = {}

    @property
    def key(self) -> int:
        """Breaks ties between engines; the same on every replica for the same prompt.
        Made only when there is a tie to break."""
        if self._key is None:
            self._key = hash((tuple(self.tokens), extra_code(
                tuple(key for key in (self.lora, self.salt) if key))))
        return self._key

    def hashes(self, block_size: int) -> list[int]:
        hashes = self._hashes.get(block_size)
        if hashes is None:
            hashes = self._hashes[block_size] = prompt_hashes(
                self.tokens, block_size, self.lora, self.salt)
        return hashes


class KvAware:
    """Cached blocks against load, per `CacheScore`; sessions kept on their home engine."""

    uses_kv_events = True

    def __init__(self, context: PolicyContext) -> None:
        if context.kv is None:
            raise ValueError("the kvaware policy needs the application's KV cache index")
        self._context = context
        self._kv: KvCache = context.kv
        self._score = CacheScore(context.config)
        self._session_key = context.config.session_key
        self._rings = Session(context)
        self._rng = random.Random()
        self._without_events = PrefixAware(context)
        """For a model none of whose engines publish events (yet): the prompts seen here."""

    async def prepare(
        self, request: InboundRequest, candidates: Sequence[Backend], endpoint: str,
    ) -> None:
        """Learn the prompt's blocks, when some candidate's cache is known."""
        kv = self._kv
        body = request.json
        if (
            body is None or kv.tokens is None or request.prepared is not None
            or not kv.index.knows_any([backend.id for backend in candidates])
        ):
            return
        asked = lowest(candidates, load_scores(self._context, candidates), self._rng)
        tokens = await kv.tokens.tokens(body, request.model, endpoint, asked)
        if not tokens:
            return
        salt = body.get("cache_salt")
        lora = request.model if request.model in kv.index.lora_names else None
        blocks = PromptBlocks(tokens, lora, salt if isinstance(salt, str) else None)
        try:  # hashed here, where a failure only means routing on load
            for size in {kv.index.block_size(backend.id) for backend in candidates}:
                if size:
                    blocks.hashes(size)
        except TypeError:  # the engine's "tokens" held something unhashable
            return
        request.prepared = blocks

    def choose(self, request: InboundRequest, candidates: Sequence[Backend]) -> Backend:
        loads = load_scores(self._context, candidates)
        blocks = request.prepared if isinstance(request.prepared, PromptBlocks) else None
        home = self._home(request, candidates)
        if blocks is None and home is None:
            if not self._kv.index.knows_any([backend.id for backend in candidates]):
                return self._without_events.choose(request, candidates)
            return lowest(candidates, loads, self._rng)
        index = self._kv.index
        prompt = len(blocks.tokens) if blocks is not None else 0
        cached = [0] * len(candidates)
        if blocks is not None:
            for number, backend in enumerate(candidates):
                size = index.block_size(backend.id)
                if size:
                    # The engine computes the prompt's last token whatever it holds.
                    hashes = blocks.hashes(size)[: (prompt - 1) // size]
                    cached[number] = size * index.matched_blocks(backend.id, hashes)
        score = self._score
        costs = score.costs(prompt, cached, loads)
        if home is not None:
            costs[home] = loads[home] * score.load_cost - score.load_cost
        chosen = score.best(candidates, costs,
                            lambda: blocks.key if blocks is not None else self._rng.getrandbits(63))
        if blocks is not None:
            self._kv.predict(candidates[chosen].id, score.counted(cached[chosen], prompt), prompt)
        return candidates[chosen]

    def _home(self, request: InboundRequest, candidates: Sequence[Backend]) -> int | None:
        """The index of the session's home engine, if the request has a session key."""
        key = session_key(request, self._session_key)
        if key is None and self._session_key != DEFAULT_SESSION_KEY:
            key = session_key(request, DEFAULT_SESSION_KEY)
        if key is None:
            return None
        if len(candidates) == 1:
            return 0
        return self._rings.ring(candidates).owner(key)

    def forget_backend(self, backend_id: str) -> None:
        self._kv.forget(backend_id)
        self._without_events.forget_backend(backend_id)

    def __repr__(self) -> str:
        return (f"<KvAware load_cost_tokens={self._score.load_cost:g} "
                f"min_match={self._score.min_length} {self._kv.index!r}>")
