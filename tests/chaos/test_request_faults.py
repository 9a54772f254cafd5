"""Faults of requests, not of engines: a burst of requests answered with 500s, cut streams and
hangs on every engine at once, while every engine stays healthy (`/health` answers 200).

The breakers open on every engine, yet none of them may take a model's last backends out
(`--max-ejection-percent`): the clean requests right after the burst must all succeed at
once, not wait out the breakers' cooldown, and every engine must serve again within the
first second. The scenario measures the time to recover, from the end of the burst to the
first complete answer and until every engine served one, and the share of clean requests
that succeeded in the first second.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from router.config.settings import Config
from router.keys import HEALTH, POOL
from router.testing import RunningEngine
from router.testing.chaos.clients import ClientResult, Kind, call

from ..conftest import StartRouter
from . import TALLY
from .conftest import (
    CHAOS_SETTINGS, Scale, Scenario, chaos_config, chat_body, expect_kinds, scales, traffic,
    wait_for,
)

READ_TIMEOUT = CHAOS_SETTINGS["read_timeout"]
COOLDOWN = Config.cb_cooldown
"""The production default: recovery must not rest on a short cooldown."""
THRESHOLD = Config.cb_failure_threshold
CLEAN_WINDOW = 1.0
"""Seconds of clean traffic measured right after the burst."""
RECOVERY_LIMIT = COOLDOWN + 10
"""How long to keep asking, one request at a time, when none succeeded in the window: so the
time to recover is measured (and reported) even where the router fails this scenario."""


@dataclass(frozen=True)
class Phase:
    name: str
    knobs: dict[str, Any]
    stream: bool | None
    injected: Callable[[RunningEngine], int]


PHASES = (
    Phase("500", {"fail_status": 500}, None, lambda e: e.state.failures_injected),
    Phase("truncated_stream", {"truncate_after_chunks": 2}, True, lambda e: e.state.truncated),
    # Hangs last: a hang has no first byte, so nothing closes a breaker before the burst ends.
    Phase("hang", {"hang_after_headers": True}, None, lambda e: e.state.hangs),
)


@dataclass
class Recovery:
    first_success: float | None
    """Seconds from the end of the burst to the first complete answer; None: not within
    `RECOVERY_LIMIT`."""
    window: list[ClientResult]
    """Clean requests started within `CLEAN_WINDOW` of the end of the burst."""
    every_engine: float | None
    """Seconds from the end of the burst until every engine had served a complete answer;
    None: not within the window."""

    def share(self, test: Callable[[ClientResult], bool]) -> float:
        return sum(1 for r in self.window if test(r)) / len(self.window)

    def line(self) -> str:
        first = "never" if self.first_success is None else f"{self.first_success:.3f} s"
        every = "-" if self.every_engine is None else f"{self.every_engine:.3f} s"
        return (f"time to first success {first}, until every engine served {every}; "
                f"first {CLEAN_WINDOW:g} s: {len(self.window)} clean requests, "
                f"{self.share(lambda r: r.kind is Kind.COMPLETE):.0%} complete, "
                f"{self.share(lambda r: r.status == 503):.0%} got 503")


async def clean_traffic(url: str, rng: random.Random, tag: str, concurrency: int,
                        engines: int) -> Recovery:
    """`concurrency` clients in a loop for `CLEAN_WINDOW` s; then, if none succeeded, one
    request every 0.2 s until one does (or `RECOVERY_LIMIT`)."""
    started = time.monotonic()
    window: list[ClientResult] = []
    successes: list[float] = []
    first_by_engine: dict[str | None, float] = {}
    async with aiohttp.ClientSession() as session:
        async def client(n: int) -> None:
            sent = 0
            while time.monotonic() - started < CLEAN_WINDOW:
                result = await call(session, url, chat_body(rng), request_id=f"{tag}-{n}-{sent}",
                                    timeout=10)
                sent += 1
                window.append(result)
                if result.kind is Kind.COMPLETE:
                    successes.append(time.monotonic() - started)
                    first_by_engine.setdefault(result.backend, successes[-1])

        await asyncio.gather(*(client(n) for n in range(concurrency)))
        late = 0
        while not successes and time.monotonic() - started < RECOVERY_LIMIT:
            await asyncio.sleep(0.2)
            result = await call(session, url, chat_body(rng), request_id=f"{tag}-late-{late}",
                                timeout=10)
            late += 1
            if result.kind is Kind.COMPLETE:
                successes.append(time.monotonic() - started)
    every = max(first_by_engine.values()) if len(first_by_engine) == engines else None
    return Recovery(min(successes, default=None), window, every)


@pytest.mark.parametrize("probes", [True, False], ids=["probes", "no_probes"])
@pytest.mark.parametrize("scale", scales())
async def test_fault_burst_on_every_engine_never_ejects_the_fleet(
    scale: Scale, probes: bool, start_router: StartRouter, engines: list[RunningEngine],
    scenario: Scenario, rng: random.Random,
) -> None:
    router = await start_router(chaos_config(
        [engine.url for engine in engines], cb_cooldown=COOLDOWN,
        health_check_interval=0.2 if probes else 0.0, health_check_timeout=1.0,
    ))
    health, backends = router.app[HEALTH], router.app[POOL].backends
    if probes:
        await wait_for(lambda: all(health.state(b.id).probe_ok for b in backends),
                       what="first probes passed")
    await scenario.begin(router)
    # Enough faults for every engine to reach the threshold, whatever the balance.
    count = max(2 * THRESHOLD * len(engines), scale.requests // 2)
    async for round_ in scenario.rounds(scale.rounds):
        for phase in PHASES:
            before = sum(phase.injected(engine) for engine in engines)
            for engine in engines:
                for name, value in phase.knobs.items():
                    setattr(engine.behaviour, name, value)
            burst = await traffic(
                router, rng, f"burst-{phase.name}-{round_}", count,
                concurrency=scale.concurrency, timeout=10,
                body=lambda r, stream=phase.stream: chat_body(r, stream=stream, max_tokens=6))
            for engine in engines:  # the faulty requests are over: the engines serve again
                for name in phase.knobs:
                    setattr(engine.behaviour, name, getattr(type(engine.behaviour)(), name))
            scenario.results += burst
            scenario.fault(f"fleet_{phase.name}",
                           sum(phase.injected(engine) for engine in engines) - before)
            expect_kinds(burst, lambda r: {Kind.ERROR, Kind.CUT})
        # The premise: the burst opened every engine's breaker, while the probes pass.
        assert all(health.state(b.id).breaker != "closed" for b in backends), \
            [health.state(b.id) for b in backends]
        if probes:
            assert all(health.state(b.id).probe_ok for b in backends)

        recovery = await clean_traffic(router.url + "/v1/chat/completions", rng,
                                       f"clean-{round_}", scale.concurrency, len(engines))
        scenario.results += recovery.window
        TALLY.recoveries.append(recovery.first_success)
        print(f"\n[{scenario.name}] round {round_}: {recovery.line()}")
        expect_kinds(recovery.window, lambda r: {Kind.COMPLETE})
        assert recovery.first_success is not None and recovery.first_success < CLEAN_WINDOW
        # The first good answer ends the other breakers' cooldown: full capacity at once.
        assert recovery.every_engine is not None
    await scenario.finish(router, engines, max_seconds=READ_TIMEOUT * 3 + 2)
