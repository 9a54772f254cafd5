"""What the engines report about themselves: the last figures scraped from each `/metrics`,
and the model cards of each `/v1/models`.

`EngineStats` is the store policies read (`get(backend_id)`); `EngineScraper` fills it, and
keeps the pool's model cards (`BackendPool.set_cards`) fresh for the router's `/v1/models`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from dataclasses import dataclass, replace

import aiohttp

from router.backends.pool import Backend, BackendPool, model_cards
from router.errors import AnswerTooLarge, failure_detail
from router.proxy.upstream_read import chunks_bounded, loads_stepwise, read_bounded

__all__ = [
    "EngineSnapshot", "EngineStats", "EngineScraper", "MetricsParser", "parse_engine_metrics",
]

log = logging.getLogger("router.stats.engine")

CARDS_REFRESH = 30.0
"""Seconds between two reads of an engine's `/v1/models` (LoRA adapters come and go at run
time); an engine whose cards are not known yet is asked at every scrape."""
MAX_MODELS_ANSWER = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """One scrape of one engine; a figure the engine does not export is None."""

    scraped_at: float
    """`time.monotonic()` of the scrape."""
    running: float | None = None
    """`vllm:num_requests_running`, summed over the engine's models."""
    waiting: float | None = None
    """`vllm:num_requests_waiting`, summed over the engine's models."""
    swapped: float | None = None
    """`vllm:num_requests_swapped` (vLLM V0 only: V1 does not swap)."""
    kv_cache_usage: float | None = None
    """`vllm:kv_cache_usage_perc` (older vLLM: `vllm:gpu_cache_usage_perc`), 0..1."""
    prefix_cache_hits: float | None = None
    prefix_cache_queries: float | None = None
    prefix_cache_hit_rate: float | None = None
    """`vllm:gpu_prefix_cache_hit_rate`, which only vLLM V0 exports (V1: hits / queries)."""
    scrape_duration: float | None = None
    """Seconds the request and the parse took; vLLM answers `/metrics` on the same event loop
    as the API, so a slow scrape is an early sign of a saturated API server."""

    def age(self, now: float) -> float:
        """Seconds since the scrape, for `now` from `time.monotonic()`."""
        return now - self.scraped_at


# Series name -> (snapshot field, rank). Per field the lowest rank present wins: a newer vLLM
# name over an older one, and a counter's `_total` sample over a bare name, so an exposition
# that carries both is not counted twice.
_SERIES: dict[str, tuple[str, int]] = {
    "vllm:num_requests_running": ("running", 0),
    "vllm:num_requests_waiting": ("waiting", 0),
    "vllm:num_requests_swapped": ("swapped", 0),
    "vllm:gpu_prefix_cache_hit_rate": ("prefix_cache_hit_rate", 0),
    "vllm:kv_cache_usage_perc": ("kv_cache_usage", 0),
    "vllm:gpu_cache_usage_perc": ("kv_cache_usage", 1),
    "vllm:prefix_cache_hits_total": ("prefix_cache_hits", 0),
    "vllm:prefix_cache_hits": ("prefix_cache_hits", 1),
    "vllm:gpu_prefix_cache_hits_total": ("prefix_cache_hits", 2),
    "vllm:gpu_prefix_cache_hits": ("prefix_cache_hits", 3),
    "vllm:prefix_cache_queries_total": ("prefix_cache_queries", 0),
    "vllm:prefix_cache_queries": ("prefix_cache_queries", 1),
    "vllm:gpu_prefix_cache_queries_total": ("prefix_cache_queries", 2),
    "vllm:gpu_prefix_cache_queries": ("prefix_cache_queries", 3),
}
_AVERAGED = frozenset({"kv_cache_usage", "prefix_cache_hit_rate"})
"""Fields that are a share of one engine's cache: several label sets (data-parallel engines,
each with its own cache) are averaged, where request counts add up."""

# One sample line of a wanted series: the name at a line start, optional labels (up to the
# line's last `}`, so a `}` inside a quoted label value does no harm), then the value. The
# leading newline is a literal the regex engine searches for in C, so the ~200 other lines of a
# vLLM page are skipped at memchr speed (anchoring with `^` and MULTILINE is 6x slower). Bytes,
# not text: the page is never decoded, only the few values that match are.
_SAMPLE = re.compile(
    rb"\n(" + b"|".join(re.escape(name.encode()) for name in sorted(_SERIES, key=len,
                                                                    reverse=True)) + rb")"
    rb"(?:\{[^\n]*\})?[ \t]+([^ \t\r\n]+)"
)
_SERIES_BYTES = {name.encode(): key for name, key in _SERIES.items()}
MAX_LINE = 64 * 1024
"""Longest line the parser keeps while waiting for its end; a wanted sample line is well under
a kilobyte, so a longer one is skipped (and a page of one endless line costs nothing)."""


