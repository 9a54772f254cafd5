"""`/v1/models` lists the engines' own model cards (every field, LoRA adapters' `parent`
included), and `/engines` is production-stack's list, whose `engine_id` pins a request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from router.backends.pool import Backend, BackendPool, model_cards
from router.config.settings import Config, StaticBackend
from router.stats.engine import EngineScraper, EngineStats
from router.testing import RunningEngine, start_engine
from router.testing.engine.state import ENGINE_CONFIG, MAX_MODEL_LEN

from .conftest import StartRouter

BASE = "llama-base"
LORA = "sql-lora"


@pytest.fixture
async def lora_engine() -> AsyncIterator[RunningEngine]:
    engine = await start_engine([BASE, LORA], name="lora-engine")
    engine.app[ENGINE_CONFIG].lora_parents[LORA] = BASE
    yield engine
    await engine.close()


async def listed(url: str) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/v1/models") as response:
            assert response.status == 200
            body = await response.json()
    assert body["object"] == "list"
    return {entry["id"]: entry for entry in body["data"]}


async def listed_once_read(url: str, model: str) -> dict[str, dict[str, Any]]:
    """The listing once the router read the engines' cards (its first scrape, at start)."""
    async with asyncio.timeout(5):
        while True:
            entries = await listed(url)
            if entries[model]["owned_by"] != "router":
                return entries
            await asyncio.sleep(0.02)


async def test_v1_models_keeps_every_field_of_the_engines_cards_lora_adapters_included(
    start_router: StartRouter, lora_engine: RunningEngine
) -> None:
    router = await start_router(Config(
        static_backends=(StaticBackend(lora_engine.url, (BASE, LORA)),),
        aliases={"fast": BASE}))
    async with aiohttp.ClientSession() as session:
        async with session.get(lora_engine.url + "/v1/models") as response:
            engine_cards = {card["id"]: card for card in (await response.json())["data"]}
    entries = await listed_once_read(router.url, BASE)
    assert sorted(entries) == sorted([BASE, LORA, "fast"])
    for model in (BASE, LORA):  # as the engine gave it, but for `created` (its listing time)
        assert {k: v for k, v in entries[model].items() if k != "created"} == {
            k: v for k, v in engine_cards[model].items() if k != "created"}
    base, lora = entries[BASE], entries[LORA]
    assert (base["owned_by"], base["root"], base["parent"], base["max_model_len"]) == (
        "vllm", BASE, None, MAX_MODEL_LEN)
    assert base["permission"][0]["object"] == "model_permission"
    assert (lora["owned_by"], lora["root"], lora["parent"], lora["max_model_len"]) == (
        "vllm", f"/adapters/{LORA}", BASE, None)
    # An alias is its model's card under its own name, pointing at the model.
    alias = entries["fast"]
    assert (alias["root"], alias["max_model_len"], alias["owned_by"]) == (
        BASE, MAX_MODEL_LEN, "vllm")
    # What an OpenAI client sees: the extra fields come through.
    client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused")
    models = {model.id: model for model in (await client.models.list()).data}
    assert models[LORA].model_extra is not None
    assert models[LORA].model_extra["parent"] == BASE
    assert models[BASE].owned_by == "vllm"
    await client.close()


async def test_only_the_models_the_router_routes_are_listed(
    start_router: StartRouter, lora_engine: RunningEngine
) -> None:
    # --static-models names BASE only: the engine's adapter is not routed, so not listed.
    router = await start_router(Config(
        static_backends=(StaticBackend(lora_engine.url, (BASE,)),)))
    entries = await listed_once_read(router.url, BASE)
    assert list(entries) == [BASE]
    assert entries[BASE]["max_model_len"] == MAX_MODEL_LEN


async def slow_models_engine() -> web.AppRunner:
    """An engine whose `/v1/models` never answers (its `/metrics` does)."""
    async def never(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="vllm:num_requests_waiting 0\n")

    app = web.Application()
    app.router.add_get("/v1/models", never)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


async def test_an_engine_that_does_not_answer_v1_models_never_delays_the_listing(
    start_router: StartRouter,
) -> None:
    runner = await slow_models_engine()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        router = await start_router(Config(
            static_backends=(StaticBackend(url, ("slow-model",)),), engine_stats_timeout=30.0))
        await asyncio.sleep(0.1)  # the scraper's read of /v1/models is under way
        started = time.monotonic()
        entries = await listed(router.url)
        assert time.monotonic() - started < 1.0
        # No card yet: a minimal one, still pointing at the model.
        assert entries == {"slow-model": {
            "id": "slow-model", "object": "model", "created": entries["slow-model"]["created"],
            "owned_by": "router", "root": "slow-model", "parent": None}}
    finally:
        await runner.cleanup()


