"""The engines' KV event streams, followed into the index.

Each engine says where it publishes (`GET /kv_event_sources`: per data-parallel rank an
endpoint, a replay endpoint and a topic; `*` stands for the engine's own host), unless
`--kv-events-endpoint` gives a template for networks where that address is not reachable.
Each rank's stream is followed on its own: a ZMQ SUB socket for the live batches and, on
demand, a DEALER socket asking the replay endpoint for what was missed.

Sequence numbers decide what a batch means:
- the next one: applied;
- a jump ahead: the missed batches are replayed first; when the engine's buffer no longer
  holds them (or it has no replay endpoint, or does not answer), what the index knew of that
  rank is dropped and relearned from the batches that come;
- one already seen: a duplicate right after a replay (skipped), otherwise the engine
  restarted (its counter starts again at 0): its blocks are dropped, the batch applied.
On start a rank is replayed from 0, so a router that starts after its engines learns what
they hold (as far as their buffer reaches).

Routing never waits on any of this: a silent or broken stream leaves an index that is stale
or empty, and the policy's load term decides.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiohttp
import zmq
import zmq.asyncio
from yarl import URL

from router.backends.pool import Backend, BackendPool
from router.kvcache.events import MalformedBatch, decode_batch, decode_seq
from router.kvcache.index import KvIndex
from router.proxy.upstream_read import loads_stepwise, read_bounded

__all__ = ["EventSource", "FeedStats", "KvEventFeeds", "event_sources"]

log = logging.getLogger("router.kvcache")

MAX_MESSAGE = 8 * 1024 * 1024
"""Largest frame taken from an engine's event stream; a bigger one drops the connection."""
RECEIVE_QUEUE = 256
"""Batches ZMQ queues for us per stream before it drops (and we see a gap)."""
MAX_SOURCES_ANSWER = 256 * 1024
REPLAY_TIMEOUT = 5.0
SOURCES_RETRY = 5.0
"""Seconds before asking `/kv_event_sources` again after it could not be asked."""
SOURCES_REFRESH = 30.0
"""Seconds between two asks once answered: a restarted engine may publish elsewhere, or
start publishing."""
SYNC_INTERVAL = 2.0
"""Seconds between two looks at the pool (backends added or removed)."""
WARN_EVERY = 60.0


class EventSource(NamedTuple):
    rank: int
    endpoint: str
    replay: str | None
    topic: str
    binds: bool = True
    """The engine binds its publisher (a wildcard host). With a given host vLLM connects
    out to it instead, to a subscriber that binds: the router, which connects, gets nothing."""


@dataclass
class FeedStats:
    """One engine's stream, for `/metrics` and `/dashboard`."""

    batches: int = 0
    events_skipped: int = 0
    """Events that were malformed or of an unknown type."""
    malformed: int = 0
    """Messages that were not a batch at all."""
    gaps_replayed: int = 0
    gaps_lost: int = 0
    """Gaps the replay could not fill: the rank's blocks were dropped and relearned."""
    restarts: int = 0
    lag: float | None = None
    """Seconds between the engine publishing the last batch and the router applying it."""
    sources: int = 0
    """Event streams followed (data-parallel ranks)."""
    synced: int = 0
    """Streams whose first replay (what the engine held before we came) is done."""
    warned_at: float = -WARN_EVERY


def event_sources(answer: Any, host: str) -> list[EventSource]:
    """The streams in a `/kv_event_sources` answer, `*` replaced by the engine's host."""
    if not isinstance(answer, dict):
        return []
    sources = []
    for rank, config in answer.items():
        if not isinstance(config, dict) or config.get("enable_kv_cache_events") is False:
            continue
        if config.get("publisher", "zmq") != "zmq":
            continue
        raw = config.get("endpoint")
        endpoint = _reachable(raw, host)
        if endpoint is None:
            continue
        topic = config.get("topic")
        sources.append(EventSource(
            int(rank) if str(rank).isdigit() else 0, endpoint,
            _reachable(config.get("replay_endpoint"), host),
            topic if isinstance(topic, str) else "",
            endpoint != raw,
        ))
    return sorted(sources)


def _reachable(endpoint: Any, host: str) -> str | None:
    """A tcp endpoint the router can connect to, or None."""
    if not isinstance(endpoint, str) or not endpoint.startswith("tcp://"):
        return None
    address, _, port = endpoint[len("tcp://"):].rpartition(":")
    if not port.isdigit() or not address:
        return None
    if address in ("*", "0.0.0.0", "[::]", "::"):
        address = _in_url(host)
    return f"tcp://{address}:{port}"


def from_template(template: str, host: str) -> str:
    return template.replace("{host}", _in_url(host))


