"""Reloading the configuration (SIGHUP, or `--config-watch` noticing the file changed):
traffic moves to the new backends, streams on a removed one run to their end, and a file that
does not load is refused with one log line while the running configuration keeps serving."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from router.app import make_app
from router.config.load import load_config
from router.config.settings import Config
from router.keys import CHOOSER, POOL
from router.policies import Session
from router.serve.reload import Reloader
from router.serve.server import serve
from router.testing import RunningEngine
from router.testing.processes import free_port, wait_until_healthy

from .conftest import CHAT, MODELS


def write_config(path: Path, port: int, engines: list[RunningEngine], **extra: object) -> None:
    settings = {
        "host": "127.0.0.1", "port": port,
        "static-backends": [engine.url for engine in engines],
        "static-models": [list(MODELS) for _ in engines], **extra,
    }
    path.write_text(json.dumps(settings))


async def chat(session: aiohttp.ClientSession, url: str, stream: bool = False) -> str:
    body = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "stream": stream,
            "max_tokens": 10}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        await response.read()
        return response.headers["x-router-backend"]


async def test_sighup_reload_moves_traffic_without_dropping_streams(
    engines: list[RunningEngine], tmp_path: Path
) -> None:
    first, second = engines
    path, port = tmp_path / "router.json", free_port()
    url = f"http://127.0.0.1:{port}"
    write_config(path, port, [first])
    argv = ["--config", str(path)]
    stop = asyncio.Event()
    config = await asyncio.to_thread(load_config, argv)
    server = asyncio.create_task(serve(config, stop, lambda: load_config(argv)))
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_healthy(session, url)
            first.behaviour.token_delay = 0.1
            streams = [asyncio.create_task(chat(session, url, stream=True)) for _ in range(5)]
            async with asyncio.timeout(5):
                while first.state.open < 5:
                    await asyncio.sleep(0.01)
            write_config(path, port, [second], **{"static-aliases": {"gpt": CHAT}})
            os.kill(os.getpid(), signal.SIGHUP)
            async with asyncio.timeout(5):
                while second.state.completed == 0:
                    await chat(session, url)
            # The streams on the old backend ran to the end (requests sent before the reload
            # landed went there too).
            await asyncio.gather(*streams)
            assert first.state.completed >= 5 and first.state.cancelled == 0
            async with session.get(url + "/v1/models") as response:
                ids = {model["id"] for model in (await response.json())["data"]}
            assert "gpt" in ids
            # A broken file is refused; the running configuration keeps serving.
            path.write_text("static-backends: [not a url\n")
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(0.2)
            completed = second.state.completed
            await chat(session, url)
            assert second.state.completed == completed + 1
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)


async def test_config_watch_reloads_a_changed_file(
    engines: list[RunningEngine], tmp_path: Path
) -> None:
    first, second = engines
    path, port = tmp_path / "router.json", free_port()
    url = f"http://127.0.0.1:{port}"
    write_config(path, port, [first], **{"config-watch": True})
    argv = ["--config", str(path)]
    config = await asyncio.to_thread(load_config, argv)
    assert isinstance(config, Config) and config.config_watch
    stop = asyncio.Event()
    server = asyncio.create_task(serve(config, stop, lambda: load_config(argv)))
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_healthy(session, url)
            await chat(session, url)
            write_config(path, port, [second], **{"config-watch": True})
            async with asyncio.timeout(6):
                while second.state.completed == 0:
                    await chat(session, url)
                    await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)


async def reloader_for(
    path: Path, engines: list[RunningEngine]
) -> tuple[web.Application, Reloader]:
    """A real (not started) app configured from the file at `path`, and its reloader."""
    write_config(path, 8001, engines)
    argv = ["--config", str(path)]
    app = make_app(await asyncio.to_thread(load_config, argv))
    return app, Reloader(app, lambda: load_config(argv))


async def test_a_file_that_does_not_load_is_refused_in_one_line(
    engines: list[RunningEngine], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "router.json"
    app, reloader = await reloader_for(path, engines[:1])
    before = reloader.current
    path.write_text('{"port": "eighty"}')
    with caplog.at_level(logging.ERROR, logger="router.reload"):
        assert await reloader.reload("SIGHUP") is False
    [record] = caplog.records
    assert record.getMessage().startswith(
        "config reload (SIGHUP) refused, the running configuration stays: "
        f"config file {path}: argument --port: invalid port value: 'eighty'"
    )
    assert "\n" not in record.getMessage()
    assert reloader.current is before
    assert [b.url for b in app[POOL].backends] == [engines[0].url]


async def test_a_reload_swaps_backends_and_policy_and_keeps_the_kept_backend(
    engines: list[RunningEngine], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "router.json"
    app, reloader = await reloader_for(path, engines[:1])
    [kept] = app[POOL].backends
    write_config(path, 8001, engines, **{"routing-logic": "session", "session-key": "x-user"})
    with caplog.at_level(logging.INFO, logger="router.reload"):
        assert await reloader.reload("config file changed") is True
    assert [b.url for b in app[POOL].backends] == [e.url for e in engines]
    assert app[POOL].backends[0].id == kept.id  # its stats and health go on
    assert isinstance(app[CHOOSER].policy, Session)
    messages = [record.getMessage() for record in caplog.records]
    assert messages[-1] == "config reloaded (config file changed)"
    assert f"backends now: {engines[0].url}, {engines[1].url}" in messages


async def test_settings_that_need_a_restart_are_reported_once(
    engines: list[RunningEngine], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "router.json"
    _, reloader = await reloader_for(path, engines[:1])
    write_config(path, 8002, engines[:1], **{"read-timeout": 5})
    with caplog.at_level(logging.WARNING, logger="router.reload"):
        assert await reloader.reload("SIGHUP")
        assert await reloader.reload("SIGHUP")  # the same file again: nothing new to say
    assert [record.getMessage() for record in caplog.records] == [
        "changed settings that take effect at restart only: port, read_timeout"
    ]
    assert isinstance(reloader.current, Config) and reloader.current.port == 8002
