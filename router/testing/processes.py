"""For tests and benchmarks that run the router or engines as separate processes."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import aiohttp

__all__ = ["free_port", "proc_status_kib", "cpu_seconds", "wait_until_healthy"]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def proc_status_kib(pid: int, field: str) -> int:
    """A memory figure of a process from /proc, in KiB: `VmRSS` now, `VmHWM` at its peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def wait_until_healthy(
    session: aiohttp.ClientSession,
    url: str,
    process: asyncio.subprocess.Process | None = None,
    timeout: float = 15.0,
) -> None:
    """Poll `url/health` until it answers 200; fail early if `process` exits."""
    async with asyncio.timeout(timeout):
        while process is None or process.returncode is None:
            try:
                async with session.get(url + "/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} exited with code {process.returncode} before it was healthy")
