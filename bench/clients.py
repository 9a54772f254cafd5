"""The Python clients of the benchmark, for what `wrk` cannot do: a streamed 1 GiB multipart
upload, thousands of concurrent slow streams, and a soak with mixed traffic and clients that
leave mid-answer."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import shutil
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.load import chat_body
from bench.procs import Proc
from bench.targets import CHAT, SLOW, WHISPER

__all__ = ["upload", "Upload", "slow_streams", "soak", "router_in_flight"]

BOUNDARY = "bench-boundary-7d3f"
MIB = 1 << 20


# ----------------------------------------------------------------------------- upload


@dataclass
class Upload:
    """A multipart body of `size_mib` MiB of random bytes, its digests computed once: of the
    file part (what the fake engine reports) and of the whole body (`--upload-sink raw`)."""

    size_mib: int
    block: bytes = field(default_factory=lambda: os.urandom(MIB))
    sha256: str = ""
    body_sha256: str = ""

    HEAD = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
            f"{WHISPER}\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"bench.wav\"\r\nContent-Type: audio/wav\r\n\r\n").encode()
    TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()

    def __post_init__(self) -> None:
        digest = hashlib.sha256()
        for _ in range(self.size_mib):
            digest.update(self.block)
        self.sha256 = digest.hexdigest()
        whole = hashlib.sha256(self.HEAD)
        for _ in range(self.size_mib):
            whole.update(self.block)
        whole.update(self.TAIL)
        self.body_sha256 = whole.hexdigest()

    def intact(self, answer: str) -> bool:
        return self.sha256 in answer or self.body_sha256 in answer

    def write_to(self, path: Path) -> None:
        with open(path, "wb") as file:
            file.write(self.HEAD)
            for _ in range(self.size_mib):
                file.write(self.block)
            file.write(self.TAIL)

    async def body(self) -> AsyncIterator[bytes]:
        yield self.HEAD
        for _ in range(self.size_mib):
            yield self.block
        yield self.TAIL


async def _upload(url: str, data: Upload) -> tuple[int, str, float]:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        async with session.post(
            url + "/v1/audio/transcriptions", data=data.body(),
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        ) as response:
            text = await response.text()
        return response.status, text, time.perf_counter() - started


def _curl_upload(url: str, path: Path) -> tuple[int, str, float]:
    """curl POSTs the file with its Content-Length, as an SDK sends a file it has on disk."""
    marker = "\nBENCH_STATUS "
    started = time.perf_counter()
    done = subprocess.run(
        [str(shutil.which("curl")), "-sS", "-X", "POST", "-T", str(path), "--max-time", "600",
         "-H", f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
         "-H", "Expect:", "-w", marker + "%{http_code}", url + "/v1/audio/transcriptions"],
        capture_output=True, text=True, timeout=660)
    elapsed = time.perf_counter() - started
    text, _, status = done.stdout.rpartition(marker)
    return int(status or 0), text + done.stderr, elapsed


def upload(url: str, proc: Proc, data: Upload, file: Path | None = None) -> dict[str, object]:
    """Upload `data` through `url` (with curl from `file` when given, else from Python);
    `proc` is the process tree whose memory is watched."""
    baseline = proc.rss_kib()
    peak_reset = proc.reset_peak()
    cpu_before = proc.cpu_seconds()
    if file is not None:
        status, text, elapsed = _curl_upload(url, file)
    else:
        status, text, elapsed = asyncio.run(_upload(url, data))
    cpu = proc.cpu_seconds() - cpu_before
    peak = proc.peak_rss_kib()
    intact = status == 200 and data.intact(text)
    return {
        "size_mib": data.size_mib, "status": status, "intact": intact,
        "seconds": round(elapsed, 3), "mb_per_s": round(data.size_mib * MIB / 1e6 / elapsed, 1),
        "rss_before_mb": round(baseline / 1024, 1), "rss_peak_mb": round(peak / 1024, 1),
        "rss_growth_mb": round((peak - baseline) / 1024, 1), "peak_reset": peak_reset,
        "cpu_s": round(cpu, 2), "client": "curl" if file is not None else "python",
        "answer": text[:200] if not intact else "",
    }


# ----------------------------------------------------------------------------- slow streams


async def _slow_streams(url: str, proc: Proc, count: int, tokens: int, parallel_opens: int,
                        timeout: float) -> dict[str, object]:
    body = chat_body(SLOW, True, tokens).encode()
    expected = tokens + 3  # role chunk, one per token, the finish chunk, [DONE]
    headers = {"Content-Type": "application/json"}
    opening = asyncio.Semaphore(parallel_opens)
    failures: Counter[str] = Counter()
    state = {"open": 0, "peak_open": 0, "done": 0, "all_open_at": None}
    rss_samples: list[int] = []
    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    client_timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=60)

    async def one(session: aiohttp.ClientSession) -> None:
        seen = 0
        counted = False
        try:
            async with opening:
                response = await session.post(url + "/v1/chat/completions", data=body,
                                              headers=headers)
            async with response:
                if response.status != 200:
                    failures[f"status {response.status}"] += 1
                    return
                tail = b""
                async for chunk in response.content.iter_any():
                    if not counted:
                        counted = True
                        state["open"] += 1
                        if state["open"] > state["peak_open"]:
                            state["peak_open"] = state["open"]
                            if state["open"] == count:
                                state["all_open_at"] = time.perf_counter() - started
                    seen += chunk.count(b"data: ")
                    tail = (tail + chunk)[-32:]
                if seen != expected or b"[DONE]" not in tail:
                    failures[f"truncated ({seen} of {expected} events)"] += 1
                    return
                state["done"] += 1
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            failures[type(error).__name__] += 1
        finally:
            if counted:
                state["open"] -= 1

    async def watch() -> None:
        while True:
            rss_samples.append(proc.rss_kib())
            await asyncio.sleep(0.5)

    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        watcher = asyncio.create_task(watch())
        try:
            await asyncio.gather(*(one(session) for _ in range(count)))
        finally:
            watcher.cancel()
    return {
        "streams": count, "events_per_stream": expected, "completed": state["done"],
        "failed": sum(failures.values()), "failures": dict(failures),
        "peak_open": state["peak_open"], "all_open_after_s": state["all_open_at"],
        "seconds": round(time.perf_counter() - started, 1),
        "rss_peak_mb": round(max(rss_samples or [0]) / 1024, 1),
    }


def slow_streams(url: str, proc: Proc, count: int, tokens: int, parallel_opens: int = 256,
                 timeout: float = 600.0) -> dict[str, object]:
    """`count` streams of `tokens` slow tokens each, all open at once; none may fail."""
    baseline = proc.rss_kib()
    peak_reset = proc.reset_peak()
    cpu_before = proc.cpu_seconds()
    result = asyncio.run(_slow_streams(url, proc, count, tokens, parallel_opens, timeout))
    result.update({
        "rss_before_mb": round(baseline / 1024, 1),
        "rss_hwm_mb": round(proc.peak_rss_kib() / 1024, 1), "peak_reset": peak_reset,
        "cpu_s": round(proc.cpu_seconds() - cpu_before, 2),
        "cpu_ms_per_stream": round((proc.cpu_seconds() - cpu_before) / count * 1e3, 2),
        "open_fds_after": proc.open_fds(),
    })
    return result


# ----------------------------------------------------------------------------- soak


def router_in_flight(url: str) -> int | None:
    """`in_flight` from the router's `GET /health` (a connection of its own, then closed)."""
    request = urllib.request.Request(url + "/health", headers={"Connection": "close"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            value = json.loads(response.read()).get("in_flight")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) else None


MIX: tuple[tuple[str, int], ...] = (
    ("chat", 35),                 # non-streamed chat, fast engine
    ("sse", 25),                  # 64-chunk stream, fast engine
    ("slow_stream", 12),          # slow stream read to the end
    ("slow_stream_leave", 10),    # slow stream, the client leaves after a few chunks
    ("slow_wait_leave", 6),       # non-streamed on the slow engine, the client leaves first
    ("upload", 5),                # 256 KiB multipart
    ("bad", 7),                   # unknown model (404) or broken JSON (400)
)


async def _soak(url: str, proc: Proc, seconds: float, concurrency: int, sample_every: float,
                seed: int, slow_tokens: int) -> dict[str, object]:
    rng = random.Random(seed)
    kinds = [kind for kind, _ in MIX]
    weights = [weight for _, weight in MIX]
    done: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    samples: list[dict[str, float]] = []
    headers = {"Content-Type": "application/json"}
    chat = chat_body(CHAT, False).encode()
    sse = chat_body(CHAT, True).encode()
    slow_sse = chat_body(SLOW, True, slow_tokens).encode()
    slow_wait = chat_body(SLOW, False, slow_tokens).encode()
    small = os.urandom(256 * 1024)
    upload_body = (
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{WHISPER}\r\n"
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\""
        f"\r\n\r\n").encode() + small + f"\r\n--{BOUNDARY}--\r\n".encode()
    upload_headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    started = time.monotonic()
    deadline = started + seconds

    async def expect(session: aiohttp.ClientSession, data: bytes, status: int,
                     path: str = "/v1/chat/completions",
                     extra: dict[str, str] | None = None) -> None:
        async with session.post(url + path, data=data, headers=extra or headers) as response:
            await response.read()
            if response.status != status:
                unexpected[f"status {response.status} (wanted {status})"] += 1

    async def leave_mid_stream(session: aiohttp.ClientSession, after: int) -> None:
        async with session.post(url + "/v1/chat/completions", data=slow_sse,
                                headers=headers) as response:
            seen = 0
            async for chunk in response.content.iter_any():
                seen += chunk.count(b"data: ")
                if seen >= after:
                    break
            response.close()  # drop the connection mid-answer

    async def leave_while_waiting(session: aiohttp.ClientSession, after: float) -> None:
        try:
            async with asyncio.timeout(after):
                await expect(session, slow_wait, 200)
        except TimeoutError:
            pass  # cancelled: aiohttp closes the connection

    actions: dict[str, Callable[[aiohttp.ClientSession], object]] = {
        "chat": lambda s: expect(s, chat, 200),
        "sse": lambda s: expect(s, sse, 200),
        "slow_stream": lambda s: expect(s, slow_sse, 200),
        "slow_stream_leave": lambda s: leave_mid_stream(s, rng.randint(1, slow_tokens)),
        "slow_wait_leave": lambda s: leave_while_waiting(s, rng.uniform(0.01, 0.15)),
        "upload": lambda s: expect(s, upload_body, 200, "/v1/audio/transcriptions",
                                   upload_headers),
        "bad": lambda s: (expect(s, b'{"model": "no-such-model", "messages": []}', 404)
                          if rng.random() < 0.5 else expect(s, b'{"model": ', 400)),
    }

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            try:
                await actions[kind](session)  # type: ignore[misc]
                done[kind] += 1
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
                unexpected[f"{kind}: {type(error).__name__}"] += 1

    async def sample() -> None:
        while True:
            in_flight = await asyncio.to_thread(router_in_flight, url)
            samples.append({"t": round(time.monotonic() - started, 1),
                            "rss_mb": round(proc.rss_kib() / 1024, 2),
                            "fds": proc.open_fds(), "in_flight": -1 if in_flight is None
                            else in_flight, "cpu_s": round(proc.cpu_seconds(), 2)})
            await asyncio.sleep(sample_every)

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:
        sampler = asyncio.create_task(sample())
        try:
            await asyncio.gather(*(client(session) for _ in range(concurrency)))
        finally:
            sampler.cancel()
    return {"requests": dict(done), "total_requests": sum(done.values()),
            "unexpected": dict(unexpected), "samples": samples,
            "traffic_seconds": round(time.monotonic() - started, 1)}


def soak(url: str, proc: Proc, minutes: float, concurrency: int = 32, seed: int = 5,
         slow_tokens: int = 16, settle_timeout: float = 30.0) -> dict[str, object]:
    """Mixed traffic for `minutes`; then RSS drift, in-flight and open fds back to start."""
    seconds = minutes * 60
    time.sleep(min(2.0, seconds / 20))  # let the router's first probes and scrapes settle
    fds_start = proc.open_fds()
    kinds_start = proc.fd_kinds()
    rss_start = proc.rss_kib() / 1024
    sample_every = max(1.0, min(10.0, seconds / 60))
    result = asyncio.run(_soak(url, proc, seconds, concurrency, sample_every, seed,
                               slow_tokens))
    samples = result["samples"]
    assert isinstance(samples, list)
    warm_up = max(10.0, 0.2 * seconds)
    after = [s for s in samples if s["t"] >= warm_up] or samples[-2:]
    rss_base = after[0]["rss_mb"]
    rss_end = after[-1]["rss_mb"]
    slope = _slope([(s["t"], s["rss_mb"]) for s in after]) * 60
    # Back to rest: in-flight to zero, fds to their start value (pooled keep-alive
    # connections to the engines close after their idle timeout).
    settle_start = time.monotonic()
    fds_end, in_flight_end = proc.open_fds(), router_in_flight(url)
    while time.monotonic() - settle_start < settle_timeout:
        fds_end = proc.open_fds()
        in_flight_end = router_in_flight(url)
        if in_flight_end == 0 and fds_end <= fds_start:
            break
        time.sleep(0.5)
    fds_end = proc.open_fds()
    result.update({
        "minutes": minutes, "concurrency": concurrency, "warm_up_s": warm_up,
        "rss_start_mb": round(rss_start, 1), "rss_after_warm_up_mb": rss_base,
        "rss_end_mb": rss_end,
        "rss_drift_pct": round((rss_end - rss_base) / rss_base * 100, 2),
        "rss_slope_mb_per_min": round(slope, 3),
        "rss_max_mb": max(s["rss_mb"] for s in samples),
        "in_flight_max": max(s["in_flight"] for s in samples),
        "in_flight_end": in_flight_end, "fds_start": fds_start, "fds_end": fds_end,
        "fds_max": max(s["fds"] for s in samples),
        "settle_s": round(time.monotonic() - settle_start, 1),
        "fd_kinds_start": kinds_start, "fd_kinds_end": proc.fd_kinds(),
    })
    return result


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (per x unit); 0 for fewer than two points."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var
