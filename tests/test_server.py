"""The process around the app: readiness, the drain on SIGTERM, systemd's notify socket."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from router.config.settings import Config, StaticBackend
from router.serve.server import serve
from router.testing import RunningEngine
from router.testing.processes import free_port, wait_until_healthy

from .conftest import CHAT, MODELS

STREAM = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "stream": True,
          "max_tokens": 20}


async def read_stream(session: aiohttp.ClientSession, url: str) -> str:
    async with session.post(url + "/v1/chat/completions", json=STREAM) as response:
        assert response.status == 200
        return (await response.read()).decode()


async def wait_streaming(engines: list[RunningEngine], count: int) -> None:
    async with asyncio.timeout(5):
        while sum(engine.state.open for engine in engines) < count:
            await asyncio.sleep(0.01)


async def test_drain_finishes_live_streams_and_refuses_new_connections(
    engines: list[RunningEngine],
) -> None:
    for engine in engines:
        engine.behaviour.token_delay = 0.05  # each stream takes about a second
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stop = asyncio.Event()
    config = Config(
        host="127.0.0.1", port=port, shutdown_delay=0.3, drain_timeout=10,
        static_backends=tuple(StaticBackend(e.url, MODELS) for e in engines),
    )
    server = asyncio.create_task(serve(config, stop))
    async with aiohttp.ClientSession() as session:
        await wait_until_healthy(session, url)
        async with session.get(url + "/ready") as response:
            assert response.status == 200
        streams = [asyncio.create_task(read_stream(session, url)) for _ in range(20)]
        await wait_streaming(engines, 20)
        stop.set()
        await asyncio.sleep(0.1)
        async with session.get(url + "/ready") as response:  # still listening, not ready
            assert (response.status, (await response.json())["status"]) == (503, "draining")
        bodies = await asyncio.gather(*streams)
    assert all(body.rstrip().endswith("data: [DONE]") for body in bodies)
    await asyncio.wait_for(server, 5)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_drain_timeout_cuts_what_is_still_running(engines: list[RunningEngine]) -> None:
    for engine in engines:
        engine.behaviour.token_delay = 1.0  # far longer than the drain
    port = free_port()
    stop = asyncio.Event()
    config = Config(host="127.0.0.1", port=port, drain_timeout=0.3,
                    static_backends=tuple(StaticBackend(e.url, MODELS) for e in engines))
    server = asyncio.create_task(serve(config, stop))
    async with aiohttp.ClientSession() as session:
        await wait_until_healthy(session, f"http://127.0.0.1:{port}")
        stream = asyncio.create_task(read_stream(session, f"http://127.0.0.1:{port}"))
        await wait_streaming(engines, 1)
        started = time.monotonic()
        stop.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await stream
        await asyncio.wait_for(server, 5)
    assert time.monotonic() - started < 3
    async with asyncio.timeout(2):  # the engine saw its request cancelled
        while sum(engine.state.open for engine in engines):
            await asyncio.sleep(0.01)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """systemd's side of the notify protocol: a datagram socket the router writes to."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    yield sock
    sock.close()


async def receive(sock: socket.socket, timeout: float = 10.0) -> str:
    loop = asyncio.get_running_loop()
    return (await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)).decode()


async def test_sigterm_under_systemd_with_50_live_streams_loses_none(
    engines: list[RunningEngine], notify_socket: socket.socket, tmp_path: Path
) -> None:
    for engine in engines:
        engine.behaviour.token_delay = 0.05
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    environ = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"),
               "WATCHDOG_USEC": "200000"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", str(port),
        "--static-backends", ",".join(e.url for e in engines),
        "--static-models", ",".join(";".join(MODELS) for _ in engines),
        "--log-level", "warning", env=environ,
    )
    try:
        assert await receive(notify_socket) == "READY=1"
        assert await receive(notify_socket) == "WATCHDOG=1"
        async with aiohttp.ClientSession() as session:
            streams = [asyncio.create_task(read_stream(session, url)) for _ in range(50)]
            await wait_streaming(engines, 50)
            process.send_signal(signal.SIGTERM)
            states = set()
            while "STOPPING=1" not in states:
                states.add(await receive(notify_socket))
            bodies = await asyncio.gather(*streams)
        assert len(bodies) == 50
        assert all(body.rstrip().endswith("data: [DONE]") for body in bodies)
        assert [json.loads(line[6:])["choices"][0]["delta"].get("content")
                for line in bodies[0].splitlines() if line.startswith("data: {")][1] == "tok0"
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
