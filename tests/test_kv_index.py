"""The KV cache index and the kvaware policy, fed with batches packed the way vLLM publishes
them (msgpack maps), without sockets: decoding, hashing, bounds, the score and stickiness."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import msgpack
import pytest

from router.backends.pool import Backend
from router.kvcache.events import MalformedBatch, Removed, Stored, decode_batch
from router.kvcache.feeds import EventSource, event_sources
from router.kvcache.index import KvIndex, prompt_hashes
from router.kvcache.state import KvCache
from router.policies import PolicyContext
from router.policies.kvaware import KvAware, PromptBlocks
from router.proxy.inbound import InboundRequest

from .test_policies import chat, make_backends, make_context, make_request, set_in_flight

BLOCK = 4


def stored(tokens: list[int], hashes: list[int], parent: int | None = None,
           **extra: Any) -> dict[str, Any]:
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
            "token_ids": tokens, "block_size": BLOCK, "lora_id": None, "medium": "GPU",
            "lora_name": None, **extra}


def batch(*events: Any, ts: float = 0.0) -> bytes:
    return bytes(msgpack.packb([ts, list(events), 0]))


def store_prompt(index: KvIndex, backend_id: str, tokens: list[int], *, lora: str | None = None,
                 salt: str | None = None, first_hash: int = 1000, rank: int = 0) -> list[int]:
    """Publish `tokens`' full blocks as one engine stores them; the engine hashes used."""
    count = len(tokens) // BLOCK
    hashes = [first_hash + n for n in range(count)]
    extra = [[k for k in ((lora,) if lora else ()) + ((salt,) if salt and n == 0 else ())]
             or None for n in range(count)]
    index.apply(backend_id, rank, decode_batch(batch(stored(
        tokens[: count * BLOCK], hashes, extra_keys=extra, lora_name=lora))))
    return hashes


def test_a_batch_decodes_to_its_events_and_bad_events_are_skipped() -> None:
    decoded = decode_batch(batch(
        stored(list(range(8)), [1, 2]),
        {"type": "BlockRemoved", "block_hashes": [2], "medium": "GPU"},
        {"type": "Mystery"},
        stored(list(range(7)), [1, 2]),  # tokens do not fill the blocks
        ["BlockStored", [1], None],  # the array shape of old vLLM
        stored([1, 2, 3, "x"], [3]),
        {"type": "BlockStored", "block_hashes": list(range(70_000)), "block_size": 1},
        stored(list(range(4)), [9], medium="CPU"),  # an offload tier: not a prefill hit
    ))
    assert [type(event) for event in decoded.events] == [Stored, Removed]
    assert len(decoded.skipped) == 5


@pytest.mark.parametrize("payload", [b"", b"\xc1", bytes(msgpack.packb({"a": 1})),
                                     bytes(msgpack.packb([0.0, "events"])),
                                     bytes(msgpack.packb(["now", []]))])
def test_a_payload_that_is_no_batch_is_refused(payload: bytes) -> None:
    with pytest.raises(MalformedBatch):
        decode_batch(payload)


def test_stored_blocks_match_the_prompt_hashes_in_a_row() -> None:
    index = KvIndex(1000)
    tokens = list(range(100, 122))  # 5 full blocks of 4, and 2 tokens over
    store_prompt(index, "a", tokens)
    assert index.matched_blocks("a", prompt_hashes(tokens, BLOCK)) == 5
    assert index.matched_blocks("a", prompt_hashes(tokens[:9] + [7] * 12, BLOCK)) == 2
    assert index.matched_blocks("b", prompt_hashes(tokens, BLOCK)) == 0
    # The same tokens shifted by one fall on other block boundaries: no match.
    assert index.matched_blocks("a", prompt_hashes([0] + tokens, BLOCK)) == 0


def test_a_child_batch_chains_on_its_parent_and_an_unknown_parent_is_skipped() -> None:
    index = KvIndex(1000)
    tokens = list(range(16))
    index.apply("a", 0, decode_batch(batch(stored(tokens[:8], [11, 12]))))
    index.apply("a", 0, decode_batch(batch(stored(tokens[8:], [13, 14], parent=12))))
    assert index.matched_blocks("a", prompt_hashes(tokens, BLOCK)) == 4
    index.apply("b", 0, decode_batch(batch(stored(tokens[8:], [13, 14], parent=12))))
    assert index.engines["b"].orphans == 1 and len(index.engines["b"]) == 0


