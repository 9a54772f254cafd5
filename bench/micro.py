"""What the router's own per-request steps cost, in isolation: `python -m bench.micro`.

On a shared 2-core machine, end-to-end CPU per request moves by 10-20 % between runs, more
than the steps a change would save. These timings (best of several repeats, in-process, no
sockets) are stable to a microsecond or two, and price the changes proposed in
docs/benchmarks.md. Each uses the router's real code on a request like the benchmark's; a
step whose code is gone from the router prints "n/a". (The pooled-connection steps hold one
loopback connection to a raw engine, opened before the timing.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import timeit
from collections.abc import Awaitable, Callable
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy, istr

from bench.load import chat_body
from bench.targets import CHAT

HEADERS = CIMultiDictProxy(CIMultiDict({
    "Host": "127.0.0.1:8001", "User-Agent": "OpenAI/Python 1.40.0",
    "Content-Type": "application/json", "Content-Length": "130", "Accept": "application/json",
    "Accept-Encoding": "gzip, deflate", "Connection": "keep-alive",
    "Authorization": "Bearer sk-123", "X-Stainless-Lang": "python",
}))
ENGINE_HEADERS = CIMultiDictProxy(CIMultiDict({
    "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
    "Date": "Wed, 25 Nov 2026 17:00:30 GMT", "Server": "Python/3.11 aiohttp/3.14",
    "Transfer-Encoding": "chunked", "x-request-id": "abc",
}))


def best_us(function: Callable[[], object], number: int = 2000, repeat: int = 7) -> float:
    """Best of `repeat` runs of `number` calls, in microseconds per call."""
    return min(timeit.repeat(function, number=number, repeat=repeat)) / number * 1e6


def one_pass_headers(incoming: Any, drop: frozenset[istr], request_id: str) -> CIMultiDict[str]:
    named = incoming.get("Connection")
    if named:
        drop = drop | {istr(name.strip()) for name in named.split(",")}
    headers = CIMultiDict([(k, v) for k, v in incoming.items() if k not in drop])
    headers["x-request-id"] = request_id
    return headers


class _Transport:
    """Just enough of a transport for an aiohttp client protocol fed by hand."""

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


JSON_ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 300\r\n"
               b"Date: Wed, 25 Nov 2026 17:00:30 GMT\r\nServer: uvicorn\r\n\r\n" + b"x" * 300)
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\nServer: uvicorn\r\n\r\n")


def head_watch_cost() -> float:
    """An answer's head (JSON whole, and an SSE head) fed to a real aiohttp protocol with the
    router's `HeadWatch` armed, minus the same without it: what the phase timeouts add."""
    from aiohttp.client_proto import ResponseHandler

    from router.proxy.timeouts import HeadWatch, ProxyTimeout

    timeout = ProxyTimeout(sock_read=1800.0, body_read=600.0, head=30.0)

    async def run() -> float:
        protocol = ResponseHandler(asyncio.get_running_loop())
        protocol.connection_made(_Transport())  # type: ignore[arg-type]

        def once(watch: bool, answer: bytes) -> None:
            protocol.set_response_params(read_timeout=1800.0 if watch else 600.0)
            if watch:
                HeadWatch(protocol, timeout).arm()
            protocol.data_received(answer)
            protocol._buffer.clear()  # the parsed message: nobody reads it here
            protocol._drop_timeout()

        def cpu_us(watch: bool, answer: bytes) -> float:
            # CPU time, many repeats: the step is ~1 us on a ~15 us parse, below the noise
            # of a shared machine's wall clock.
            runs = timeit.repeat(lambda: once(watch, answer), number=5000, repeat=15,
                                 timer=time.process_time)
            return min(runs) / 5000 * 1e6

        return max(cpu_us(True, answer) - cpu_us(False, answer)
                   for answer in (JSON_ANSWER, SSE_HEAD))
    return asyncio.run(run())


def async_cost_over(
    costly: Callable[[], Awaitable[object]], baseline: Callable[[], Awaitable[object]],
    number: int = 5000, repeats: int = 7,
) -> float:
    """µs per call that `costly()` takes over `baseline()`: the best of `repeats` runs each."""
    async def run() -> float:
        best = []
        for coroutine in (costly, baseline):
            runs = []
            for _ in range(repeats):
                started = time.perf_counter()
                for _ in range(number):
                    await coroutine()
                runs.append(time.perf_counter() - started)
            best.append(min(runs) / number * 1e6)
        return best[0] - best[1]
    return asyncio.run(run())


def connect_frame_cost() -> float:
    """One more coroutine frame around `TCPConnector.connect` (plus its isinstance check)."""
    from router.proxy.timeouts import ProxyTimeout

    timeout = ProxyTimeout()

    async def inner() -> object:
        return None

    async def outer() -> object:
        result = await inner()
        if isinstance(timeout, ProxyTimeout) and result is not None:
            pass
        return result

    return async_cost_over(outer, inner)


def retry_ticket() -> Callable[[], None]:
    from router.proxy.retries import RetryBudget

    budget = RetryBudget(20.0, 3)

    def one() -> None:
        ticket = budget.ticket()
        try:
            pass
        finally:
            ticket.close()
    return one


