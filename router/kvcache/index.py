"""Which engine holds which KV cache blocks, and a prompt's blocks in the same hashes.

The index does not reproduce the engine's block hash (its algorithm and seed are engine
settings: `--prefix-caching-hash-algo`, `PYTHONHASHSEED`). It chains a hash of its own over
what every `BlockStored` carries, the block's tokens and extra keys, as the engine chains its
own, and keeps engine hash -> own hash per engine for removals and parents. A prompt turned
into tokens hashes the same way, so the two meet whatever the engine's settings:

    own(block) = hash((own(parent) or ROOT, tuple(block's token ids), extra(block)))

where `extra` folds the block's untagged extra keys as vLLM publishes them: the LoRA name
on every block of an adapter's prompt, the `cache_salt` on the first block. Only ints go into
`hash()`, so own hashes are the same in every process: router replicas that saw the same
events hold the same index.

Memory is bounded by `max_blocks` over all engines: past it the busiest engine's oldest block
goes (blocks are ordered by their last store).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from router.kvcache.events import Batch, BlockHash, Cleared, Removed, Stored

__all__ = ["KvIndex", "EngineBlocks", "prompt_hashes", "extra_code", "ROOT"]

ROOT = 0
"""The parent of a first block."""
MAX_LORA_NAMES = 10_000
MAX_COPIES = 100_000
"""Duplicate blocks counted per engine at most (a removal beyond is taken as the last copy)."""


def extra_code(keys: tuple[str, ...] | None) -> int:
    """The block's extra keys as one int (0 for none), the same in every process."""
    if not keys:
        return 0
    digest = hashlib.blake2b("\x00".join(keys).encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big") | 1


def prompt_hashes(
    tokens: Sequence[int], block_size: int, lora: str | None = None, salt: str | None = None,
) -> list[int]:
    """The own hashes of the prompt's full blocks, as an engine would store them."""
    first = extra_code(tuple(key for key in (lora, salt) if key))
    rest = extra_code((lora,) if lora else None)
    hashes = []
    parent = ROOT
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start:start + block_size]),
                       rest if start else first))
        hashes.append(parent)
    return hashes


@dataclass(eq=False)
class EngineBlocks:
    """One engine's blocks: (rank, engine hash) -> own hash in store order, and how many
    entries hold each own hash (data-parallel ranks may hold the same block)."""

    by_engine_hash: OrderedDict[tuple[int, BlockHash], int] = field(default_factory=OrderedDict)
    own: dict[int, int] = field(default_factory=dict)
    block_size: int = 0
    """The engine's block size, from its `BlockStored` events (0 before any)."""
    orphans: int = 0
    """Stored events skipped because their parent was unknown here (joined mid-stream)."""
    copies: dict[tuple[int, BlockHash], int] = field(default_factory=dict)
    """Blocks stored more than once under one hash, and how many times more: vLLM computes a
    fully cached prompt's last block again and keeps both copies; evicting one leaves the
    other serving hits."""

    def add(self, key: tuple[int, BlockHash], own_hash: int) -> bool:
        """Record one block; True if it is new."""
        previous = self.by_engine_hash.get(key)
        if previous is not None:
            self.by_engine_hash.move_to_end(key)
            if previous == own_hash:
                if len(self.copies) < MAX_COPIES:
                    self.copies[key] = self.copies.get(key, 0) + 1
                return False
            self.copies.pop(key, None)
            self._release(previous)
        self.by_engine_hash[key] = own_hash
        self.own[own_hash] = self.own.get(own_hash, 0) + 1
        return previous is None

    def remove(self, key: tuple[int, BlockHash]) -> bool:
        extra = self.copies.get(key)
        if extra is not None:  # one copy of several went
            if extra > 1:
                self.copies[key] = extra - 1
            else:
                del self.copies[key]
            return False
        own_hash = self.by_engine_hash.pop(key, None)
        if own_hash is None:
            return False
        self._release(own_hash)
        return True

    def pop_oldest(self) -> None:
        key, own_hash = self.by_engine_hash.popitem(last=False)
        self.copies.pop(key, None)
        self._release(own_hash)

    def clear_rank(self, rank: int) -> int:
        keys = [key for key in self.by_engine_hash if key[0] == rank]
        for key in keys:
            self.copies.pop(key, None)
            self.remove(key)
        return len(keys)

    def _release(self, own_hash: int) -> None:
        count = self.own[own_hash] - 1
        if count:
            self.own[own_hash] = count
        else:
            del self.own[own_hash]

    def __len__(self) -> int:
        return len(self.by_engine_hash)


