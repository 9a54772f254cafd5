"""`router_upstream_connect_seconds`' probe: a connector that times each new connection to a
backend (DNS, TCP, TLS), so a request on a pooled connection costs nothing for the figure."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import ClientRequest
from aiohttp.client_proto import ResponseHandler
from aiohttp.tracing import Trace

from router.proxy.timeouts import HeadWatchingConnector

__all__ = ["TimedConnector"]


class TimedConnector(HeadWatchingConnector):
    """Times `_create_connection` (aiohttp's hook for opening a new connection; stable through
    3.x). Should aiohttp rename it, the metric goes missing (tests/test_metrics.py notices);
    requests are unaffected."""

    def __init__(self, observe: Callable[[str, float], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._observe = observe

    async def _create_connection(
        self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> ResponseHandler:
        started = time.perf_counter()
        protocol = await super()._create_connection(req, traces, timeout)
        self._observe(str(req.url), time.perf_counter() - started)
        return protocol
