"""Plugins that do nothing, for `router+plugin` and `router+plugin-async`: what loading a
plugin costs per request before the plugin does any work of its own.

`--callbacks bench.idle_plugin:IdlePlugin` (sync methods: fast, so each call runs on the
event loop, timed) or `bench.idle_plugin:IdleAsyncPlugin` (async methods: each call is a
task on the event loop). Both define the three request events and `pre_request`, the methods a
typical plugin has; `pre_request` is awaited by the request, the events are not.
"""

from __future__ import annotations

from aiohttp import web

from router.flow import RequestFlow

__all__ = ["IdlePlugin", "IdleAsyncPlugin"]


class IdlePlugin:
    def pre_request(self, flow: RequestFlow) -> web.StreamResponse | None:
        return None

    def on_new(self, flow: RequestFlow) -> None:
        pass

    def on_response(self, flow: RequestFlow) -> None:
        pass

    def on_complete(self, flow: RequestFlow) -> None:
        pass


class IdleAsyncPlugin:
    async def pre_request(self, flow: RequestFlow) -> web.StreamResponse | None:
        return None

    async def on_new(self, flow: RequestFlow) -> None:
        pass

    async def on_response(self, flow: RequestFlow) -> None:
        pass

    async def on_complete(self, flow: RequestFlow) -> None:
        pass
