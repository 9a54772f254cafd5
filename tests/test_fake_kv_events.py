"""The fake engine's KV cache events: vLLM's wire format, its cache behaviour (hits, duplicate
recomputed blocks, LRU eviction), replay, restarts and the test hooks, over real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio

from router.testing import KvEventsOptions, RunningEngine, start_engine
from router.testing.engine.kv_events import (
    BlockCache,
    LoraAdapter,
    Prefill,
    all_blocks_cleared,
    block_removed,
    block_stored,
    encode_batch,
)
from router.testing.engine.state import ENGINE_CONFIG
from tests.conftest import CHAT, MODELS

LORA = "chat-lora"
BLOCK = 4
TIMEOUT = 2.0

StartKvEngine = Callable[..., Awaitable[RunningEngine]]


@pytest.fixture
async def start_kv_engine() -> AsyncIterator[StartKvEngine]:
    started: list[RunningEngine] = []

    async def start(**options: Any) -> RunningEngine:
        engine = await start_engine(
            (*MODELS, LORA), kv_events=KvEventsOptions(block_size=BLOCK, **options))
        engine.app[ENGINE_CONFIG].lora_parents[LORA] = CHAT
        started.append(engine)
        return engine

    yield start
    for engine in started:
        await engine.close()


@pytest.fixture
async def kv_engine(start_kv_engine: StartKvEngine) -> RunningEngine:
    return await start_kv_engine()


@pytest.fixture
async def zmq_context() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def subscribe(context: zmq.asyncio.Context, engine: RunningEngine) -> zmq.asyncio.Socket:
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.subscribe(b"kv")
    sub.connect(engine.kv_events.publisher.endpoint)
    await engine.kv_events.publisher.wait_for_subscribers()
    return sub


async def next_batch(sub: zmq.asyncio.Socket) -> tuple[int, list[dict[str, Any]]]:
    """The next message, checked for vLLM's framing: its sequence number and events."""
    frames = await asyncio.wait_for(sub.recv_multipart(), TIMEOUT)
    assert len(frames) == 3 and frames[0] == b"kv" and len(frames[1]) == 8
    ts, events, rank = msgpack.unpackb(frames[2])
    assert isinstance(ts, float) and rank == 0
    return int.from_bytes(frames[1], "big"), events


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with session.post(url, json=body) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def chat(session: aiohttp.ClientSession, engine: RunningEngine,
               messages: list[dict[str, str]], **extra: Any) -> None:
    await post(session, engine.url + "/v1/chat/completions",
               {"model": CHAT, "messages": messages, "max_tokens": 1, **extra})


async def complete(session: aiohttp.ClientSession, engine: RunningEngine, prompt: str,
                   **extra: Any) -> None:
    await post(session, engine.url + "/v1/completions",
               {"model": CHAT, "prompt": prompt, "max_tokens": 1, **extra})


async def prefix_counters(session: aiohttp.ClientSession, engine: RunningEngine
                          ) -> tuple[float, float]:
    async with session.get(engine.url + "/metrics") as response:
        text = await response.text()
    values = {}
    for line in text.splitlines():
        if line.startswith("vllm:prefix_cache_"):
            name, value = line.split("{", 1)[0], line.rsplit(" ", 1)[1]
            assert name not in values, "one sample per family"
            values[name] = float(value)
    return values["vllm:prefix_cache_queries_total"], values["vllm:prefix_cache_hits_total"]


QUESTION = [{"role": "user", "content": "What is a KV cache, and why route by it?"}]
FOLLOW_UP = [*QUESTION, {"role": "assistant", "content": "It holds attention state."},
             {"role": "user", "content": "Show me."}]


