"""Four batches over one 168 MB, 1.5 M-line input file, validated by a real router process:
its memory must stay bounded (the input caps, and `custom_id`s kept as hashes)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from router.testing import RunningEngine
from router.testing.processes import free_port, proc_status_kib, wait_until_healthy

from .conftest import CHAT
from .test_multipart import BOUNDARY, content_type

LINES = 1_500_000
BATCHES = 4
LINE = ('{"custom_id": "req-%07d", "method": "POST", "url": "/v1/chat/completions", '
        '"body": {"model": "%s"}}\n')


async def input_file() -> AsyncIterator[bytes]:
    """The upload: LINES valid lines (about 112 bytes each), then the first `custom_id` again,
    so a validation that reads it all fails at its end and no line ever runs."""
    yield (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
           f"batch\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
           f"filename=\"big.jsonl\"\r\n\r\n").encode()
    for start in range(0, LINES, 10_000):
        yield "".join(LINE % (n, CHAT) for n in range(start, start + 10_000)).encode()
    yield (LINE % (0, CHAT)).encode()
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


@pytest.mark.slow
@pytest.mark.parametrize("flags, code", [
    ([], "input_too_many_requests"),  # the default cap: 50,000 requests
    (["--max-batch-requests", "2000000"], "invalid_request"),  # read whole: the duplicate
])
async def test_validating_four_batches_of_a_168_mb_input_keeps_memory_bounded(
    engine: RunningEngine, tmp_path: Path, flags: list[str], code: str
) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", str(port),
        "--static-backends", engine.url, "--static-models", CHAT, "--log-level", "warning",
        "--enable-batch-api", "--file-storage-path", str(tmp_path / "files"), *flags,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            await wait_until_healthy(session, url, process)
            async with session.post(url + "/v1/files", data=input_file(),
                                    headers={"Content-Type": content_type()}) as response:
                assert response.status == 200, await response.text()
                uploaded = await response.json()
            await asyncio.sleep(0.5)  # let the upload's buffers go
            baseline = peak = await asyncio.to_thread(proc_status_kib, process.pid, "VmRSS")
            started = time.monotonic()
            ids = []
            for _ in range(BATCHES):
                async with session.post(url + "/v1/batches", json={
                    "input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                }) as response:
                    assert response.status == 200, await response.text()
                    ids.append((await response.json())["id"])
            batches: list[dict[str, object]] = []
            async with asyncio.timeout(300):
                while not batches or any(b["status"] == "validating" for b in batches):
                    peak = max(peak, await asyncio.to_thread(proc_status_kib, process.pid,
                                                             "VmRSS"))
                    batches = []
                    for batch_id in ids:
                        async with session.get(f"{url}/v1/batches/{batch_id}") as response:
                            batches.append(await response.json())
                    await asyncio.sleep(0.05)
            elapsed = time.monotonic() - started
        growth = (peak - baseline) / 1024
        print(f"\n{uploaded['bytes'] / 1e6:.0f} MB, {LINES + 1} lines, {BATCHES} batches "
              f"{' '.join(flags) or '(default caps)'}: router RSS {baseline // 1024} MB -> "
              f"peak {peak // 1024} MB (+{growth:.0f} MB), validated in {elapsed:.1f} s")
        for batch in batches:
            assert batch["status"] == "failed"
            errors = batch["errors"]
            assert isinstance(errors, dict) and errors["data"][-1]["code"] == code
        assert sum((engine.state.started,)) == 0
        assert growth < (32 if not flags else 96)
    finally:
        process.terminate()
        await process.wait()