class KvIndex:
    """Every engine's cached blocks, as its KV events told them; bounded by `max_blocks`."""

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self.engines: dict[str, EngineBlocks] = {}
        self.blocks = 0
        """Entries over all engines."""
        self.trimmed = 0
        """Blocks dropped to keep within `max_blocks`."""
        self.lora_names: set[str] = set()
        """The LoRA adapters seen in events: a request for one of them hashes with its name."""

    def apply(self, backend_id: str, rank: int, batch: Batch) -> None:
        """One batch of one engine's (data-parallel `rank`) events, in order."""
        engine = self.engines.get(backend_id)
        if engine is None:
            engine = self.engines[backend_id] = EngineBlocks()
        for event in batch.events:
            if isinstance(event, Stored):
                self._stored(engine, rank, event)
            elif isinstance(event, Removed):
                for block_hash in event.block_hashes:
                    self.blocks -= engine.remove((rank, block_hash))
            elif isinstance(event, Cleared):
                self.blocks -= engine.clear_rank(rank)
        while self.blocks > self.max_blocks:
            busiest = max(self.engines.values(), key=len)
            busiest.pop_oldest()
            self.blocks -= 1
            self.trimmed += 1

    def _stored(self, engine: EngineBlocks, rank: int, event: Stored) -> None:
        if event.parent is None:
            parent = ROOT
        else:
            known = engine.by_engine_hash.get((rank, event.parent))
            if known is None:  # its chain is unknown here: these blocks cannot be matched
                engine.orphans += 1
                return
            parent = known
        engine.block_size = event.block_size
        if event.lora_name and len(self.lora_names) < MAX_LORA_NAMES:
            self.lora_names.add(event.lora_name)
        size = event.block_size
        tokens = event.token_ids
        for number, block_hash in enumerate(event.block_hashes):
            code = extra_code(event.extra_keys[number])
            parent = hash((parent, tuple(tokens[number * size:(number + 1) * size]), code))
            self.blocks += engine.add((rank, block_hash), parent)

    def matched_blocks(self, backend_id: str, hashes: Sequence[int]) -> int:
        """How many of the prompt's first blocks the engine holds, in a row."""
        engine = self.engines.get(backend_id)
        if engine is None:
            return 0
        held = engine.own
        count = 0
        for block_hash in hashes:
            if block_hash not in held:
                break
            count += 1
        return count

    def block_size(self, backend_id: str) -> int:
        engine = self.engines.get(backend_id)
        return engine.block_size if engine is not None else 0

    def knows_any(self, backend_ids: Iterable[str]) -> bool:
        """Whether any of these engines has told its block size yet (sent a store)."""
        engines = self.engines
        return any(
            (engine := engines.get(backend_id)) is not None and engine.block_size
            for backend_id in backend_ids
        )

    def forget(self, backend_id: str, rank: int | None = None) -> None:
        """Drop what an engine (or one of its ranks) held: it restarted, left the pool, or
        its events had a gap the replay could not fill."""
        engine = self.engines.get(backend_id)
        if engine is None:
            return
        if rank is None:
            self.blocks -= len(engine)
            del self.engines[backend_id]
        else:
            self.blocks -= engine.clear_rank(rank)

    def __repr__(self) -> str:
        return f"<KvIndex engines={len(self.engines)} blocks={self.blocks}/{self.max_blocks}>"