class MetricsParser:
    """Parses a `/metrics` page chunk by chunk as it arrives, keeping only the figures it
    wants: a big page never becomes one big string, and each chunk costs a regex scan of
    itself (no line splitting, no decoding)."""

    __slots__ = ("_totals", "_carry")

    def __init__(self) -> None:
        self._totals: dict[tuple[str, int], list[float]] = {}
        self._carry: bytes | None = b"\n"
        """The unfinished last line, from its leading newline; None while skipping the rest
        of a line too long to be wanted."""

    def feed(self, chunk: bytes) -> None:
        end = chunk.rfind(b"\n")
        if end < 0:
            if self._carry is not None:
                self._carry += chunk
                if len(self._carry) > MAX_LINE:
                    self._carry = None
            return
        self._scan(chunk[:end] if self._carry is None else self._carry + chunk[:end])
        self._carry = chunk[end:]

    def _scan(self, text: bytes) -> None:
        totals = self._totals
        for match in _SAMPLE.finditer(text):
            try:
                value = float(match[2])
            except ValueError:
                continue
            if not math.isfinite(value):
                continue
            key = _SERIES_BYTES[match[1]]
            acc = totals.get(key)
            if acc is None:
                totals[key] = [value, 1.0]
            else:
                acc[0] += value
                acc[1] += 1.0

    def snapshot(self, scraped_at: float) -> EngineSnapshot:
        """The figures of the whole page (call once, after the last chunk)."""
        if self._carry is not None:
            self._scan(self._carry)
            self._carry = None
        figures: dict[str, float] = {}
        for (field, _rank), (total, count) in sorted(self._totals.items(),
                                                     key=lambda item: item[0][1]):
            if field not in figures:
                figures[field] = total / count if field in _AVERAGED else total
        return EngineSnapshot(scraped_at=scraped_at, **figures)


def parse_engine_metrics(text: str, scraped_at: float) -> EngineSnapshot:
    """The figures a vLLM `/metrics` page (Prometheus text format) holds; never raises.

    Lines of other series, comments and broken lines are skipped; a value that is not a
    finite number counts as absent."""
    parser = MetricsParser()
    parser.feed(text.encode("utf-8", errors="replace"))
    return parser.snapshot(scraped_at)


class EngineStats:
    """The latest snapshot per backend id, and why the last scrape failed when it did."""

    def __init__(self) -> None:
        self._latest: dict[str, EngineSnapshot] = {}
        self._errors: dict[str, str] = {}

    def get(self, backend_id: str) -> EngineSnapshot | None:
        return self._latest.get(backend_id)

    def update(self, backend_id: str, snapshot: EngineSnapshot) -> None:
        self._latest[backend_id] = snapshot
        self._errors.pop(backend_id, None)

    def record_error(self, backend_id: str, error: str) -> None:
        """The last scrape failed; the previous snapshot (if any) stays."""
        self._errors[backend_id] = error

    def last_error(self, backend_id: str) -> str | None:
        """Why the last scrape failed; None when it succeeded or none was tried."""
        return self._errors.get(backend_id)

    def backend_ids(self) -> set[str]:
        """Every backend the store holds a snapshot or an error for."""
        return self._latest.keys() | self._errors.keys()

    def forget(self, backend_id: str) -> None:
        self._latest.pop(backend_id, None)
        self._errors.pop(backend_id, None)

    def __repr__(self) -> str:
        return f"<EngineStats backends={len(self._latest)} failing={len(self._errors)}>"


