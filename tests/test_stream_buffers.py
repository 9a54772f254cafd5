"""What a client that stops reading makes the router hold: `--stream-buffer-size` per side.

Past the client's write-buffer mark the router stops reading from the backend; the backend's
read buffer stops reading its socket at the same size, and reads at most that much at once;
so a stalled stream holds a few times the mark, whatever the backend pushes."""

from __future__ import annotations

import asyncio
import json
import socket

from router.keys import CLIENT_SESSION
from router.testing import RunningEngine

from .conftest import CHAT, RouterUnderTest, StartRouter, config_for

MARK = 16 * 1024
AIOHTTP_DRAIN_EVERY = 64 * 1024
"""aiohttp's `StreamResponse.write` waits for the client only after this much was written
since its last wait: the client's write buffer can pass a smaller mark by that much."""


async def stalled_client(port: int) -> asyncio.StreamWriter:
    """Starts a big stream, reads its head, and then nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # stall sooner
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
    body = json.dumps({"model": CHAT, "stream": True, "max_tokens": 5000,
                       "messages": [{"role": "user", "content": "x"}]}).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    await reader.readuntil(b"\r\n\r\n")
    return writer


def held(router: RouterUnderTest) -> tuple[list[int], list[int], list[int]]:
    """Per stream: the client's write buffer, the backend answer's read buffer, and how much
    the backend connection reads at once."""
    runner = router.server.runner
    assert runner is not None and runner.server is not None
    writes = [handler.transport.get_write_buffer_size()
              for handler in runner.server.connections if handler.transport is not None]
    connector = router.app[CLIENT_SESSION].connector
    protocols = list(connector._acquired)  # type: ignore[union-attr]
    reads = [protocol._payload._size for protocol in protocols if protocol._payload is not None]
    read_sizes = [protocol.transport.max_size for protocol in protocols]
    return writes, reads, read_sizes


async def test_stalled_client_holds_a_few_marks_not_megabytes(
    start_router: StartRouter, engine: RunningEngine,
) -> None:
    engine.behaviour.chunk_padding = 16 * 1024
    router = await start_router(config_for([engine], stream_buffer_size=MARK))
    port = router.server.port
    assert port is not None
    clients = [await stalled_client(port) for _ in range(6)]
    # Until the engine cannot push any more: everything has backed up.
    async with asyncio.timeout(20):
        last = -1
        while engine.state.bytes_sent != last:
            last = engine.state.bytes_sent
            await asyncio.sleep(0.3)
    writes, reads, read_sizes = held(router)
    assert len(reads) == len(clients) and engine.state.open == len(clients)
    assert read_sizes == [MARK] * len(clients)
    # The backend's read buffer: paused past the mark, after one read of at most the mark.
    assert max(reads) <= 2 * MARK, reads
    # The client's: past the mark by at most aiohttp's drain step and the chunk in hand.
    assert max(writes) <= AIOHTTP_DRAIN_EVERY + 3 * MARK, writes
    for writer in clients:
        writer.close()
    await router.settled(len(clients), timeout=5.0)