async def test_chat_publishes_its_prompt_blocks_as_tokenize_renders_them(
    kv_engine: RunningEngine, zmq_context: zmq.asyncio.Context,
    session: aiohttp.ClientSession,
) -> None:
    sub = await subscribe(zmq_context, kv_engine)
    tokens = (await post(session, kv_engine.url + "/tokenize",
                         {"model": CHAT, "messages": QUESTION}))["tokens"]
    await chat(session, kv_engine, QUESTION)
    seq, events = await next_batch(sub)
    full = len(tokens) // BLOCK
    assert seq == 0 and len(events) == 1
    first = events[0]
    assert first == {
        "type": "BlockStored", "block_hashes": first["block_hashes"], "parent_block_hash": None,
        "token_ids": tokens[:full * BLOCK], "block_size": BLOCK, "lora_id": None,
        "medium": "GPU", "lora_name": None, "extra_keys": [None] * full, "group_idx": 0,
    }
    assert len(set(first["block_hashes"])) == full
    assert all(0 <= h < 2**64 for h in first["block_hashes"])

    # A longer conversation hits the first prompt's blocks and chains its new ones to them.
    longer = (await post(session, kv_engine.url + "/tokenize",
                         {"model": CHAT, "messages": FOLLOW_UP}))["tokens"]
    await chat(session, kv_engine, FOLLOW_UP)
    seq, events = await next_batch(sub)
    assert seq == 1 and [event["type"] for event in events] == ["BlockStored"]
    assert events[0]["parent_block_hash"] == first["block_hashes"][-1]
    assert events[0]["token_ids"] == longer[full * BLOCK:len(longer) // BLOCK * BLOCK]
    assert await prefix_counters(session, kv_engine) == (
        len(tokens) + len(longer), full * BLOCK)


async def test_repeated_prompts_hit_and_a_recomputed_last_block_is_stored_again(
    kv_engine: RunningEngine, zmq_context: zmq.asyncio.Context,
    session: aiohttp.ClientSession,
) -> None:
    kv_engine.behaviour.prefix_cache = True  # synthetic counters: replaced by the real ones
    sub = await subscribe(zmq_context, kv_engine)
    await complete(session, kv_engine, "0123456789")  # 10 tokens: 2 full blocks
    _, [stored] = await next_batch(sub)
    await complete(session, kv_engine, "0123456789")  # both blocks hit: nothing to publish
    assert await prefix_counters(session, kv_engine) == (20, 8)

    # 8 tokens: at most (8 - 1) // 4 = 1 block may hit, as in vLLM, so the second block is
    # computed again and stored a second time under the same hash.
    await complete(session, kv_engine, "01234567")
    seq, events = await next_batch(sub)
    assert seq == 1
    assert events == [block_stored(stored["block_hashes"][1:], stored["block_hashes"][0],
                                   list(b"4567"), BLOCK, [None])]
    assert await prefix_counters(session, kv_engine) == (28, 12)

    # Asked for (`kv_cache_report_mode: "full"`), hits are published too, from the first block.
    await complete(session, kv_engine, "0123456789",
                   vllm_xargs={"kv_cache_report_mode": "full"})
    _, events = await next_batch(sub)
    assert events == [block_stored(stored["block_hashes"], None, list(b"01234567"), BLOCK,
                                   [None, None])]


async def test_eviction_removes_the_least_recent_blocks_tail_first(
    start_kv_engine: StartKvEngine, zmq_context: zmq.asyncio.Context,
    session: aiohttp.ClientSession,
) -> None:
    engine = await start_kv_engine(cache_blocks=4)
    sub = await subscribe(zmq_context, engine)
    await complete(session, engine, "aaaaaaaa")
    _, [a] = await next_batch(sub)
    await complete(session, engine, "bbbbbbbbb")
    _, [b] = await next_batch(sub)
    await complete(session, engine, "ccccccccc")
    _, events = await next_batch(sub)
    a1, a2 = a["block_hashes"]
    assert events[:2] == [block_removed(a2), block_removed(a1)]
    assert [event["type"] for event in events[2:]] == ["BlockStored"]
    assert len(engine.kv_events.cache) == 4 and a1 not in engine.kv_events.cache
    await complete(session, engine, "aaaaaaaa")  # evicted: a miss that evicts b
    _, events = await next_batch(sub)
    assert events[:2] == [block_removed(h) for h in reversed(b["block_hashes"])]
    assert events[2]["block_hashes"] == a["block_hashes"]
    assert await prefix_counters(session, engine) == (34, 0)


async def test_replay_returns_buffered_batches_then_the_end_marker(
    start_kv_engine: StartKvEngine, zmq_context: zmq.asyncio.Context,
    session: aiohttp.ClientSession,
) -> None:
    engine = await start_kv_engine(buffer_steps=3)
    publisher = engine.kv_events.publisher
    sub = await subscribe(zmq_context, engine)
    for prompt in ("first...", "second..", "third..."):
        await complete(session, engine, prompt)
        await next_batch(sub)
    lost = await publisher.publish([all_blocks_cleared()], live=False)  # replay only
    assert lost == 3 and publisher.next_seq == 4

    dealer = zmq_context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(publisher.replay_endpoint)

    async def replay(start: int) -> list[tuple[int, bytes]]:
        await dealer.send_multipart([b"", start.to_bytes(8, "big")])
        answers: list[tuple[int, bytes]] = []
        while True:
            frames = await asyncio.wait_for(dealer.recv_multipart(), TIMEOUT)
            assert len(frames) == 4 and frames[0] == b""
            seq = int.from_bytes(frames[2], "big", signed=True)
            if seq == -1:
                assert frames[1] == b"" and frames[3] == b""
                return answers
            assert frames[1] == b"kv"
            answers.append((seq, frames[3]))

    answers = await replay(2)
    assert [seq for seq, _ in answers] == [2, 3]
    assert msgpack.unpackb(answers[1][1])[1] == [{"type": "AllBlocksCleared"}]
    assert [seq for seq, _ in await replay(0)] == [1, 2, 3]  # 3 batches kept: seq 0 is gone
    assert await replay(9) == []
    await dealer.send_multipart([b"not", b"a", b"request"])  # ignored, as vLLM does
    assert [seq for seq, _ in await replay(3)] == [3]


async def test_restart_starts_the_sequence_and_the_cache_again(
    kv_engine: RunningEngine, zmq_context: zmq.asyncio.Context,
    session: aiohttp.ClientSession,
) -> None:
    publisher = kv_engine.kv_events.publisher
    ports = publisher.port, publisher.replay_port
    sub = await subscribe(zmq_context, kv_engine)
    await complete(session, kv_engine, "restart me")
    await complete(session, kv_engine, "restart me")
    seq, first = await next_batch(sub)
    assert seq == 0 and await prefix_counters(session, kv_engine) == (20, 8)

    await kv_engine.kv_events.restart()
    assert (publisher.port, publisher.replay_port) == ports and publisher.next_seq == 0
    # The same SUB socket reconnects by itself, but sends its subscription again only while
    # something waits on it (ZMQ handles the reconnection inside the socket's calls).
    receiving = asyncio.create_task(next_batch(sub))
    await publisher.wait_for_subscribers()
    await complete(session, kv_engine, "restart me")
    seq, events = await receiving
    assert seq == 0 and events == first  # the same hashes, stored again
    assert await prefix_counters(session, kv_engine) == (10, 0)


async def test_reset_prefix_cache_clears_all_blocks(
    kv_engine: RunningEngine, zmq_context: zmq.asyncio.Context,
    session: aiohttp.ClientSession,
) -> None:
    sub = await subscribe(zmq_context, kv_engine)
    await complete(session, kv_engine, "cached prompt")
    await next_batch(sub)
    assert await post(session, kv_engine.url + "/reset_prefix_cache", {}) == {"success": True}
    assert await next_batch(sub) == (1, [{"type": "AllBlocksCleared"}])
    await complete(session, kv_engine, "cached prompt")
    seq, [stored] = await next_batch(sub)
    assert seq == 2 and stored["parent_block_hash"] is None
    assert await prefix_counters(session, kv_engine) == (26, 0)


async def test_kv_event_sources_as_vllm_answers(
    kv_engine: RunningEngine, engine: RunningEngine, session: aiohttp.ClientSession,
) -> None:
    publisher = kv_engine.kv_events.publisher
    async with session.get(kv_engine.url + "/kv_event_sources") as response:
        assert await response.json() == {"0": {
            "enable_kv_cache_events": True, "publisher": "zmq",
            "endpoint": f"tcp://*:{publisher.port}",
            "replay_endpoint": f"tcp://*:{publisher.replay_port}",
            "buffer_steps": 10_000, "hwm": 100_000, "max_queue_size": 100_000, "topic": "kv",
        }}
    async with session.get(engine.url + "/kv_event_sources") as response:  # events off
        assert await response.json() == {}
    with pytest.raises(RuntimeError):
        engine.kv_events


async def test_salt_and_lora_key_the_blocks(
    kv_engine: RunningEngine, zmq_context: zmq.asyncio.Context,
    session: aiohttp.ClientSession,
) -> None:
    sub = await subscribe(zmq_context, kv_engine)
    await complete(session, kv_engine, "same text")
    _, [plain] = await next_batch(sub)
    await complete(session, kv_engine, "same text", cache_salt="tenant-a")
    _, [salted] = await next_batch(sub)
    assert salted["extra_keys"] == [["tenant-a"], None]
    assert not set(salted["block_hashes"]) & set(plain["block_hashes"])
    await post(session, kv_engine.url + "/v1/completions",
               {"model": LORA, "prompt": "same text", "max_tokens": 1, "cache_salt": "s"})
    _, [lora] = await next_batch(sub)
    assert (lora["lora_name"], lora["lora_id"]) == (LORA, 3)
    assert lora["extra_keys"] == [[LORA, "s"], [LORA]]
    assert not set(lora["block_hashes"]) & set(salted["block_hashes"])


async def test_refused_requests_leave_the_cache_alone(
    kv_engine: RunningEngine, session: aiohttp.ClientSession,
) -> None:
    kv_engine.behaviour.fail_status = 503
    async with session.post(kv_engine.url + "/v1/completions",
                            json={"prompt": "never prefilled"}) as response:
        assert response.status == 503
    kv_engine.behaviour.fail_status = None
    async with session.post(kv_engine.url + "/v1/completions",
                            json={"model": "no-such-model", "prompt": "x" * 9}) as response:
        assert response.status == 404
    assert await prefix_counters(session, kv_engine) == (0, 0)
    assert kv_engine.kv_events.publisher.next_seq == 0


async def test_malformed_messages_for_robustness_tests(
    kv_engine: RunningEngine, zmq_context: zmq.asyncio.Context,
) -> None:
    publisher = kv_engine.kv_events.publisher
    sub = await subscribe(zmq_context, kv_engine)
    await publisher.publish_raw(b"kv", b"two frames only")
    assert await asyncio.wait_for(sub.recv_multipart(), TIMEOUT) == [b"kv", b"two frames only"]
    assert await publisher.publish_payload(b"\xc1 not msgpack") == 0
    frames = await asyncio.wait_for(sub.recv_multipart(), TIMEOUT)
    assert frames == [b"kv", (0).to_bytes(8, "big"), b"\xc1 not msgpack"]
    await publisher.publish([{"type": "BlockMoved", "block_hashes": [1]}])
    assert await next_batch(sub) == (1, [{"type": "BlockMoved", "block_hashes": [1]}])


async def test_cleanup_closes_sockets_and_tasks(start_kv_engine: StartKvEngine) -> None:
    engine = await start_kv_engine()
    await engine.close()
    names = {task.get_name() for task in asyncio.all_tasks()}
    assert not {"kv-events-replay", "kv-events-subscriptions"} & names
    with pytest.raises(RuntimeError):
        await engine.kv_events.publisher.publish([])


# What vLLM 0.32's msgspec encoder wrote for the same batch (`KVEventBatch` with these
# `BlockStored`, `BlockRemoved` and `AllBlocksCleared`), captured once from the real class.
VLLM_BATCH = bytes.fromhex(
    "93cb41d954fc40100000948aa474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657392"
    "cfffffffffffffffff05b1706172656e745f626c6f636b5f6861736807a9746f6b656e5f69647394686900"
    "ccffaa626c6f636b5f73697a6502a76c6f72615f696402a66d656469756da3475055a96c6f72615f6e616d"
    "65a26164aa65787472615f6b6579739292a26164a473616c7491a26164a967726f75705f696478008aa474"
    "797065ab426c6f636b53746f726564ac626c6f636b5f6861736865739109b1706172656e745f626c6f636b"
    "5f68617368c0a9746f6b656e5f696473920102aa626c6f636b5f73697a6502a76c6f72615f6964c0a66d65"
    "6469756da3475055a96c6f72615f6e616d65c0aa65787472615f6b65797391c0a967726f75705f69647800"
    "84a474797065ac426c6f636b52656d6f766564ac626c6f636b5f68617368657391cfffffffffffffffffa6"
    "6d656469756da3475055a967726f75705f6964780081a474797065b0416c6c426c6f636b73436c65617265"
    "6400"
)


def test_batches_are_byte_for_byte_what_vllm_sends() -> None:
    lora = LoraAdapter(name="ad", id=2, path="/adapters/ad")
    events = [
        block_stored([2**64 - 1, 5], 7, [104, 105, 0, 255], 2, [["ad", "salt"], ["ad"]], lora),
        block_stored([9], None, [1, 2], 2, [None]),
        block_removed(2**64 - 1),
        all_blocks_cleared(),
    ]
    assert encode_batch(events, ts=1700000000.25) == VLLM_BATCH


def test_a_prompt_larger_than_the_cache_keeps_its_head() -> None:
    cache = BlockCache(block_size=2, capacity=2)
    result = cache.prefill(Prefill(list(range(7))))
    assert len(cache) == 2 and result.hit_tokens == 0
    [stored] = result.events
    assert stored["token_ids"] == [0, 1, 2, 3]
    assert stored["block_hashes"] == cache.block_hashes(Prefill(list(range(7))))[:2]
