"""What a change to the router would buy, measured before it is made: the router, unchanged on
disk, run with one or more patches applied in memory at start.

`python -m bench.experiments PATCH[,PATCH...] ROUTER-ARGS...`; `python -m bench --experiments
lean` measures each as a target of its own (`router+PATCH`) beside the router and the floor.

Patches (each one models a proposed change; a patch whose target no longer exists in the
router is reported and skipped, the run goes on):
- `uvloop`: the event loop from uvloop.
- `nometrics`: the Prometheus subscriber's per-request work removed: the upper bound of what
  a cheaper metrics implementation (plain counters folded in at scrape time) can save.
- `notimeout`: no `asyncio.timeout` around reading a JSON body: what skipping the timer when
  the body has already arrived with the headers (nearly always for chat) saves.
- `orjson`: `orjson.loads` for the request body (when orjson is installed).
- `gcfreeze`: once the app has started, `gc.freeze()` (what exists then is never scanned
  again) and a young generation ten times larger: fewer, no longer, collections, the
  usual remedy when GC pauses show in a service's latency tail.
- `gcfreezeonly`: `gc.freeze()` once the app has started, thresholds unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import runpy
import sys
import types
from collections.abc import AsyncIterator, Callable

PATCHES: dict[str, Callable[[], str | None]] = {}


def patch(name: str) -> Callable[[Callable[[], str | None]], Callable[[], str | None]]:
    def register(function: Callable[[], str | None]) -> Callable[[], str | None]:
        PATCHES[name] = function
        return function
    return register


@patch("uvloop")
def _uvloop() -> str | None:
    try:
        import uvloop
    except ImportError:
        return "uvloop is not installed"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return None


@patch("nometrics")
def _nometrics() -> str | None:
    from router import metrics

    cls = getattr(metrics, "Metrics", None)
    if cls is None:
        return "router.metrics.Metrics not found"
    for event in ("on_new", "on_retry", "on_response", "on_complete"):
        if hasattr(cls, event):
            setattr(cls, event, lambda self, flow: None)
    return None


@patch("notimeout")
def _notimeout() -> str | None:
    from router import inbound

    if getattr(inbound, "asyncio", None) is not asyncio:
        return "router.inbound does not use asyncio.timeout"

    @contextlib.asynccontextmanager
    async def no_timeout(delay: float | None) -> AsyncIterator[None]:
        yield

    shim = types.SimpleNamespace(**{k: getattr(asyncio, k) for k in dir(asyncio)
                                    if not k.startswith("__")})
    shim.timeout = no_timeout
    inbound.asyncio = shim  # type: ignore[assignment]
    return None


@patch("orjson")
def _orjson() -> str | None:
    try:
        import orjson
    except ImportError:
        return "orjson is not installed"
    from router import inbound

    if getattr(inbound, "json", None) is not json:
        return "router.inbound does not use json"
    shim = types.SimpleNamespace(loads=orjson.loads, dumps=json.dumps,
                                 JSONDecodeError=json.JSONDecodeError)
    inbound.json = shim  # type: ignore[assignment]
    return None


@patch("gcfreezeonly")
def _gcfreezeonly() -> str | None:
    return _freeze(threshold=None)


@patch("gcfreeze")
def _gcfreeze() -> str | None:
    return _freeze(threshold=7000)


def _freeze(threshold: int | None) -> str | None:
    import gc

    from aiohttp import web

    from router import server

    make_app = getattr(server, "make_app", None)
    if make_app is None:
        return "router.server.make_app not found"

    async def freeze(app: web.Application) -> None:
        gc.collect()
        gc.freeze()
        if threshold is not None:
            gc.set_threshold(threshold, 10, 10)

    def make_frozen_app(*args: object, **kwargs: object) -> web.Application:
        app: web.Application = make_app(*args, **kwargs)
        app.on_startup.append(freeze)
        return app

    server.make_app = make_frozen_app
    return None


def main() -> None:
    names = [n for n in sys.argv[1].split(",") if n]
    for name in names:
        if name not in PATCHES:
            sys.exit(f"unknown patch {name!r} (choose among {sorted(PATCHES)})")
        problem = PATCHES[name]()
        if problem is not None:
            print(f"bench.experiments: patch {name} skipped: {problem}", file=sys.stderr)
    sys.argv = ["router", *sys.argv[2:]]
    runpy.run_module("router", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
