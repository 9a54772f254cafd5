"""vLLM's KV cache events, decoded from one published message and checked field by field.

A message is `(topic, seq, payload)`: `seq` 8 bytes big-endian, `payload` msgpack of
`[timestamp, [event, ...], data_parallel_rank]`, each event a map tagged by `"type"`. The
engine is trusted no more than a client: a malformed batch or event is reported and skipped,
never applied half-read, and sizes are bounded before anything is kept.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any

import msgpack

__all__ = [
    "BlockHash", "Stored", "Removed", "Cleared", "Event", "Batch", "MalformedBatch",
    "decode_seq", "decode_batch", "are_token_ids", "MAX_BLOCKS_PER_EVENT",
]

BlockHash = int | bytes
"""An engine's block hash: an int by default, bytes with `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`."""
MAX_BLOCKS_PER_EVENT = 65_536
"""More blocks than any prompt fills in one step: past it the event is refused."""
MAX_KEY_CHARS = 1024
"""Longest LoRA name or cache salt kept from an event."""


class MalformedBatch(ValueError):
    """The payload is not a batch of events at all."""


@dataclass(frozen=True, slots=True)
class Stored:
    """`BlockStored`: blocks now in the cache (a hit sends none, unless the request asked
    for `kv_cache_report_mode: full`)."""

    block_hashes: list[BlockHash]
    parent: BlockHash | None
    token_ids: list[int]
    block_size: int
    extra_keys: list[tuple[str, ...] | None]
    """Per block: the untagged extra keys (LoRA name, cache salt); a block whose keys hold
    anything else (multimodal or prompt-embeds digests) has `UNMATCHABLE` there."""
    lora_name: str | None


@dataclass(frozen=True, slots=True)
class Removed:
    """`BlockRemoved`: blocks evicted from the cache."""

    block_hashes: list[BlockHash]


@dataclass(frozen=True, slots=True)
class Cleared:
    """`AllBlocksCleared`: the engine reset its prefix cache."""


Event = Stored | Removed | Cleared


@dataclass(frozen=True, slots=True)
class Batch:
    timestamp: float
    """The engine's wall clock when it published the batch."""
    events: list[Event]
    skipped: list[str]
    """Why each skipped event was skipped."""


UNMATCHABLE = ("\x00unmatchable",)
"""Extra keys no text prompt produces: such blocks are kept (their children chain from them)
but never match a request the router can hash."""


def are_token_ids(values: list[Any]) -> bool:
    """Every value is an int that fits 64 bits: checked at C speed by `array`, which refuses
    anything else (a 4,000-token prompt: tens of microseconds, not hundreds)."""
    try:
        array("q", values)
    except (TypeError, OverflowError):
        return False
    return True


def decode_seq(raw: bytes) -> int:
    if len(raw) != 8:
        raise MalformedBatch(f"sequence number of {len(raw)} bytes, not 8")
    return int.from_bytes(raw, "big", signed=True)


def decode_batch(payload: bytes) -> Batch:
    """One batch; raises `MalformedBatch` when the payload is not one at all."""
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise MalformedBatch(f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise MalformedBatch("not a [timestamp, events, ...] array")
    timestamp = batch[0]
    if not isinstance(timestamp, (int, float)) or isinstance(timestamp, bool):
        raise MalformedBatch("timestamp is not a number")
    events: list[Event] = []
    skipped: list[str] = []
    for raw in batch[1]:
        try:
            event = _event(raw)
        except ValueError as exc:
            skipped.append(str(exc))
            continue
        if event is not None:
            events.append(event)
    return Batch(float(timestamp), events, skipped)


def _event(raw: Any) -> Event | None:
    """The event, None for one the router has no use for, or ValueError."""
    if isinstance(raw, list) and raw and isinstance(raw[0], str):
        raise ValueError(f"{raw[0][:40]!r} as an array (vLLM before maps): not supported")
    if not isinstance(raw, dict):
        raise ValueError("event is not a map")
    kind = raw.get("type")
    if kind == "AllBlocksCleared":
        return Cleared()
    if kind not in ("BlockStored", "BlockRemoved"):
        raise ValueError(f"unknown event type {str(kind)[:40]!r}")
    if raw.get("group_idx") not in (None, 0) or raw.get("medium") not in (None, "GPU"):
        # Other KV cache groups (hybrid models) and offload tiers: the first group's device
        # cache is what a prefill reuses at once.
        return None
    hashes = _hashes(raw.get("block_hashes"))
    if kind == "BlockRemoved":
        return Removed(hashes)
    block_size = raw.get("block_size")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or not 0 < block_size:
        raise ValueError("BlockStored without a positive block_size")
    tokens = raw.get("token_ids")
    if not isinstance(tokens, list) or len(tokens) != len(hashes) * block_size:
        raise ValueError("BlockStored token_ids do not fill its blocks")
    if not are_token_ids(tokens):
        raise ValueError("BlockStored token_ids are not all integers")
    parent = raw.get("parent_block_hash")
    if parent is not None and not _is_hash(parent):
        raise ValueError("BlockStored parent_block_hash is not a hash")
    lora_name = raw.get("lora_name")
    lora = _key(lora_name) if lora_name is not None else None
    return Stored(hashes, parent, tokens, block_size,
                  _extra_keys(raw.get("extra_keys"), lora, len(hashes)), lora)


def _is_hash(value: Any) -> bool:
    return (type(value) is int) or (isinstance(value, bytes) and 0 < len(value) <= 64)


def _hashes(value: Any) -> list[BlockHash]:
    if not isinstance(value, list) or not value:
        raise ValueError("block_hashes is not a non-empty list")
    if len(value) > MAX_BLOCKS_PER_EVENT:
        raise ValueError(f"{len(value)} blocks in one event")
    if not all(_is_hash(item) for item in value):
        raise ValueError("block_hashes holds something else than hashes")
    return value


def _extra_keys(value: Any, lora: str | None, count: int) -> list[tuple[str, ...] | None]:
    if value is None:
        # Publishers before `extra_keys`: the LoRA name applies to every block.
        return [(lora,) if lora else None] * count
    if not isinstance(value, list) or len(value) != count:
        raise ValueError("extra_keys is not one entry per block")
    keys: list[tuple[str, ...] | None] = []
    for entry in value:
        if entry is None or entry == []:
            keys.append(None)
        elif isinstance(entry, list) and all(isinstance(item, str) for item in entry):
            keys.append(tuple(_key(item) for item in entry))
        else:  # multimodal (identifier, offset) pairs, prompt-embeds digests
            keys.append(UNMATCHABLE)
    return keys


def _key(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_KEY_CHARS:
        raise ValueError("a LoRA name or cache salt that is not a short string")
    return value