def _in_url(host: str) -> str:
    """The host as an endpoint writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


class _Cursor:
    """Where a stream is: the last applied sequence number and, after a replay, the lowest
    one a duplicate may have."""

    def __init__(self) -> None:
        self.last: int | None = None
        self.floor = 0

    def reset(self) -> None:
        self.last, self.floor = None, 0


class KvEventFeeds:
    """Follows every engine's KV events into `index` while `wanted()` (the policy uses them).

    The owner runs `run()` as a task and cancels it before closing `session`; cancelling
    closes every socket."""

    def __init__(
        self, index: KvIndex, pool: BackendPool, session: aiohttp.ClientSession,
        wanted: Callable[[], bool], endpoint: str | None = None, replay: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.index = index
        self.pool = pool
        self.session = session
        self.wanted = wanted
        self.endpoint_template = endpoint
        self.replay_template = replay
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.stats: dict[str, FeedStats] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._context: zmq.asyncio.Context | None = None

    async def run(self) -> None:
        try:
            while True:
                self.sync()
                await asyncio.sleep(SYNC_INTERVAL)
        finally:
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.clear()
            if self._context is not None:
                self._context.destroy(linger=0)

    def sync(self) -> None:
        """Follow the engines in the pool, no others."""
        wanted = {backend.id: backend for backend in self.pool.backends
                  if backend.kind == "engine"} if self.wanted() else {}
        for backend_id in self._tasks.keys() - wanted.keys():
            self._tasks.pop(backend_id).cancel()
            self.stats.pop(backend_id, None)
            self.index.forget(backend_id)
        if wanted and self._context is None:  # its I/O thread only when there is a stream
            self._context = zmq.asyncio.Context()
        for backend_id, backend in wanted.items():
            if backend_id not in self._tasks:
                self.stats[backend_id] = FeedStats()
                self._tasks[backend_id] = asyncio.create_task(self._follow_engine(backend))

    async def _follow_engine(self, backend: Backend) -> None:
        current: list[EventSource] = []
        followers: list[asyncio.Task[None]] = []
        try:
            while True:
                sources = await self._sources(backend)
                if sources is not None and sources != current:
                    for task in followers:
                        task.cancel()
                    await asyncio.gather(*followers, return_exceptions=True)
                    self.index.forget(backend.id)
                    current = sources
                    self.stats[backend.id].sources = len(sources)
                    followers = [asyncio.create_task(self._follow(backend, source))
                                 for source in sources]
                    if sources:
                        log.info("kv events: following backend %s at %s", backend.id,
                                 ", ".join(source.endpoint for source in sources))
                    for source in sources:
                        if not source.binds:
                            log.warning(
                                "kv events: backend %s publishes by connecting out to %s (vLLM "
                                "binds only a wildcard endpoint such as tcp://*:5557): the "
                                "router connects as well, so no live event will come; start "
                                "the engine with a tcp://*:PORT endpoint",
                                backend.id, source.endpoint)
                for number, task in enumerate(followers):
                    if task.done():  # ended by what no handler expected: follow it again
                        if not task.cancelled() and task.exception() is not None:
                            log.warning("kv events: backend %s stream %s stopped (%r); "
                                        "following it again", backend.id,
                                        current[number].endpoint, task.exception())
                        self.index.forget(backend.id, current[number].rank)
                        followers[number] = asyncio.create_task(
                            self._follow(backend, current[number]))
                # An engine that answered (even "no events") is asked again now and then;
                # one that could not be asked, soon.
                await asyncio.sleep(SOURCES_RETRY if sources is None else SOURCES_REFRESH)
        finally:
            for task in followers:
                task.cancel()
            await asyncio.gather(*followers, return_exceptions=True)

    async def _sources(self, backend: Backend) -> list[EventSource] | None:
        """The engine's event streams; None when it could not be asked (keep what we had)."""
        host = URL(backend.url).host or ""
        if self.endpoint_template is not None:
            replay = (from_template(self.replay_template, host)
                      if self.replay_template else None)
            return [EventSource(0, from_template(self.endpoint_template, host), replay, "")]
        try:
            async with self.session.get(
                backend.url + "/kv_event_sources", timeout=self.timeout,
                headers={"Accept": "application/json"}, allow_redirects=False,
            ) as response:
                if response.status == 404:
                    return []  # a vLLM without the endpoint, or not vLLM
                if response.status != 200:
                    return None
                raw = await read_bounded(response, MAX_SOURCES_ANSWER, "/kv_event_sources")
            return event_sources(await loads_stepwise(raw), host)
        except Exception as exc:  # the engine is down or odd: asked again later
            log.debug("kv events: asking backend %s for its sources failed: %r",
                      backend.id, exc)
            return None

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        """A socket that never lingers on close and drops a peer sending frames too big."""
        assert self._context is not None
        socket = self._context.socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        return socket

    async def _follow(self, backend: Backend, source: EventSource) -> None:
        socket = self._socket(zmq.SUB)
        socket.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE)
        socket.setsockopt(zmq.SUBSCRIBE, source.topic.encode())
        cursor = _Cursor()
        try:
            socket.connect(source.endpoint)
            if source.replay is not None:  # learn what the engine already holds
                await self._replay(backend, source, 0, cursor, initial=True)
            self.stats[backend.id].synced += 1
            while True:
                frames = await socket.recv_multipart()
                try:
                    await self._receive(backend, source, frames, cursor)
                except (MalformedBatch, ValueError, TypeError, KeyError) as exc:
                    # What a hostile batch might still trip; the stream goes on.
                    self._malformed(backend.id, repr(exc))
        except zmq.ZMQError as exc:
            log.warning("kv events: backend %s stream %s: %s", backend.id, source.endpoint,
                        exc)
        finally:
            socket.close(linger=0)

    async def _receive(
        self, backend: Backend, source: EventSource, frames: list[bytes], cursor: _Cursor,
    ) -> None:
        if len(frames) != 3:
            self._malformed(backend.id, f"a message of {len(frames)} frames, not 3")
            return
        try:
            seq = decode_seq(frames[1])
        except MalformedBatch as exc:
            self._malformed(backend.id, str(exc))
            return
        last = cursor.last
        if last is not None and seq <= last:
            if seq >= cursor.floor:
                return  # also in the replay we just read
            self.stats[backend.id].restarts += 1
            log.info("kv events: backend %s (rank %d) restarted: relearning its cache",
                     backend.id, source.rank)
            self.index.forget(backend.id, source.rank)
            cursor.reset()
        elif last is not None and seq > last + 1:
            await self._replay(backend, source, last + 1, cursor)
            if cursor.last is not None and seq <= cursor.last:
                return
            if cursor.last is not None and seq > cursor.last + 1:
                self._lost(backend.id, source.rank, cursor)
        cursor.floor = seq + 1  # live again: anything older is a restart, not a duplicate
        self._apply(backend.id, source.rank, seq, frames[2], cursor)

    async def _replay(
        self, backend: Backend, source: EventSource, start: int, cursor: _Cursor,
        initial: bool = False,
    ) -> None:
        """Apply the engine's buffered batches from `start`; a gap the buffer no longer
        covers drops the rank's blocks. `initial`: the first read of what the engine held
        before we came, which may start anywhere."""
        if source.replay is None:
            if not initial:
                self._lost(backend.id, source.rank, cursor)
            return
        socket = self._socket(zmq.DEALER)
        first = True
        try:
            socket.connect(source.replay)
            async with asyncio.timeout(REPLAY_TIMEOUT):
                await socket.send_multipart([b"", start.to_bytes(8, "big")])
                while True:
                    frames = await socket.recv_multipart()
                    if len(frames) != 4:
                        self._malformed(backend.id, f"a replay message of {len(frames)} frames")
                        continue
                    seq = decode_seq(frames[2])
                    if seq == -1:
                        if initial and cursor.last is None:
                            # Nothing buffered from the start: the engine published nothing
                            # yet, and its first batch will be 0.
                            cursor.last = -1
                        break
                    if first and seq > start and not initial:
                        self._lost(backend.id, source.rank, cursor)
                    first = False
                    if cursor.last is None or seq > cursor.last:
                        self._apply(backend.id, source.rank, seq, frames[3], cursor)
            if not initial:
                self.stats[backend.id].gaps_replayed += 1
            cursor.floor = start
        except (TimeoutError, MalformedBatch, zmq.ZMQError) as exc:
            if not initial:
                log.info("kv events: backend %s replay from %d failed: %r", backend.id, start,
                         exc)
                self._lost(backend.id, source.rank, cursor)
        finally:
            socket.close(linger=0)

    def _apply(
        self, backend_id: str, rank: int, seq: int, payload: bytes, cursor: _Cursor,
    ) -> None:
        cursor.last = seq
        stats = self.stats[backend_id]
        try:
            batch = decode_batch(payload)
        except MalformedBatch as exc:
            self._malformed(backend_id, str(exc))
            return
        stats.batches += 1
        stats.lag = max(0.0, time.time() - batch.timestamp)
        if batch.skipped:
            stats.events_skipped += len(batch.skipped)
            self._warn(backend_id, f"{len(batch.skipped)} events skipped: {batch.skipped[0]}")
        self.index.apply(backend_id, rank, batch)

    def _lost(self, backend_id: str, rank: int, cursor: _Cursor) -> None:
        self.stats[backend_id].gaps_lost += 1
        log.info("kv events: backend %s (rank %d) missed batches no replay holds: "
                 "relearning its cache", backend_id, rank)
        self.index.forget(backend_id, rank)
        cursor.reset()

    def _malformed(self, backend_id: str, what: str) -> None:
        self.stats[backend_id].malformed += 1
        self._warn(backend_id, f"malformed message skipped: {what}")

    def _warn(self, backend_id: str, what: str) -> None:
        stats = self.stats[backend_id]
        now = time.monotonic()
        if now - stats.warned_at >= WARN_EVERY:
            stats.warned_at = now
            log.warning("kv events: backend %s: %s (further ones this minute at debug)",
                        backend_id, what)
        else:
            log.debug("kv events: backend %s: %s", backend_id, what)

    def __repr__(self) -> str:
        return f"<KvEventFeeds following={len(self._tasks)} {self.index!r}>"
