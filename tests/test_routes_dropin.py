"""Routes production-stack proxies, through the router to loopback fake engines: Anthropic
Messages, speech, images (generations, edits), detokenize, and vLLM's sleep-mode admin calls."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from router.app import make_app

from router.backends.pool import backend_id
from router.testing import RunningEngine
from router.testing.engine.media import speech_audio
from tests.conftest import CHAT, RouterUnderTest, StartRouter, config_for


def client_for(router: RouterUnderTest) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)


def sse_events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    """Anthropic's named events: (event name, data) in order."""
    events = []
    for block in raw.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        events.append((lines["event"], json.loads(lines["data"])))
    return events


async def test_anthropic_messages_json_and_stream(router: RouterUnderTest) -> None:
    body = {"model": CHAT, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"anthropic-version": "2023-06-01"}
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/v1/messages", json=body,
                                headers=headers) as response:
            assert response.status == 200
            message = await response.json()
        assert message["type"] == "message" and message["model"] == CHAT
        assert message["usage"]["output_tokens"] == 5

        async with session.post(router.url + "/v1/messages", json={**body, "stream": True},
                                headers=headers) as response:
            assert response.status == 200
            assert response.content_type == "text/event-stream"
            events = sse_events(await response.text())
        names = [name for name, _ in events]
        assert names[0] == "message_start" and names[-1] == "message_stop"
        assert names.count("content_block_delta") == 5
        assert all(data["type"] == name for name, data in events)

        async with session.post(router.url + "/v1/messages",
                                json={**body, "model": "nope"}) as response:
            assert response.status == 404  # the router read `model`: no engine serves it
            assert (await response.json())["error"]["code"] == "model_not_found"
    await router.settled(3)
    streamed = [flow for flow in router.log.flows.values() if flow.stream]
    assert [flow.endpoint for flow in streamed] == ["/v1/messages"]


async def test_speech_bytes_pass_through_whole_and_streamed(router: RouterUnderTest) -> None:
    client = client_for(router)
    audio = await client.audio.speech.create(model=CHAT, voice="alloy", input="hello there")
    assert audio.content == speech_audio("hello there", "alloy")
    assert audio.response.headers["content-type"] == "audio/mpeg"

    async with client.audio.speech.with_streaming_response.create(
        model=CHAT, voice="echo", input="streamed", response_format="wav",
    ) as response:
        chunks = [chunk async for chunk in response.iter_bytes()]
    assert b"".join(chunks) == speech_audio("streamed", "echo")
    assert response.headers["content-type"] == "audio/wav"
    await router.settled(2)


async def test_image_generation(router: RouterUnderTest) -> None:
    result = await client_for(router).images.generate(model=CHAT, prompt="a cat", n=2)
    assert result.data is not None
    assert [base64.b64decode(image.b64_json or "") for image in result.data] == [
        b"image 0 of a cat", b"image 1 of a cat",
    ]
    await router.settled(1)


async def test_image_edit_upload_streams_through(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    image = bytes(range(256)) * 4000  # ~1 MB: more than the router peeks at
    digest = hashlib.sha256(image).hexdigest()
    client = client_for(router)
    result = await client.images.edit(model=CHAT, image=("cat.png", image, "image/png"),
                                      prompt="add a hat")
    assert result.data is not None
    assert result.data[0].revised_prompt == (
        f"edit of {len(image)} bytes with sha256 {digest}: add a hat"
    )
    # Several images go as `image[]`.
    two = await client.images.edit(
        model=CHAT, image=[("a.png", b"a" * 10, "image/png"), ("b.png", b"b" * 10, "image/png")],
        prompt="merge",
    )
    assert two.data is not None and "edit of 20 bytes" in (two.data[0].revised_prompt or "")
    uploads = [upload for engine in engines for upload in engine.state.uploads]
    assert sorted(upload.size for upload in uploads) == [20, len(image)]

    async with aiohttp.ClientSession() as session:
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("model", CHAT)
        form.add_field("prompt", "no image")
        async with session.post(router.url + "/v1/images/edits", data=form) as response:
            assert response.status == 400
            assert "'image'" in (await response.json())["error"]["message"]
    await router.settled(3)


async def test_detokenize(router: RouterUnderTest) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/tokenize",
                                json={"model": CHAT, "prompt": "a b c"}) as response:
            tokens = (await response.json())["tokens"]
        async with session.post(router.url + "/detokenize",
                                json={"model": CHAT, "tokens": tokens}) as response:
            assert response.status == 200
            assert await response.json() == {"prompt": "a b c"}
    await router.settled(2)


