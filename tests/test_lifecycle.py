"""The lifecycle contract on every exit path: exactly one `on_new` and one `on_complete` per
flow; `on_new` with the backend already chosen for a routed request, or right before
`on_complete` for one that ended before routing; the outcome, status and error each path
leaves. Driven through a real router in front of real loopback engines (`router.testing`).

Paths covered elsewhere are not repeated here: a client leaving mid-stream and a backend
breaking mid-stream (test_faults), a plugin refusing (test_plugins), a router bug before the
answer (test_proxy)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from router.errors import InternalError
from router.flow import Outcome, RequestFlow
from router.keys import CHOOSER, CONFIG, EVENTS, LIVE_REQUESTS, POOL
from router.proxy.dispatch import dispatch
from router.proxy.inbound import InboundRequest, json_request
from router.proxy.sinks import Collector, Write
from router.testing import RunningEngine

from .conftest import CHAT, RouterUnderTest, StartRouter, config_for

JSON_HEADERS = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"}))
BODY = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@dataclass(frozen=True)
class Seen:
    """A flow as a subscriber saw it at one event."""

    event: str
    backend: str | None
    outcome: Outcome | None
    status: int | None
    error: str | None


class Snapshots:
    """Records the flow's state at each event (the `EventLog` keeps only the last state)."""

    def __init__(self) -> None:
        self.seen: dict[str, list[Seen]] = {}

    def _record(self, event: str, flow: RequestFlow) -> None:
        self.seen.setdefault(flow.id, []).append(Seen(
            event, flow.backend.id if flow.backend else None, flow.outcome, flow.status,
            flow.error))

    def on_new(self, flow: RequestFlow) -> None:
        self._record("new", flow)

    def on_response(self, flow: RequestFlow) -> None:
        self._record("response", flow)

    def on_retry(self, flow: RequestFlow) -> None:
        self._record("retry", flow)

    def on_complete(self, flow: RequestFlow) -> None:
        self._record("complete", flow)

    def only(self) -> list[Seen]:
        assert len(self.seen) == 1, self.seen
        return next(iter(self.seen.values()))


async def snapshots_of(router: RouterUnderTest) -> Snapshots:
    snapshots = Snapshots()
    router.app[EVENTS].subscribe(snapshots)
    return snapshots


async def post(
    router: RouterUnderTest, body: object, path: str = "/v1/chat/completions"
) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + path, json=body) as response:
            return response.status, await response.json()


class CannedAnswer:
    """A plugin that answers every request itself, with a 200."""

    def pre_request(self, flow: RequestFlow) -> web.StreamResponse:
        return web.json_response({"canned": True})


class PolicyBug:
    def choose(self, request: object, candidates: object) -> object:
        raise RuntimeError("policy bug")


async def test_a_routed_request_is_new_with_its_backend_then_complete_ok(
    router: RouterUnderTest,
) -> None:
    snapshots = await snapshots_of(router)
    assert (await post(router, BODY))[0] == 200
    await router.settled(1)
    new, response, complete = snapshots.only()
    assert (new.event, response.event, complete.event) == ("new", "response", "complete")
    assert new.backend is not None and new.outcome is None and new.status is None
    assert (complete.backend, complete.outcome, complete.status, complete.error) == (
        new.backend, Outcome.OK, 200, None)


async def test_a_refusal_before_routing_is_new_then_complete_with_its_message(
    router: RouterUnderTest,
) -> None:
    snapshots = await snapshots_of(router)
    status, payload = await post(router, {**BODY, "model": "no-such-model"})
    assert status == 404
    await router.settled(1)
    new, complete = snapshots.only()
    # on_new comes at the end, the outcome already set, and no backend: nothing was routed.
    assert new == Seen("new", None, Outcome.REJECTED, 404, payload["error"]["message"])
    assert complete == Seen("complete", None, Outcome.REJECTED, 404, payload["error"]["message"])


async def test_the_rate_limit_refuses_inside_the_lifecycle(
    start_router: StartRouter, engine: RunningEngine
) -> None:
    router = await start_router(config_for([engine], rate_limit=0.001, rate_limit_burst=1.0))
    snapshots = await snapshots_of(router)
    assert (await post(router, BODY))[0] == 200
    status, payload = await post(router, BODY)
    assert status == 429
    await router.settled(2)
    refused = [seen for seen in snapshots.seen.values() if seen[-1].status == 429]
    assert [seen.event for seen in refused[0]] == ["new", "complete"]
    assert refused[0][-1] == Seen("complete", None, Outcome.REJECTED, 429,
                                  payload["error"]["message"])
    assert engine.state.started == 1


async def test_a_plugin_answer_is_new_then_complete_ok_without_a_backend(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    router = await start_router(config_for(
        engines, callbacks=("tests.test_lifecycle:CannedAnswer",)))
    snapshots = await snapshots_of(router)
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/v1/chat/completions", json=BODY,
                                headers={"X-Request-Id": "canned-1"}) as response:
            assert response.status == 200
            assert response.headers["x-request-id"] == "canned-1"
            assert await response.json() == {"canned": True}
    await router.settled(1)
    assert snapshots.only() == [Seen("new", None, Outcome.OK, 200, None),
                                Seen("complete", None, Outcome.OK, 200, None)]
    assert sum(engine.state.started for engine in engines) == 0


