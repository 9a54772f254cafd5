"""The fake engine in a child process, steered over HTTP: it can be SIGKILLed mid-stream
and started again on the same port.

`EngineProcess` runs `python -m router.testing.chaos --port P`, which serves
`make_controlled_engine_app`: the fake engine (`router.testing.engine`) plus
`/_chaos/behaviour` (POST `EngineBehaviour` knobs) and `/_chaos/state` (its counters).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from router.testing.engine.app import make_engine_app
from router.testing.engine.state import ENGINE_BEHAVIOUR, ENGINE_STATE, EngineBehaviour
from router.testing.processes import free_port, wait_until_healthy

__all__ = ["EngineProcess", "make_controlled_engine_app"]

LOOPBACK = "127.0.0.1"


class EngineProcess:
    """A fake engine in a child process: steer it at run time, SIGKILL it, start it again.

    Use as `async with EngineProcess(models) as engine:`; the child is always killed and
    waited for on exit. Knobs set with `configure()` are applied again after a restart.
    """

    def __init__(
        self, models: Sequence[str], *, name: str = "engine", port: int | None = None
    ) -> None:
        self.models = tuple(models)
        self.name = name
        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.kills = 0
        self.knobs: dict[str, Any] = {}
        self.process: asyncio.subprocess.Process | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self, timeout: float = 20.0) -> None:
        """Start the child (on the same port as before) and wait until it is healthy."""
        if self.alive:
            raise RuntimeError(f"engine process {self.name} is already running")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router.testing.chaos", "--host", LOOPBACK,
            "--port", str(self.port), "--models", ",".join(self.models), "--name", self.name,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        )
        try:
            async with aiohttp.ClientSession() as session:
                await wait_until_healthy(session, self.url, self.process, timeout)
                if self.knobs:
                    await self._post(session, self.knobs)
        except BaseException:
            await self.kill()
            raise

    async def configure(self, **knobs: Any) -> None:
        """Set `EngineBehaviour` fields in the child (kept for restarts)."""
        self.knobs.update(knobs)
        async with aiohttp.ClientSession() as session:
            await self._post(session, knobs)

    async def _post(self, session: aiohttp.ClientSession, knobs: Mapping[str, Any]) -> None:
        async with session.post(self.url + "/_chaos/behaviour", json=dict(knobs),
                                timeout=aiohttp.ClientTimeout(total=5)) as response:
            if response.status != 200:
                raise RuntimeError(f"{self.name}: {response.status} {await response.text()}")

    async def state(self) -> dict[str, int]:
        """The child's `EngineState` counters."""
        async with aiohttp.ClientSession() as session:
            async with session.get(self.url + "/_chaos/state",
                                   timeout=aiohttp.ClientTimeout(total=5)) as response:
                result: dict[str, int] = await response.json()
                return result

    async def kill(self) -> None:
        """SIGKILL the child (no goodbye to its connections) and reap it."""
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
            self.kills += 1
        async with asyncio.timeout(10):
            await process.wait()

    async def __aenter__(self) -> EngineProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.kill()


_KNOBS = {f.name for f in dataclasses.fields(EngineBehaviour)}


async def _set_behaviour(request: web.Request) -> web.Response:
    knobs = await request.json()
    behaviour = request.app[ENGINE_BEHAVIOUR]
    unknown = set(knobs) - _KNOBS
    if unknown:
        return web.json_response({"error": f"unknown knobs: {sorted(unknown)}"}, status=400)
    for name, value in knobs.items():
        setattr(behaviour, name, value)
    return web.json_response(dataclasses.asdict(behaviour))


async def _get_state(request: web.Request) -> web.Response:
    state = request.app[ENGINE_STATE]
    counters = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
                if isinstance(getattr(state, f.name), int)}
    return web.json_response(counters)


def make_controlled_engine_app(models: Sequence[str], name: str) -> web.Application:
    """The fake engine plus `/_chaos/behaviour` (POST knobs) and `/_chaos/state`."""
    app = make_engine_app(models, name)
    app.router.add_post("/_chaos/behaviour", _set_behaviour)
    app.router.add_get("/_chaos/state", _get_state)
    return app
