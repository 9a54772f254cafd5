"""The load generator: `wrk` with a Lua script for the POST body, or, when wrk is not
installed (CI's smoke run), a Python client with the same interface, named as such in the
results because its figures do not compare with wrk's."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

__all__ = ["LoadResult", "run_load", "wrk_path", "chat_body"]

WRK_MARK = "BENCH_JSON "
LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[{body}]==]
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{mark}{{"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"connect":%.0f,' ..
    '"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f,' ..
    '"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,"max_us":%.0f,' ..
    '"mean_us":%.1f}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


def chat_body(model: str, stream: bool, max_tokens: int = 64) -> str:
    return json.dumps({"model": model,
                       "messages": [{"role": "user", "content": "Say something."}],
                       "max_tokens": max_tokens, "stream": stream}, separators=(",", ":"))


def wrk_path() -> str | None:
    return shutil.which("wrk")


@dataclass
class LoadResult:
    loadgen: str
    requests: int
    duration_s: float
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    error_detail: dict[str, int]

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


def run_wrk(url: str, body: str, concurrency: int, duration: float,
            timeout: float = 30.0, cpus: str | None = None) -> LoadResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA.format(body=body, mark=WRK_MARK))
    try:
        pin = ["taskset", "-c", cpus] if cpus else []
        argv = [*pin, str(wrk_path()), "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s",
                f"--timeout={int(timeout)}s", "-s", script.name, url]
        done = subprocess.run(argv, capture_output=True, text=True,
                              timeout=duration + timeout + 30)
    finally:
        Path(script.name).unlink(missing_ok=True)
    line = next((line for line in done.stdout.splitlines() if line.startswith(WRK_MARK)), None)
    if line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    data = json.loads(line[len(WRK_MARK):])
    errors = {key: data[key] for key in ("connect", "read", "write", "status", "timeout")}
    return LoadResult(
        loadgen="wrk", requests=data["requests"], duration_s=data["duration_us"] / 1e6,
        errors=sum(errors.values()), p50_ms=data["p50_us"] / 1e3, p90_ms=data["p90_us"] / 1e3,
        p99_ms=data["p99_us"] / 1e3, mean_ms=data["mean_us"] / 1e3,
        error_detail={k: v for k, v in errors.items() if v},
    )


async def _python_load(url: str, body: str, concurrency: int,
                       duration: float) -> LoadResult:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    data = body.encode()
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        deadline = started + duration

        async def client() -> None:
            while time.perf_counter() < deadline:
                begin = time.perf_counter()
                try:
                    async with session.post(url, data=data, headers=headers) as response:
                        await response.read()
                        if response.status >= 300:
                            errors["status"] = errors.get("status", 0) + 1
                            continue
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    errors["read"] = errors.get("read", 0) + 1
                    continue
                latencies.append(time.perf_counter() - begin)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ordered = sorted(latencies) or [0.0]

    def pick(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1e3

    return LoadResult(
        loadgen="python", requests=len(latencies), duration_s=wall,
        errors=sum(errors.values()), p50_ms=pick(0.5), p90_ms=pick(0.9), p99_ms=pick(0.99),
        mean_ms=sum(ordered) / len(ordered) * 1e3, error_detail=errors,
    )


def run_load(url: str, body: str, concurrency: int, duration: float,
             loadgen: str = "wrk", cpus: str | None = None) -> LoadResult:
    """POST `body` to `url` from `concurrency` connections for `duration` seconds (wrk
    pinned to `cpus` when given)."""
    if loadgen == "wrk":
        return run_wrk(url, body, concurrency, duration, cpus=cpus)
    return asyncio.run(_python_load(url, body, concurrency, duration))