async def test_a_client_gone_before_routing_is_new_then_complete_disconnected(
    solo_router: RouterUnderTest, engine: RunningEngine
) -> None:
    snapshots = await snapshots_of(solo_router)
    body = json.dumps(BODY).encode()
    host, port = solo_router.server.host, solo_router.server.port
    _, writer = await asyncio.open_connection(host, port)
    writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                 .encode() + body[:10])
    await writer.drain()
    await asyncio.sleep(0.1)  # the handler waits for the rest of the body
    writer.close()
    await solo_router.settled(1)
    assert snapshots.only() == [Seen("new", None, Outcome.CLIENT_DISCONNECTED, 499, None),
                                Seen("complete", None, Outcome.CLIENT_DISCONNECTED, 499, None)]


async def test_a_backend_failure_after_routing_keeps_its_detail(
    start_router: StartRouter, engine: RunningEngine
) -> None:
    # Probes off: the request path's own connect failure, not the prober's verdict.
    router = await start_router(config_for([engine], health_check_interval=0))
    snapshots = await snapshots_of(router)
    await engine.close()
    status, payload = await post(router, BODY)
    assert status == 503
    await router.settled(1)
    new, complete = snapshots.only()
    assert new.backend is not None and new.outcome is None
    assert complete.outcome is Outcome.BACKEND_ERROR and complete.status == 503
    # The client reads the message; the flow (the access line) has aiohttp's detail too.
    assert complete.error is not None
    assert complete.error.startswith(payload["error"]["message"] + " (")


async def test_a_router_bug_before_routing_still_completes_the_flow(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    snapshots = await snapshots_of(router)
    router.app[CHOOSER].policy = PolicyBug()  # type: ignore[assignment]
    status, payload = await post(router, BODY)
    assert status == 500 and payload["error"]["type"] == "internal_error"
    await router.settled(1)
    new, complete = snapshots.only()
    assert (new.event, new.backend) == ("new", None)
    assert (complete.outcome, complete.status) == (Outcome.ROUTER_ERROR, 500)
    assert complete.error == repr(RuntimeError("policy bug"))


async def test_cancelled_in_the_admission_queue_is_new_then_complete_cancelled(
    start_router: StartRouter, engine: RunningEngine
) -> None:
    router = await start_router(config_for([engine], max_concurrent_requests=1, queue_size=5))
    snapshots = await snapshots_of(router)
    engine.behaviour.first_token_delay = 30
    running = asyncio.create_task(post(router, BODY))
    async with asyncio.timeout(3):
        while engine.state.started < 1:
            await asyncio.sleep(0.01)
    queued = asyncio.create_task(post(router, BODY))
    async with asyncio.timeout(3):
        while router.app[LIVE_REQUESTS].live < 2:
            await asyncio.sleep(0.01)
    assert router.app[LIVE_REQUESTS].cancel_all() == 2  # as the end of a drain does
    await router.settled(2)
    for task in (running, queued):
        task.cancel()
    await asyncio.gather(running, queued, return_exceptions=True)
    routed, waiting = sorted(snapshots.seen.values(), key=lambda seen: seen[0].backend is None)
    assert [seen.event for seen in routed] == ["new", "complete"]
    assert routed[0].backend is not None and routed[-1].outcome is Outcome.CANCELLED
    assert waiting == [Seen("new", None, Outcome.CANCELLED, None, None),
                       Seen("complete", None, Outcome.CANCELLED, None, None)]


class BrokenSink(Collector):
    """A receiver that fails (a router bug) at the end of an answer it started taking."""

    def __init__(self) -> None:
        super().__init__(1 << 20)
        self.started = False
        self.aborted = False

    async def start(self, flow: RequestFlow, upstream: aiohttp.ClientResponse) -> Write:
        await super().start(flow, upstream)
        self.started = True
        return self.write

    async def end(self, last: bytes) -> None:
        raise RuntimeError("sink bug")

    def abort(self) -> bool:
        self.aborted = self.started
        return self.started


async def test_a_router_bug_after_the_answer_started_cuts_it_and_keeps_its_status(
    router: RouterUnderTest,
) -> None:
    """The status already went out: the flow keeps it, the answer is cut, not replaced."""
    snapshots = await snapshots_of(router)
    app = router.app
    flow = RequestFlow(id="bug-after-start", endpoint="/v1/chat/completions")
    sink = BrokenSink()
    body = {**BODY, "stream": True}

    async def receive() -> InboundRequest:
        return json_request(body, JSON_HEADERS, app[POOL], None,
                            app[CONFIG].max_json_body_size)

    error = await dispatch(app, flow, sink, receive, flow.endpoint)
    assert isinstance(error, InternalError) and sink.aborted
    await router.settled(1)
    new, response, complete = snapshots.only()
    assert (new.event, response.event, complete.event) == ("new", "response", "complete")
    assert (complete.outcome, complete.status) == (Outcome.ROUTER_ERROR, 200)
    assert complete.error == repr(RuntimeError("sink bug"))
