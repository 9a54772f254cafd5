"""A 200 MB upload through a real router process: its memory must stay flat."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from router.testing import RunningEngine
from router.testing.processes import free_port, proc_status_kib, wait_until_healthy

from .conftest import CHAT, WHISPER
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


async def router_process(engine: RunningEngine, models: str) -> tuple[
        asyncio.subprocess.Process, str]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", str(port),
        "--static-backends", engine.url, "--static-models", models, "--log-level", "warning",
    )
    return process, f"http://127.0.0.1:{port}"


@pytest.mark.slow
@pytest.mark.parametrize("bombs", [1, 8])
async def test_gzip_bombs_keep_router_memory_bounded(engine: RunningEngine, bombs: int) -> None:
    # 1 GiB of JSON in 1 MB of gzip. Before: one cost ~260 MB, eight ~420 MB, and each held
    # the event loop for a second or more.
    member = gzip.compress(b" " * 2**20, 9)
    body = (gzip.compress(b'{"model": "' + CHAT.encode() + b'", "prompt": "')
            + member * 1024 + gzip.compress(b'"}'))
    process, url = await router_process(engine, f"{CHAT};{WHISPER}")
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_healthy(session, url, process)
            baseline = await asyncio.to_thread(proc_status_kib, process.pid, "VmRSS")

            async def send() -> int:
                async with session.post(url + "/v1/chat/completions", data=body,
                                        headers={"Content-Type": "application/json",
                                                 "Content-Encoding": "gzip"}) as response:
                    await response.read()
                    return response.status

            started = time.monotonic()
            statuses = await asyncio.gather(*(send() for _ in range(bombs)))
            elapsed = time.monotonic() - started
            peak = await asyncio.to_thread(proc_status_kib, process.pid, "VmHWM")
    finally:
        process.terminate()
        await process.wait()
    growth = (peak - baseline) * 1024
    print(f"\n{bombs} gzip bomb(s) of {len(body) / 1e6:.1f} MB (1 GiB decoded): router RSS "
          f"{baseline // 1024} MB -> peak {peak // 1024} MB (+{growth / 2**20:.1f} MB), "
          f"answered in {elapsed:.2f} s")
    assert statuses == [413] * bombs
    assert growth <= (40 if bombs == 1 else 200) * 2**20


@pytest.mark.slow
async def test_file_first_upload_with_3000_fields_keeps_router_memory_flat(
    engine: RunningEngine
) -> None:
    # Before: every field was kept while the router read on for `model`: 44 -> 391 MB.
    file_head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
                 f"filename=\"a.wav\"\r\n\r\n").encode()
    value = b"v" * 60 * 1024

    async def body() -> AsyncIterator[bytes]:
        yield file_head + b"x" * 1000 + b"\r\n"
        for n in range(3000):
            yield (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"f{n}\"\r\n\r\n"
                   .encode() + value + b"\r\n")
        yield (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
               f"{WHISPER}\r\n--{BOUNDARY}--\r\n").encode()

    process, url = await router_process(engine, WHISPER)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_healthy(session, url, process)
            baseline = await asyncio.to_thread(proc_status_kib, process.pid, "VmRSS")
            async with session.post(url + "/v1/audio/transcriptions", data=body(),
                                    headers={"Content-Type": content_type()}) as response:
                status = response.status
            peak = await asyncio.to_thread(proc_status_kib, process.pid, "VmHWM")
    finally:
        process.terminate()
        await process.wait()
    growth = (peak - baseline) * 1024
    print(f"\nfile first, then 3000 fields of 60 KiB: router RSS {baseline // 1024} MB -> "
          f"peak {peak // 1024} MB (+{growth / 2**20:.1f} MB), status {status}")
    assert status == 413
    assert growth <= MAX_GROWTH
