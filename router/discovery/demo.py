"""Demo discovery (`--demo`): start fake vLLM engines in-process and route to them, so a
newcomer sees the router answer without any GPU."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from router.backends.pool import Backend
from router.config.settings import DEMO_MODELS
from router.keys import CONFIG, POOL
from router.testing import start_engine

__all__ = ["demo_engines"]

log = logging.getLogger("router.demo")


async def demo_engines(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the demo engines live exactly as long as the app."""
    engines = []
    try:
        for number in range(app[CONFIG].demo_engines):
            engine = await start_engine(DEMO_MODELS, name=f"demo-{number}")
            engines.append(engine)
            log.info("demo engine %d serving %s at %s", number, ", ".join(DEMO_MODELS), engine.url)
        app[POOL].replace(Backend(url=engine.url, models=DEMO_MODELS) for engine in engines)
        yield
    finally:
        for engine in engines:
            await engine.close()
