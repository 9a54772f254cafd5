"""`--workers N`: the supervisor starts N worker processes on one port, tells systemd once
all listen, restarts one that dies, forwards SIGHUP and SIGTERM, and stops when they cannot
listen. Real processes on loopback, each test bounded in time."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from router.backends.pool import backend_id
from router.testing import RunningEngine
from router.testing.processes import free_port

from . import test_server
from .conftest import CHAT, MODELS
from .test_reload import chat, write_config
from .test_server import receive

notify_socket = test_server.notify_socket


def two_workers(
    engine: str, port: int, **options: Any
) -> Coroutine[Any, Any, asyncio.subprocess.Process]:
    """`python -m router --workers 2` on `port` in front of `engine`."""
    return asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "--workers", "2", "--host", "127.0.0.1",
        "--port", str(port), "--static-backends", engine,
        "--static-models", ";".join(MODELS), "--log-level", "warning", **options,
    )


async def test_workers_share_the_port_and_stop_together(
    engines: list[RunningEngine], notify_socket: socket.socket, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    environ = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    process = await two_workers(engines[0].url, port, env=environ)
    try:
        assert await receive(notify_socket, 20) == "READY=1"  # once, for both workers
        workers = await asyncio.to_thread(child_pids, process.pid)
        assert len(workers) == 2
        # A connection per request, so both workers take some.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(20):
                async with session.post(url + "/v1/completions",
                                        json={"model": CHAT, "prompt": "x"}) as response:
                    assert response.status == 200
            for _ in range(6):  # whichever worker answers, the figures are everyone's
                async with session.get(url + "/metrics") as response:
                    families = {family.name: family for family in
                                text_string_to_metric_families(await response.text())}
                completed = sum(sample.value for sample in families["router_requests"].samples
                                if sample.name == "router_requests_total")
                assert completed == 20
                running = families["vllm:num_requests_running"].samples
                assert running and all(sample.value == 0 for sample in running)
        process.send_signal(signal.SIGTERM)
        assert await receive(notify_socket) == "STOPPING=1"
        assert await asyncio.wait_for(process.wait(), 15) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    finally:
        await kill_all(process)


def child_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    # Only the workers, whatever else the supervisor may start.
    return [int(child) for child in children
            if "router.serve.workers" in Path(f"/proc/{child}/cmdline").read_text()]


async def test_workers_that_cannot_listen_stop_the_router(engines: list[RunningEngine]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()  # no SO_REUSEPORT: the workers cannot share it
        port = taken.getsockname()[1]
        process = await two_workers(engines[0].url, port,
                                    stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(process.communicate(), 20)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert process.returncode == 1
    assert b"failed to start" in err


def environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().partition("=")[::2] for entry in entries if entry)


async def test_a_worker_that_dies_is_restarted(
    engines: list[RunningEngine], notify_socket: socket.socket, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    environ = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    process = await two_workers(engines[0].url, port, env=environ,
                                stderr=asyncio.subprocess.PIPE)
    try:
        assert await receive(notify_socket, 20) == "READY=1"
        workers = await asyncio.to_thread(child_pids, process.pid)
        assert len(workers) == 2
        # Each worker has the metrics directory, and not systemd's socket (only the
        # supervisor speaks to systemd).
        seen = [await asyncio.to_thread(environment, pid) for pid in workers]
        metrics_dir = Path(seen[0]["PROMETHEUS_MULTIPROC_DIR"])
        assert metrics_dir.is_dir() and seen[1]["PROMETHEUS_MULTIPROC_DIR"] == str(metrics_dir)
        assert not any("NOTIFY_SOCKET" in env for env in seen)
        os.kill(workers[0], signal.SIGKILL)
        # The new worker listens: all are ready again.
        assert await receive(notify_socket, 20) == "READY=1"
        now = await asyncio.to_thread(child_pids, process.pid)
        assert len(now) == 2 and workers[0] not in now and workers[1] in now
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(10):
                async with session.post(url + "/v1/completions",
                                        json={"model": CHAT, "prompt": "x"}) as response:
                    assert response.status == 200
        process.send_signal(signal.SIGTERM)
        assert await receive(notify_socket) == "STOPPING=1"
        _, err = await asyncio.wait_for(process.communicate(), 15)
        assert process.returncode == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in now)
        assert not metrics_dir.exists()  # the supervisor's own temporary directory
        assert f"(pid {workers[0]}) died with code -9; restarting it".encode() in err
    finally:
        await kill_all(process)


async def test_sighup_reloads_every_worker(
    engines: list[RunningEngine], notify_socket: socket.socket, tmp_path: Path
) -> None:
    first, second = engines
    path, port = tmp_path / "router.json", free_port()
    url = f"http://127.0.0.1:{port}"
    write_config(path, port, [first], **{"log-level": "warning"})
    environ = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "--workers", "2", "--config", str(path), env=environ,
    )
    try:
        assert await receive(notify_socket, 20) == "READY=1"
        write_config(path, port, [second], **{"log-level": "warning"})
        process.send_signal(signal.SIGHUP)
        # A connection per request, so both workers take some: 20 in a row on the new
        # backend only when every worker reloaded.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            in_a_row = 0
            async with asyncio.timeout(10):
                while in_a_row < 20:
                    backend = await chat(session, url)
                    in_a_row = in_a_row + 1 if backend == backend_id(second.url) else 0
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        await kill_all(process)


async def kill_all(process: asyncio.subprocess.Process) -> None:
    """After a failure: the supervisor and its workers, which would outlive it."""
    if process.returncode is None:
        workers = await asyncio.to_thread(child_pids, process.pid)
        process.kill()
        await process.wait()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