def test_removals_and_a_reset_take_blocks_away() -> None:
    index = KvIndex(1000)
    tokens = list(range(16))
    hashes = store_prompt(index, "a", tokens)
    index.apply("a", 0, decode_batch(batch(
        {"type": "BlockRemoved", "block_hashes": [hashes[2]], "medium": "GPU"})))
    assert index.matched_blocks("a", prompt_hashes(tokens, BLOCK)) == 2
    index.apply("a", 0, decode_batch(batch({"type": "AllBlocksCleared"})))
    assert index.matched_blocks("a", prompt_hashes(tokens, BLOCK)) == 0
    assert index.blocks == 0


def test_a_block_stored_twice_stays_until_both_copies_are_removed() -> None:
    index = KvIndex(1000)
    tokens = list(range(8))
    store_prompt(index, "a", tokens)
    store_prompt(index, "a", tokens)  # vLLM computed the last block again and kept both
    removal = {"type": "BlockRemoved", "block_hashes": [1001], "medium": "GPU"}
    index.apply("a", 0, decode_batch(batch(removal)))
    assert index.matched_blocks("a", prompt_hashes(tokens, BLOCK)) == 2
    index.apply("a", 0, decode_batch(batch(removal)))
    assert index.matched_blocks("a", prompt_hashes(tokens, BLOCK)) == 1
    assert index.blocks == 1


def test_lora_and_cache_salt_keep_the_same_tokens_apart() -> None:
    index = KvIndex(1000)
    tokens = list(range(12))
    store_prompt(index, "a", tokens, salt="tenant-a")
    store_prompt(index, "b", tokens, lora="sql-adapter", first_hash=2000)
    assert index.matched_blocks("a", prompt_hashes(tokens, BLOCK, salt="tenant-a")) == 3
    assert index.matched_blocks("a", prompt_hashes(tokens, BLOCK, salt="tenant-b")) == 0
    assert index.matched_blocks("a", prompt_hashes(tokens, BLOCK)) == 0
    assert index.matched_blocks("b", prompt_hashes(tokens, BLOCK, lora="sql-adapter")) == 3
    assert index.matched_blocks("b", prompt_hashes(tokens, BLOCK)) == 0
    assert index.lora_names == {"sql-adapter"}


def test_the_index_stays_within_its_bound_taking_from_the_busiest_engine() -> None:
    index = KvIndex(max_blocks=50)
    for n in range(30):
        store_prompt(index, "a", [n] * 8, first_hash=10 * n)
    store_prompt(index, "b", list(range(8)), first_hash=5000)
    assert index.blocks == 50 and len(index.engines["b"]) == 2
    assert index.trimmed == 12
    index.forget("a")
    assert index.blocks == 2 and "a" not in index.engines


# --- the policy ---------------------------------------------------------------------------

def kv_context(**settings: Any) -> PolicyContext:
    base = make_context(**settings)
    return PolicyContext(base.config, base.stats, base.engines, KvCache(KvIndex(100_000)))


def prepared(body: dict[str, Any], tokens: list[int],
             headers: dict[str, str] | None = None) -> InboundRequest:
    request = make_request(body, headers)
    request.prepared = PromptBlocks(tokens, None, None)
    return request


def test_the_engine_holding_the_prompt_wins_until_it_is_busy_enough() -> None:
    context = kv_context(load_cost_tokens=10.0)
    assert context.kv is not None
    backends = make_backends(3)
    tokens = list(range(400))  # 100 blocks
    store_prompt(context.kv.index, backends[1].id, tokens)
    policy = KvAware(context)
    request = prepared(chat("hi"), tokens)
    assert policy.choose(request, backends) is backends[1]
    set_in_flight(context, backends[1], 39)  # 400 cached tokens = 40 requests of load
    assert policy.choose(request, backends) is backends[1]
    set_in_flight(context, backends[1], 41)
    assert policy.choose(request, backends) is not backends[1]
    predicted = context.kv.predicted[backends[1].id]
    # All but the last block: the engine always computes the last token.
    assert (predicted.cached_tokens, predicted.prompt_tokens) == (792, 800)


def test_ties_spread_new_prompts_and_two_replicas_break_them_alike() -> None:
    backends = make_backends(3)
    replicas = []
    for _ in range(2):
        context = kv_context()
        assert context.kv is not None
        store_prompt(context.kv.index, backends[0].id, [9] * 8)  # events seen: tokens used
        replicas.append(KvAware(context))
    rng = random.Random(7)
    prompts = [[rng.randrange(1000) for _ in range(40)] for _ in range(300)]
    first = [replicas[0].choose(prepared(chat("x"), p), backends).id for p in prompts]
    second = [replicas[1].choose(prepared(chat("x"), p), backends).id for p in prompts]
    assert first == second
    assert min(Counter(first).values()) > 60


