"""Backend choice end to end: pinning, failover, health and breakers, disaggregated prefill,
and the `/engines` listing."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from typing import Any

import aiohttp
import openai
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from router.config.settings import Config, StaticBackend
from router.flow import Outcome
from router.keys import CHOOSER, ENGINE_STATS, HEALTH, POOL
from router.policies.features import prompt_text
from router.policies.prefixaware import PrefixAware
from router.proxy.inbound import InboundRequest
from router.testing import RunningEngine, start_engine
from router.testing.processes import free_port, wait_until_healthy

from .conftest import CHAT, MODELS, WHISPER, RouterUnderTest, StartRouter, config_for
from .test_multipart import content_type, multipart_body

CHAT_BODY = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def post(router: RouterUnderTest, path: str = "/v1/chat/completions",
               body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any], str | None]:
    """Status, JSON answer and serving backend id of one request."""
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + path, json=body or CHAT_BODY) as response:
            return (response.status, await response.json(),
                    response.headers.get("x-router-backend"))


def dead_backend() -> StaticBackend:
    return StaticBackend(f"http://127.0.0.1:{free_port()}", MODELS)


def live_backend(engine: RunningEngine, *labels: str) -> StaticBackend:
    return StaticBackend(engine.url, MODELS, labels)


async def test_id_query_pins_the_backend_and_is_not_forwarded(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    pinned = router.app[POOL].backends[1].id
    for _ in range(3):
        status, _, served = await post(router, f"/v1/chat/completions?id={pinned}&x=1")
        assert (status, served) == (200, pinned)
    assert [engine.state.completed for engine in engines] == [0, 3]
    assert engines[1].state.last_path == "/v1/chat/completions?x=1"
    status, reply, _ = await post(router, "/v1/chat/completions?id=nope")
    assert status == 400 and "nope" in reply["error"]["message"]
    await router.settled(4)


async def test_requests_fail_over_from_a_dead_backend(
    start_router: StartRouter, engine: RunningEngine
) -> None:
    # Probes off, so only the request path learns that the first backend is dead.
    router = await start_router(Config(
        static_backends=(dead_backend(), live_backend(engine)), health_check_interval=0,
        retry_backoff=0.01,
    ))
    for _ in range(6):
        status, reply, _ = await post(router)
        assert status == 200, reply
    await router.settled(6)
    retried = [flow for flow in router.log.flows.values() if flow.attempts]
    assert retried and all(flow.outcome is Outcome.OK for flow in router.log.flows.values())
    assert all(attempt.outcome is Outcome.BACKEND_ERROR for f in retried for attempt in f.attempts)
    assert all(router.log.events[flow.id] == ["new", "retry", "response", "complete"]
               for flow in retried)


async def test_spooled_upload_fails_over_with_the_same_bytes(
    start_router: StartRouter, engine: RunningEngine
) -> None:
    router = await start_router(Config(
        static_backends=(dead_backend(), live_backend(engine)), health_check_interval=0,
        retry_backoff=0.01,
    ))
    audio = bytes(range(256)) * 8000
    body = multipart_body([("file", audio, "a.wav"), ("model", WHISPER.encode(), None)])
    for _ in range(2):  # round robin: at least one starts on the dead backend
        async with aiohttp.ClientSession() as session:
            async with session.post(router.url + "/v1/audio/transcriptions", data=body,
                                    headers={"Content-Type": content_type()}) as response:
                assert response.status == 200, await response.text()
    assert [u.sha256 for u in engine.state.uploads] == [hashlib.sha256(audio).hexdigest()] * 2
    await router.settled(2)
    attempts = [len(flow.attempts) for flow in router.log.flows.values()]
    assert max(attempts) == 1 and sum(attempts) >= 1


async def test_no_retry_with_max_retries_zero(
    start_router: StartRouter, engine: RunningEngine
) -> None:
    router = await start_router(Config(
        static_backends=(dead_backend(), live_backend(engine)), health_check_interval=0,
        max_retries=0,
    ))
    statuses = sorted([(await post(router))[0] for _ in range(2)])
    assert statuses == [200, 503]
    await router.settled(2)


def backend_id(router: RouterUnderTest, engine: RunningEngine) -> str:
    return next(b.id for b in router.app[POOL].backends if b.url == engine.url)


async def test_killed_backend_opens_breaker_then_recovers(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    victim, survivor = engines
    port = int(victim.url.rsplit(":", 1)[1])
    router = await start_router(config_for(
        engines, health_check_interval=0, cb_failure_threshold=2, cb_cooldown=0.5,
        retry_backoff=0.01,
    ))
    victim_id, survivor_id = backend_id(router, victim), backend_id(router, survivor)
    health = router.app[HEALTH]
    victim.behaviour.token_delay = 0.05
    async with aiohttp.ClientSession() as session:
        # A stream in flight on the victim when it dies ends cut short, never cleanly.
        async with session.post(router.url + "/v1/chat/completions", params={"id": victim_id},
                                json={**CHAT_BODY, "stream": True, "max_tokens": 50}) as stream:
            await stream.content.readuntil(b"data: ")
            await victim.close()
            with pytest.raises(aiohttp.ClientPayloadError):
                await stream.read()
        # No client sees an error for requests that had not started on it.
        for _ in range(6):
            status, reply, served = await post(router)
            assert (status, served) == (200, survivor_id), reply
        assert health.state(victim_id).breaker == "open"
        assert not health.available(router.app[POOL].backends[0])
        revived = await start_engine(MODELS, port=port, name="revived")
        try:
            await asyncio.sleep(0.6)  # the breaker's cooldown
            served_by = [(await post(router))[2] for _ in range(4)]
            assert victim_id in served_by and revived.state.completed >= 1
            assert health.state(victim_id).breaker == "closed"
        finally:
            await revived.close()
    await router.settled(len(router.log.flows))
    outcomes = [flow.outcome for flow in router.log.flows.values()]
    assert outcomes.count(Outcome.BACKEND_ERROR) == 1 and outcomes.count(Outcome.OK) == 10


async def test_every_backend_down_is_a_503_at_once(start_router: StartRouter) -> None:
    router = await start_router(Config(
        static_backends=(dead_backend(), dead_backend()), health_check_timeout=1.0,
    ))
    health = router.app[HEALTH]
    async with asyncio.timeout(3):  # the first probes run at start
        while any(health.available(b) for b in router.app[POOL].backends):
            await asyncio.sleep(0.02)
    status, reply, _ = await post(router)
    assert status == 503 and "no healthy backend" in reply["error"]["message"]
    await router.settled(1)
    flow = router.log.only()
    assert (flow.outcome, flow.backend) == (Outcome.BACKEND_ERROR, None)


async def test_fault_burst_on_every_engine_leaves_the_fleet_routable(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    """Faults of requests (here: every answer a 500) reach both engines and open both
    breakers, while both pass their probes. The ejection cap keeps one of them routable: the
    burst's clients get the engines' own 500s, not the router's 503, and the first clean
    request after it succeeds at once instead of after the cooldown."""
    router = await start_router(config_for(
        engines, cb_failure_threshold=2, cb_cooldown=60.0, health_check_interval=0.1,
    ))
    health, pool = router.app[HEALTH], router.app[POOL]
    async with asyncio.timeout(3):
        while not all(health.state(b.id).probe_ok for b in pool.backends):
            await asyncio.sleep(0.02)
    for engine in engines:
        engine.behaviour.fail_status = 500
    burst = [(await post(router))[0] for _ in range(8)]
    assert burst == [500] * 8
    assert [health.state(b.id).breaker for b in pool.backends] == ["open", "open"]
    async with aiohttp.ClientSession() as session:
        async with session.get(router.url + "/ready") as response:
            assert response.status == 200
            assert (await response.json())["available_backends"] == 1
        async with session.get(router.url + "/engines") as response:
            listing = await response.json()
        assert sorted(len(entry["kept_by_ejection_cap"]) for entry in listing) == [0, 2]
        async with session.get(router.url + "/metrics") as response:
            assert f'router_ejection_cap_backends{{model="{CHAT}"}} 1.0' in await response.text()
    held = next(entry["id"] for entry in listing if not entry["kept_by_ejection_cap"])
    status, reply, _ = await post(router, f"/v1/chat/completions?id={held}")
    assert status == 503 and "not available" in reply["error"]["message"]

    for engine in engines:
        engine.behaviour.fail_status = None
    status, reply, served = await post(router)
    assert status == 200, reply
    # The request the cap sent was that backend's trial: its good answer closed the breaker,
    # and cut the other's cooldown short: both engines serve again, long before 60 s.
    assert served is not None and health.state(served).breaker == "closed"
    completed = [engine.state.completed for engine in engines]
    for _ in range(4):
        assert (await post(router))[0] == 200
    assert [health.state(b.id).breaker for b in pool.backends] == ["closed", "closed"]
    assert all(engine.state.completed > before for engine, before in zip(engines, completed))
    await router.settled(14)


async def test_engines_lists_health_load_and_scraped_figures(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    engines[0].behaviour.num_requests_waiting = 7
    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(3):  # the first scrape runs at start
            while True:
                async with session.get(router.url + "/engines") as response:
                    listing = await response.json()
                if all(entry["engine"] for entry in listing):
                    break
                await asyncio.sleep(0.02)
    by_url = {entry["url"]: entry for entry in listing}
    first = by_url[engines[0].url]
    assert first["healthy"] is True and first["breaker"] == "closed"
    assert first["in_flight"] == 0 and sorted(first["models"]) == sorted(MODELS)
    assert first["engine"]["num_requests_waiting"] == 7
    assert by_url[engines[1].url]["engine"]["num_requests_waiting"] == 0


async def test_disaggregated_prefill_runs_both_hops_in_one_lifecycle(
    start_router: StartRouter,
) -> None:
    engines = [await start_engine(MODELS, name=f"{role}-{n}")
               for role in ("prefill", "decode") for n in range(2)]
    try:
        prefills, decodes = engines[:2], engines[2:]
        router = await start_router(Config(
            static_backends=tuple(
                live_backend(engine, "prefill" if engine in prefills else "decode")
                for engine in engines
            ),
            # The kv_transfer_params handoff asserted below is the orchestrated flow's.
            routing_logic="disaggregated_prefill_orchestrated",
        ))
        client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
        for _ in range(4):
            stream = await client.chat.completions.create(
                model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                stream=True, stream_options={"include_usage": True},
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text.split() == ["tok0", "tok1", "tok2"]
        assert [engine.state.completed for engine in engines] == [2, 2, 2, 2]
        prefill_body = prefills[0].state.last_json
        assert prefill_body is not None
        assert (prefill_body["max_tokens"], prefill_body["stream"]) == (1, False)
        assert "stream_options" not in prefill_body
        assert prefill_body["kv_transfer_params"]["do_remote_decode"] is True
        decode_body = decodes[0].state.last_json
        assert decode_body is not None and decode_body["stream"] is True
        assert decode_body["kv_transfer_params"]["remote_engine_id"].startswith("prefill-")
        await router.settled(4)
        assert all(flow.prefill_backend is not None and flow.backend is not None
                   and "decode" in flow.backend.labels for flow in router.log.flows.values())
        # Endpoints without a prefill go straight to a decode backend.
        status, _, _ = await post(router, "/v1/embeddings", {"model": CHAT, "input": "x"})
        assert status == 200 and sum(e.state.completed for e in decodes) == 5
    finally:
        for engine in engines:
            await engine.close()


async def test_backends_leaving_the_pool_take_their_health_and_prefix_state(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    router = await start_router(config_for(engines, routing_logic="prefixaware",
                                           health_check_interval=0))
    pool, health = router.app[POOL], router.app[HEALTH]
    leaving, staying = pool.backends
    for backend in (leaving, staying):
        status, _, served = await post(router, f"/v1/chat/completions?id={backend.id}")
        assert (status, served) == (200, backend.id)
    health.record_probe(leaving.id, False, "down")
    policy = router.app[CHOOSER].policy
    assert isinstance(policy, PrefixAware)
    request = chat_request(CHAT_BODY)
    for backend in (leaving, staying):  # each has now received this prompt
        assert policy.choose(request, [backend]) is backend
    prompt = prompt_text(request)
    tree = policy.tree(CHAT)
    assert prompt is not None and tree is not None
    assert set(tree.match(prompt)[1]) == {leaving.id, staying.id}
    pool.replace([staying])
    assert health.state(leaving.id).probe_ok is None  # forgotten
    assert set(tree.match(prompt)[1]) == {staying.id}
    await router.settled(2)


def chat_request(body: dict[str, Any]) -> InboundRequest:
    return InboundRequest(model=CHAT, stream=False, headers=CIMultiDictProxy(CIMultiDict()),
                          json=body)


@pytest.mark.parametrize("policy", ["roundrobin", "session", "leastload", "prefixaware",
                                    "disaggregated_prefill",
                                    "disaggregated_prefill_orchestrated"])
async def test_every_policy_through_python_m_router(policy: str) -> None:
    disaggregated = policy.startswith("disaggregated_prefill")
    roles = ["prefill", "prefill", "decode", "decode"] if disaggregated else ["", ""]
    engines = [await start_engine(MODELS, name=f"{role or 'engine'}-{n}")
               for n, role in enumerate(roles)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--host", "127.0.0.1", "--port", str(port), "--routing-logic", policy,
            "--static-backends", ",".join(e.url for e in engines),
            "--static-models", ",".join(";".join(MODELS) for _ in engines),
            "--log-level", "warning"]
    if disaggregated:
        args += ["--static-model-labels", ",".join(roles)]
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "router", *args)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_healthy(session, url, process)
            served = set()
            for _ in range(6):
                async with session.post(url + "/v1/chat/completions", json=CHAT_BODY,
                                        headers={"x-session-id": "user-42"}) as response:
                    assert response.status == 200, await response.text()
                    assert (await response.json())["choices"][0]["message"]["content"]
                    served.add(response.headers["x-router-backend"])
        if policy in ("session", "prefixaware"):
            assert len(served) == 1  # the same session / conversation stays put
        if policy == "roundrobin":
            assert len(served) == 2
    finally:
        process.terminate()
        await process.wait()
        for engine in engines:
            await engine.close()


async def test_leastload_avoids_the_engine_reporting_a_long_queue(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    busy, idle = engines
    busy.behaviour.num_requests_waiting = 40  # what its /metrics will say
    router = await start_router(config_for(engines, routing_logic="leastload"))
    busy_id = backend_id(router, busy)
    async with asyncio.timeout(3):  # the first scrape runs at start
        while (snapshot := router.app[ENGINE_STATS].get(busy_id)) is None:
            await asyncio.sleep(0.02)
    assert snapshot.waiting == 40
    for _ in range(20):
        status, _, _ = await post(router)
        assert status == 200
    assert (busy.state.completed, idle.state.completed) == (0, 20)
    await router.settled(20)


async def test_a_backend_503_is_retried_elsewhere_but_passed_on_when_alone(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    draining, healthy = engines
    draining.behaviour.fail_status = 503
    router = await start_router(config_for(engines, health_check_interval=0,
                                           retry_backoff=0.01))
    for _ in range(4):
        status, reply, served = await post(router)
        assert (status, served) == (200, backend_id(router, healthy)), reply
    assert draining.state.started >= 1
    await router.settled(4)
    # With no other backend to try, the client gets the backend's own answer untouched.
    healthy.behaviour.fail_status = 503
    status, reply, _ = await post(router)
    assert status == 503 and "Injected failure from engine" in reply["error"]["message"]


async def test_log_stats_writes_a_line_per_backend(
    start_router: StartRouter, engines: list[RunningEngine], caplog: pytest.LogCaptureFixture
) -> None:
    router = await start_router(config_for(engines, log_stats=True, log_stats_interval=0.1))
    caplog.set_level("INFO", logger="router.stats")
    await post(router)
    async with asyncio.timeout(3):
        while len([r for r in caplog.records if r.name == "router.stats"]) < 2:
            await asyncio.sleep(0.02)
    lines = [r.getMessage() for r in caplog.records if r.name == "router.stats"]
    assert all("healthy=True" in line and "in_flight=0" in line for line in lines[:2])
    assert {line.split()[0] for line in lines} == {
        f"backend={b.id}" for b in router.app[POOL].backends}