async def test_sleep_wake_fan_out_and_one_engine(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    ids = [backend_id(engine.url) for engine in engines]
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/sleep?level=2") as response:
            assert response.status == 200
            answer = await response.json()
        assert sorted(entry["engine_id"] for entry in answer["engines"]) == sorted(ids)
        assert [engine.state.sleep_level for engine in engines] == [2, 2]

        async with session.get(router.url + "/is_sleeping") as response:
            entries = (await response.json())["engines"]
        assert [entry["answer"] for entry in entries] == [{"is_sleeping": True}] * 2

        async with session.post(router.url + f"/wake_up?id={ids[1]}") as response:
            assert response.status == 200
        assert [engine.state.sleep_level for engine in engines] == [2, 0]
        async with session.get(router.url + f"/is_sleeping?id={ids[1]}") as response:
            assert await response.json() == {"is_sleeping": False}  # the engine's own answer

        async with session.post(router.url + "/sleep?level=9") as response:
            assert response.status == 502  # every engine refused: the listing says so
            entries = (await response.json())["engines"]
        assert {entry["status"] for entry in entries} == {400}

        async with session.post(router.url + "/sleep?id=unknown") as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "invalid_request"


async def test_sleep_with_an_engine_down_is_a_502_listing(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    await engines[0].close()
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/sleep") as response:
            assert response.status == 502
            entries = {e["engine_id"]: e for e in (await response.json())["engines"]}
    down = entries[backend_id(engines[0].url)]
    assert down["status"] == 0 and down["error"] == "cannot reach the engine"
    assert "127.0.0.1" not in json.dumps(entries)
    assert entries[backend_id(engines[1].url)]["status"] == 200


async def test_engine_admin_calls_need_a_key_when_keys_are_set(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    router = await start_router(config_for(engines, api_keys=("k",)))
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/sleep") as response:
            assert response.status == 401
        assert [engine.state.sleep_level for engine in engines] == [0, 0]
        async with session.post(router.url + "/sleep",
                                headers={"Authorization": "Bearer k"}) as response:
            assert response.status == 200
        assert [engine.state.sleep_level for engine in engines] == [1, 1]


def this_host_address() -> str | None:
    """An address of this host other than loopback, if it has one (no packet is sent)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 9))
        address: str = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


async def test_without_keys_only_this_host_may_put_engines_to_sleep(
    aiohttp_server: Callable[..., Awaitable[TestServer]], engines: list[RunningEngine]
) -> None:
    address = this_host_address()
    if address is None:
        pytest.skip("this host has no address but loopback")
    server = await aiohttp_server(make_app(config_for(engines)), host="0.0.0.0")
    async with aiohttp.ClientSession() as session:
        remote = f"http://{address}:{server.port}"
        async with session.post(remote + "/sleep") as response:
            assert response.status == 403
            assert (await response.json())["error"]["code"] == "forbidden"
        async with session.get(remote + "/is_sleeping") as response:
            assert response.status == 200  # reading is open
        assert [engine.state.sleep_level for engine in engines] == [0, 0]
        async with session.post(f"http://127.0.0.1:{server.port}/sleep") as response:
            assert response.status == 200
        assert [engine.state.sleep_level for engine in engines] == [1, 1]
