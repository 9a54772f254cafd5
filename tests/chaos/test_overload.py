"""An overloaded fleet with short timeouts: engines too slow for the response timeout, one
answering 503 in bursts, one dead, one that drops requests it read. Failover must never send
a request an engine may be working on to a second one: a request reaches several engines
only when each one before the last answered 502/503/504 or refused the connection."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from router.keys import RETRY_BUDGET
from router.testing import RunningEngine, start_engine
from router.testing.chaos.backend import Fault, MisbehavingBackend
from router.testing.processes import free_port

from ..conftest import MODELS, StartRouter
from .conftest import CHAOS_SETTINGS, Scale, Scenario, chaos_config, scales, settle, traffic

RESPONSE_TIMEOUT = CHAOS_SETTINGS["response_timeout"]


@pytest.mark.parametrize("scale", scales())
async def test_no_request_an_engine_may_be_working_on_is_sent_twice(
    scale: Scale, start_router: StartRouter, scenario: Scenario, rng: random.Random,
) -> None:
    engines: list[RunningEngine] = [
        await start_engine(MODELS, name=name) for name in ("slow", "overloaded", "good")]
    slow, overloaded, good = engines
    slow.behaviour.first_token_delay = RESPONSE_TIMEOUT * 1.5
    good.behaviour.token_delay = 0.005
    for engine in engines:
        engine.behaviour.record_request_ids = True
    dead = f"http://127.0.0.1:{free_port()}"
    drops = [Fault.OK, Fault.CLOSE_BEFORE_HEADERS, Fault.RESET_BEFORE_HEADERS, Fault.SILENT]
    try:
        async with MisbehavingBackend(drops) as dropper:
            router = await start_router(chaos_config(
                [slow.url, overloaded.url, dead, dropper.url, good.url],
                cb_failure_threshold=10**6))  # every request meets its backend's fault
            await scenario.begin(router)
            async for round_ in scenario.rounds(scale.rounds):
                overloaded.behaviour.fail_status = 503
                overloaded.behaviour.fail_burst = max(3, scale.requests // 3)
                scenario.results += await traffic(
                    router, rng, f"overload-{round_}", scale.requests,
                    concurrency=scale.concurrency, timeout=10)
            await settle(router)

            sightings: Counter[str] = Counter()
            for engine in engines:
                sightings.update(engine.state.request_ids)
            sightings.update(served.request_id for served in dropper.served
                             if served.request_id is not None)
            wrong = []
            for result in scenario.results:
                flow = router.log.flows[result.request_id]
                assert flow.backend is not None
                not_me = [a for a in flow.attempts if "answered 50" in a.error]
                refused = [a for a in flow.attempts if "unreachable" in a.error]
                reached_last = flow.backend.url != dead
                if (len(not_me) + len(refused) != len(flow.attempts)
                        or sightings[result.request_id] != len(not_me) + reached_last):
                    wrong.append(f"{result.request_id}: seen {sightings[result.request_id]} "
                                 f"times, attempts {flow.attempts}, then {flow.backend.id}")
            assert not wrong, "\n".join(wrong[:10])
            kinds = Counter((r.kind.value, r.status) for r in scenario.results)
            retried = Counter(a.error.split(": ")[-1][:20] for f in router.log.flows.values()
                              for a in f.attempts)
            # The scenario did what it says: timeouts, drops, 503s and refusals all happened.
            assert kinds[("error", 504)] and kinds[("error", 502)], kinds
            assert any(f.attempts for f in router.log.flows.values()), retried
            assert overloaded.state.failures_injected > 0
            budget = router.app[RETRY_BUDGET]
            assert (budget.requests, budget.retries) == (0, 0)
            scenario.fault("timeouts_not_retried", kinds[("error", 504)])
            scenario.fault("drops_not_retried", kinds[("error", 502)])
            scenario.fault("retries", sum(len(f.attempts) for f in router.log.flows.values()))
            await scenario.finish(router, engines, max_seconds=RESPONSE_TIMEOUT * 3 + 2)
    finally:
        for engine in engines:
            await engine.close()
