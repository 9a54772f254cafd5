"""Nothing gets in, nothing waits forever: API keys, credentials to backends, admission
control, rate limits, slow clients and oversized headers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router.app import make_app
from router.config.load import load_config
from router.config.settings import Config, StaticBackend
from router.flow import Outcome
from router.serve.server import serve
from router.testing import RunningEngine
from router.testing.processes import free_port, wait_until_healthy

from .conftest import CHAT, MODELS, RouterUnderTest, StartRouter, config_for

BODY = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def call(
    router: RouterUnderTest, method: str, path: str, key: str | None = None,
    body: dict[str, Any] | None = None,
) -> tuple[int, Any, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, router.url + path, json=body,
                                   headers=headers) as response:
            text = await response.text()
            try:
                payload = json.loads(text)
            except ValueError:
                payload = text
            return response.status, payload, response.headers


async def test_api_keys_guard_the_api_but_not_probes(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    router = await start_router(config_for(engines, api_keys=("key-one", "key-two")))
    for key in (None, "wrong", "key-one-but-longer"):
        status, payload, headers = await call(router, "POST", "/v1/chat/completions", key, BODY)
        assert status == 401 and payload["error"]["type"] == "authentication_error"
        assert headers["WWW-Authenticate"] == "Bearer" and headers["x-request-id"]
    for key in ("key-one", "key-two"):
        status, _, _ = await call(router, "POST", "/v1/chat/completions", key, BODY)
        assert status == 200
    assert (await call(router, "GET", "/v1/models"))[0] == 401
    for path in ("/health", "/ready", "/metrics", "/engines"):
        assert (await call(router, "GET", path))[0] == 200, path
    assert sum(engine.state.started for engine in engines) == 2
    await router.settled(2)


async def test_anthropic_clients_present_their_key_as_x_api_key(
    start_router: StartRouter, engine: RunningEngine
) -> None:
    router = await start_router(config_for([engine], api_keys=("key-one",)))
    async with aiohttp.ClientSession() as session:
        for key, status in (("wrong", 401), ("key-one", 200)):
            async with session.post(router.url + "/v1/chat/completions", json=BODY,
                                    headers={"x-api-key": key}) as response:
                assert response.status == status
    # The router's key is the client's credential for the router, not sent on.
    assert engine.state.last_headers is not None
    assert "x-api-key" not in engine.state.last_headers
    await router.settled(1)  # a 401 comes before the request has a flow


async def test_protect_admin_closes_metrics_and_engines(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    router = await start_router(config_for(engines, api_keys=("k",), protect_admin=True))
    for path in ("/metrics", "/engines", "/dashboard", "/version"):
        assert (await call(router, "GET", path))[0] == 401, path
        assert (await call(router, "GET", path, "k"))[0] == 200, path
    for path in ("/health", "/ready"):
        assert (await call(router, "GET", path))[0] == 200, path


@pytest.mark.parametrize(
    "settings, seen",
    [
        ({}, None),
        ({"backend_api_key": "backend-secret"}, "Bearer backend-secret"),
        ({"forward_client_auth": True}, "Bearer client-key"),
        ({"forward_client_auth": True, "backend_api_key": "b"}, "Bearer client-key"),
    ],
)
async def test_which_credentials_reach_the_backend(
    start_router: StartRouter, engine: RunningEngine, settings: dict[str, Any], seen: str | None
) -> None:
    router = await start_router(config_for([engine], api_keys=("client-key",), **settings))
    status, _, _ = await call(router, "POST", "/v1/chat/completions", "client-key", BODY)
    assert status == 200
    assert engine.state.last_headers is not None
    assert engine.state.last_headers.get("Authorization") == seen


async def test_admission_queues_then_refuses_with_retry_after(
    start_router: StartRouter, engine: RunningEngine
) -> None:
    router = await start_router(config_for(
        [engine], max_concurrent_requests=2, queue_size=1, queue_timeout=0.3,
    ))
    engine.behaviour.first_token_delay = 1.0
    running = [asyncio.create_task(call(router, "POST", "/v1/chat/completions", body=BODY))
               for _ in range(2)]
    async with asyncio.timeout(3):
        while engine.state.open < 2:
            await asyncio.sleep(0.01)
    queued = asyncio.create_task(call(router, "POST", "/v1/chat/completions", body=BODY))
    await asyncio.sleep(0.05)
    status, payload, headers = await call(router, "POST", "/v1/chat/completions", body=BODY)
    assert status == 429 and payload["error"]["code"] == "rate_limit_exceeded"
    assert "queue is full" in payload["error"]["message"] and headers["Retry-After"] == "1"
    status, payload, _ = await queued  # waited its 0.3 s, then gave up
    assert status == 429 and "in the queue" in payload["error"]["message"]
    assert [result[0] for result in await asyncio.gather(*running)] == [200, 200]
    engine.behaviour.first_token_delay = 0
    assert (await call(router, "POST", "/v1/chat/completions", body=BODY))[0] == 200
    await router.settled(5)
    outcomes = sorted(str(flow.outcome) for flow in router.log.flows.values())
    assert outcomes.count(str(Outcome.REJECTED)) == 2


async def test_a_queued_request_runs_when_a_slot_frees(
    start_router: StartRouter, engine: RunningEngine
) -> None:
    router = await start_router(config_for([engine], max_concurrent_requests=1, queue_size=5))
    engine.behaviour.first_token_delay = 0.2
    results = await asyncio.gather(*(call(router, "POST", "/v1/chat/completions", body=BODY)
                                     for _ in range(4)))
    assert [status for status, _, _ in results] == [200] * 4
    assert engine.state.completed == 4
    await router.settled(4)


async def test_rate_limit_per_client(start_router: StartRouter, engine: RunningEngine) -> None:
    router = await start_router(config_for([engine], rate_limit=1.0, rate_limit_burst=2.0))
    statuses = [(await call(router, "POST", "/v1/chat/completions", body=BODY))[0]
                for _ in range(3)]
    assert statuses == [200, 200, 429]
    await router.settled(3)


async def test_slow_json_body_gets_408_without_touching_a_backend(
    start_router: StartRouter, engine: RunningEngine
) -> None:
    router = await start_router(config_for([engine], client_body_timeout=0.3))
    reader, writer = await asyncio.open_connection(router.server.host, router.server.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"")
    started = time.monotonic()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    assert head.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 2
    writer.close()
    assert engine.state.started == 0
    await router.settled(1)


async def test_slowloris_headers_are_cut_off(engines: list[RunningEngine]) -> None:
    port = free_port()
    stop = asyncio.Event()
    config = Config(host="127.0.0.1", port=port, client_header_timeout=0.3,
                    static_backends=tuple(StaticBackend(e.url, MODELS) for e in engines))
    server = asyncio.create_task(serve(config, stop))
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_healthy(session, f"http://127.0.0.1:{port}")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the router
        assert time.monotonic() - started < 2
        writer.close()
    finally:
        stop.set()
        await asyncio.wait_for(server, 5)


async def raw_exchange(port: int, head: bytes) -> tuple[int, dict[str, str], Any]:
    """Send `head` on a fresh connection; the status, headers and JSON body of the answer,
    which must close the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        raw = await asyncio.wait_for(reader.read(), 5)  # read() to EOF: the router closed
    finally:
        writer.close()
    head_part, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head_part.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip()
               for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, json.loads(body)


