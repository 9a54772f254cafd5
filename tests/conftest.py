"""Fixtures: real fake-vLLM engines and a real router on loopback, plus an event recorder."""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from blockbuster import BlockBuster, blockbuster_ctx

from router.app import make_app
from router.backends.pool import Backend
from router.config.settings import Config, StaticBackend
from router.flow import Outcome, RequestFlow
from router.keys import CLIENT_SESSION, EVENTS, STATS
from router.testing import RunningEngine, start_engine

CHAT = "chat-model"
WHISPER = "whisper-model"
MODELS = (CHAT, WHISPER)


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """Fail any test in which something blocks the event loop (as aiohttp's own suite does)."""
    with blockbuster_ctx(scanned_modules=["router"]) as bb:
        yield bb


class Clock:
    """A monotonic clock that only moves when told (for stats, health and metrics)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


class EventLog:
    """Subscriber that records every event per flow, to check the exactly-once contract."""

    def __init__(self) -> None:
        self.events: dict[str, list[str]] = defaultdict(list)
        self.flows: dict[str, RequestFlow] = {}
        self.completed = asyncio.Event()

    def on_new(self, flow: RequestFlow) -> None:
        self.events[flow.id].append("new")
        self.flows[flow.id] = flow

    def on_retry(self, flow: RequestFlow) -> None:
        self.events[flow.id].append("retry")

    def on_response(self, flow: RequestFlow) -> None:
        self.events[flow.id].append("response")

    def on_complete(self, flow: RequestFlow) -> None:
        self.events[flow.id].append("complete")
        self.completed.set()

    def assert_balanced(self) -> None:
        for flow_id, names in self.events.items():
            assert names[0] == "new" and names[-1] == "complete", (flow_id, names)
            assert names.count("new") == 1 and names.count("complete") == 1, (flow_id, names)
            assert names.count("response") <= 1, (flow_id, names)
            if "retry" in names:  # retries come before the first byte
                assert names.count("retry") == len(self.flows[flow_id].attempts), names
                assert "response" not in names[: names.index("retry")], names

    def outcomes(self) -> list[Outcome | None]:
        return [flow.outcome for flow in self.flows.values()]

    def only(self) -> RequestFlow:
        assert len(self.flows) == 1, self.flows
        return next(iter(self.flows.values()))


_flow_ids = itertools.count()


def make_flow(
    backend: Backend | None = None, t_start: float | None = None, *, model: str | None = "m",
    stream: bool = False, endpoint: str = "/v1/chat/completions",
    outcome: Outcome | None = None, status: int | None = None,
) -> RequestFlow:
    """A flow as the handler makes one, for unit tests of subscribers and policies."""
    flow = RequestFlow(id=f"flow-{next(_flow_ids)}", endpoint=endpoint, model=model,
                       stream=stream, backend=backend, outcome=outcome, status=status)
    if t_start is not None:
        flow.t_start = t_start
    return flow


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> None:
    """Wait until `check()` holds, polling; fail the test after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


@dataclass
class RouterUnderTest:
    url: str
    app: web.Application
    server: TestServer
    log: EventLog = field(default_factory=EventLog)

    def in_flight(self) -> int:
        return self.app[STATS].total_in_flight()

    def acquired_connections(self) -> int:
        # aiohttp has no public count of connections checked out of the pool.
        connector = self.app[CLIENT_SESSION].connector
        assert connector is not None
        return len(connector._acquired)  # type: ignore[attr-defined]

    async def settled(self, expected_flows: int, timeout: float = 2.0) -> None:
        """Wait until `expected_flows` flows completed; then check the contract held."""
        async with asyncio.timeout(timeout):
            while sum("complete" in names for names in self.log.events.values()) < expected_flows:
                self.log.completed.clear()
                await self.log.completed.wait()
        # Let the connection release that follows on_complete run.
        await asyncio.sleep(0.05)
        self.log.assert_balanced()
        assert self.in_flight() == 0
        assert self.acquired_connections() == 0


StartRouter = Callable[..., Awaitable[RouterUnderTest]]


def config_for(engines: list[RunningEngine], **overrides: Any) -> Config:
    backends = tuple(StaticBackend(url=engine.url, models=MODELS) for engine in engines)
    return Config(static_backends=backends, **overrides)


@pytest.fixture
async def engines() -> AsyncIterator[list[RunningEngine]]:
    started = [await start_engine(MODELS, name=f"engine-{n}") for n in range(2)]
    yield started
    for engine in started:
        await engine.close()


@pytest.fixture
async def three_engines() -> AsyncIterator[list[RunningEngine]]:
    started = [await start_engine(MODELS, name=f"engine-{n}") for n in range(3)]
    yield started
    for engine in started:
        await engine.close()


@pytest.fixture
async def engine(engines: list[RunningEngine]) -> RunningEngine:
    return engines[0]


@pytest.fixture
def start_router(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> StartRouter:
    async def start(config: Config) -> RouterUnderTest:
        app = make_app(config)
        log = EventLog()
        app[EVENTS].subscribe(log)
        server = await aiohttp_server(app)
        return RouterUnderTest(url=str(server.make_url("")).rstrip("/"), app=app, server=server,
                               log=log)

    return start


@pytest.fixture
async def router(start_router: StartRouter, engines: list[RunningEngine]) -> RouterUnderTest:
    """A router in front of both engines."""
    return await start_router(config_for(engines))


@pytest.fixture
async def solo_router(start_router: StartRouter, engine: RunningEngine) -> RouterUnderTest:
    """A router in front of one engine, for fault tests that steer that engine."""
    return await start_router(config_for([engine], read_timeout=2.0))
