"""Engine stats: parsing vLLM's `/metrics`, and `EngineScraper` against real loopback engines."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from router.backends.pool import Backend, BackendPool
from router.config.settings import Config, StaticBackend
from router.keys import ENGINE_STATS
from router.stats.engine import (
    MAX_LINE, EngineScraper, EngineSnapshot, EngineStats, MetricsParser, parse_engine_metrics,
)
from router.testing import RunningEngine
from router.testing.flood import start_flood
from router.testing.processes import free_port
from router.testing.vllm_metrics import LLAMA, VLLM_METRICS

from .conftest import MODELS, StartRouter

# vLLM 0.8: only the old names.
OLD_VLLM_METRICS = f"""\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",{LLAMA}}} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",{LLAMA}}} 0.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{{engine="0",{LLAMA}}} 0.125
# HELP vllm:gpu_prefix_cache_queries_total GPU prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:gpu_prefix_cache_queries_total counter
vllm:gpu_prefix_cache_queries_total{{engine="0",{LLAMA}}} 1000.0
# HELP vllm:gpu_prefix_cache_hits_total GPU prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:gpu_prefix_cache_hits_total counter
vllm:gpu_prefix_cache_hits_total{{engine="0",{LLAMA}}} 250.0
"""  # noqa: E501


async def test_parse_realistic_vllm_exposition() -> None:
    assert len(VLLM_METRICS.splitlines()) >= 200
    snapshot = parse_engine_metrics(VLLM_METRICS, scraped_at=123.0)
    assert snapshot == EngineSnapshot(
        scraped_at=123.0,
        running=15.0,  # summed over the model_name label sets
        waiting=5.0,
        kv_cache_usage=0.375,  # the new name wins over gpu_cache_usage_perc (0.99)
        prefix_cache_hits=650_000.0,  # `_created` series are not counted
        prefix_cache_queries=1_000_000.0,
    )


async def test_parse_agrees_with_prometheus_client() -> None:
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(VLLM_METRICS):
        for sample in family.samples:
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    snapshot = parse_engine_metrics(VLLM_METRICS, scraped_at=0.0)
    assert snapshot.running == sums["vllm:num_requests_running"]
    assert snapshot.waiting == sums["vllm:num_requests_waiting"]
    assert snapshot.prefix_cache_hits == sums["vllm:prefix_cache_hits_total"]
    assert snapshot.prefix_cache_queries == sums["vllm:prefix_cache_queries_total"]


async def test_parse_old_vllm_names() -> None:
    snapshot = parse_engine_metrics(OLD_VLLM_METRICS, scraped_at=1.0)
    assert snapshot == EngineSnapshot(
        scraped_at=1.0, running=2.0, waiting=0.0, kv_cache_usage=0.125,
        prefix_cache_hits=250.0, prefix_cache_queries=1000.0,
    )


async def test_parse_counters_without_total_suffix_are_not_counted_twice() -> None:
    text = (
        "vllm:prefix_cache_hits 10\n"
        "vllm:prefix_cache_queries 40\n"
        "vllm:gpu_prefix_cache_hits_total 999\n"
    )
    snapshot = parse_engine_metrics(text, scraped_at=0.0)
    assert (snapshot.prefix_cache_hits, snapshot.prefix_cache_queries) == (10.0, 40.0)
    both = parse_engine_metrics(text + "vllm:prefix_cache_hits_total 11\n", scraped_at=0.0)
    assert both.prefix_cache_hits == 11.0


async def test_parse_averages_kv_cache_over_data_parallel_engines() -> None:
    text = (
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2\n'
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.6\n'
        'vllm:num_requests_running{engine="0",model_name="m"} 3\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 4\n'
    )
    snapshot = parse_engine_metrics(text, scraped_at=0.0)
    assert snapshot.kv_cache_usage == pytest.approx(0.4)
    assert snapshot.running == 7.0


async def test_parse_sample_line_forms() -> None:
    text = (
        "vllm:num_requests_running 3 1700000000000\n"  # with a timestamp
        'vllm:num_requests_waiting{model_name="odd } name",engine="0"} 2\r\n'  # `}` and CRLF
        'vllm:num_requests_waiting{model_name="b"}\t1e1\n'
        "vllm:num_requests_running_total 100\n"  # another series that starts alike
        "xvllm:num_requests_running 100\n"
        "  vllm:num_requests_running 100\n"  # not at the line start: not a sample
        "# vllm:num_requests_running 100\n"
    )
    snapshot = parse_engine_metrics(text, scraped_at=0.0)
    assert (snapshot.running, snapshot.waiting) == (3.0, 12.0)
    assert snapshot.kv_cache_usage is None
    assert snapshot.prefix_cache_hits is None


async def test_parse_malformed_input_never_raises() -> None:
    broken = [
        "",
        "\n\n\n",
        "\x00\xff garbage {{{ }}}",
        "vllm:num_requests_running",
        "vllm:num_requests_running ",
        'vllm:num_requests_running{model_name="a" 3',
        "vllm:num_requests_running{} abc",
        "vllm:num_requests_running{ 5",
        "vllm:num_requests_waiting NaN",
        "vllm:num_requests_waiting +Inf",
        "vllm:kv_cache_usage_perc -Inf",
        "vllm:kv_cache_usage_perc 1e999",
        "vllm:num_requests_waiting 0x10",
    ]
    for text in broken:
        assert parse_engine_metrics(text, scraped_at=5.0) == EngineSnapshot(scraped_at=5.0)
    # Broken lines among good ones: only the good ones count.
    mixed = "\n".join(broken) + "\nvllm:num_requests_waiting 4\nvllm:kv_cache_usage_perc 0.5\n"
    snapshot = parse_engine_metrics(mixed, scraped_at=5.0)
    assert (snapshot.waiting, snapshot.kv_cache_usage) == (4.0, 0.5)
    # Random damage to a real page.
    rng = random.Random(7)
    alphabet = ' {}"=\n\t#:.,-+eE0123456789abcvllm_\\\x00'
    for _ in range(300):
        chars = list(VLLM_METRICS)
        for _ in range(rng.randint(1, 50)):
            chars[rng.randrange(len(chars))] = rng.choice(alphabet)
        parse_engine_metrics("".join(chars), scraped_at=0.0)


async def test_snapshot_age() -> None:
    assert EngineSnapshot(scraped_at=100.0).age(102.5) == 2.5


# --------------------------------------------------------------------------- scraper

StartServer = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # Like the app's session: bytes are relayed as they come, never decompressed.
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def scraper_for(
    backends: list[Backend], session: aiohttp.ClientSession, *, interval: float = 10.0,
    timeout: float = 2.0,
) -> EngineScraper:
    return EngineScraper(EngineStats(), BackendPool(backends), session, interval, timeout)


def backend_for(engine: RunningEngine) -> Backend:
    return Backend(engine.url, MODELS)


async def test_scrape_once_reads_the_fake_engines(
    engines: list[RunningEngine], session: aiohttp.ClientSession,
) -> None:
    engines[0].behaviour.num_requests_waiting = 7
    engines[0].behaviour.kv_cache_usage = 0.25
    first, second = (backend_for(engine) for engine in engines)
    scraper = scraper_for([first, second], session)
    before = time.monotonic()
    await scraper.scrape_once()
    snapshot = scraper.store.get(first.id)
    assert snapshot is not None
    assert (snapshot.running, snapshot.waiting, snapshot.kv_cache_usage) == (0.0, 7.0, 0.25)
    assert snapshot.prefix_cache_hits is None  # the fake engine has no prefix cache
    assert before <= snapshot.scraped_at <= time.monotonic()
    assert snapshot.scrape_duration is not None and snapshot.scrape_duration > 0
    other = scraper.store.get(second.id)
    assert other is not None and other.waiting == 0.0 and other.kv_cache_usage == 0.0
    assert scraper.store.last_error(first.id) is None
    assert scraper.store.last_error(second.id) is None


async def test_unreachable_backend_has_no_snapshot_and_does_not_raise(
    session: aiohttp.ClientSession,
) -> None:
    dead = Backend(f"http://127.0.0.1:{free_port()}", MODELS)
    scraper = scraper_for([dead], session)
    await scraper.scrape_once()
    assert scraper.store.get(dead.id) is None
    error = scraper.store.last_error(dead.id)
    assert error is not None and "ClientConnectorError" in error


async def test_failed_scrape_keeps_the_old_snapshot(
    engines: list[RunningEngine], session: aiohttp.ClientSession,
) -> None:
    backend = backend_for(engines[0])
    scraper = scraper_for([backend], session)
    await scraper.scrape_once()
    snapshot = scraper.store.get(backend.id)
    assert snapshot is not None
    await engines[0].close()
    await scraper.scrape_once()
    assert scraper.store.get(backend.id) is snapshot
    assert scraper.store.last_error(backend.id) is not None
    assert "failing=1" in repr(scraper.store)


async def test_non_200_is_a_failed_scrape(
    aiohttp_server: StartServer, session: aiohttp.ClientSession,
) -> None:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(status=503, text="vllm:num_requests_waiting 3\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    server = await aiohttp_server(app)
    backend = Backend(str(server.make_url("")), MODELS)
    scraper = scraper_for([backend], session)
    await scraper.scrape_once()
    assert scraper.store.get(backend.id) is None
    assert scraper.store.last_error(backend.id) == "HTTP 503"


async def test_hanging_backends_are_cut_by_the_timeout_concurrently(
    aiohttp_server: StartServer, engine: RunningEngine, session: aiohttp.ClientSession,
) -> None:
    async def metrics(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    hanging = [await aiohttp_server(app) for _ in range(3)]
    backends = [Backend(str(server.make_url("")), MODELS) for server in hanging]
    healthy = backend_for(engine)
    scraper = scraper_for([*backends, healthy], session, timeout=0.3)
    assert repr(scraper) == ("<EngineScraper backends=4 interval=10.0s timeout=0.3s "
                             "max_size=16777216>")
    started = time.monotonic()
    await scraper.scrape_once()
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 0.8  # all cut at once, not one after the other (0.9 s)
    for backend in backends:
        assert scraper.store.get(backend.id) is None
        assert scraper.store.last_error(backend.id) == "timed out after 0.3s"
    assert scraper.store.get(healthy.id) is not None


async def test_run_scrapes_periodically_and_stops_on_cancel(
    aiohttp_server: StartServer, session: aiohttp.ClientSession,
) -> None:
    hits = 0

    async def metrics(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.Response(text=f"vllm:num_requests_running {hits}\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    server = await aiohttp_server(app)
    backend = Backend(str(server.make_url("")), MODELS)
    scraper = scraper_for([backend], session, interval=0.05)
    task = asyncio.create_task(scraper.run())
    async with asyncio.timeout(2):
        while hits < 3:
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    stopped_at = hits
    snapshot = scraper.store.get(backend.id)
    assert snapshot is not None and snapshot.running == float(stopped_at)
    await asyncio.sleep(0.2)
    assert hits == stopped_at


async def test_cancel_ends_run_during_a_hanging_scrape(
    aiohttp_server: StartServer, session: aiohttp.ClientSession,
) -> None:
    entered = asyncio.Event()

    async def metrics(request: web.Request) -> web.Response:
        entered.set()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    server = await aiohttp_server(app)
    scraper = scraper_for([Backend(str(server.make_url("")), MODELS)], session, timeout=60.0)
    task = asyncio.create_task(scraper.run())
    async with asyncio.timeout(2):
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_backend_removed_from_the_pool_is_forgotten(
    engines: list[RunningEngine], session: aiohttp.ClientSession,
) -> None:
    kept, removed = (backend_for(engine) for engine in engines)
    dead = Backend(f"http://127.0.0.1:{free_port()}", MODELS)
    scraper = scraper_for([kept, removed, dead], session)
    await scraper.scrape_once()
    assert scraper.store.backend_ids() == {kept.id, removed.id, dead.id}
    scraper.pool.replace([kept])
    await scraper.scrape_once()
    assert scraper.store.get(removed.id) is None
    assert scraper.store.last_error(dead.id) is None
    assert scraper.store.backend_ids() == {kept.id}
    assert scraper.store.get(kept.id) is not None


# --------------------------------------------------------------------------- bounds


async def test_parse_in_chunks_agrees_with_the_whole_page() -> None:
    page = VLLM_METRICS.encode()
    whole = parse_engine_metrics(VLLM_METRICS, scraped_at=0.0)
    rng = random.Random(3)
    for _ in range(200):
        parser = MetricsParser()
        cuts = sorted(rng.sample(range(1, len(page)), rng.randint(1, 40)))
        for start, end in zip([0, *cuts], [*cuts, len(page)]):
            parser.feed(page[start:end])
        assert parser.snapshot(0.0) == whole
    one_byte_at_a_time = MetricsParser()
    for byte in range(len(page)):
        one_byte_at_a_time.feed(page[byte:byte + 1])
    assert one_byte_at_a_time.snapshot(0.0) == whole


async def test_parse_skips_a_line_too_long_to_be_wanted_without_keeping_it() -> None:
    parser = MetricsParser()
    parser.feed(b"vllm:num_requests_running 1\nvllm:num_requests_waiting{x=\"")
    for _ in range(64):  # 4 MiB of one line
        parser.feed(b"y" * 65536)
        assert len(parser._carry or b"") <= MAX_LINE + 65536
    parser.feed(b"\"} 5\nvllm:kv_cache_usage_perc 0.5\n")
    snapshot = parser.snapshot(0.0)
    assert (snapshot.running, snapshot.waiting, snapshot.kv_cache_usage) == (1.0, None, 0.5)


async def test_parse_of_the_largest_page_read_never_holds_the_loop() -> None:
    page = VLLM_METRICS.encode()
    big = page * (16 * 1024 * 1024 // len(page))
    parser = MetricsParser()
    worst = total = 0.0
    for start in range(0, len(big), 65536):  # aiohttp hands over at most ~64 KiB at once
        began = time.thread_time()  # CPU: other processes on a busy machine do not count
        parser.feed(big[start:start + 65536])
        spent = time.thread_time() - began
        worst, total = max(worst, spent), total + spent
    assert parser.snapshot(0.0).running == 15.0 * (len(big) // len(page))
    print(f"\nparse of a 16 MiB page in 64 KiB chunks: {total * 1e3:.0f} ms in all, "
          f"{worst * 1e3:.2f} ms for the slowest chunk")
    assert worst < 0.02  # generous: ~1 ms here


async def test_endless_metrics_page_is_cut_at_the_size_limit_and_its_connection_closed(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
) -> None:
    async with await start_flood(total=256 * 1024 * 1024) as flood:
        backend = Backend(flood.url, MODELS)
        scraper = EngineScraper(EngineStats(), BackendPool([backend]), session,
                                interval=10.0, timeout=2.0, max_size=4 * 1024 * 1024)
        started = time.monotonic()
        await scraper.scrape_once()
        assert time.monotonic() - started < 1.5
        error = scraper.store.last_error(backend.id)
        assert error == ("/metrics answered more than 4194304 bytes: raise "
                         "--engine-stats-max-size if that is real")
        assert scraper.store.get(backend.id) is None
        async with asyncio.timeout(2):
            await flood.state.cut_event.wait()  # the engine saw its connection closed
        assert flood.state.bytes_sent < 32 * 1024 * 1024
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "connection closed" in warnings[0]
        await scraper.scrape_once()  # the same failure again: no second warning
        assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1


async def test_a_declared_length_over_the_limit_is_refused_before_reading(
    session: aiohttp.ClientSession,
) -> None:
    async with await start_flood(total=64 * 1024 * 1024, declare_length=True,
                                 delay=0.05) as flood:
        backend = Backend(flood.url, MODELS)
        scraper = EngineScraper(EngineStats(), BackendPool([backend]), session,
                                interval=10.0, timeout=2.0, max_size=1024 * 1024)
        await scraper.scrape_once()
        error = scraper.store.last_error(backend.id)
        assert error is not None and "more than 1048576 bytes" in error
        async with asyncio.timeout(2):
            await flood.state.cut_event.wait()
        assert flood.state.bytes_sent <= 2 * 1024 * 1024


async def test_the_scrape_timeout_bounds_a_body_that_trickles(
    session: aiohttp.ClientSession,
) -> None:
    # One small chunk every 20 ms, for ever: never over the size limit, never silent long
    # enough for a per-read timeout; only a limit on the whole scrape ends it.
    async with await start_flood(chunk_size=100, delay=0.02) as flood:
        backend = Backend(flood.url, MODELS)
        scraper = scraper_for([backend], session, timeout=0.5)
        started = time.monotonic()
        await scraper.scrape_once()
        assert 0.5 <= time.monotonic() - started < 1.5
        assert scraper.store.last_error(backend.id) == "timed out after 0.5s"
        async with asyncio.timeout(2):
            await flood.state.cut_event.wait()


async def test_router_health_answers_quickly_while_a_huge_metrics_page_is_scraped(
    start_router: StartRouter,
) -> None:
    async with await start_flood(total=256 * 1024 * 1024) as flood:
        router = await start_router(Config(
            static_backends=(StaticBackend(url=flood.url, models=MODELS),),
            engine_stats_interval=0.05, health_check_interval=0,
        ))
        latencies = []
        async with aiohttp.ClientSession() as client:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                began = time.monotonic()
                async with client.get(router.url + "/health") as response:
                    assert response.status == 200
                latencies.append(time.monotonic() - began)
                await asyncio.sleep(0.01)
        assert flood.state.requests >= 2  # scrapes ran meanwhile, each cut at 16 MiB
        assert flood.state.cut >= 1
        error = router.app[ENGINE_STATS].last_error(Backend(flood.url, MODELS).id)
        assert error is not None and "more than 16777216 bytes" in error
        print(f"\n/health during 16 MiB scrapes: max {max(latencies) * 1e3:.1f} ms over "
              f"{len(latencies)} requests, {flood.state.requests} scrapes")
        assert max(latencies) < 0.3
