"""`--config FILE` (YAML or JSON) and reloading it without dropping anything in flight."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from router.config.load import load_config
from router.config.settings import Config, ConfigError, StaticBackend
from router.serve.server import serve
from router.testing import RunningEngine
from router.testing.processes import free_port, wait_until_healthy

from .conftest import CHAT, MODELS


def test_yaml_file_holds_the_flags_and_flags_override_it(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        "port: 9000\n"
        "static-backends: [http://a:8000, http://b:8000]\n"
        "static_models: [[llama, qwen], whisper]\n"
        "static-aliases: {gpt-4o: llama}\n"
        "routing-logic: roundrobin\n"
        "read-timeout: 30\n"
        "max-body-size: 1GiB\n"
    )
    config = load_config(["--config", str(path), "--port", "9100"])
    assert config.port == 9100  # the flag wins
    assert config.static_backends == (
        StaticBackend("http://a:8000", ("llama", "qwen")),
        StaticBackend("http://b:8000", ("whisper",)),
    )
    assert config.aliases == {"gpt-4o": "llama"}
    assert (config.read_timeout, config.max_body_size) == (30.0, 2**30)
    assert config.config_file == str(path)


def test_json_file_and_boolean_keys(tmp_path: Path) -> None:
    path = tmp_path / "router.json"
    path.write_text(json.dumps({"demo": True, "log-level": "debug"}))
    config = load_config(["--config", str(path)])
    assert (config.demo, config.log_level) == (True, "debug")


@pytest.mark.parametrize(
    "content, expected",
    [
        ("colour: blue\n", "unknown key 'colour'"),
        ("port: abc\nstatic-backends: [http://a:1]\nstatic-models: [m]\n",
         "config file {path}: argument --port: invalid port value: 'abc'"),
        ("demo: yes please\n", "key 'demo' must be true or false"),
        ("- just a list\n", "expected a mapping"),
        ("port: [1\n", "config file {path}:"),
        ("config: other.yaml\n", "unknown key 'config'"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as error:
        load_config(["--config", str(path)])
    assert expected.format(path=path) in str(error.value)
    assert "\n" not in str(error.value)


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file .*missing.yaml"):
        load_config(["--config", str(tmp_path / "missing.yaml")])


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


def test_command_line_flags_replace_repeatable_file_settings(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text("demo: true\ncallbacks: [tests.plugin_examples:Gatekeeper]\n")
    from_file = load_config(["--config", str(path)])
    assert from_file.callbacks == ("tests.plugin_examples:Gatekeeper",)
    overridden = load_config(["--config", str(path),
                              "--callbacks", "tests.plugin_examples:EventCounter"])
    assert overridden.callbacks == ("tests.plugin_examples:EventCounter",)
