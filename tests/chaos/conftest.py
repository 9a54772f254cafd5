"""The chaos suite's scales, its after-scenario checks, and its summary.

Every scenario test takes `scale`: `short` runs in `make test`, `long` (marked `chaos`) in
`make chaos` only. A scenario starts `Scenario.begin(router)` once the router and engines are
up (it records the open file descriptors and RSS) and ends with `Scenario.finish(...)`, which
asserts what the suite promises: every client got a complete answer or a clear error, no
request outlived its bound, every `on_new` got exactly one `on_complete`, in-flight gauges are
zero, the connection pool holds nothing acquired, engines hold nothing open, and descriptors
and memory are back near their start.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
from collections import Counter
from collections.abc import (
    AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence,
)
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from router.backends.pool import backend_id
from router.config.settings import Config, StaticBackend
from router.flow import Outcome, RequestFlow
from router.keys import EVENTS
from router.testing import RunningEngine
from router.testing.chaos.clients import CLEAR, ClientResult, Kind, call
from router.testing.chaos.tally import open_fds, rss_kib

from ..conftest import CHAT, MODELS, RouterUnderTest
from . import TALLY

FD_SLACK = 8
"""Descriptors a scenario may leave open (lazily created loop internals, a pooled socket
being closed)."""
RSS_SLACK_KIB = 64 * 1024
"""Growth of the test process's RSS a scenario may leave behind: the allocator keeps what a
burst of concurrent requests needed (uploads: up to 256 KiB each) as its working size."""
RSS_DRIFT_KIB = 16 * 1024
"""Growth allowed from the end of a scenario's first round to the end of its last: once the
working size is reached, more rounds of the same traffic must not need more memory."""
SETTLE_TIMEOUT = 10.0

# Timeouts short enough that faults resolve fast, long enough for a busy 2-core machine.
CHAOS_SETTINGS: dict[str, Any] = dict(
    read_timeout=0.5,
    response_timeout=0.5,
    connect_timeout=0.5,
    upstream_keepalive=0.3,
    cb_cooldown=0.2,
    health_check_interval=0.0,
    engine_stats_interval=0.0,
    retry_backoff=0.01,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "chaos: the long chaos suite (`make chaos`); deselected otherwise")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long chaos runs only when asked for with `-m chaos` (whatever setup.cfg's addopts)."""
    if "chaos" in (config.option.markexpr or ""):
        return
    keep = [item for item in items if item.get_closest_marker("chaos") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TALLY.requests:
        return
    terminalreporter.section("chaos summary")
    for line in TALLY.lines():
        terminalreporter.write_line(line)
    report = os.environ.get("CHAOS_REPORT")
    if report:
        with open(report, "w") as out:
            json.dump(TALLY.as_dict(), out, indent=2)
        terminalreporter.write_line(f"written to {report}")


@dataclass(frozen=True)
class Scale:
    name: str
    requests: int
    """Requests per round of a scenario."""
    rounds: int
    concurrency: int
    seed: int = 20240611


SHORT = Scale("short", requests=24, rounds=1, concurrency=8)
LONG = Scale("long", requests=240, rounds=6, concurrency=32)


def scales() -> list[Any]:
    """`short` (in `make test`) and `long` (marked `chaos`) for `parametrize("scale", ...)`.
    A function, so the mark is made when test modules are imported, after `pytest_configure`
    registered it."""
    return [pytest.param(SHORT, id="short"), pytest.param(LONG, id="long", marks=pytest.mark.chaos)]


def served_by(router: RouterUnderTest, result: ClientResult) -> str | None:
    """The backend that last had the request: the answer says so, the router's own error
    (no `x-router-backend`) does not, its flow does."""
    if result.backend is not None:
        return result.backend
    flow = router.log.flows.get(result.request_id)
    return None if flow is None or flow.backend is None else flow.backend.id


def chaos_config(urls: Iterable[str], **overrides: Any) -> Config:
    backends = tuple(StaticBackend(url=url, models=MODELS) for url in urls)
    return Config(static_backends=backends, **{**CHAOS_SETTINGS, **overrides})


def chat_body(rng: random.Random, *, stream: bool | None = None,
              max_tokens: int | None = None) -> dict[str, Any]:
    return {
        "model": CHAT,
        "messages": [{"role": "user", "content": f"chaos {rng.random()}"}],
        "stream": rng.random() < 0.5 if stream is None else stream,
        "max_tokens": rng.randint(1, 12) if max_tokens is None else max_tokens,
    }


def id_of(engine: RunningEngine | str) -> str:
    return backend_id(engine if isinstance(engine, str) else engine.url)


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0,
                   what: str = "condition") -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"{what} not reached within {timeout} s") from None


