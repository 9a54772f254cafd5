"""kvaware end to end: the router in front of fake engines that publish vLLM's KV cache
events (ZMQ on loopback), judged by the engines' own prefix-cache counters."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from collections import Counter
from typing import Any

import aiohttp
import pytest

from router.backends.pool import Backend, BackendPool
from router.keys import KV_CACHE, POOL
from router.kvcache import feeds as feeds_module
from router.kvcache.events import Batch
from router.kvcache.feeds import FeedStats, KvEventFeeds
from router.kvcache.index import KvIndex
from router.testing import KvEventsOptions, RunningEngine, start_engine

from .conftest import CHAT, MODELS, RouterUnderTest, StartRouter, config_for, eventually

BLOCK = 16
CACHE_BLOCKS = 240
"""Per engine: room for a third of the conversations (12 of about 48 blocks at their last
turn) and some more, not for all of them: where a conversation goes matters."""
SYSTEM = "You answer questions about the weather, briefly and with care. "


@pytest.fixture
async def kv_engines() -> AsyncIterator[list[RunningEngine]]:
    started = [await start_engine(MODELS, name=f"kv-engine-{n}",
                                  kv_events=KvEventsOptions(block_size=BLOCK,
                                                            cache_blocks=CACHE_BLOCKS))
               for n in range(3)]
    yield started
    for engine in started:
        await engine.close()


async def kv_router(start_router: StartRouter, engines: list[RunningEngine],
                    **settings: Any) -> RouterUnderTest:
    router = await start_router(config_for(engines, routing_logic="kvaware",
                                           health_check_interval=0, **settings))
    for engine in engines:  # every stream subscribed before the first request
        await engine.kv_events.publisher.wait_for_subscribers(timeout=10)
    await synced(router)
    return router


async def synced(router: RouterUnderTest) -> None:
    """Until the router has read every engine's replay buffer (its first sync)."""
    feeds = router.app[KV_CACHE].feeds
    assert feeds is not None
    await eventually(lambda: len(feeds.stats) == len(router.app[POOL].backends)
                     and all(stats.synced for stats in feeds.stats.values()), timeout=10)


async def chat(session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]],
               **extra: Any) -> str:
    body = {"model": CHAT, "messages": messages, "max_tokens": 8, **extra}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        await response.read()
        return response.headers["x-router-backend"]


def hit_rate(engines: list[RunningEngine]) -> float:
    """The fleet's share of prompt tokens served from cache, by the engines' own counts."""
    queries = sum(engine.kv_events.queries for engine in engines)
    return sum(engine.kv_events.hits for engine in engines) / max(1, queries)


def history_of(n: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Conversation {n}: will it rain in city {n}? " * 3}]


def next_turn(n: int) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": f"tok0 tok1 tok2 tok3 tok4 tok5 and {n} more"},
            {"role": "user", "content": f"And the day after, in city {n}, and the next? " * 2}]


async def conversations(session: aiohttp.ClientSession, urls: list[str], count: int,
                        turns: int, seed: int = 3, at_once: bool = True) -> list[list[str]]:
    """`count` chats of `turns` turns, each turn sent to a random router URL; the backend of
    every turn, per conversation. `at_once`: all under way together (each sends its next turn
    when the last answer came back), else one request at a time, turns interleaved."""
    rng = random.Random(seed)
    if not at_once:
        histories = [history_of(n) for n in range(count)]
        served: list[list[str]] = [[] for _ in range(count)]
        for _ in range(turns):
            for n in rng.sample(range(count), count):
                served[n].append(await chat(session, rng.choice(urls), histories[n]))
                histories[n] += next_turn(n)
        return served

    async def one(n: int) -> list[str]:
        history = history_of(n)
        backends = []
        for _ in range(turns):
            await asyncio.sleep(rng.random() * 0.01)  # users think for different times
            backends.append(await chat(session, rng.choice(urls), history))
            history += next_turn(n)
        return backends

    return list(await asyncio.gather(*(one(n) for n in range(count))))


