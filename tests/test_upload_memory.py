"""A 200 MB upload through a real router process: its memory must stay flat."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from router.testing import RunningEngine
from router.testing.processes import free_port, proc_status_kib, wait_until_healthy

from .conftest import WHISPER
from .test_multipart import BOUNDARY, content_type

UPLOAD_SIZE = 200 * 1024 * 1024
MAX_GROWTH = 48 * 1024 * 1024


async def upload_body(digest: hashlib._Hash, file_first: bool) -> AsyncIterator[bytes]:
    model = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
             f"{WHISPER}\r\n").encode()
    file_head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
                 f"filename=\"big.wav\"\r\n\r\n").encode()
    block = bytes(range(256)) * 4096  # 1 MiB
    if not file_first:
        yield model
    yield file_head
    for _ in range(UPLOAD_SIZE // len(block)):
        digest.update(block)
        yield block
    yield b"\r\n"
    if file_first:
        yield model
    yield f"--{BOUNDARY}--\r\n".encode()


@pytest.mark.slow
@pytest.mark.parametrize("file_first", [False, True])
async def test_200mb_upload_keeps_router_memory_flat(
    engine: RunningEngine, file_first: bool
) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", str(port),
        "--static-backends", engine.url, "--static-models", WHISPER, "--log-level", "warning",
    )
    try:
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            await wait_until_healthy(session, url, process)
            baseline = await asyncio.to_thread(proc_status_kib, process.pid, "VmRSS")
            digest = hashlib.sha256()
            started = time.monotonic()
            async with session.post(url + "/v1/audio/transcriptions",
                                    data=upload_body(digest, file_first),
                                    headers={"Content-Type": content_type()}) as response:
                assert response.status == 200, await response.text()
                text = (await response.json())["text"]
            elapsed = time.monotonic() - started
            peak = await asyncio.to_thread(proc_status_kib, process.pid, "VmHWM")
        assert digest.hexdigest() in text
        growth = (peak - baseline) * 1024
        print(f"\n200 MB upload, file {'first' if file_first else 'last'}: router RSS "
              f"{baseline // 1024} MB -> peak {peak // 1024} MB (+{growth / 2**20:.1f} MB), "
              f"{UPLOAD_SIZE / 2**20 / elapsed:.0f} MB/s")
        assert growth <= MAX_GROWTH
    finally:
        process.terminate()
        await process.wait()
