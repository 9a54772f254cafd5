"""The fake engine's fault knobs, checked directly (no router): what the scenarios rely on."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from router.testing import RunningEngine
from router.testing.chaos.backend import Fault, MisbehavingBackend
from router.testing.chaos.engine import EngineProcess

from ..conftest import CHAT, MODELS

CHAT_BODY = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}]}


async def test_fail_burst_fails_the_next_n_requests_only(engine: RunningEngine) -> None:
    engine.behaviour.fail_status = 429
    engine.behaviour.fail_burst = 2
    async with aiohttp.ClientSession() as session:
        statuses = []
        for _ in range(4):
            async with session.post(engine.url + "/v1/chat/completions",
                                    json=CHAT_BODY) as response:
                statuses.append(response.status)
    assert statuses == [429, 429, 200, 200]
    assert (engine.state.failures_injected, engine.behaviour.fail_burst) == (2, 0)


async def test_truncate_after_chunks_ends_the_body_early(engine: RunningEngine) -> None:
    engine.behaviour.truncate_after_chunks = 2
    async with aiohttp.ClientSession() as session:
        async with session.post(engine.url + "/v1/chat/completions",
                                json={**CHAT_BODY, "stream": True}) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    await asyncio.sleep(0.05)
    assert (engine.state.truncated, engine.state.resets, engine.state.open) == (1, 0, 0)


async def test_headers_delay_and_chunk_padding(engine: RunningEngine) -> None:
    engine.behaviour.headers_delay = 0.2
    engine.behaviour.chunk_padding = 1000
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(engine.url + "/v1/chat/completions",
                                json={**CHAT_BODY, "stream": True, "max_tokens": 3}) as response:
            assert time.monotonic() - started >= 0.2
            text = await response.text()
    assert text.rstrip().endswith("data: [DONE]")
    assert engine.state.bytes_sent == len(text.encode()) >= 5 * 1000


async def test_misbehaving_backend_answers_probes_and_logs_faults() -> None:
    async with MisbehavingBackend([Fault.INVALID_HTTP, Fault.OK]) as backend:
        async with aiohttp.ClientSession() as session:
            async with session.get(backend.url + "/health") as response:
                assert response.status == 200
            with pytest.raises(aiohttp.ClientResponseError):
                await session.post(backend.url + "/v1/chat/completions", json=CHAT_BODY,
                                   headers={"x-request-id": "one"})
            async with session.post(backend.url + "/v1/chat/completions", json=CHAT_BODY,
                                    headers={"x-request-id": "two"}) as response:
                assert (await response.json())["object"] == "chat.completion"
    assert [(s.fault, s.request_id) for s in backend.served] == [
        (Fault.INVALID_HTTP, "one"), (Fault.OK, "two")]
    assert backend.faults_injected == 1


async def test_engine_process_is_steered_killed_and_restarted() -> None:
    async with EngineProcess(MODELS, name="child") as child:
        await child.configure(fail_status=503, fail_burst=1)
        async with aiohttp.ClientSession() as session:
            for expected in (503, 200):
                async with session.post(child.url + "/v1/chat/completions",
                                        json=CHAT_BODY) as response:
                    assert response.status == expected
        assert (await child.state())["failures_injected"] == 1
        await child.kill()
        assert not child.alive and child.kills == 1
        await child.start()  # on the same port, its knobs set again (a burst re-armed)
        assert (await child.state())["started"] == 0
    assert not child.alive
