"""Backends that fail: slow, hanging, erroring in bursts, cutting streams, or not speaking
HTTP at all. Traffic runs concurrently while one backend misbehaves; each client's answer is
checked against what its backend did, then the router must be back to a clean state."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from router.keys import HEALTH
from router.testing import RunningEngine
from router.testing.chaos.backend import AFTER_HEADERS, BEFORE_HEADERS, Fault, MisbehavingBackend
from router.testing.chaos.clients import ClientResult, Kind, call

from ..conftest import CHAT, StartRouter
from .conftest import (
    CHAOS_SETTINGS, Scale, Scenario, chaos_config, expect_kinds, id_of, scales, served_by,
    traffic,
)

READ_TIMEOUT = CHAOS_SETTINGS["read_timeout"]
COMPLETE = {Kind.COMPLETE}


@dataclass(frozen=True)
class EngineFault:
    """Knobs for the faulty engine, and what a client served by it may see."""

    knobs: dict[str, Any]
    stream: set[Kind]
    json: set[Kind]
    count: Callable[[RunningEngine], int] = field(default=lambda engine: 0)
    """Faults the engine reports having injected."""
    delay: float = 0.0
    """Extra seconds a request may take."""


def _burst(status: int, scale: Scale) -> dict[str, Any]:
    return {"fail_status": status, "fail_burst": max(3, scale.requests // 4)}


ENGINE_FAULTS: dict[str, Callable[[Scale], EngineFault]] = {
    "slow_answers": lambda scale: EngineFault(
        {"headers_delay": 0.1, "first_token_delay": 0.1, "token_delay": 0.02},
        COMPLETE, COMPLETE, count=lambda engine: engine.state.started, delay=0.5),
    "hang_after_headers": lambda scale: EngineFault(
        {"hang_after_headers": True}, {Kind.CUT}, {Kind.CUT},
        count=lambda engine: engine.state.hangs),
    # The first token comes after the read timeout: a stream (headers already sent) is cut;
    # a JSON answer comes past the response timeout: a 504, never sent to the other engine
    # (this one is still generating it).
    "first_token_past_the_timeouts": lambda scale: EngineFault(
        {"first_token_delay": READ_TIMEOUT * 3}, {Kind.CUT}, {Kind.ERROR},
        count=lambda engine: engine.state.started),
    "burst_of_500": lambda scale: EngineFault(
        _burst(500, scale), {Kind.ERROR, Kind.COMPLETE}, {Kind.ERROR, Kind.COMPLETE},
        count=lambda engine: engine.state.failures_injected),
    "burst_of_429": lambda scale: EngineFault(
        _burst(429, scale), {Kind.ERROR, Kind.COMPLETE}, {Kind.ERROR, Kind.COMPLETE},
        count=lambda engine: engine.state.failures_injected),
    "reset_mid_stream": lambda scale: EngineFault(
        {"reset_after_chunks": 2}, {Kind.CUT}, COMPLETE,
        count=lambda engine: engine.state.resets),
    "truncated_mid_stream": lambda scale: EngineFault(
        {"truncate_after_chunks": 2}, {Kind.CUT}, COMPLETE,
        count=lambda engine: engine.state.truncated),
}


@pytest.mark.parametrize("fault", sorted(ENGINE_FAULTS))
@pytest.mark.parametrize("scale", scales())
async def test_engine_faults_under_traffic(
    fault: str, scale: Scale, start_router: StartRouter, engines: list[RunningEngine],
    scenario: Scenario, rng: random.Random,
) -> None:
    faulty, healthy = engines
    router = await start_router(chaos_config([faulty.url, healthy.url]))
    await scenario.begin(router)
    spec = ENGINE_FAULTS[fault](scale)
    injected = 0
    async for round_ in scenario.rounds(scale.rounds):
        before = spec.count(faulty)
        for name, value in spec.knobs.items():
            setattr(faulty.behaviour, name, value)
        results = await traffic(router, rng, f"{fault}-{round_}", scale.requests,
                                concurrency=scale.concurrency, timeout=10)
        injected += spec.count(faulty) - before
        for name in spec.knobs:  # the engine heals between rounds
            setattr(faulty.behaviour, name, getattr(type(faulty.behaviour)(), name))
        scenario.results += results

        def allowed(result: ClientResult) -> set[Kind]:
            if served_by(router, result) != id_of(faulty):
                return COMPLETE
            return spec.stream if result.stream else spec.json

        expect_kinds(results, allowed)
        if fault.startswith("burst_of_"):
            # Every injected failure reached exactly one client, with its status.
            status = spec.knobs["fail_status"]
            errors = [r for r in results if r.kind is Kind.ERROR]
            assert len(errors) == spec.count(faulty) - before
            assert {r.status for r in errors} <= {status}
    scenario.fault(fault, injected)
    if fault == "burst_of_429":
        # Load shedding is not a dead backend: the breaker stays closed.
        assert router.app[HEALTH].state(id_of(faulty)).breaker == "closed"
    assert injected > 0, "the fault never fired"
    await scenario.finish(router, engines, max_seconds=READ_TIMEOUT * 3 + spec.delay + 2)


# --- a backend that does not speak HTTP properly ---------------------------------------------

FAULTS = list(Fault)

ALONE_EXPECTED: dict[Fault, set[tuple[Kind, int | None]]] = {
    Fault.OK: {(Kind.COMPLETE, 200)},
    Fault.SLOW_HEADERS: {(Kind.COMPLETE, 200)},
    Fault.SILENT: {(Kind.ERROR, 504)},
    # Reset right after the first chunks: usually read before the reset lands.
    Fault.RESET_MID_BODY: {(Kind.CUT, 200), (Kind.ERROR, 502)},
    **{fault: {(Kind.ERROR, 502)} for fault in BEFORE_HEADERS - {Fault.SILENT}},
    **{fault: {(Kind.CUT, 200)} for fault in AFTER_HEADERS - {Fault.RESET_MID_BODY}},
}


@pytest.mark.parametrize("scale", scales())
async def test_misbehaving_backend_alone(
    scale: Scale, start_router: StartRouter, scenario: Scenario, rng: random.Random,
) -> None:
    """Every fault, answered by the only backend: a 502/504 JSON error before the headers,
    a cut stream after them, a complete answer when it was merely slow."""
    faults = FAULTS
    async with MisbehavingBackend(faults) as backend:
        # No breaker in the way: every request must meet its fault.
        router = await start_router(chaos_config([backend.url], cb_failure_threshold=10**6))
        await scenario.begin(router)
        async for round_ in scenario.rounds(scale.rounds):
            count = max(2 * len(faults), scale.requests)
            results = await traffic(router, rng, f"alone-{round_}", count,
                                    concurrency=scale.concurrency, timeout=10)
            scenario.results += results
            wrong = []
            for result in results:
                fault = backend.fault_of(result.request_id)
                assert fault is not None, result
                if (result.kind, result.status) not in ALONE_EXPECTED[fault]:
                    wrong.append(f"{fault.value}: {result}")
            assert not wrong, "\n".join(wrong)
        scenario.fault("raw_backend", backend.faults_injected)
        await scenario.finish(router, max_seconds=READ_TIMEOUT + 2)
    assert {served.fault for served in backend.served} == set(FAULTS)


@pytest.mark.parametrize("scale", scales())
async def test_misbehaving_backend_beside_a_good_engine(
    scale: Scale, start_router: StartRouter, engine: RunningEngine, scenario: Scenario,
    rng: random.Random,
) -> None:
    """With a good engine beside it, a fault before the headers is that client's 502/504:
    the request was sent, the backend may be working on it, so it is not sent to the good
    engine. Faults after the headers cut that client's answer, and only that one."""
    faults = [rng.choice(FAULTS) for _ in range(scale.requests * scale.rounds * 2)]
    async with MisbehavingBackend(faults) as backend:
        router = await start_router(chaos_config([backend.url, engine.url]))
        await scenario.begin(router)
        async for round_ in scenario.rounds(scale.rounds):
            results = await traffic(router, rng, f"beside-{round_}", scale.requests,
                                    concurrency=scale.concurrency, timeout=10)
            scenario.results += results

            def allowed(result: ClientResult) -> set[Kind]:
                fault = backend.fault_of(result.request_id)
                if fault in AFTER_HEADERS:
                    return {Kind.CUT}
                if fault in BEFORE_HEADERS:
                    return {Kind.ERROR}
                return COMPLETE

            expect_kinds(results, allowed)
        scenario.fault("raw_backend", backend.faults_injected)
        await scenario.finish(router, [engine], max_seconds=READ_TIMEOUT * 2 + 2)
    assert backend.faults_injected > 0


async def test_bad_chunk_size_mid_body_does_not_hang(start_router: StartRouter) -> None:
    """Regression: aiohttp's C parser drops a malformed chunk size that arrives after the
    headers without ending the response payload, and drops its read timer with it; the
    router's stall watch must cut the request (it used to wait for ever)."""
    async with MisbehavingBackend([Fault.BAD_CHUNK_SIZE]) as backend:
        router = await start_router(chaos_config([backend.url]))
        async with aiohttp.ClientSession() as session:
            result = await call(session, router.url + "/v1/chat/completions",
                                {"model": CHAT, "messages": [], "stream": True},
                                request_id="bad-chunk", timeout=READ_TIMEOUT * 4)
        if result.kind is Kind.HUNG:
            raise TimeoutError(result.detail)
        assert result.kind is Kind.CUT, result
        await router.settled(1)
