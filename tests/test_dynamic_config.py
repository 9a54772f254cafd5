"""production-stack's dynamic config file (`--dynamic-config-json`, `--dynamic-config-yaml`):
read at start in its format, watched, a change applied like a reload."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from router.config.load import load_config
from router.config.settings import ConfigError, StaticBackend
from router.serve.server import serve
from router.testing import RunningEngine
from router.testing.processes import free_port, wait_until_healthy

from .conftest import CHAT
from .test_reload import chat


def write_json(path: Path, engine: RunningEngine, **extra: object) -> None:
    # As production-stack's docs write it: flag values as strings, underscores in keys.
    path.write_text(json.dumps({
        "service_discovery": "static", "routing_logic": "roundrobin",
        "static_backends": engine.url, "static_models": CHAT, **extra,
    }))


async def test_a_json_file_change_moves_traffic_while_streams_on_the_old_engine_finish(
    engines: list[RunningEngine], tmp_path: Path
) -> None:
    first, second = engines
    path, port = tmp_path / "dynamic.json", free_port()
    url = f"http://127.0.0.1:{port}"
    write_json(path, first)
    argv = ["--dynamic-config-json", str(path), "--host", "127.0.0.1", "--port", str(port),
            "--dynamic-config-interval", "0.1"]
    config = await asyncio.to_thread(load_config, argv)
    assert config.dynamic_config_file == str(path)
    stop = asyncio.Event()
    server = asyncio.create_task(serve(config, stop, lambda: load_config(argv)))
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_healthy(session, url)
            first.behaviour.token_delay = 0.1
            streams = [asyncio.create_task(chat(session, url, stream=True)) for _ in range(3)]
            async with asyncio.timeout(5):
                while first.state.open < 3:
                    await asyncio.sleep(0.01)
            write_json(path, second, static_aliases="gpt:" + CHAT)
            async with asyncio.timeout(5):
                while second.state.completed == 0:
                    await chat(session, url)
                    await asyncio.sleep(0.05)
            old_ids = set(await asyncio.gather(*streams))
            assert len(old_ids) == 1 and first.state.cancelled == 0
            async with session.get(url + "/v1/models") as response:
                ids = {model["id"] for model in (await response.json())["data"]}
            assert "gpt" in ids
            # A file that does not load is refused; the running configuration serves on.
            path.write_text('{"static_backends": ')
            await asyncio.sleep(0.3)
            completed = second.state.completed
            assert await chat(session, url) not in old_ids
            assert second.state.completed == completed + 1
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)


def test_the_yaml_form_groups_backends_by_model(tmp_path: Path) -> None:
    path = tmp_path / "dynamic.yaml"
    path.write_text(
        "service_discovery: static\n"
        "routing_logic: session\n"
        "session_key: x-user-id\n"
        "static_models:\n"
        "  llama: {static_backends: [http://10.0.0.7:8000, http://10.0.0.8:8000],"
        " static_model_type: chat}\n"
        "  qwen: {static_backends: [http://10.0.0.8:8000], static_model_type: chat}\n"
        "static_aliases: {gpt-4o: llama}\n"
    )
    config = load_config(["--dynamic-config-yaml", str(path), "--session-key", "x-team"])
    assert config.static_backends == (
        StaticBackend("http://10.0.0.7:8000", ("llama",), model_type="chat"),
        StaticBackend("http://10.0.0.8:8000", ("llama", "qwen"), model_type="chat"),
    )
    assert config.aliases == {"gpt-4o": "llama"}
    assert config.routing_logic == "session"
    assert config.session_key == "x-team"  # the command line wins over the file
    assert config.dynamic_config_file == str(path)


@pytest.mark.parametrize("argv, message", [
    (["--dynamic-config-json", "{path}", "--dynamic-config-yaml", "{path}"], "not allowed"),
    (["--config", "{path}", "--dynamic-config-json", "{path}"], "--config"),
    (["--dynamic-config-json", "{typo}"], "static_backend"),
])
def test_bad_dynamic_config_is_refused_naming_the_flag_or_key(
    tmp_path: Path, argv: list[str], message: str
) -> None:
    path, typo = tmp_path / "dynamic.json", tmp_path / "typo.json"
    path.write_text(json.dumps({"static_backends": "http://10.0.0.7:8000",
                                "static_models": "m"}))
    typo.write_text(json.dumps({"static_backend": "http://10.0.0.7:8000"}))
    with pytest.raises(ConfigError, match=message):
        load_config([arg.format(path=path, typo=typo) for arg in argv])
