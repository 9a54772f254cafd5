"""Plugins (--callbacks) and the request rewriter (--request-rewriter), end to end."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router import plugin_shim
from router.config.load import parse_config
from router.flow import Outcome
from router.keys import PLUGINS
from router.plugins import load_object
from router.testing import RunningEngine

from .conftest import CHAT, RouterUnderTest, StartRouter, config_for
from .plugin_examples import (
    Blocking, BodyWatcher, EventCounter, Gatekeeper, ProductionStackStyle, Sluggish,
)

BODY = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def post(router: RouterUnderTest, body: dict[str, Any] | bytes) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
        async with session.post(router.url + "/v1/chat/completions", **kwargs,
                                headers={"Content-Type": "application/json"}) as response:
            return response.status, await response.read()


def plugin(router: RouterUnderTest, kind: type) -> Any:
    host = router.app[PLUGINS]
    assert host is not None
    found = [p for p in host.plugins if isinstance(p, kind)]
    found += [p.handler for p in host.plugins if isinstance(getattr(p, "handler", None), kind)]
    return found[0]


async def test_a_plugin_refuses_a_request_before_routing(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    router = await start_router(config_for(
        engines, callbacks=("tests.plugin_examples:Gatekeeper",)))
    status, body = await post(router, {**BODY, "user": "banned"})
    assert status == 403 and b"banned" in body
    assert (await post(router, {**BODY, "user": "fine"}))[0] == 200
    assert sum(engine.state.started for engine in engines) == 1
    await router.settled(2)
    refused = [f for f in router.log.flows.values() if f.status == 403]
    assert refused[0].outcome is Outcome.REJECTED and refused[0].backend is None
    # A fast sync method runs on the event loop: a thread hand-off would cost more than it.
    assert plugin(router, Gatekeeper).threads == {threading.current_thread().name}


async def test_a_slow_sync_plugin_moves_to_the_plugin_threads_after_one_call(
    start_router: StartRouter, engines: list[RunningEngine], caplog: pytest.LogCaptureFixture
) -> None:
    router = await start_router(config_for(engines, callbacks=(
        "tests.plugin_examples:Sluggish", "tests.plugin_examples:Blocking")))
    loop_thread = threading.current_thread().name
    for _ in range(3):
        assert (await post(router, BODY))[0] == 200
    await router.settled(3)
    sluggish = plugin(router, Sluggish)
    for _ in range(100):  # the threaded calls end after the requests
        if len(sluggish.threads) == 3 and len(plugin(router, Blocking).threads) == 3:
            break
        await asyncio.sleep(0.02)
    # First call on the loop, measured over the budget; the next ones in the threads.
    assert sluggish.threads[0] == loop_thread
    assert all(name.startswith("plugin") for name in sluggish.threads[1:])
    assert "runs in the plugin threads from now on" in caplog.text
    # `blocking = True`: in the threads from the first call.
    assert all(name.startswith("plugin") for name in plugin(router, Blocking).threads)
    # While a threaded call sleeps, the loop serves other requests at once.
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async with session.get(router.url + "/health") as response:
            assert response.status == 200
    assert time.monotonic() - started < Sluggish.delay


async def test_a_body_plugin_sees_the_whole_stream_without_slowing_it(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    router = await start_router(config_for(engines, callbacks=(
        "tests.plugin_examples:BodyWatcher", "tests.plugin_examples.EventCounter")))
    for engine in engines:
        engine.behaviour.token_delay = 0.05
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/v1/chat/completions",
                                json={**BODY, "stream": True}) as response:
            first = await response.content.readuntil(b"\n\n")
            # The first event arrived while the engine was still generating.
            assert sum(engine.state.open for engine in engines) == 1 and b"data: " in first
            streamed = first + await response.read()
    watcher, counter = plugin(router, BodyWatcher), plugin(router, EventCounter)
    async with asyncio.timeout(2):
        while not watcher.bodies or len(counter.seen) < 2:
            await asyncio.sleep(0.01)
    assert watcher.bodies == [streamed]
    assert counter.seen == ["new", "complete:ok"]
    await router.settled(1)


async def test_no_body_is_kept_when_no_plugin_wants_it(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    router = await start_router(config_for(
        engines, callbacks=("tests.plugin_examples:EventCounter",)))
    assert (await post(router, BODY))[0] == 200
    await router.settled(1)
    assert router.log.only().response_body is None


async def test_a_failing_plugin_never_breaks_a_request(
    start_router: StartRouter, engines: list[RunningEngine], caplog: pytest.LogCaptureFixture
) -> None:
    router = await start_router(config_for(engines, callbacks=("tests.plugin_examples:Broken",)))
    for _ in range(3):
        status, body = await post(router, BODY)
        assert status == 200 and b"tok0" in body
    await router.settled(3)
    await asyncio.sleep(0.1)
    assert "broken pre_request" in caplog.text and "plugin failed" in caplog.text


async def test_production_stack_callback_handler_loads_through_the_adapter(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    router = await start_router(config_for(
        engines, callbacks=("tests.plugin_examples.ProductionStackStyle",)))
    status, body = await post(router, BODY)
    assert status == 200
    status, canned = await post(router, {**BODY, "user": "wants-canned"})
    assert (status, canned) == (200, b'{"canned": true}')
    handler = plugin(router, ProductionStackStyle)
    async with asyncio.timeout(2):
        while not handler.responses:
            await asyncio.sleep(0.01)
    assert handler.responses == [body]
    assert handler.requests[0][1]["model"] == CHAT
    assert sum(engine.state.started for engine in engines) == 1


async def test_the_rewriter_changes_the_body_before_routing(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    router = await start_router(config_for(
        engines, request_rewriter="tests.plugin_examples:Defaults"))
    status, body = await post(router, {"model": "small", "prompt": "x", "secret_field": 1,
                                       "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200, body
    sent = next(e.state.last_json for e in engines if e.state.last_json)
    assert sent == {"model": CHAT, "prompt": "x", "max_tokens": 3,
                    "messages": [{"role": "user", "content": "hi"}]}
    await router.settled(1)
    assert router.log.only().model == CHAT


async def test_an_unchanged_body_is_sent_as_received(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    router = await start_router(config_for(
        engines, request_rewriter="tests.plugin_examples:Identity"))
    raw = b'{ "model" : "chat-model",  "messages": [{"role":"user","content":"hi"}] }'
    assert (await post(router, raw))[0] == 200
    await router.settled(1)
    assert router.log.only().request_body == raw


def test_callbacks_flags_take_both_spellings_and_refuse_bad_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = parse_config(["--demo", "--callbacks", "tests.plugin_examples:Gatekeeper,"
                           "tests.plugin_examples.BodyWatcher", "--callbacks",
                           "tests.plugin_examples:EventCounter"])
    assert config.callbacks == ("tests.plugin_examples:Gatekeeper",
                                "tests.plugin_examples.BodyWatcher",
                                "tests.plugin_examples:EventCounter")
    for bad in ("no_such_module:Thing", "tests.plugin_examples:Missing", "nodots"):
        with pytest.raises(SystemExit):
            parse_config(["--demo", "--callbacks", bad])
        assert "argument --callbacks" in capsys.readouterr().err


async def test_a_production_stack_module_instance_loads_with_its_base_class_import(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    # production-stack's `file.instance` form: the module imports vllm_router's base class.
    router = await start_router(config_for(
        engines, callbacks=("tests.production_stack_callbacks.callbacks_handler",)))
    status, body = await post(router, BODY)
    assert status == 200
    status, refused = await post(router, {**BODY, "user": "blocked"})
    assert status == 403 and b"blocked" in refused
    from tests.production_stack_callbacks import Auditor, callbacks_handler

    handler = plugin(router, Auditor)
    assert handler is callbacks_handler  # the named instance, not a new one
    assert handler.models == [CHAT, CHAT]
    async with asyncio.timeout(2):
        while not handler.responses:
            await asyncio.sleep(0.01)
    assert handler.responses == [body]
    assert sum(engine.state.started for engine in engines) == 1


def test_callbacks_take_a_file_path_and_the_rewriter_takes_noop() -> None:
    path = Path(__file__).with_name("production_stack_callbacks")
    config = parse_config(["--demo", "--callbacks", f"{path}.callbacks_handler",
                           "--request-rewriter", "noop"])
    assert config.request_rewriter is None
    handler = load_object(config.callbacks[0], "--callbacks")
    assert type(handler).__name__ == "Auditor"
    assert isinstance(handler, plugin_shim.CustomCallbackHandler)
    assert load_object(config.callbacks[0], "--callbacks") is handler  # loaded once
