"""`/v1/realtime` through the router to the fake engine's Realtime endpoint: messages and
control frames relayed both ways, close codes passed on, an engine that dies mid-session, the
limits (message size, idle timeout, admission) and the session's one flow, with its metric."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from router.config.settings import Config, StaticBackend
from router.flow import Outcome
from router.keys import LIVE_REQUESTS, POOL
from router.testing import RunningEngine
from router.testing.engine.realtime import REALTIME_STATE, RealtimeState

from .conftest import CHAT, RouterUnderTest, StartRouter, config_for, eventually

TIMEOUT = 5.0


def seen(engine: RunningEngine) -> RealtimeState:
    return engine.app[REALTIME_STATE]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def connect(
    http: aiohttp.ClientSession, router: RouterUnderTest, query: str = f"?model={CHAT}",
    **options: Any,
) -> aiohttp.ClientWebSocketResponse:
    return await http.ws_connect(router.url + "/v1/realtime" + query, autoping=False,
                                 autoclose=False, **options)


async def event(socket: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    message = await socket.receive(TIMEOUT)
    assert message.type is WSMsgType.TEXT, message
    parsed: dict[str, Any] = json.loads(message.data)
    return parsed


async def upgrade_refused(
    http: aiohttp.ClientSession, router: RouterUnderTest, query: str, upgrade: bool = True,
) -> tuple[int, Any]:
    """A handshake the router refuses: its status and JSON body."""
    headers = {
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
    } if upgrade else {}
    async with http.get(router.url + "/v1/realtime" + query, headers=headers) as response:
        return response.status, await response.json()


async def test_a_session_is_relayed_both_ways_and_is_one_flow(
    router: RouterUnderTest, engines: list[RunningEngine], http: aiohttp.ClientSession,
) -> None:
    socket = await connect(http, router, f"?model={CHAT}&intent=transcription")
    assert (await event(socket))["type"] == "session.created"
    await socket.send_str(json.dumps({"type": "session.update", "model": CHAT}))
    assert await event(socket) == {"type": "session.updated", "model": CHAT}
    audio = base64.b64encode(b"\x01\x02" * 640).decode()
    await socket.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
    await socket.send_str(json.dumps({"type": "input_audio_buffer.commit"}))
    deltas = [await event(socket) for _ in range(3)]
    assert "".join(d["delta"] for d in deltas) == "heard 1280 bytes"
    done = await event(socket)
    assert done["type"] == "transcription.done" and done["usage"]["completion_tokens"] == 3
    await socket.send_bytes(b"\x00binary\xff")
    message = await socket.receive(TIMEOUT)
    assert (message.type, message.data) == (WSMsgType.BINARY, b"\x00binary\xff")
    await socket.close(code=4001, message=b"client done")
    assert socket.close_code == 4001  # the router echoed the client's code

    engine = next(e for e in engines if seen(e).opened)
    assert seen(engine).last_path == f"/v1/realtime?model={CHAT}&intent=transcription"
    await eventually(lambda: seen(engine).close_codes == [4001])
    await router.settled(1)
    flow = router.log.only()
    assert (flow.outcome, flow.status, flow.model, flow.endpoint) == (
        Outcome.OK, 101, CHAT, "/v1/realtime")
    assert flow.backend is not None and flow.backend.url == engine.url
    assert router.log.events[flow.id] == ["new", "response", "complete"]
    assert flow.bytes_down > 0
    async with http.get(router.url + "/metrics") as response:
        assert ('router_requests_total{endpoint="/v1/realtime",outcome="ok",status="101"} 1.0'
                in await response.text())


async def test_pings_go_end_to_end_and_the_engine_close_code_reaches_the_client(
    router: RouterUnderTest, http: aiohttp.ClientSession,
) -> None:
    socket = await connect(http, router)
    await event(socket)
    await socket.ping(b"are you there")
    message = await socket.receive(TIMEOUT)
    assert (message.type, message.data) == (WSMsgType.PONG, b"are you there")
    await socket.send_str(json.dumps({"type": "test.close", "code": 4002, "reason": "bye"}))
    message = await socket.receive(TIMEOUT)
    assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 4002, "bye")
    await socket.close()
    await router.settled(1)
    assert router.log.only().outcome is Outcome.OK


async def test_an_engine_that_dies_mid_session_closes_the_client_with_1014(
    router: RouterUnderTest, engines: list[RunningEngine], http: aiohttp.ClientSession,
) -> None:
    socket = await connect(http, router)
    await event(socket)
    await socket.send_str(json.dumps({"type": "test.die"}))
    message = await socket.receive(TIMEOUT)
    assert (message.type, message.data) == (WSMsgType.CLOSE, 1014)
    await socket.close()
    await router.settled(1)
    flow = router.log.only()
    assert flow.outcome is Outcome.BACKEND_ERROR and flow.error is not None
    assert "mid-session" in flow.error
    assert router.app[LIVE_REQUESTS].live == 0
    assert sum(seen(e).open for e in engines) == 0


async def test_a_client_that_vanishes_ends_the_engine_session(
    router: RouterUnderTest, engines: list[RunningEngine],
) -> None:
    async with aiohttp.ClientSession() as http:
        socket = await connect(http, router)
        await event(socket)
        assert sum(seen(e).open for e in engines) == 1
    # The session's connection dropped without a close frame.
    await eventually(lambda: sum(seen(e).open for e in engines) == 0)
    await router.settled(1)
    assert router.log.only().outcome is Outcome.CLIENT_DISCONNECTED
    assert [code for e in engines for code in seen(e).close_codes] == [1001]


async def test_refused_upgrades_are_json_errors_before_any_backend(
    router: RouterUnderTest, engines: list[RunningEngine], http: aiohttp.ClientSession,
) -> None:
    status, body = await upgrade_refused(http, router, "")  # two models: which one?
    assert status == 400 and "?model=" in body["error"]["message"]
    status, body = await upgrade_refused(http, router, "?model=nope")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body = await upgrade_refused(http, router, f"?model={CHAT}&id=unknown")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = await upgrade_refused(http, router, f"?model={CHAT}", upgrade=False)
    assert status == 400 and "WebSocket" in body["error"]["message"]
    await router.settled(4)
    assert router.log.outcomes() == [Outcome.REJECTED] * 4
    assert sum(seen(e).opened for e in engines) == 0


async def test_an_unreachable_engine_is_a_503_before_the_upgrade(
    start_router: StartRouter, http: aiohttp.ClientSession,
) -> None:
    router = await start_router(Config(static_backends=(
        StaticBackend(url="http://127.0.0.1:9", models=(CHAT,)),)))
    status, body = await upgrade_refused(http, router, "")  # the one model: no query needed
    assert status == 503 and body["error"]["code"] == "no_backend_available"
    await router.settled(1)


async def test_one_model_needs_no_query_and_id_pins_the_backend(
    start_router: StartRouter, engines: list[RunningEngine], http: aiohttp.ClientSession,
) -> None:
    router = await start_router(Config(static_backends=tuple(
        StaticBackend(url=e.url, models=(CHAT,)) for e in engines)))
    target = next(b for b in router.app[POOL].backends if b.url == engines[1].url)
    for _ in range(3):
        socket = await connect(http, router, f"?id={target.id}")
        await event(socket)
        await socket.close()
    assert (seen(engines[0]).opened, seen(engines[1]).opened) == (0, 3)
    assert seen(engines[1]).last_path == "/v1/realtime"
    await router.settled(3)


async def test_admission_holds_a_slot_for_the_whole_session(
    start_router: StartRouter, engines: list[RunningEngine], http: aiohttp.ClientSession,
) -> None:
    router = await start_router(config_for(engines, max_concurrent_requests=1, queue_size=0))
    first = await connect(http, router)
    await event(first)
    status, body = await upgrade_refused(http, router, f"?model={CHAT}")
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    await first.close()
    await router.settled(2)
    second = await connect(http, router)  # the slot came back
    await event(second)
    await second.close()
    await router.settled(3)
    assert router.log.outcomes() == [Outcome.OK, Outcome.REJECTED, Outcome.OK]


async def test_a_message_over_the_limit_closes_with_1009(
    start_router: StartRouter, engines: list[RunningEngine], http: aiohttp.ClientSession,
) -> None:
    router = await start_router(config_for(engines, websocket_max_message_size=1024))
    socket = await connect(http, router)
    await event(socket)
    await socket.send_str(json.dumps({"type": "test.echo", "pad": "x" * 500}))
    assert (await event(socket))["pad"] == "x" * 500
    await socket.send_str(json.dumps({"type": "test.echo", "pad": "x" * 2000}))
    message = await socket.receive(TIMEOUT)
    assert (message.type, message.data) == (WSMsgType.CLOSE, 1009)
    await socket.close()
    await router.settled(1)
    assert router.log.only().outcome is Outcome.REJECTED
    await eventually(lambda: sum(seen(e).open for e in engines) == 0)


async def test_an_idle_session_is_closed_on_both_sides(
    start_router: StartRouter, engines: list[RunningEngine], http: aiohttp.ClientSession,
) -> None:
    router = await start_router(config_for(engines, websocket_idle_timeout=0.3))
    socket = await connect(http, router)
    await event(socket)
    message = await socket.receive(TIMEOUT)
    assert (message.type, message.data, message.extra) == (
        WSMsgType.CLOSE, 1001, "idle timeout")
    await socket.close()
    await router.settled(1)
    flow = router.log.only()
    assert flow.outcome is Outcome.OK and flow.error is not None and "0.3 s" in flow.error
    await eventually(lambda: [c for e in engines for c in seen(e).close_codes] == [1001])


async def test_shutdown_cuts_a_session_with_going_away(
    router: RouterUnderTest, engines: list[RunningEngine], http: aiohttp.ClientSession,
) -> None:
    socket = await connect(http, router)
    await event(socket)
    assert router.app[LIVE_REQUESTS].live == 1
    assert router.app[LIVE_REQUESTS].cancel_all() == 1
    message = await socket.receive(TIMEOUT)
    assert (message.type, message.data) == (WSMsgType.CLOSE, 1001)
    await socket.close()
    await router.settled(1)
    assert router.log.only().outcome is Outcome.CANCELLED
    await eventually(lambda: sum(seen(e).open for e in engines) == 0)
    await asyncio.sleep(0)


async def test_the_heartbeat_cuts_a_client_that_stops_answering_pings(
    start_router: StartRouter, engines: list[RunningEngine], http: aiohttp.ClientSession,
) -> None:
    router = await start_router(config_for(engines, websocket_heartbeat=0.2))
    socket = await connect(http, router)  # autoping off: the router's pings go unanswered
    await event(socket)
    await router.settled(1)
    assert router.log.only().outcome is Outcome.CLIENT_DISCONNECTED
    await eventually(lambda: [c for e in engines for c in seen(e).close_codes] == [1001])
    await socket.close()


async def test_a_client_that_answers_pings_outlives_many_heartbeats(
    start_router: StartRouter, engines: list[RunningEngine], http: aiohttp.ClientSession,
) -> None:
    router = await start_router(config_for(engines, websocket_heartbeat=0.1))
    socket = await http.ws_connect(router.url + f"/v1/realtime?model={CHAT}")  # autoping on
    await event(socket)
    # aiohttp's client answers pings while a receive() waits (and a timeout of its own
    # would restart at each ping): one waits in the background through ten heartbeats.
    reader = asyncio.create_task(socket.receive())
    await asyncio.sleep(1.0)
    assert not reader.done()
    await socket.send_str(json.dumps({"type": "test.echo"}))
    message = await asyncio.wait_for(reader, TIMEOUT)
    assert message.type is WSMsgType.TEXT and json.loads(message.data)["type"] == "test.echo"
    await socket.close()
    await router.settled(1)
    assert router.log.only().outcome is Outcome.OK


async def test_an_engine_without_the_realtime_api_is_a_404_that_leaves_it_healthy(
    start_router: StartRouter, aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    async def healthy(request: web.Request) -> web.Response:
        return web.Response()

    plain_app = web.Application()  # healthy, and 404 to anything else
    plain_app.router.add_get("/health", healthy)
    plain = await aiohttp_server(plain_app)
    router = await start_router(Config(static_backends=(
        StaticBackend(url=str(plain.make_url("")).rstrip("/"), models=(CHAT,)),),
        cb_failure_threshold=1))
    for _ in range(2):
        status, body = await upgrade_refused(http, router, "")
        assert (status, body["error"]["code"]) == (404, "upgrade_refused"), body
    await router.settled(2)
    assert router.log.outcomes() == [Outcome.REJECTED] * 2


async def test_an_unreachable_engine_gives_way_to_another_before_the_upgrade(
    start_router: StartRouter, engine: RunningEngine, http: aiohttp.ClientSession,
) -> None:
    router = await start_router(Config(static_backends=(
        StaticBackend(url="http://127.0.0.1:9", models=(CHAT,)),
        StaticBackend(url=engine.url, models=(CHAT,)),
    ), health_check_interval=0))
    for _ in range(2):  # round robin: the dead backend is tried first at least once
        socket = await connect(http, router, "")
        assert (await event(socket))["type"] == "session.created"
        await socket.close()
    await router.settled(2)
    assert seen(engine).opened == 2
    attempts = [flow.attempts for flow in router.log.flows.values()]
    assert 1 <= sum(map(len, attempts)) and all(len(tries) <= 1 for tries in attempts)
    assert all(tries[0].outcome is Outcome.BACKEND_ERROR for tries in attempts if tries)
    assert router.log.outcomes() == [Outcome.OK, Outcome.OK]