async def test_oversized_or_malformed_heads_get_json_errors(
    engines: list[RunningEngine], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="router.server")
    port = free_port()
    stop = asyncio.Event()
    config = Config(host="127.0.0.1", port=port, max_header_size=1024,
                    static_backends=tuple(StaticBackend(e.url, MODELS) for e in engines))
    server = asyncio.create_task(serve(config, stop))
    chat = b"POST /v1/chat/completions"
    heads = {
        "big header": chat + b" HTTP/1.1\r\nHost: x\r\nX-Big: " + b"x" * 4096 + b"\r\n\r\n",
        "long URL": chat + b"?q=" + b"x" * 4096 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "many headers": chat + b" HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: y\r\n" % i for i in range(500)) + b"\r\n",
        "not HTTP": b"GARBAGE / HTTP/1.1\r\n\r\n",
    }
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}"
            await wait_until_healthy(session, url)
            for case, head in heads.items():
                status, headers, body = await raw_exchange(port, head)
                expected = (400, "malformed_request") if case == "not HTTP" else (
                    431, "request_header_fields_too_large")
                assert (status, body["error"]["code"]) == expected, case
                assert body["error"]["type"] == "invalid_request_error", case
                assert headers["content-type"].startswith("application/json"), case
                assert headers["x-request-id"], case
            async with session.post(url + "/v1/chat/completions", json=BODY,
                                    headers={"X-Small": "x" * 512}) as response:
                assert response.status == 200
    finally:
        stop.set()
        await asyncio.wait_for(server, 5)
    assert sum(engine.state.started for engine in engines) == 1
    # One line per refusal, no traceback (a client must not be able to flood the log).
    refusals = [r for r in caplog.records if r.getMessage().startswith("refused a request")]
    assert len(refusals) == len(heads) and not any(r.exc_info for r in caplog.records)


