"""Plugins (`--callbacks module:Class`) and the request rewriter (`--request-rewriter`).

A plugin is a small class with any of:

- `on_new(flow)`, `on_retry(flow)`, `on_response(flow)`, `on_complete(flow)`: the request
  events;
- `pre_request(flow)`: before a backend is chosen; return an aiohttp response to answer the
  request itself (refuse it, or serve a canned answer), or None to let it through;
- `post_request(flow, body)`: the whole response body, after it reached the client, only for
  a plugin whose class sets `wants_body = True` (nothing is kept for the others).

Each method may be sync or async. Async ones run on the event loop, the events' as tasks. A
sync method runs on the event loop too, timed, while its calls stay under `INLINE_BUDGET`
(1 ms): an idle or light plugin then costs a plain function call, where a thread hand-off
would cost 100-300 µs of CPU per call. The first call over the budget moves that method to
a small thread pool for good, with a warning, so a slow plugin stalls the loop once at most;
a plugin whose class sets `blocking = True` (it does I/O, say) starts in the threads. The
events never wait for a plugin; `pre_request` is awaited, as its answer decides the request.
A plugin's exception is logged and the request goes on as if the plugin had not been there.

Plugins written for production-stack's `CustomCallbackHandler` (`pre_request(request,
request_body, request_json)` and `post_request(request, response_content)`) load through
`ProductionStackAdapter`, named its way (`module.instance`); their import of
`vllm_router`'s base class resolves to `router.plugin_shim` when production-stack is not
installed.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import time
import types
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from aiohttp import web

from router import plugin_shim
from router.config.settings import ConfigError
from router.events import EVENT_NAMES, RequestEvents
from router.flow import RequestFlow

__all__ = ["find_object", "load_object", "PluginHost", "RequestRewriter"]

log = logging.getLogger("router.plugins")

MAX_PENDING = 10_000
"""Event calls waiting for the plugin threads; past it events are dropped, with a warning."""
INLINE_BUDGET = 0.001
"""Seconds a sync plugin call may take on the event loop before its method moves to the
plugin threads."""


def find_object(spec: str, flag: str) -> object:
    """What `spec` names: `module:Name`, or production-stack's `module.name`, whose module
    may also be a file path without `.py` (`/etc/router/callbacks.handler`); `Name` is a
    class or (production-stack's form) an instance. Errors name `flag`."""
    module_name, sep, name = spec.partition(":")
    if not sep:
        module_name, _, name = spec.rpartition(".")
    if not module_name or not name:
        raise ConfigError(f"argument {flag}: {spec!r} names nothing to load (use "
                          "module:Class or module.instance)")
    plugin_shim.install()  # production-stack modules import its base class
    try:
        module = import_module_or_file(module_name)
    except Exception as error:
        raise ConfigError(f"argument {flag}: cannot import {module_name!r}: {error!r}") from None
    found = getattr(module, name, None)
    if found is None:
        raise ConfigError(f"argument {flag}: {module_name!r} has no {name!r}")
    return found


def import_module_or_file(name: str) -> types.ModuleType:
    """`name` as a module path, or as a file path (with a `/`, `.py` added)."""
    if "/" not in name and os.sep not in name:
        return importlib.import_module(name)
    path = os.path.abspath(name + ".py")
    known = sys.modules.get(f"router_callbacks:{path}")
    if known is not None:
        return known
    spec = importlib.util.spec_from_file_location(os.path.basename(name), path)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Kept, so a reload (which checks the flags again) finds the same module and instance.
    sys.modules[f"router_callbacks:{path}"] = module
    return module


def load_object(spec: str, flag: str) -> object:
    """What `spec` names: a class is instantiated (no arguments), an instance used as is."""
    found = find_object(spec, flag)
    if not inspect.isclass(found):
        return found
    try:
        return found()
    except Exception as error:
        raise ConfigError(f"argument {flag}: cannot load {spec!r}: {error!r}") from None


class ProductionStackAdapter:
    """Runs a production-stack `CustomCallbackHandler` as a plugin."""

    wants_body = True

    def __init__(self, handler: object) -> None:
        self.handler = handler
        self.wants_body = callable(getattr(handler, "post_request", None))

    def __repr__(self) -> str:
        return f"<ProductionStackAdapter {self.handler!r}>"

    async def pre_request(self, flow: RequestFlow) -> web.StreamResponse | None:
        method = getattr(self.handler, "pre_request", None)
        if method is None:
            return None
        body = flow.request_body or b""
        result = method(flow.request, body, flow.request_json)
        if inspect.isawaitable(result):
            result = await result
        return as_response(result)

    async def post_request(self, flow: RequestFlow, body: bytes) -> None:
        result = self.handler.post_request(flow.request, body)  # type: ignore[attr-defined]
        if inspect.isawaitable(result):
            await result


def as_response(result: object) -> web.StreamResponse | None:
    """A handler's answer as an aiohttp response: its own, or a Starlette/FastAPI one (a
    production-stack handler's) copied, or None."""
    if result is None or isinstance(result, web.StreamResponse):
        return result
    status, body = getattr(result, "status_code", None), getattr(result, "body", None)
    if not isinstance(status, int) or not isinstance(body, (bytes, bytearray)):
        return None
    headers = getattr(result, "headers", {})
    return web.Response(status=status, body=bytes(body), headers={
        str(name): str(value) for name, value in headers.items()
        if str(name).lower() not in ("content-length", "transfer-encoding")
    })


def is_production_stack_handler(plugin: object) -> bool:
    pre = getattr(plugin, "pre_request", None)
    if pre is None:
        return False
    try:
        return len(inspect.signature(pre).parameters) == 3
    except (TypeError, ValueError):
        return False


class PluginMethod:
    """One plugin method and where it runs: a task (async), inline on the loop, or in the
    plugin threads (`threaded`: declared blocking, or once measured slow)."""

    __slots__ = ("function", "is_async", "threaded")

    def __init__(self, function: Callable[..., Any], blocking: bool) -> None:
        self.function = function
        self.is_async = inspect.iscoroutinefunction(function)
        self.threaded = blocking and not self.is_async

    def run_inline(self, *args: object) -> Any:
        """Call on the loop, timed; None when it raised (logged)."""
        started = time.perf_counter()
        try:
            return self.function(*args)
        except Exception:
            log.exception("plugin %r failed", self.function)
            return None
        finally:
            took = time.perf_counter() - started
            if took > INLINE_BUDGET:
                self.threaded = True
                log.warning("plugin %r took %.1f ms on the event loop: it runs in the plugin "
                            "threads from now on (set blocking = True on its class to start "
                            "there)", self.function, took * 1000)

    def __repr__(self) -> str:
        where = "async" if self.is_async else "threads" if self.threaded else "inline"
        return f"<PluginMethod {self.function!r} {where}>"


class PluginHost:
    """The loaded plugins; subscribed to the request events like any other subscriber."""

    def __init__(self, plugins: Iterable[object]) -> None:
        self.plugins = [
            ProductionStackAdapter(p) if is_production_stack_handler(p) else p for p in plugins
        ]
        self.wants_body = any(getattr(p, "wants_body", False) for p in self.plugins)
        self._threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="plugin")
        self._pending: set[asyncio.Future[Any]] = set()
        self._methods = {name: self._resolve(name) for name in (*EVENT_NAMES, "pre_request")}
        self._methods["post_request"] = self._resolve(
            "post_request", lambda plugin: bool(getattr(plugin, "wants_body", False)))

    def _resolve(
        self, name: str, wanted: Callable[[object], bool] = lambda plugin: True
    ) -> list[PluginMethod]:
        return [
            PluginMethod(method, bool(getattr(plugin, "blocking", False)))
            for plugin in self.plugins
            if callable(method := getattr(plugin, name, None)) and wanted(plugin)
        ]

    def _call(self, method: PluginMethod, *args: object) -> None:
        """Run `method` without waiting for it: inline while fast, else a task or a thread."""
        if not method.is_async and not method.threaded:
            method.run_inline(*args)
            return
        if len(self._pending) >= MAX_PENDING:
            log.warning("plugins are %d calls behind: dropping %r", MAX_PENDING, method)
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any]
        if method.is_async:
            future = loop.create_task(method.function(*args))
        else:
            future = loop.run_in_executor(self._threads, method.function, *args)
        self._pending.add(future)
        future.add_done_callback(self._finished)

    def _finished(self, future: asyncio.Future[Any]) -> None:
        self._pending.discard(future)
        if not future.cancelled() and (error := future.exception()) is not None:
            log.error("plugin failed", exc_info=error)

    def subscribe(self, events: RequestEvents) -> None:
        """Each plugin's event methods join the request events' one fan-out, each through
        `_call` (inline while fast, else a task or a thread)."""
        for name in EVENT_NAMES:
            for method in self._methods[name]:
                events.add_handler(name, functools.partial(self._call, method))

    async def pre_request(self, flow: RequestFlow) -> web.StreamResponse | None:
        """The first plugin answer, or None: the request goes on to a backend."""
        for method in self._methods["pre_request"]:
            try:
                if method.is_async:
                    answer = await method.function(flow)
                elif method.threaded:
                    loop = asyncio.get_running_loop()
                    answer = await loop.run_in_executor(self._threads, method.function, flow)
                else:
                    answer = method.run_inline(flow)
            except Exception:
                log.exception("plugin %r failed in pre_request for %r", method, flow)
                continue
            if isinstance(answer, web.StreamResponse):
                return answer
        return None

    def post_request(self, flow: RequestFlow, body: bytes) -> None:
        """Hand the body to the plugins that want it, without delaying anything."""
        for method in self._methods["post_request"]:
            self._call(method, flow, body)

    async def aclose(self) -> None:
        """Let running plugin calls finish, then stop the threads."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=5)
        self._threads.shutdown(wait=False, cancel_futures=True)

    def __repr__(self) -> str:
        return f"<PluginHost plugins={self.plugins!r} pending={len(self._pending)}>"


class RequestRewriter(Protocol):
    def rewrite(self, flow: RequestFlow, body: dict[str, Any]) -> dict[str, Any]:
        """The JSON body to route and send instead of `body` (which may be changed in place
        and returned)."""
        ...
