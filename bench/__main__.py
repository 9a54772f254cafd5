"""`make bench`: what the router costs over a direct call and over a bare aiohttp proxy.

Everything runs as separate processes on loopback: a fake engine, the router in front of it,
and the bare pass-through proxy (the floor). For each workload the client sends requests one
at a time (added latency) and then from several concurrent clients (throughput), and the
proxy process's CPU time per request is read from /proc, which stays meaningful on a noisy
machine. A 200 MB upload then measures the router's memory growth and throughput.
Results are printed as a table and written to `bench/results/latest.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

from router.testing.processes import cpu_seconds, free_port, proc_status_kib, wait_until_healthy

CHAT = "bench-llm"
WHISPER = "bench-whisper"
RESULTS = Path(__file__).parent / "results"


@dataclass
class Result:
    target: str
    workload: str
    concurrency: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float


async def spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, *args)


def chat_body(stream: bool) -> bytes:
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": 64, "stream": stream}
    return json.dumps(body).encode()


async def measure(
    session: aiohttp.ClientSession, url: str, pid: int, body: bytes, requests: int,
    concurrency: int,
) -> tuple[float, list[float], float]:
    """Send `requests` chat requests from `concurrency` clients; wall time, latencies, CPU."""
    latencies: list[float] = []
    remaining = requests
    headers = {"Content-Type": "application/json"}

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            async with session.post(url + "/v1/chat/completions", data=body,
                                    headers=headers) as response:
                await response.read()
                assert response.status == 200, response.status
            latencies.append(time.perf_counter() - started)

    cpu_before = cpu_seconds(pid)
    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return wall, latencies, cpu_seconds(pid) - cpu_before


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def upload_figures(session: aiohttp.ClientSession, url: str, pid: int,
                         size_mb: int) -> dict[str, float]:
    boundary = "bench-boundary"
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
               f"{WHISPER}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
               f"filename=\"a.wav\"\r\n\r\n").encode()
        for _ in range(size_mb):
            digest.update(block)
            yield block
        yield f"\r\n--{boundary}--\r\n".encode()

    baseline = proc_status_kib(pid, "VmRSS")
    started = time.perf_counter()
    async with session.post(url + "/v1/audio/transcriptions", data=body(),
                            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
                            ) as response:
        text = (await response.json())["text"]
    elapsed = time.perf_counter() - started
    assert digest.hexdigest() in text, "the engine did not receive the upload intact"
    peak = proc_status_kib(pid, "VmHWM")
    return {"size_mb": size_mb, "mb_per_s": size_mb / elapsed,
            "rss_before_mb": baseline / 1024, "rss_peak_mb": peak / 1024,
            "rss_growth_mb": (peak - baseline) / 1024}


async def run(requests: int, concurrency: int, upload_mb: int) -> dict[str, object]:
    ports = {name: free_port() for name in ("engine", "bare", "router")}
    engine_url = f"http://127.0.0.1:{ports['engine']}"
    processes = {
        "direct": await spawn("-m", "router.testing", "--port", str(ports["engine"]),
                              "--models", f"{CHAT},{WHISPER}"),
    }
    processes["bare"] = await spawn("-m", "bench.bare_proxy", "--port", str(ports["bare"]),
                                    "--upstream", engine_url)
    processes["router"] = await spawn(
        "-m", "router", "--host", "127.0.0.1", "--port", str(ports["router"]),
        "--static-backends", engine_url, "--static-models", f"{CHAT};{WHISPER}",
        "--log-level", "warning",
    )
    urls = {"direct": engine_url, "bare": f"http://127.0.0.1:{ports['bare']}",
            "router": f"http://127.0.0.1:{ports['router']}"}
    results: list[Result] = []
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            await wait_until_healthy(session, engine_url, processes["direct"])
            await wait_until_healthy(session, urls["router"], processes["router"])
            for workload, stream in (("chat", False), ("sse64", True)):
                body = chat_body(stream)
                for clients in (1, concurrency):
                    for target, url in urls.items():
                        pid = processes[target].pid
                        await measure(session, url, pid, body, 200, clients)  # warm-up
                        wall, latencies, cpu = await measure(
                            session, url, pid, body, requests, clients
                        )
                        results.append(Result(
                            target, workload, clients, requests, requests / wall,
                            percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3,
                            cpu / requests * 1e6,
                        ))
                        print_row(results[-1])
            upload = await upload_figures(session, urls["router"], processes["router"].pid,
                                          upload_mb)
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            await process.wait()
    print(f"\nupload of {upload['size_mb']:.0f} MB through the router: "
          f"{upload['mb_per_s']:.0f} MB/s, RSS {upload['rss_before_mb']:.0f} MB -> peak "
          f"{upload['rss_peak_mb']:.0f} MB (+{upload['rss_growth_mb']:.1f} MB)")
    summary = overhead_summary(results)
    for line in summary["lines"]:  # type: ignore[attr-defined]
        print(line)
    return {"results": [asdict(r) for r in results], "upload": upload,
            "overhead": summary["figures"]}


def print_row(result: Result) -> None:
    print(f"{result.workload:6} c={result.concurrency:<3} {result.target:7} "
          f"{result.rps:8.0f} req/s  p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms"
          f"  cpu {result.cpu_us_per_request:7.0f} us/req", flush=True)


def overhead_summary(results: list[Result]) -> dict[str, object]:
    lines = ["", "router vs direct call (c=1) and vs the bare aiohttp proxy (CPU per request):"]
    figures: dict[str, float] = {}
    by_key = {(r.target, r.workload, r.concurrency): r for r in results}
    for workload in ("chat", "sse64"):
        direct, router = by_key["direct", workload, 1], by_key["router", workload, 1]
        bare = by_key["bare", workload, 1]
        added_p50 = router.p50_ms - direct.p50_ms
        added_p99 = router.p99_ms - direct.p99_ms
        ratio = router.cpu_us_per_request / bare.cpu_us_per_request
        figures.update({f"{workload}_added_p50_ms": added_p50,
                        f"{workload}_added_p99_ms": added_p99,
                        f"{workload}_cpu_ratio_to_bare": ratio})
        lines.append(f"  {workload:6} added latency p50 {added_p50:+.2f} ms, "
                     f"p99 {added_p99:+.2f} ms; CPU {router.cpu_us_per_request:.0f} us vs bare "
                     f"{bare.cpu_us_per_request:.0f} us ({ratio:.2f}x)")
    return {"lines": lines, "figures": figures}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--upload-mb", type=int, default=200)
    args = parser.parse_args()
    report = asyncio.run(run(args.requests, args.concurrency, args.upload_mb))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {RESULTS / 'latest.json'}")


if __name__ == "__main__":
    main()
