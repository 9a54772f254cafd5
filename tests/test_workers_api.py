"""The worker API of sglang-router and vllm-router (`router.api.workers`): engines added and
removed at run time, through real loopback engines and a real router."""

from __future__ import annotations

import asyncio
import dataclasses
from unittest import mock
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request
from yarl import URL

from router.api.auth import from_this_host
from router.backends.pool import Backend, BackendPool
from router.config.settings import StaticBackend
from router.discovery.runtime import RuntimeWorkers
from router.keys import POOL
from router.serve.reload import Reloader
from router.testing import RunningEngine
from router.testing.processes import free_port

from .conftest import CHAT, MODELS, RouterUnderTest, StartRouter, config_for, eventually
from .test_reload import chat


async def workers(session: aiohttp.ClientSession, router: RouterUnderTest) -> dict[str, Any]:
    async with session.get(router.url + "/workers") as response:
        assert response.status == 200, await response.text()
        listing: dict[str, Any] = await response.json()
        return listing


def backend_id(router: RouterUnderTest, url: str) -> str:
    return next(b.id for b in router.app[POOL].backends if b.url == url)


async def test_post_workers_learns_the_models_and_routes_to_the_new_engine(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    first, second = engines
    router = await start_router(config_for([first]))
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/workers", json={"url": second.url}) as response:
            assert response.status == 200, await response.text()
            added = await response.json()
        assert added["success"] is True
        assert added["worker"]["url"] == second.url
        assert set(added["worker"]["models"]) == set(MODELS)
        listing = await workers(session, router)
        assert listing["total"] == 2
        assert {w["url"]: w["source"] for w in listing["workers"]} == {
            first.url: "static", second.url: "runtime"}
        assert listing["stats"]["regular_count"] == 2
        new_id = backend_id(router, second.url)
        served = {await chat(session, router.url) for _ in range(6)}
        assert new_id in served
        async with session.get(router.url + "/engines") as response:
            sources = {e["url"]: e["source"] for e in await response.json()}
        assert sources == {first.url: "static", second.url: "runtime"}
        async with session.get(router.url + "/workers/" + quote(second.url, safe="")) as response:
            assert response.status == 200
            assert (await response.json())["source"] == "runtime"


async def test_query_form_adds_lists_and_removes(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    """vllm-router's and sglang-router's older form: `/add_worker?url=`, `/list_workers`,
    `/remove_worker?url=`, with their plain-text answers."""
    first, second = engines
    router = await start_router(config_for([first]))
    async with aiohttp.ClientSession() as session:
        add = URL(router.url + "/add_worker").with_query(url=second.url + "/")
        async with session.post(add) as response:
            assert response.status == 200, await response.text()
            assert await response.text() == f"Successfully added worker: {second.url}"
        async with session.get(router.url + "/list_workers") as response:
            assert await response.json() == {"urls": [first.url, second.url]}
        remove = URL(router.url + "/remove_worker").with_query(url=first.url)
        async with session.post(remove) as response:
            assert response.status == 200, await response.text()
            assert await response.text() == f"Successfully removed worker: {first.url}"
        async with session.get(router.url + "/list_workers") as response:
            assert await response.json() == {"urls": [second.url]}
        assert {await chat(session, router.url) for _ in range(4)} == {
            backend_id(router, second.url)}
        async with session.post(remove) as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "worker_not_found"


async def test_removing_an_engine_lets_its_streams_finish_and_new_requests_avoid_it(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    first, second = engines
    first_id = backend_id(router, first.url)
    first.behaviour.token_delay = 0.1
    async with aiohttp.ClientSession() as session:
        streams = [asyncio.create_task(chat(session, router.url, stream=True))
                   for _ in range(4)]
        await eventually(lambda: first.state.open >= 1, timeout=5)
        async with session.delete(router.url + "/workers/" + quote(first.url, safe="")) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["success"] is True
        assert await asyncio.gather(*streams)
        assert first.state.completed >= 1 and first.state.cancelled == 0
        assert first_id not in {await chat(session, router.url) for _ in range(6)}
        assert [w["url"] for w in (await workers(session, router))["workers"]] == [second.url]
    await router.settled(10)


async def test_the_worker_api_word_outlives_a_config_reload(
    start_router: StartRouter, three_engines: list[RunningEngine]
) -> None:
    """Removed over the API: stays out though the config still lists it. Added over the API:
    stays in though the config does not list it. Discovery decides the rest."""
    first, second, third = three_engines
    config = config_for([first, second])
    router = await start_router(config)
    async with aiohttp.ClientSession() as session:
        async with session.delete(router.url + "/workers/" + first.url) as response:
            assert response.status == 200, await response.text()
        async with session.post(router.url + "/workers",
                                json={"url": third.url, "model_id": CHAT}) as response:
            assert response.status == 200, await response.text()
        reloaded = dataclasses.replace(config, static_backends=(
            StaticBackend(url=first.url, models=MODELS),
            StaticBackend(url=second.url + "/v2", models=MODELS)))
        await Reloader(router.app, lambda: reloaded).reload("test")
        urls = [w["url"] for w in (await workers(session, router))["workers"]]
        assert urls == [second.url + "/v2", third.url]
        # Added again over the API, the removed engine is back.
        async with session.post(router.url + "/workers", json={"url": first.url}) as response:
            assert response.status == 200, await response.text()
        sources = {w["url"]: w["source"] for w in (await workers(session, router))["workers"]}
        assert sources == {second.url + "/v2": "static", third.url: "runtime",
                           first.url: "runtime"}


async def test_the_worker_api_needs_a_key_when_the_router_has_keys(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    first, second = engines
    router = await start_router(config_for([first], api_keys=("secret",)))
    key = {"Authorization": "Bearer secret"}
    async with aiohttp.ClientSession() as session:
        for method, path in [("POST", "/workers"), ("GET", "/workers"),
                             ("GET", "/list_workers"), ("POST", "/add_worker?url=" + second.url),
                             ("POST", "/remove_worker?url=" + first.url),
                             ("DELETE", "/workers/" + quote(first.url, safe=""))]:
            async with session.request(method, router.url + path,
                                       json={"url": second.url}) as response:
                assert response.status == 401, (method, path)
        assert [b.url for b in router.app[POOL].backends] == [first.url]
        async with session.post(router.url + "/add_worker", params={"url": second.url},
                                headers=key) as response:
            assert response.status == 200, await response.text()
        async with session.get(router.url + "/list_workers", headers=key) as response:
            assert (await response.json())["urls"] == [first.url, second.url]


async def test_an_engine_that_cannot_be_reached_gets_a_clear_error(
    start_router: StartRouter, engine: RunningEngine
) -> None:
    router = await start_router(config_for([engine]))
    nowhere = f"http://127.0.0.1:{free_port()}"
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/workers", json={"url": nowhere}) as response:
            assert response.status == 502
            error = (await response.json())["error"]
        assert error["code"] == "worker_unreachable"
        assert "could not be reached" in error["message"] and "model_id" in error["message"]
        assert nowhere not in error["message"]
        async with session.post(router.url + "/add_worker",
                                params={"url": nowhere}) as response:
            assert response.status == 502
        assert [b.url for b in router.app[POOL].backends] == [engine.url]
        # With its model given, an engine still loading is added without being asked.
        async with session.post(router.url + "/workers",
                                json={"url": nowhere, "model_id": CHAT}) as response:
            assert response.status == 200, await response.text()
        assert [b.url for b in router.app[POOL].backends] == [engine.url, nowhere]


async def test_an_engine_that_lists_no_model_is_refused(
    start_router: StartRouter, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    async def no_models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app.router.add_get("/v1/models", no_models)
    empty = await aiohttp_server(app)
    router = await start_router(config_for([]))
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/workers",
                                json={"url": str(empty.make_url(""))}) as response:
            assert response.status == 502
            assert "lists no model" in (await response.json())["error"]["message"]
    assert router.app[POOL].backends == ()


async def test_bad_requests_are_refused_with_json_errors(router: RouterUnderTest) -> None:
    async with aiohttp.ClientSession() as session:
        for body in [{}, {"url": "ftp://x"}, {"url": "http://user:pw@h:1"}, ["x"],
                     {"url": "http://h:1", "worker_type": "gpu"},
                     {"url": "http://h:1", "api_key": "other"}]:
            async with session.post(router.url + "/workers", json=body) as response:
                assert response.status == 400, body
                assert (await response.json())["error"]["type"] == "invalid_request_error"
        async with session.post(router.url + "/workers", data=b"{not json") as response:
            assert response.status == 400
        async with session.delete(router.url + "/workers/"
                                  + quote("http://10.9.9.9:1", safe="")) as response:
            assert response.status == 404
        async with session.post(router.url + "/add_worker") as response:
            assert response.status == 400


async def test_changes_are_refused_with_several_worker_processes(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    first, second = engines
    router = await start_router(config_for([first], workers=2))
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/workers", json={"url": second.url}) as resp:
            assert resp.status == 409
            assert "--workers" in (await resp.json())["error"]["message"]
        async with session.get(router.url + "/list_workers") as response:
            assert (await response.json())["urls"] == [first.url]


def test_discovery_updates_keep_the_overlay_and_backend_ids() -> None:
    """Whatever discovery publishes next (a Kubernetes watch event, a reload), the worker
    API's additions stay and its removals stay out; a kept URL keeps its id."""
    pool = BackendPool()
    runtime = RuntimeWorkers(pool, "k8s")
    pool.replace([Backend("http://10.0.0.1:8000", (CHAT,)),
                  Backend("http://10.0.0.2:8000", (CHAT,))])
    added = Backend("http://10.0.0.9:8000", (CHAT,))
    runtime.add(added)
    assert runtime.remove("http://10.0.0.1:8000")
    forgotten: list[frozenset[str]] = []
    pool.on_removed(forgotten.append)
    pool.replace([Backend("http://10.0.0.1:8000", (CHAT,)),
                  Backend("http://10.0.0.3:8000", (CHAT,)),
                  Backend("http://10.0.0.9:8000", ("other",))])
    assert [(b.url, runtime.source(b)) for b in pool.backends] == [
        ("http://10.0.0.3:8000", "k8s"), ("http://10.0.0.9:8000", "runtime")]
    assert pool.candidates(CHAT)[-1] is added
    assert forgotten == [frozenset({Backend("http://10.0.0.2:8000", ()).id})]
    assert not runtime.remove("http://10.0.0.1:8000")


def test_without_keys_only_this_host_may_change_workers() -> None:
    def caller(peer: tuple[str, int] | str) -> web.Request:
        transport = mock.Mock()
        transport.get_extra_info.side_effect = (
            lambda name, default=None: peer if name == "peername" else default)
        return make_mocked_request("POST", "/add_worker", transport=transport)

    assert from_this_host(caller(("127.0.0.1", 5000)))
    assert from_this_host(caller(("::1", 5000)))
    assert not from_this_host(caller(("10.0.0.7", 5000)))
    assert not from_this_host(caller(("192.168.1.20", 5000)))