async def test_conversations_stay_where_their_cache_is(
    start_router: StartRouter, kv_engines: list[RunningEngine],
) -> None:
    router = await kv_router(start_router, kv_engines)
    async with aiohttp.ClientSession() as session:
        served = await conversations(session, [router.url], count=12, turns=5)
    shares = Counter(backend for backends in served for backend in backends)
    moved = sum(len(set(backends)) > 1 for backends in served)
    rate = hit_rate(kv_engines)
    print(f"\nkvaware fleet hit rate {rate:.3f}, requests per engine {sorted(shares.values())}, "
          f"conversations that moved {moved}")
    assert rate > 0.55
    assert len(shares) == 3 and max(shares.values()) <= 0.5 * 60
    kv = router.app[KV_CACHE]
    assert sum(p.requests for p in kv.predicted.values()) >= 12 * 4
    await router.settled(60)


async def test_roundrobin_is_the_baseline_the_hit_rate_beats(
    start_router: StartRouter, kv_engines: list[RunningEngine],
) -> None:
    router = await start_router(config_for(kv_engines, health_check_interval=0))
    async with aiohttp.ClientSession() as session:
        await conversations(session, [router.url], count=12, turns=5)
    rate = hit_rate(kv_engines)
    print(f"\nroundrobin fleet hit rate {rate:.3f}")
    assert rate < 0.5


async def test_two_replicas_route_alike_without_talking(
    start_router: StartRouter, kv_engines: list[RunningEngine],
) -> None:
    first = await start_router(config_for(kv_engines, routing_logic="kvaware",
                                          health_check_interval=0))
    second = await start_router(config_for(kv_engines, routing_logic="kvaware",
                                           health_check_interval=0))
    for engine in kv_engines:
        await engine.kv_events.publisher.wait_for_subscribers(count=2, timeout=10)
    await synced(first)
    await synced(second)
    async with aiohttp.ClientSession() as session:
        served = await conversations(session, [first.url, second.url], count=9, turns=4,
                                     at_once=False)
    assert all(len(set(backends)) == 1 for backends in served), served
    # A new prompt: both replicas break the tie on the same engine.
    fresh = [{"role": "user", "content": "A question never asked before, about snow."}]
    async with aiohttp.ClientSession() as session:
        assert await chat(session, first.url, fresh) == await chat(session, second.url, fresh)


def engine_serving(router: RouterUnderTest, engines: list[RunningEngine],
                   backend_id: str) -> RunningEngine:
    url = next(b.url for b in router.app[POOL].backends if b.id == backend_id)
    return next(engine for engine in engines if engine.url == url)


def feed(router: RouterUnderTest, backend_id: str) -> FeedStats:
    feeds = router.app[KV_CACHE].feeds
    assert feeds is not None
    return feeds.stats[backend_id]


async def test_a_restarted_engine_is_relearned_and_routing_goes_on(
    start_router: StartRouter, kv_engines: list[RunningEngine],
) -> None:
    router = await kv_router(start_router, kv_engines)
    index = router.app[KV_CACHE].index
    async with aiohttp.ClientSession() as session:
        await conversations(session, [router.url], count=6, turns=2)
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": "One more question, about wind."}]
        home = await chat(session, router.url, messages)
        engine = engine_serving(router, kv_engines, home)
        await engine.kv_events.restart()  # sequence back to 0, cache empty
        await engine.kv_events.publisher.wait_for_subscribers(timeout=10)
        # The router still believes the engine holds the prompt and sends it there; the
        # engine's first batch (sequence 0) tells the restart.
        assert await chat(session, router.url, messages) == home
        await eventually(lambda: feed(router, home).restarts == 1, timeout=5)
        held = len(index.engines[home])
        assert held == len(engine.kv_events.cache)  # relearned from what it stores now
        assert await chat(session, router.url, messages) == home