class EngineScraper:
    """Scrapes every backend's `/metrics` into an `EngineStats`, every `interval` seconds.

    A scrape is bounded twice: `timeout` seconds for all of it (connect, headers and the
    whole body), and `max_size` bytes of body; past either it is a failed scrape and the
    connection is closed. The page is parsed as it arrives (`MetricsParser`).

    Every `cards_refresh` seconds it also reads each engine's `/v1/models` (same timeout, at
    most `MAX_MODELS_ANSWER` bytes) into the pool's model cards; a failed read keeps the cards
    the engine gave before. Nobody waits for either: a request never does.

    The owner runs `run()` as a task and cancels it before closing `session`."""

    def __init__(
        self, store: EngineStats, pool: BackendPool, session: aiohttp.ClientSession,
        interval: float, timeout: float, max_size: int = 16 * 1024 * 1024,
        cards_refresh: float = CARDS_REFRESH,
    ) -> None:
        self.store = store
        self.pool = pool
        self.session = session
        self.interval = interval
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.max_size = max_size
        self.cards_refresh = cards_refresh
        self._cards_read_at: dict[str, float] = {}
        """Backend id -> `time.monotonic()` of its last good `/v1/models` read."""

    async def run(self) -> None:
        """Scrape, sleep, repeat until cancelled."""
        while True:
            await self.scrape_once()
            await asyncio.sleep(self.interval)

    async def scrape_once(self) -> None:
        """Scrape all engines concurrently; failures are recorded in the store, not raised.
        External providers have no `/metrics` to scrape."""
        engines = [backend for backend in self.pool.backends if backend.kind == "engine"]
        now = time.monotonic()
        due = [backend for backend in engines
               if now - self._cards_read_at.get(backend.id, -math.inf) >= self.cards_refresh]
        await asyncio.gather(*(self._scrape(backend) for backend in engines),
                             *(self._read_cards(backend) for backend in due))
        # Read the pool again: a backend removed while we were scraping it goes too.
        current = {backend.id for backend in self.pool.backends}
        for backend_id in self.store.backend_ids() - current:
            self.store.forget(backend_id)
        for backend_id in self._cards_read_at.keys() - current:
            del self._cards_read_at[backend_id]

    async def _read_cards(self, backend: Backend) -> None:
        try:
            async with self.session.get(
                backend.url + "/v1/models", timeout=self.timeout,
                headers={"Accept": "application/json"}, allow_redirects=False,
            ) as response:
                if response.status != 200:
                    raise _ScrapeError(f"HTTP {response.status}")
                raw = await read_bounded(response, MAX_MODELS_ANSWER, "/v1/models")
            cards = model_cards(await loads_stepwise(raw))
        except Exception as exc:  # the cards it gave before stay; asked again next scrape
            log.debug("engine stats: reading the models of backend %s (%s) failed: %s",
                      backend.id, backend.url, _describe(exc, self.timeout.total))
            return
        self._cards_read_at[backend.id] = time.monotonic()
        self.pool.set_cards(backend.id, cards)

    async def _scrape(self, backend: Backend) -> None:
        started = time.monotonic()
        try:
            # Plain text: decompressing costs CPU, and a session that relays bytes as they
            # come (like the proxy's) would hand us gzip.
            async with self.session.get(
                backend.url + "/metrics", timeout=self.timeout,
                headers={"Accept-Encoding": "identity"}, allow_redirects=False,
            ) as response:
                if response.status != 200:
                    raise _ScrapeError(f"HTTP {response.status}")
                encoding = response.headers.get("Content-Encoding", "identity")
                if encoding != "identity" and not self.session.auto_decompress:
                    raise _ScrapeError(f"unexpected Content-Encoding {encoding}")
                parser = MetricsParser()
                async for chunk in chunks_bounded(response, self.max_size, "/metrics"):
                    parser.feed(chunk)
        except AnswerTooLarge as exc:
            # A misconfigured or hostile engine: worth a warning, once per change.
            error = f"{exc.message}: raise --engine-stats-max-size if that is real"
            if self.store.last_error(backend.id) != error:
                log.warning("engine stats: backend %s (%s): %s; scrape cut and the "
                            "connection closed", backend.id, backend.url, error)
            self.store.record_error(backend.id, error)
            return
        except Exception as exc:  # a scrape must never end the loop, whatever went wrong
            error = _describe(exc, self.timeout.total)
            log.debug("engine stats: scraping backend %s (%s) failed: %s",
                      backend.id, backend.url, error)
            self.store.record_error(backend.id, error)
            return
        snapshot = parser.snapshot(started)
        self.store.update(backend.id, replace(
            snapshot, scrape_duration=time.monotonic() - started))

    def __repr__(self) -> str:
        return (f"<EngineScraper backends={len(self.pool.backends)} "
                f"interval={self.interval}s timeout={self.timeout.total}s "
                f"max_size={self.max_size}>")


class _ScrapeError(Exception):
    """The engine answered, but not with a metrics page."""


def _describe(exc: Exception, timeout: float | None) -> str:
    if isinstance(exc, _ScrapeError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout}s"
    return failure_detail(exc)
