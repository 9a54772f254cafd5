"""What a huge or endless answer costs a real router process: its RSS, and how quickly it
still answers `/health` meanwhile (the figures docs/security.md quotes)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest

from router.testing import RunningEngine
from router.testing.flood import RunningFlood, start_flood
from router.testing.processes import free_port, proc_status_kib, wait_until_healthy

from .conftest import CHAT, MODELS

MIB = 1024 * 1024
MAX_GROWTH = 64 * MIB
MAX_HEALTH_LATENCY = 0.3
"""The target is 100 ms; the slack is for a shared machine where the flood server runs on
the same cores (typical figures: p50 2-8 ms, max 30-100 ms)."""
MEASURED = 8.0
"""Seconds of flood per measurement."""


@asynccontextmanager
async def router_process(*args: str) -> AsyncIterator[tuple[str, int]]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "error", "--health-check-interval", "0", *args,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            await wait_until_healthy(session, url, process)
        yield url, process.pid
    finally:
        process.terminate()
        await process.wait()


async def health_latencies(url: str, seconds: float) -> list[float]:
    latencies = []
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            began = time.monotonic()
            async with session.get(url + "/health") as response:
                assert response.status == 200
            latencies.append(time.monotonic() - began)
            await asyncio.sleep(0.02)
    return latencies


def report(what: str, baseline: int, peak: int, latencies: list[float],
           flood: RunningFlood) -> None:
    latencies = sorted(latencies)
    print(f"\n{what}: router RSS {baseline // 1024} MB -> peak {peak // 1024} MB "
          f"(+{(peak - baseline) / 1024:.1f} MB); /health p50 "
          f"{latencies[len(latencies) // 2] * 1e3:.1f} ms, max {latencies[-1] * 1e3:.1f} ms "
          f"over {len(latencies)}; {flood.state.requests} answers, "
          f"{flood.state.bytes_sent / MIB:.0f} MiB sent, {flood.state.cut} cut")


@pytest.mark.slow
async def test_512mib_metrics_answers_keep_router_memory_and_health_flat() -> None:
    async with await start_flood(total=512 * MIB) as flood:
        flood.state.paused = True
        async with router_process(
            "--static-backends", flood.url, "--static-models", ";".join(MODELS),
            "--engine-stats-interval", "0.5",
        ) as (url, pid):
            await asyncio.sleep(1.0)  # a few small scrapes: the baseline
            baseline = await asyncio.to_thread(proc_status_kib, pid, "VmRSS")
            flood.state.paused = False
            latencies = await health_latencies(url, MEASURED)
            peak = await asyncio.to_thread(proc_status_kib, pid, "VmHWM")
    report("512 MiB /metrics answers, scraped every 0.5 s", baseline, peak, latencies, flood)
    assert flood.state.requests >= 4 and flood.state.cut >= 4
    assert (peak - baseline) * 1024 <= MAX_GROWTH
    assert max(latencies) <= MAX_HEALTH_LATENCY


@pytest.mark.slow
async def test_endless_prefill_answers_keep_router_memory_and_health_flat(
    engine: RunningEngine,
) -> None:
    async with await start_flood(["/v1/chat/completions"]) as flood:
        flood.state.paused = True
        async with router_process(
            "--static-backends", f"{flood.url},{engine.url}",
            "--static-models", f"{';'.join(MODELS)},{';'.join(MODELS)}",
            "--static-model-labels", "prefill,decode",
            "--routing-logic", "disaggregated_prefill", "--engine-stats-interval", "0",
            # Every request meets the flood: no breaker takes the prefill backend out.
            "--cb-failure-threshold", "1000000",
        ) as (url, pid):
            baseline = await asyncio.to_thread(proc_status_kib, pid, "VmRSS")
            flood.state.paused = False
            statuses: list[int] = []

            async def clients() -> None:
                body = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}]}
                async with aiohttp.ClientSession() as session:
                    deadline = time.monotonic() + MEASURED
                    while time.monotonic() < deadline:
                        async with session.post(url + "/v1/chat/completions",
                                                json=body) as response:
                            await response.read()
                            statuses.append(response.status)

            load = [asyncio.create_task(clients()) for _ in range(4)]
            latencies = await health_latencies(url, MEASURED)
            await asyncio.gather(*load)
            peak = await asyncio.to_thread(proc_status_kib, pid, "VmHWM")
    report(f"endless prefill answers, 4 clients, {len(statuses)} requests", baseline, peak,
           latencies, flood)
    assert statuses and set(statuses) == {502}
    assert (peak - baseline) * 1024 <= MAX_GROWTH
    assert max(latencies) <= MAX_HEALTH_LATENCY