def test_model_cards_keep_every_field_and_skip_entries_without_an_id() -> None:
    answer = {"object": "list", "data": [
        {"id": "a", "root": "/w/a", "max_model_len": 8, "extra": {"x": 1}},
        {"id": ""}, {"root": "no id"}, "not a card", {"id": 7},
        {"id": "a", "root": "a second card for a"},
        {"id": "b", "parent": "a"},
    ]}
    assert model_cards(answer) == {
        "a": {"id": "a", "root": "/w/a", "max_model_len": 8, "extra": {"x": 1}},
        "b": {"id": "b", "parent": "a"},
    }
    assert model_cards({"data": "nope"}) == {} and model_cards([1]) == {}


def test_the_pool_keeps_cards_only_for_its_backends() -> None:
    one, two = Backend("http://one:8000", ("m",)), Backend("http://two:8000", ("m", "n"))
    pool = BackendPool([one, two])
    pool.set_cards(two.id, {"m": {"id": "m", "owned_by": "two"}})
    assert pool.card("m") == {"id": "m", "owned_by": "two"}  # one has none: two's
    pool.set_cards(one.id, {"m": {"id": "m", "owned_by": "one"}})
    assert pool.card("m") == {"id": "m", "owned_by": "one"}
    assert pool.card("n") is None
    pool.replace([two])
    assert pool.card("m") == {"id": "m", "owned_by": "two"}
    pool.set_cards(one.id, {"m": {"id": "m", "owned_by": "gone"}})  # left meanwhile
    pool.replace([one, two])
    assert pool.card("m") == {"id": "m", "owned_by": "two"}


def test_created_is_when_the_backend_came_into_the_pool() -> None:
    one, two = Backend("http://one:8000", ("m",)), Backend("http://two:8000", ("m",))
    before = time.time()
    pool = BackendPool([one])
    added = pool.added_at(one.id)
    assert before <= added <= time.time()
    pool.replace([Backend("http://one:8000", ("m", "n")), two])  # same URL: same backend
    assert pool.added_at(one.id) == added
    assert pool.added_at(two.id) >= added


async def test_engines_is_production_stacks_list_and_its_engine_id_pins_a_request(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    router = await start_router(Config(static_backends=tuple(
        StaticBackend(engine.url, ("chat-model",)) for engine in engines)))
    async with aiohttp.ClientSession() as session:
        async with session.get(router.url + "/engines") as response:
            assert response.status == 200
            listing = await response.json()
        assert isinstance(listing, list) and len(listing) == 2
        by_url = {entry["url"]: entry for entry in listing}
        for engine in engines:
            entry = by_url[engine.url]
            assert entry["serving_models"] == ["chat-model"]
            assert entry["engine_id"] == entry["id"]
            assert isinstance(entry["created"], int)
            assert abs(entry["created"] - time.time()) < 60
        # The tutorials' way: the id of one engine from /engines, then `?id=` to reach it.
        target = engines[1]
        engine_id = by_url[target.url]["engine_id"]
        for _ in range(3):
            async with session.post(router.url + f"/v1/completions?id={engine_id}", json={
                "model": "chat-model", "prompt": "hi", "max_tokens": 2,
            }) as response:
                assert response.status == 200
                await response.read()
        async with session.get(router.url + "/health") as response:
            health = await response.json()
    assert health["status"] == "healthy" and "routing" in health
    assert (engines[0].state.completed, target.state.completed) == (0, 3)


async def test_the_scraper_rereads_cards_and_keeps_the_last_good_ones(
    lora_engine: RunningEngine,
) -> None:
    backend = Backend(lora_engine.url, (BASE, LORA))
    pool = BackendPool([backend])
    async with aiohttp.ClientSession() as session:
        scraper = EngineScraper(EngineStats(), pool, session, interval=1.0, timeout=2.0,
                                cards_refresh=0.0)
        await scraper.scrape_once()
        card = pool.card(LORA)
        assert card is not None and card["parent"] == BASE
        # The adapter is reloaded on another base at run time: the next read sees it.
        lora_engine.app[ENGINE_CONFIG].lora_parents[LORA] = "other-base"
        await scraper.scrape_once()
        card = pool.card(LORA)
        assert card is not None and card["parent"] == "other-base"
        # An engine that stops answering keeps the cards it gave before.
        await lora_engine.close()
        await scraper.scrape_once()
        assert scraper.store.last_error(backend.id) is not None  # it was asked, and failed
        card = pool.card(LORA)
        assert card is not None and card["parent"] == "other-base"