def measure_all() -> list[tuple[str, str]]:
    results: list[tuple[str, str]] = []

    def add(name: str, step: Callable[[], float]) -> None:
        try:
            results.append((name, f"{step():7.2f} us"))
        except Exception as error:  # the router changed: say so, go on
            results.append((name, f"    n/a ({type(error).__name__}: {error})"))

    body = chat_body(CHAT, True).encode()
    add("json.loads of the chat body", lambda: best_us(lambda: json.loads(body)))

    def orjson_loads() -> float:
        import orjson
        return best_us(lambda: orjson.loads(body))
    add("orjson.loads of the chat body", orjson_loads)

    def metrics_page(ours: bool) -> Callable[[], float]:
        """One engine-stats scrape's parse of a real vLLM page, against prometheus_client's."""
        from prometheus_client.parser import text_string_to_metric_families

        from router.stats.engine import parse_engine_metrics
        from router.testing.vllm_metrics import VLLM_METRICS

        def library() -> None:
            for family in text_string_to_metric_families(VLLM_METRICS):
                for _sample in family.samples:
                    pass

        return lambda: best_us(
            (lambda: parse_engine_metrics(VLLM_METRICS, scraped_at=0.0)) if ours else library,
            number=200)
    add("engine-stats parse of a vLLM /metrics page (per scrape)", metrics_page(True))
    add("  prometheus_client's parser of the same page", metrics_page(False))

    def forward(direction: str) -> Callable[[], float]:
        def step() -> float:
            from router.proxy import headers as proxy
            drop = proxy.NOT_FORWARDED_UP if direction == "up" else proxy.NOT_FORWARDED_DOWN
            incoming = HEADERS if direction == "up" else ENGINE_HEADERS
            return best_us(lambda: proxy.forward_headers(incoming, drop, "req-1"))
        return step

    def forward_one_pass(direction: str) -> Callable[[], float]:
        def step() -> float:
            from router.proxy import headers as proxy
            drop = proxy.NOT_FORWARDED_UP if direction == "up" else proxy.NOT_FORWARDED_DOWN
            incoming = HEADERS if direction == "up" else ENGINE_HEADERS
            return best_us(lambda: one_pass_headers(incoming, drop, "req-1"))
        return step

    add("forward_headers, request (router now)", forward("up"))
    add("forward_headers, request (one pass)", forward_one_pass("up"))
    add("forward_headers, response (router now)", forward("down"))
    add("forward_headers, response (one pass)", forward_one_pass("down"))

    def timeout_cost() -> float:
        async def with_timeout() -> None:
            async with asyncio.timeout(60):
                pass

        async def without() -> None:
            pass

        return async_cost_over(with_timeout, without)
    add("asyncio.timeout around reading the body", timeout_cost)
    add("response head watch (the timeouts by phase), per request", head_watch_cost)
    add("  of which the connect() override's frame", connect_frame_cost)
    add("retry budget ticket (take and give back), per request",
        lambda: best_us(retry_ticket()))
    add("request id: os.urandom(16).hex()", lambda: best_us(lambda: os.urandom(16).hex()))

    def events(only_metrics: bool) -> Callable[[], float]:
        def step() -> float:
            from router.app import make_app
            from router.config.load import parse_config
            from router.flow import Outcome, RequestFlow
            from router.keys import EVENTS, METRICS, POOL

            config = parse_config(["--static-backends", "http://127.0.0.1:9,http://127.0.0.1:10",
                                   "--static-models", f"{CHAT},{CHAT}", "--log-level",
                                   "warning"])
            app = make_app(config)
            backend = app[POOL].candidates(CHAT)[0]
            target = app[METRICS] if only_metrics else app[EVENTS]
            tail = (b'data: {"id":"x","choices":[{"index":0,"delta":{},"finish_reason":"stop"'
                    b'}]}\n\ndata: [DONE]\n\n')

            def one() -> None:
                flow = RequestFlow(id="req-1", endpoint="/v1/chat/completions")
                flow.model, flow.stream, flow.backend = CHAT, True, backend
                target.on_new(flow)
                now = time.monotonic()
                flow.status, flow.t_headers, flow.t_first_byte = 200, now, now
                target.on_response(flow)
                if hasattr(flow, "tail"):
                    flow.tail = tail
                flow.outcome, flow.t_end = Outcome.OK, time.monotonic()
                target.on_complete(flow)
            return best_us(one)
        return step

    add("request events, all subscribers (new+response+complete)", events(False))
    add("  of which the Prometheus metrics", events(True))

    def pool(guarded: bool) -> Callable[[], float]:
        def step() -> float:
            import aiohttp
            from router.proxy.upstream_pool import GuardedConnector
            return asyncio.run(pooled_connection_us(
                GuardedConnector if guarded else aiohttp.TCPConnector))
        return step

    add("pooled upstream connection, take + give back (aiohttp)", pool(False))
    add("pooled upstream connection, take + give back (router)", pool(True))
    return results


async def pooled_connection_us(make: Callable[[], Any], number: int = 5000,
                               repeat: int = 15) -> float:
    """Best time to take a pooled keep-alive connection and give it back (one loopback
    connection to a raw engine, opened before the timing)."""
    import aiohttp
    from yarl import URL

    from router.testing.raw_engine import RawEngine, http_response

    async with RawEngine(lambda request: [http_response(200, b"{}")]) as engine:
        connector = make()
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.get(engine.url) as response:
                await response.read()
            request = aiohttp.ClientRequest("GET", URL(engine.url),
                                            loop=asyncio.get_running_loop())
            timeout = aiohttp.ClientTimeout()
            best = float("inf")
            for _ in range(repeat):
                started = time.perf_counter()
                for _ in range(number):
                    connection = await connector.connect(request, [], timeout)
                    connection.release()
                best = min(best, time.perf_counter() - started)
            assert engine.connections == 1
            return best / number * 1e6


def main() -> None:
    argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__).parse_args()
    for name, figure in measure_all():
        print(f"{figure}  {name}")


if __name__ == "__main__":
    main()
