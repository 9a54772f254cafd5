"""`--log-stats`: one log line per backend every `--log-stats-interval` seconds, for those
who read logs rather than dashboards (production-stack's `--log-stats`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from router.keys import CONFIG, ENGINE_STATS, HEALTH, POOL, STATS

__all__ = ["log_stats", "summary_lines"]

log = logging.getLogger("router.stats")


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def summary_lines(app: web.Application) -> list[str]:
    now = time.monotonic()
    lines = []
    for backend in app[POOL].backends:
        window = app[STATS].for_backend(backend.id).snapshot()
        health = app[HEALTH].state(backend.id)
        engine = app[ENGINE_STATS].get(backend.id)
        load = "engine=-" if engine is None else (
            f"running={engine.running} waiting={engine.waiting} "
            f"kv_cache={engine.kv_cache_usage} age={engine.age(now):.0f}s"
        )
        lines.append(
            f"backend={backend.id} url={backend.url} healthy={health.available} "
            f"breaker={health.breaker} in_flight={window.in_flight} qps={window.qps:.2f} "
            f"ttft={seconds(window.avg_ttft)} latency={seconds(window.avg_latency)} {load}"
        )
    return lines


async def log_stats(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the periodic summary, as a task owned by the app."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(app[CONFIG].log_stats_interval)
            for line in summary_lines(app):
                log.info("%s", line)

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