def test_a_session_stays_home_until_home_is_overloaded() -> None:
    context = kv_context(load_cost_tokens=10.0)
    assert context.kv is not None
    backends = make_backends(3)
    policy = KvAware(context)
    headers = {"x-session-id": "conversation-42"}
    tokens = list(range(40))
    home = policy.choose(prepared(chat("hi"), tokens, headers), backends)
    others = [b for b in backends if b is not home]
    store_prompt(context.kv.index, others[0].id, [7] * 8)  # events seen, not this prompt
    # Home counts as holding the 40 tokens, plus a request's worth: 5 requests at 10 each.
    set_in_flight(context, home, 4)
    assert policy.choose(prepared(chat("hi"), tokens, headers), backends) is home
    set_in_flight(context, home, 6)
    assert policy.choose(prepared(chat("hi"), tokens, headers), backends) is not home
    # Another engine holding the whole prompt: home keeps it while at most as busy.
    store_prompt(context.kv.index, others[1].id, tokens)
    set_in_flight(context, home, 0)
    assert policy.choose(prepared(chat("hi"), tokens, headers), backends) is home
    set_in_flight(context, home, 2)
    assert policy.choose(prepared(chat("hi"), tokens, headers), backends) is others[1]
    # Home unhealthy: it is no candidate, and the session goes to the ring's next engine.
    rest = [b for b in backends if b is not home]
    assert policy.choose(prepared(chat("hi"), tokens, headers), rest) in rest


def test_without_events_the_policy_routes_on_the_prompts_it_saw() -> None:
    context = kv_context()
    backends = make_backends(4)
    policy = KvAware(context)
    turns = [f"turn {n}: " + "some words of this conversation " * 10 for n in range(8)]
    chosen = {policy.choose(make_request(chat(*turns[: n + 1])), backends).id
              for n in range(len(turns))}
    assert len(chosen) == 1
    assert "KvAware" in repr(policy)


def test_a_removed_backend_takes_its_blocks_along() -> None:
    context = kv_context()
    assert context.kv is not None
    backend = Backend(url="http://10.0.0.9:8000", models=("m",))
    store_prompt(context.kv.index, backend.id, list(range(8)))
    KvAware(context).forget_backend(backend.id)
    assert context.kv.index.blocks == 0


def test_the_event_sources_an_engine_names_are_reached_at_its_host() -> None:
    answer = {
        "0": {"enable_kv_cache_events": True, "publisher": "zmq", "topic": "kv",
              "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"},
        "1": {"enable_kv_cache_events": True, "publisher": "zmq", "topic": "kv",
              "endpoint": "tcp://10.1.2.3:5560", "replay_endpoint": None},
        "2": {"enable_kv_cache_events": False, "endpoint": "tcp://*:5561"},
        "3": {"publisher": "null", "endpoint": "tcp://*:5562"},
        "4": {"endpoint": "ipc:///tmp/kv"},
    }
    assert event_sources(answer, "10.0.0.7") == [
        EventSource(0, "tcp://10.0.0.7:5557", "tcp://10.0.0.7:5558", "kv", True),
        EventSource(1, "tcp://10.1.2.3:5560", None, "kv", False),  # vLLM connects out there
    ]
    assert event_sources(answer, "fd00::7")[0].endpoint == "tcp://[fd00::7]:5557"
    assert event_sources([], "h") == [] and event_sources({}, "h") == []


async def test_tokens_that_are_no_token_ids_leave_the_request_to_load() -> None:
    context = kv_context()
    assert context.kv is not None
    backends = make_backends(2)
    store_prompt(context.kv.index, backends[0].id, list(range(8)))

    class Answers:  # what a broken or hostile engine's /tokenize could give
        def __init__(self, tokens: list[Any]) -> None:
            self.tokens_answer = tokens

        async def tokens(self, *args: Any) -> list[Any]:
            return self.tokens_answer

    policy = KvAware(context)
    for tokens in ([[1], [2], [3], [4]] * 2, [{"a": 1}] * 8):
        context.kv.tokens = Answers(tokens)  # type: ignore[assignment]
        request = make_request(chat("hi"))
        await policy.prepare(request, backends, "/v1/chat/completions")
        assert request.prepared is None
        assert policy.choose(request, backends) in backends
    context.kv.tokens = Answers([0, 1, 2, 3, "x", 5, 6, 7.0])  # type: ignore[assignment]
    request = make_request(chat("hi"))
    await policy.prepare(request, backends, "/v1/chat/completions")
    assert policy.choose(request, backends) in backends
