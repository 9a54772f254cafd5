"""Every error the router produces itself: OpenAI-style JSON, the right status, a request id,
and the request accounted with the right outcome."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from router.config.settings import Config, StaticBackend
from router.flow import Outcome
from router.testing import RunningEngine

from .conftest import CHAT, MODELS, RouterUnderTest, StartRouter, config_for

JSON = {"Content-Type": "application/json"}
Reply = tuple[int, CIMultiDictProxy[str], Any]


async def call(
    method: str, url: str, data: Any = None, headers: dict[str, str] | None = None
) -> Reply:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, data=data, headers=headers) as response:
            # .json() fails unless the Content-Type is application/json.
            return response.status, response.headers, await response.json()


def assert_openai_error(
    reply: Reply, status: int, code: str, error_type: str = "invalid_request_error"
) -> str:
    """Check the reply is exactly {"error": {"message", "type", "code"}}; return the message."""
    got_status, headers, body = reply
    assert got_status == status, body
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"message", "type", "code"}, body
    assert (error["type"], error["code"]) == (error_type, code), body
    assert isinstance(error["message"], str) and error["message"], body
    assert headers.get("x-request-id"), dict(headers)
    return str(error["message"])


async def assert_one_flow(router: RouterUnderTest, outcome: Outcome, status: int) -> None:
    await router.settled(1)
    flow = router.log.only()
    assert (flow.outcome, flow.status) == (outcome, status)
    if outcome is Outcome.REJECTED:
        assert flow.backend is None


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"",
        b"[1, 2]",
        b'"model"',
        b"42",
        b"null",
        b"{}",
        b'{"model": ""}',
        b'{"model": null}',
        b'{"model": ["chat-model"]}',
        b'{"model": 7}',
        b'{"model": {"name": "chat-model"}}',
        b"[" * 100_000,
        b'{"model": "chat-model", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"model": "chat-model", "prompt": "\xff\xfe"}',
        b"\xff\xfe\xfd",
    ],
    ids=[
        "invalid-json", "empty", "array", "string", "number", "null", "no-model",
        "empty-model", "null-model", "model-list", "model-number", "model-object",
        "deeply-nested", "deeply-nested-inside-object", "invalid-utf8-in-string",
        "invalid-utf8",
    ],
)
async def test_bad_json_body_is_a_400(router: RouterUnderTest, body: bytes) -> None:
    reply = await call("POST", router.url + "/v1/completions", data=body, headers=JSON)
    assert_openai_error(reply, 400, "invalid_request")
    await assert_one_flow(router, Outcome.REJECTED, 400)


async def test_rejection_echoes_the_clients_request_id(router: RouterUnderTest) -> None:
    reply = await call("POST", router.url + "/v1/completions", data=b"{}",
                       headers={**JSON, "x-request-id": "req-42"})
    assert_openai_error(reply, 400, "invalid_request")
    assert reply[1]["x-request-id"] == "req-42"
    await assert_one_flow(router, Outcome.REJECTED, 400)
    assert router.log.only().id == "req-42"


async def test_unknown_model_is_a_404_listing_the_known_models(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    reply = await call("POST", router.url + "/v1/chat/completions",
                       data=b'{"model": "gpt-5", "messages": []}', headers=JSON)
    message = assert_openai_error(reply, 404, "model_not_found")
    assert "gpt-5" in message
    assert all(model in message for model in MODELS), message
    await assert_one_flow(router, Outcome.REJECTED, 404)
    assert sum(engine.state.started for engine in engines) == 0


async def test_unknown_model_404_lists_the_models_that_v1_models_lists(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    # "gpt-4o" points at a model no backend serves: /v1/models leaves it out, and asking
    # for it is a 404, so the 404 must not offer it as a known model either.
    router = await start_router(
        config_for(engines, aliases={"gpt-4o": "missing", "fast": CHAT})
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(router.url + "/v1/models") as response:
            listed = sorted(model["id"] for model in (await response.json())["data"])
    assert listed == sorted([*MODELS, "fast"])
    for asked in ("gpt-5", "gpt-4o"):
        reply = await call("POST", router.url + "/v1/completions", headers=JSON,
                           data=b'{"model": "%s", "prompt": "x"}' % asked.encode())
        message = assert_openai_error(reply, 404, "model_not_found")
        known = message.partition("Known models: ")[2].rstrip(".").split(", ")
        assert sorted(known) == listed, message
    await router.settled(2)


async def test_a_long_model_name_is_cut_in_the_404_and_the_access_line(
    router: RouterUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="router.access")
    name = "m" * 100_000
    reply = await call("POST", router.url + "/v1/chat/completions", headers=JSON,
                       data=json.dumps({"model": name, "messages": []}).encode())
    message = assert_openai_error(reply, 404, "model_not_found")
    assert "m" * 150 in message and len(message) < 1000, len(message)
    await assert_one_flow(router, Outcome.REJECTED, 404)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "router.access"]
    assert "m" * 150 in line and len(line) < 1500, len(line)


async def test_an_expectation_other_than_100_continue_is_a_json_417(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    body = json.dumps({"model": CHAT, "messages": []}).encode()
    for path in ("/v1/chat/completions", "/health"):
        reply = await call("POST" if path != "/health" else "GET", router.url + path,
                           data=body, headers={**JSON, "Expect": "200-ok"})
        assert_openai_error(reply, 417, "417")
    assert sum(engine.state.started for engine in engines) == 0
    async with aiohttp.ClientSession() as session:  # 100-continue still works
        async with session.post(router.url + "/v1/chat/completions", data=body,
                                headers=JSON, expect100=True) as response:
            assert response.status == 200


async def test_headers_over_the_total_limit_are_a_json_431(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    router = await start_router(config_for(engines, max_headers_total_size=32 * 1024))
    body = json.dumps({"model": CHAT, "messages": []}).encode()
    many = {f"x-header-{n}": "v" * 8000 for n in range(100)}  # 800 KB, each one allowed
    for path in ("/v1/chat/completions", "/health", "/nope"):
        reply = await call("POST" if path != "/health" else "GET", router.url + path,
                           data=body, headers={**JSON, **many})
        assert_openai_error(reply, 431, "request_header_fields_too_large")
    assert sum(engine.state.started for engine in engines) == 0
    few = {f"x-header-{n}": "v" * 8000 for n in range(3)}  # 24 KB: under the limit
    reply = await call("POST", router.url + "/v1/chat/completions", data=body,
                       headers={**JSON, **few})
    assert reply[0] == 200


@pytest.fixture
async def small_router(start_router: StartRouter, engines: list[RunningEngine]) -> RouterUnderTest:
    return await start_router(config_for(engines, max_json_body_size=1024))


def body_of(size: int) -> bytes:
    head = b'{"model": "' + CHAT.encode() + b'", "prompt": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'


@pytest.mark.parametrize("size", [1025, 4096])
async def test_json_body_over_the_limit_is_a_413(
    small_router: RouterUnderTest, engines: list[RunningEngine], size: int
) -> None:
    body = body_of(size)
    reply = await call("POST", small_router.url + "/v1/completions", data=body, headers=JSON)
    assert_openai_error(reply, 413, "payload_too_large")
    await assert_one_flow(small_router, Outcome.REJECTED, 413)
    assert sum(engine.state.started for engine in engines) == 0


@pytest.mark.parametrize("size", [1025, 4096])
async def test_chunked_json_body_over_the_limit_is_a_413(
    small_router: RouterUnderTest, engines: list[RunningEngine], size: int
) -> None:
    body = body_of(size)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 512):
            yield body[start:start + 512]

    reply = await call("POST", small_router.url + "/v1/completions", data=chunks(),
                       headers=JSON)
    assert_openai_error(reply, 413, "payload_too_large")
    await assert_one_flow(small_router, Outcome.REJECTED, 413)
    assert sum(engine.state.started for engine in engines) == 0


async def test_json_body_at_the_limit_is_proxied(small_router: RouterUnderTest) -> None:
    status, _, reply = await call("POST", small_router.url + "/v1/completions",
                                  data=body_of(1024), headers=JSON)
    assert status == 200, reply
    await assert_one_flow(small_router, Outcome.OK, 200)


@pytest.mark.parametrize("method, path", [("GET", "/nope"), ("POST", "/v1/nope")])
async def test_unknown_path_is_a_json_404(
    router: RouterUnderTest, method: str, path: str
) -> None:
    reply = await call(method, router.url + path)
    message = assert_openai_error(reply, 404, "404")
    assert path in message
    await router.settled(0)
    assert router.log.flows == {}


async def test_wrong_method_is_a_json_405_with_allow(router: RouterUnderTest) -> None:
    reply = await call("GET", router.url + "/v1/chat/completions")
    assert_openai_error(reply, 405, "405")
    assert reply[1]["Allow"] == "POST"
    await router.settled(0)
    assert router.log.flows == {}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_unreachable_backend_is_a_quick_503(start_router: StartRouter) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    # Probes off: this is the request path's own connect failure, not the prober's verdict.
    router = await start_router(Config(
        static_backends=(StaticBackend(url, ("m",)),), connect_timeout=2.0,
        health_check_interval=0,
    ))
    started = time.monotonic()
    reply = await call("POST", router.url + "/v1/completions",
                       data=b'{"model": "m", "prompt": "x"}', headers=JSON)
    assert time.monotonic() - started < 1.0
    message = assert_openai_error(reply, 503, "no_backend_available", "service_unavailable")
    assert "unreachable" in message
    await assert_one_flow(router, Outcome.BACKEND_ERROR, 503)
    assert router.log.only().backend is not None


@pytest.mark.parametrize(
    "answer", [b"", b"NOT HTTP AT ALL\r\n\r\n"], ids=["closes-at-once", "garbage"]
)
async def test_backend_that_breaks_before_its_headers_is_a_502(
    start_router: StartRouter, answer: bytes
) -> None:
    async def broken_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        writer.close()

    server = await asyncio.start_server(broken_backend, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        router = await start_router(
            Config(static_backends=(StaticBackend(f"http://127.0.0.1:{port}", ("m",)),))
        )
        reply = await call("POST", router.url + "/v1/completions",
                           data=b'{"model": "m", "prompt": "x"}', headers=JSON)
        assert_openai_error(reply, 502, "bad_gateway", "upstream_error")
        await assert_one_flow(router, Outcome.BACKEND_ERROR, 502)
    finally:
        server.close()
        await server.wait_closed()


async def test_backend_silent_past_response_timeout_is_a_504(
    start_router: StartRouter, engine: RunningEngine
) -> None:
    router = await start_router(config_for([engine], response_timeout=0.3))
    engine.behaviour.first_token_delay = 5.0
    started = time.monotonic()
    reply = await call("POST", router.url + "/v1/chat/completions", headers=JSON,
                       data=b'{"model": "chat-model", "messages": []}')
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 2.0
    assert_openai_error(reply, 504, "gateway_timeout", "upstream_timeout")
    await assert_one_flow(router, Outcome.TIMEOUT, 504)
    assert router.log.only().ttft is None