async def test_keys_work_with_a_root_path_and_refusals_are_counted(
    aiohttp_client: Any, engines: list[RunningEngine], caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(config_for(engines, api_keys=("k",), root_path="/router"))
    client = await aiohttp_client(app)
    for path in ("/health", "/ready"):
        assert (await client.get(path)).status == 200, path
    caplog.set_level("INFO", logger="router.access")
    response = await client.post("/v1/chat/completions", json=BODY)
    assert response.status == 401
    assert "refused" in caplog.text and "no valid API key" in caplog.text
    response = await client.post("/v1/chat/completions", json=BODY,
                                 headers={"Authorization": "bearer   k"})  # any case, spaces
    assert response.status == 200
    metrics = await (await client.get("/metrics")).text()
    assert "router_unauthorized_requests_total 1.0" in metrics
    assert (await client.get("/elsewhere")).content_type == "application/json"


async def test_rate_limits_follow_the_key_not_the_header_spelling(
    start_router: StartRouter, engine: RunningEngine
) -> None:
    router = await start_router(config_for([engine], api_keys=("k",), rate_limit=1.0,
                                           rate_limit_burst=1.0))
    statuses = []
    for header in ("Bearer k", "Bearer  k", "bearer k"):
        async with aiohttp.ClientSession() as session:
            async with session.post(router.url + "/v1/chat/completions", json=BODY,
                                    headers={"Authorization": header}) as response:
                statuses.append(response.status)
    assert statuses == [200, 429, 429]


async def test_without_keys_a_varying_header_does_not_escape_the_rate_limit(
    start_router: StartRouter, engine: RunningEngine
) -> None:
    router = await start_router(config_for([engine], rate_limit=1.0, rate_limit_burst=1.0))
    statuses = []
    for n in range(3):
        async with aiohttp.ClientSession() as session:
            async with session.post(router.url + "/v1/chat/completions", json=BODY,
                                    headers={"Authorization": f"Bearer junk-{n}"}) as response:
                statuses.append(response.status)
    assert statuses == [200, 429, 429]


async def test_backend_redirects_are_not_followed(
    start_router: StartRouter, engine: RunningEngine, aiohttp_server: Any
) -> None:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(engine.url + "/v1/chat/completions")

    elsewhere = web.Application()
    elsewhere.router.add_post("/v1/chat/completions", redirect)
    server = await aiohttp_server(elsewhere)
    router = await start_router(Config(
        static_backends=(StaticBackend(str(server.make_url("")).rstrip("/"), MODELS),),
        health_check_interval=0,
    ))
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/v1/chat/completions", json=BODY,
                                allow_redirects=False) as response:
            assert response.status == 307
    assert engine.state.started == 0


async def test_a_reload_cannot_drop_every_key(
    engines: list[RunningEngine], tmp_path: Any
) -> None:
    path, port = tmp_path / "router.json", free_port()
    url = f"http://127.0.0.1:{port}"

    def write(keys: list[str]) -> None:
        path.write_text(json.dumps({
            "host": "127.0.0.1", "port": port, "api-keys": ",".join(keys),
            "static-backends": [engines[0].url], "static-models": [list(MODELS)],
        }))

    write(["first"])
    argv = ["--config", str(path)]
    config = await asyncio.to_thread(load_config, argv)
    stop = asyncio.Event()
    server = asyncio.create_task(serve(config, stop, lambda: load_config(argv)))
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_healthy(session, url)

            async def status(key: str) -> int:
                async with session.post(url + "/v1/chat/completions", json=BODY,
                                        headers={"Authorization": f"Bearer {key}"}) as answer:
                    return answer.status

            write(["second"])
            os.kill(os.getpid(), signal.SIGHUP)
            async with asyncio.timeout(5):
                while await status("second") != 200:
                    await asyncio.sleep(0.05)
            assert await status("first") == 401
            write([])  # refused: the router stays protected
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(0.3)
            assert (await status("nothing"), await status("second")) == (401, 200)
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)
