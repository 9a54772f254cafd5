"""Disaggregated prefill through the router to a prefill and a decode engine on loopback: what
each hop is sent under `disaggregated_prefill` (production-stack's: a one-token prefill, then
the client's body as it came) and `disaggregated_prefill_orchestrated` (the prefill's
`kv_transfer_params` handed to the decode), and how a failed prefill reaches the client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDictProxy

from router.config.settings import Config, StaticBackend
from router.flow import Outcome
from router.testing import RunningEngine, start_engine
from router.testing.processes import free_port

from .conftest import CHAT, MODELS, RouterUnderTest, StartRouter

Headers = CIMultiDictProxy[str]

CLIENT_BODY: dict[str, Any] = {
    "model": CHAT,
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 3,
    "max_completion_tokens": 3,
    "min_tokens": 2,
    "stream": True,
    "stream_options": {"include_usage": True},
    "temperature": 0.5,
    "user": "u-1",
}

PREFILL_BODY: dict[str, Any] = {
    "model": CHAT,
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 1,
    "stream": False,
    "temperature": 0.5,
    "user": "u-1",
}
"""What the prefill engine must get for `CLIENT_BODY`: one token, no stream, the fields that
bound or shape a longer answer left out, nothing added."""


@pytest.fixture
async def prefill_and_decode() -> AsyncIterator[tuple[RunningEngine, RunningEngine]]:
    prefill = await start_engine(MODELS, name="prefill-0")
    decode = await start_engine(MODELS, name="decode-0")
    yield prefill, decode
    await prefill.close()
    await decode.close()


def disaggregated(prefill_url: str, decode_url: str, policy: str) -> Config:
    return Config(
        static_backends=(StaticBackend(prefill_url, MODELS, ("prefill",)),
                         StaticBackend(decode_url, MODELS, ("decode",))),
        routing_logic=policy, health_check_interval=0, engine_stats_interval=0,
    )


async def post(router: RouterUnderTest, body: dict[str, Any],
               path: str = "/v1/chat/completions") -> tuple[int, str, Headers]:
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + path, json=body) as response:
            return response.status, await response.text(), response.headers


def streamed_text(answer: str) -> str:
    """The content of an SSE chat stream."""
    parts = []
    for line in answer.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                parts.append(choice["delta"].get("content") or "")
    return "".join(parts)


async def test_prefill_gets_one_token_of_the_clients_body_and_decode_the_body_untouched(
    start_router: StartRouter, prefill_and_decode: tuple[RunningEngine, RunningEngine],
) -> None:
    prefill, decode = prefill_and_decode
    router = await start_router(disaggregated(prefill.url, decode.url, "disaggregated_prefill"))
    # The prefill engine is not asked for kv_transfer_params and returns none: production-stack's
    # flow does not need them (the engines share the cache themselves, e.g. through LMCache).
    status, answer, headers = await post(router, CLIENT_BODY)
    assert status == 200, answer
    assert streamed_text(answer).split() == ["tok0", "tok1", "tok2"]
    assert prefill.state.last_json == PREFILL_BODY
    assert decode.state.last_json == CLIENT_BODY
    assert (prefill.state.completed, decode.state.completed) == (1, 1)
    await router.settled(1)
    flow = router.log.only()
    assert flow.outcome is Outcome.OK
    assert flow.prefill_backend is not None and flow.prefill_backend.url == prefill.url
    assert flow.backend is not None and flow.backend.url == decode.url
    assert headers["x-router-backend"] == flow.backend.id


async def test_completions_prefill_without_the_optional_fields_only_gains_its_one_token(
    start_router: StartRouter, prefill_and_decode: tuple[RunningEngine, RunningEngine],
) -> None:
    prefill, decode = prefill_and_decode
    router = await start_router(disaggregated(prefill.url, decode.url, "disaggregated_prefill"))
    body = {"model": CHAT, "prompt": "once upon", "max_tokens": 2}
    status, answer, _ = await post(router, body, "/v1/completions")
    assert status == 200, answer
    assert prefill.state.last_json == {**body, "max_tokens": 1, "stream": False}
    assert decode.state.last_json == body
    await router.settled(1)


async def test_orchestrated_hands_the_prefills_kv_transfer_params_to_the_decode(
    start_router: StartRouter, prefill_and_decode: tuple[RunningEngine, RunningEngine],
) -> None:
    prefill, decode = prefill_and_decode
    router = await start_router(
        disaggregated(prefill.url, decode.url, "disaggregated_prefill_orchestrated"))
    status, answer, _ = await post(router, CLIENT_BODY)
    assert status == 200, answer
    assert streamed_text(answer).split() == ["tok0", "tok1", "tok2"]
    assert prefill.state.last_json == {**PREFILL_BODY, "kv_transfer_params": {
        "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
        "remote_block_ids": None, "remote_host": None, "remote_port": None,
    }}
    decode_body = decode.state.last_json
    assert decode_body is not None
    params = decode_body.pop("kv_transfer_params")
    assert decode_body == CLIENT_BODY
    assert params["remote_engine_id"] == "prefill-0" and params["do_remote_prefill"] is True
    await router.settled(1)


async def test_orchestrated_prefill_answer_without_kv_transfer_params_is_a_502(
    start_router: StartRouter, engine: RunningEngine,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    async def answer_without_params(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"id": "x", "choices": []})

    bare = web.Application()
    bare.router.add_post("/v1/chat/completions", answer_without_params)
    server = await aiohttp_server(bare)
    prefill_url = str(server.make_url("")).rstrip("/")
    router = await start_router(
        disaggregated(prefill_url, engine.url, "disaggregated_prefill_orchestrated"))
    status, answer, _ = await post(router, CLIENT_BODY)
    assert status == 502
    assert "returned no kv_transfer_params" in json.loads(answer)["error"]["message"]
    assert engine.state.started == 0
    # Without the handoff the same answer is all a prefill needs to give.
    plain = await start_router(disaggregated(prefill_url, engine.url, "disaggregated_prefill"))
    status, answer, _ = await post(plain, CLIENT_BODY)
    assert status == 200, answer
    await router.settled(1)
    await plain.settled(1)


@pytest.mark.parametrize("policy", ["disaggregated_prefill", "disaggregated_prefill_orchestrated"])
@pytest.mark.parametrize("fail_status", [400, 500])
async def test_a_failed_prefill_is_the_clients_json_error_and_no_decode_runs(
    start_router: StartRouter, prefill_and_decode: tuple[RunningEngine, RunningEngine],
    policy: str, fail_status: int,
) -> None:
    prefill, decode = prefill_and_decode
    prefill.behaviour.fail_status = fail_status
    router = await start_router(disaggregated(prefill.url, decode.url, policy))
    status, answer, headers = await post(router, CLIENT_BODY)
    error = json.loads(answer)["error"]
    assert status == fail_status
    assert error["code"] == "prefill_failed" and error["type"] == "upstream_error"
    assert error["message"].endswith("Injected failure from engine prefill-0.")
    assert prefill.url not in error["message"]
    assert decode.state.started == 0
    await router.settled(1)
    flow = router.log.only()
    assert headers["x-request-id"] == flow.id
    assert flow.outcome is (Outcome.REJECTED if fail_status < 500 else Outcome.BACKEND_ERROR)


@pytest.mark.parametrize("policy", ["disaggregated_prefill", "disaggregated_prefill_orchestrated"])
async def test_an_unreachable_prefill_backend_is_a_json_error_and_no_decode_runs(
    start_router: StartRouter, engine: RunningEngine, policy: str,
) -> None:
    gone = f"http://127.0.0.1:{free_port()}"
    router = await start_router(disaggregated(gone, engine.url, policy))
    status, answer, _ = await post(router, CLIENT_BODY)
    error = json.loads(answer)["error"]
    assert status in (502, 503) and error["code"], answer
    assert gone not in error["message"] and "127.0.0.1" not in error["message"]
    assert engine.state.started == 0
    await router.settled(1)
    assert router.log.only().outcome is Outcome.BACKEND_ERROR
