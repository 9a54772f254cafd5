"""What clients that stop reading make the router hold: `python -m bench.stalled_readers`.

Starts a fake engine (a child process) that streams big SSE events as fast as it can, and the
router (a child process) in front of it; opens N streams whose clients read the head and then
nothing more; waits until everything has backed up; then prints the router's RSS growth per
stream, and the kernel's TCP memory growth per stream (socket buffers: the router's towards
the stalled clients and from the engine, the engine's, the clients'). Extra router flags
after `--`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from router.testing.chaos.engine import EngineProcess
from router.testing.processes import (
    cpu_seconds, free_port, proc_status_kib, wait_until_healthy,
)

MODEL = "chat-model"
PAGE_KIB = 4


def tcp_mem_kib() -> int:
    """The kernel's memory in TCP socket buffers, machine-wide."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1]) * PAGE_KIB
    raise LookupError("TCP mem")


async def stalled_stream(
    port: int, events: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A streaming request whose client reads the answer's head, then stops reading."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": events,
                       "messages": [{"role": "user", "content": "x"}]}).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    await reader.readuntil(b"\r\n\r\n")
    return reader, writer


async def settle(pid: int, quiet: float = 1.0, timeout: float = 60.0) -> int:
    """Wait until the router's RSS stops growing; return it (KiB)."""
    deadline = time.monotonic() + timeout
    last = proc_status_kib(pid, "VmRSS")
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet)
        now = proc_status_kib(pid, "VmRSS")
        if now - last < 256:
            return now
        last = now
    return last


async def measure(streams: int, padding: int, events: int, router_flags: list[str]) -> None:
    async with EngineProcess([MODEL], name="bulk") as engine:
        await engine.configure(chunk_padding=padding)
        port = free_port()
        router = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router", "--port", str(port), "--host", "127.0.0.1",
            "--static-backends", engine.url, "--static-models", MODEL, "--no-access-log",
            "--health-check-interval", "0", "--engine-stats-interval", "0",
            "--log-level", "warning", *router_flags, stdin=subprocess.DEVNULL)
        try:
            async with aiohttp.ClientSession() as session:
                await wait_until_healthy(session, f"http://127.0.0.1:{port}", router, 30)
            # Warm up the paths once, so the baseline has the code and pools in memory.
            warm = [await stalled_stream(port, events) for _ in range(4)]
            for _, writer in warm:
                writer.close()
            await asyncio.sleep(1.0)
            rss0, tcp0 = await settle(router.pid), tcp_mem_kib()
            held = [await stalled_stream(port, events) for _ in range(streams)]
            rss1 = await settle(router.pid)
            await asyncio.sleep(1.0)
            tcp1 = tcp_mem_kib()
            sent = (await engine.state())["bytes_sent"]
            print(f"{streams} stalled streams ({padding // 1024} KiB events), router flags "
                  f"{router_flags or 'none'}:")
            print(f"  router RSS {rss0 // 1024} -> {rss1 // 1024} MiB: "
                  f"{(rss1 - rss0) / streams:.0f} KiB per stream")
            print(f"  kernel TCP memory {tcp0 // 1024} -> {tcp1 // 1024} MiB: "
                  f"{(tcp1 - tcp0) / streams:.0f} KiB per stream")
            print(f"  engine sent {sent / streams / 1024:.0f} KiB per stream before stalling")
            for _, writer in held:
                writer.close()
            await asyncio.sleep(1.0)
            await fast_readers(port, router.pid, padding)
        finally:
            router.terminate()
            await router.wait()


async def fast_readers(port: int, pid: int, padding: int, streams: int = 4,
                       events: int = 2000) -> None:
    """The other side: what the same path costs for clients that read as fast as they can."""
    body = {"model": MODEL, "stream": True, "max_tokens": events,
            "messages": [{"role": "user", "content": "x"}]}
    received = 0
    cpu0, started = cpu_seconds(pid), time.monotonic()
    async with aiohttp.ClientSession() as session:
        async def one() -> int:
            size = 0
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                    json=body) as response:
                async for piece in response.content.iter_any():
                    size += len(piece)
            return size
        received = sum(await asyncio.gather(*(one() for _ in range(streams))))
    cpu, wall = cpu_seconds(pid) - cpu0, time.monotonic() - started
    mib = received / 2**20
    print(f"  {streams} fast readers: {mib:.0f} MiB in {wall:.1f} s ({mib / wall:.0f} MiB/s), "
          f"router CPU {cpu * 1000 / mib:.1f} ms per MiB")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stalled_readers",
                                     description=__doc__)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--padding", type=int, default=16 * 1024,
                        help="bytes of padding per SSE event")
    parser.add_argument("--events", type=int, default=100_000,
                        help="events per stream (more than will ever be read)")
    parser.add_argument("router_flags", nargs="*", help="after --: extra router flags")
    args = parser.parse_args()
    asyncio.run(measure(args.streams, args.padding, args.events, args.router_flags))


if __name__ == "__main__":
    main()