async def bounded_gather(jobs: Sequence[Callable[[], Awaitable[ClientResult]]],
                         concurrency: int) -> list[ClientResult]:
    """Run `jobs` with at most `concurrency` at once, keeping their order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(job: Callable[[], Awaitable[ClientResult]]) -> ClientResult:
        async with gate:
            return await job()

    return list(await asyncio.gather(*(one(job) for job in jobs)))


async def traffic(
    router: RouterUnderTest, rng: random.Random, tag: str, count: int, *,
    concurrency: int, timeout: float, path: str = "/v1/chat/completions",
    body: Callable[[random.Random], Mapping[str, Any]] | None = None,
) -> list[ClientResult]:
    """`count` well-formed requests from one client session, `concurrency` at a time."""
    make = body or (lambda r: chat_body(r))
    bodies = [make(rng) for _ in range(count)]
    async with aiohttp.ClientSession() as session:
        return await bounded_gather([
            (lambda n=n, b=b: call(session, router.url + path, b,
                                   request_id=f"{tag}-{n}", timeout=timeout))
            for n, b in enumerate(bodies)
        ], concurrency)


@dataclass
class Scenario:
    """One scenario's baseline, client results and faults, and the checks at its end."""

    name: str
    fds: int = 0
    rss: int = 0
    results: list[ClientResult] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    finished: bool = False
    rss_rounds: list[int] = field(default_factory=list)
    """RSS (KiB) after each round of `rounds()`."""

    async def begin(self, router: RouterUnderTest) -> None:
        """Note the baseline, once the router and engines are up."""
        router.app[EVENTS].subscribe(ForgetRequests())
        # Let anything the fixtures started settle (the router's first tasks, sockets), and
        # start from a collected heap (a full collection mid-scenario stalls the loop).
        gc.collect()
        await asyncio.sleep(0.05)
        self.fds = await asyncio.to_thread(open_fds)
        self.rss = await asyncio.to_thread(rss_kib)

    async def rounds(self, count: int) -> AsyncIterator[int]:
        """`range(count)`, noting the RSS after each round (for the drift check)."""
        for n in range(count):
            yield n
            self.rss_rounds.append(await asyncio.to_thread(rss_kib))

    def fault(self, name: str, count: int = 1) -> None:
        self.faults[name] += count

    async def finish(
        self, router: RouterUnderTest, engines: Sequence[RunningEngine] = (), *,
        max_seconds: float, flows_expected: int | None = None,
    ) -> None:
        """The checks after a scenario (see the module docstring); then the tally."""
        problems: list[str] = []
        unclear = [r for r in self.results if r.kind not in CLEAR]
        problems += [f"{r.request_id}: {r.kind.value} {r.detail}" for r in unclear[:10]]
        try:
            await wait_for(lambda: all(e.state.open == 0 for e in engines), SETTLE_TIMEOUT,
                           "engines idle")
            await settle(router)
        except AssertionError as error:
            problems.append(str(error))
        log = router.log
        unbalanced = [flow_id for flow_id, names in log.events.items()
                      if names.count("new") != 1 or names.count("complete") != 1]
        problems += [f"flow {f} events {log.events[f]}" for f in unbalanced[:10]]
        problems += cross_check(self.results, router)
        too_long = [flow for flow in log.flows.values()
                    if flow.duration is not None and flow.duration > max_seconds]
        problems += [f"{flow!r} took {flow.duration:.2f} s > {max_seconds} s"
                     for flow in too_long[:10]]
        if flows_expected is not None and len(log.flows) != flows_expected:
            problems.append(f"{len(log.flows)} flows, expected {flows_expected}")
        if router.in_flight() != 0:
            problems.append(f"in-flight gauge {router.in_flight()}")
        if router.acquired_connections() != 0:
            problems.append(f"{router.acquired_connections()} pool connections acquired")
        fds = await fds_back(self.fds + 2)  # idle pooled sockets close within keep-alive
        if fds > self.fds + FD_SLACK:
            problems.append(f"open fds {self.fds} -> {fds}")
        rss = await asyncio.to_thread(rss_kib)
        if rss > self.rss + RSS_SLACK_KIB:
            problems.append(f"RSS {self.rss} KiB -> {rss} KiB")
        rounds = self.rss_rounds
        if len(rounds) >= 2 and rounds[-1] - rounds[0] > RSS_DRIFT_KIB:
            problems.append(f"RSS after each round (KiB): {rounds}")

        self.count(flows=len(log.flows), lost=len(unbalanced) + sum(
            1 for p in problems if p.startswith("no flow for")))
        kinds = Counter(r.kind.value for r in self.results)
        print(f"\n[{self.name}] {len(self.results)} requests {dict(kinds)}; "
              f"{len(log.flows)} flows; faults {dict(self.faults)}; "
              f"fds {self.fds}->{fds}; RSS {self.rss // 1024}->{rss // 1024} MiB"
              + (f" (rounds: {[r // 1024 for r in rounds]})" if len(rounds) > 1 else ""))
        # aiohttp keeps recent apps alive (an lru_cache of their middleware chains), and with
        # them this log: drop its flows so long runs do not carry every earlier scenario.
        log.events.clear()
        log.flows.clear()
        assert not problems, "\n".join(problems)

    def count(self, flows: int, lost: int) -> None:
        """Add this scenario to the session's tally (once)."""
        if self.finished:
            return
        self.finished = True
        TALLY.scenarios += 1
        TALLY.flows += flows
        TALLY.add_results(self.results)
        TALLY.add_faults(self.faults)
        TALLY.lost += lost