async def test_gaps_are_replayed_and_bad_messages_skipped(
    start_router: StartRouter, kv_engines: list[RunningEngine],
) -> None:
    router = await kv_router(start_router, kv_engines)
    engine = kv_engines[0]
    backend_id = next(b.id for b in router.app[POOL].backends if b.url == engine.url)
    publisher = engine.kv_events.publisher
    await publisher.publish([{"type": "AllBlocksCleared"}], live=False)  # missed live
    await publisher.publish_payload(b"not msgpack at all")
    await publisher.publish_raw(b"kv", b"\x00")  # two frames, no payload
    await publisher.publish([{"type": "BlockStored", "block_hashes": "no list"}])
    await eventually(lambda: feed(router, backend_id).gaps_replayed == 1, timeout=5)
    await eventually(lambda: feed(router, backend_id).malformed == 2, timeout=5)
    await eventually(lambda: feed(router, backend_id).events_skipped == 1, timeout=5)
    assert feed(router, backend_id).gaps_lost == 0
    async with aiohttp.ClientSession() as session:  # still routing, on what it knows
        served = await conversations(session, [router.url], count=3, turns=3, at_once=False)
    assert all(len(set(backends)) == 1 for backends in served), served
    async with aiohttp.ClientSession() as session:
        async with session.get(router.url + "/metrics") as response:
            text = await response.text()
    assert f'router_kv_events_skipped_total{{server="{engine.url}"}} 3.0' in text
    assert f'router_kv_event_gaps_total{{kind="replayed",server="{engine.url}"}} 1.0' in text
    assert "router_kv_predicted_prompt_tokens_total" in text


async def test_no_stream_and_no_tokens_still_route_on_load(
    start_router: StartRouter, kv_engines: list[RunningEngine],
) -> None:
    # A tokenize bound no engine meets: every request routes on load, none fails.
    router = await kv_router(start_router, kv_engines, kv_tokenize_timeout=1e-6)
    async with aiohttp.ClientSession() as session:
        await conversations(session, [router.url], count=3, turns=2)
        for engine in kv_engines:  # every stream down
            await engine.kv_events.publisher.close()
        served = await conversations(session, [router.url], count=6, turns=2)
    assert len({backend for backends in served for backend in backends}) == 3
    tokens = router.app[KV_CACHE].tokens
    assert tokens is not None and tokens.failed == tokens.asked > 0
    await router.settled(18)


async def test_the_engines_endpoints_can_be_given_instead_of_asked(
    start_router: StartRouter,
) -> None:
    options = KvEventsOptions(block_size=BLOCK)
    engine = await start_engine(MODELS, kv_events=options)
    try:
        publisher = engine.kv_events.publisher
        router = await start_router(config_for(
            [engine], routing_logic="kvaware", health_check_interval=0,
            kv_events_endpoint=f"tcp://{{host}}:{publisher.port}",
            kv_events_replay_endpoint=f"tcp://{{host}}:{publisher.replay_port}"))
        await publisher.wait_for_subscribers(timeout=10)
        async with aiohttp.ClientSession() as session:
            await conversations(session, [router.url], count=2, turns=2)
        await eventually(lambda: router.app[KV_CACHE].index.blocks > 0, timeout=5)
    finally:
        await engine.close()


class BrokenOnce(KvIndex):
    """An index whose first apply fails as a bug would."""

    def __init__(self) -> None:
        super().__init__(10_000)
        self.failed = False

    def apply(self, backend_id: str, rank: int, batch: Batch) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("a bug")
        super().apply(backend_id, rank, batch)


async def test_a_stream_that_stopped_on_a_bug_is_followed_again(
    kv_engines: list[RunningEngine], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(feeds_module, "SOURCES_REFRESH", 0.05)
    engine = kv_engines[0]
    pool = BackendPool()
    pool.replace([Backend(url=engine.url, models=MODELS)])
    index = BrokenOnce()
    async with aiohttp.ClientSession() as session:
        feeds = KvEventFeeds(index, pool, session, lambda: True)
        task = asyncio.create_task(feeds.run())
        try:
            publisher = engine.kv_events.publisher
            await publisher.wait_for_subscribers(timeout=10)
            await eventually(lambda: all(s.synced for s in feeds.stats.values())
                             and len(feeds.stats) == 1, timeout=10)
            stored = {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None,
                      "token_ids": list(range(BLOCK)), "block_size": BLOCK, "lora_id": None,
                      "medium": "GPU", "lora_name": None}
            await publisher.publish([stored])  # kills the follower
            await eventually(lambda: index.failed, timeout=10)
            # Followed again: its first replay reads the batch the bug cut short.
            await eventually(lambda: all(s.synced >= 2 for s in feeds.stats.values()),
                             timeout=10)
            await eventually(lambda: index.blocks == 1, timeout=10)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