class ForgetRequests:
    """Subscriber, after the `EventLog`: once a flow completed, drop what it refers to of its
    request (the aiohttp `Request`, the body), which the router no longer needs. The test's
    `EventLog` keeps every flow until the end of the scenario; without this it would keep every
    request, connection handler and upload buffer with it, and the RSS checks would measure
    the test's bookkeeping instead of the router."""

    FIELDS = ("request", "request_json", "request_body")

    def on_complete(self, flow: RequestFlow) -> None:
        for name in self.FIELDS:
            if getattr(flow, name, None) is not None:
                setattr(flow, name, None)


async def settle(router: RouterUnderTest) -> None:
    """Wait until every flow seen completed and nothing new arrives, then `settled()`."""
    def quiet() -> bool:
        return (all("complete" in names for names in router.log.events.values())
                and router.in_flight() == 0 and router.acquired_connections() == 0)

    async with asyncio.timeout(SETTLE_TIMEOUT):
        while True:
            await wait_for(quiet, SETTLE_TIMEOUT, "router quiet")
            seen = len(router.log.events)
            await asyncio.sleep(0.1)
            if quiet() and len(router.log.events) == seen:
                break
    await router.settled(len(router.log.events))


async def fds_back(limit: int, timeout: float = 3.0) -> int:
    """Wait (bounded) for the open descriptors to fall to `limit`; return the last count."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        fds = await asyncio.to_thread(open_fds)
        if fds <= limit or asyncio.get_running_loop().time() > deadline:
            return fds
        await asyncio.sleep(0.05)


CUT_OUTCOMES = {Outcome.BACKEND_ERROR, Outcome.TIMEOUT}
LEFT_OUTCOMES = {Outcome.CLIENT_DISCONNECTED, Outcome.OK}


def cross_check(results: Iterable[ClientResult], router: RouterUnderTest) -> list[str]:
    """What each client saw must match what the router recorded for its request."""
    problems = []
    flows = router.log.flows
    for result in results:
        flow = flows.get(result.request_id)
        if flow is None:
            if result.kind in (Kind.COMPLETE, Kind.CUT, Kind.ERROR):
                problems.append(f"no flow for {result.request_id} ({result.kind.value})")
            continue
        if result.kind is Kind.COMPLETE:
            ok = flow.outcome is Outcome.OK and flow.status == result.status
        elif result.kind is Kind.ERROR:
            ok = flow.status == result.status
        elif result.kind is Kind.CUT:
            ok = flow.outcome in CUT_OUTCOMES
        elif result.kind is Kind.LEFT:
            ok = flow.outcome in LEFT_OUTCOMES
        else:
            ok = True  # already reported as unclear
        if not ok:
            problems.append(f"{result.request_id}: client {result.kind.value} "
                            f"({result.status}) but router {flow!r}")
    return problems[:20]


def expect_kinds(results: Iterable[ClientResult],
                 allowed: Callable[[ClientResult], set[Kind]]) -> None:
    wrong = [r for r in results if r.kind not in allowed(r)]
    assert not wrong, "\n".join(
        f"{r.request_id} on {r.backend}: {r.kind.value} {r.status} {r.detail} "
        f"(expected {sorted(k.value for k in allowed(r))})" for r in wrong[:20])


@pytest.fixture
def scenario(request: pytest.FixtureRequest) -> Iterator[Scenario]:
    scenario = Scenario(request.node.name)
    yield scenario
    # A scenario that failed before `finish` still counts, failures included.
    scenario.count(flows=0, lost=0)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A fixed seed per test id: a failure replays the same way."""
    callspec = getattr(request.node, "callspec", None)
    scale = callspec.params.get("scale", SHORT) if callspec is not None else SHORT
    return random.Random(f"{scale.seed}:{request.node.name}")
