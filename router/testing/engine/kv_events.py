"""KV cache events from the fake engine, published the way vLLM publishes them (opt-in).

Why: cache-aware routing reads each engine's KV cache events; its tests need an engine that
emits real ones in milliseconds, and whose `/metrics` prefix-cache counters tell the truth
about hits, so routing can be judged by the engine and not by what the router believes.

- Wire (vLLM `distributed/kv_events.py`): a PUB socket sends `(topic, seq, payload)`, `seq` 8
  bytes big-endian from 0, `payload` msgpack of `[ts, events, data_parallel_rank]`, events maps
  tagged by `"type"`. A ROUTER socket answers `[b"", start_seq]` with every buffered batch
  from `start_seq` on, then `(b"", seq -1, b"")`. The PUB socket is an XPUB here (the same
  on the wire) so tests can wait until a subscriber is listening instead of sleeping.
- Cache (vLLM `v1/core/block_pool.py`, `kv_cache_manager.py`): only full blocks of a prompt
  are hashed, chained from the parent; a hit is the longest cached prefix, at most
  `(prompt tokens - 1) // block_size` blocks (the last token is always computed); blocks
  after the hit are stored again even when the same hash is already held (vLLM keeps such
  duplicates, and evicting one sends `BlockRemoved` while the other still serves hits);
  hits send no `BlockStored` unless the request asks `kv_cache_report_mode: "full"`
  (`vllm_xargs`); a finished request's blocks return to the LRU tail-first, so a prompt's
  last block is evicted before its first.
- Not modelled: output tokens filling blocks during decode, chunked prefill splitting one
  prompt over several batches, blocks pinned by running requests, `/v1/messages` and
  `/v1/responses` prompts.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack  # type: ignore[import-untyped,unused-ignore]
import zmq
import zmq.asyncio
from aiohttp import web

from router.testing.engine.pooling import chat_token_ids, is_token_ids, prompt_token_ids
from router.testing.engine.replies import Handler, json_reply
from router.testing.engine.state import ENGINE_CONFIG, EngineConfig, JsonDict

__all__ = [
    "BlockCache",
    "KV_EVENTS",
    "KvEventPublisher",
    "KvEvents",
    "KvEventsOptions",
    "LoraAdapter",
    "Prefill",
    "PrefillResult",
    "add_kv_events",
    "all_blocks_cleared",
    "block_removed",
    "block_stored",
    "encode_batch",
    "kv_event_sources",
    "reset_prefix_cache",
    "with_prefix_cache_counters",
]

MEDIUM_GPU = "GPU"
"""What vLLM reports as the medium of its device cache, on CPU builds too."""
END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)
PUB_HIGH_WATER_MARK = 100_000
MAX_QUEUE_SIZE = 100_000
"""vLLM's defaults for `hwm` and `max_queue_size`, echoed in `/kv_event_sources`."""
_REBIND_TIMEOUT = 2.0
"""How long a restart retries binding its old ports while the OS releases them."""
_NONE_HASH = hashlib.sha256(b"fake-vllm-none-hash").digest()
"""The parent of a prompt's first block (vLLM's `NONE_HASH`)."""
_GENERATING_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


@dataclass(frozen=True)
class KvEventsOptions:
    """How the fake engine's prefix cache and event publisher are set up."""

    block_size: int = 32
    """Tokens per cache block (a partial last block is never stored)."""
    cache_blocks: int = 1_000_000
    """Blocks the cache holds before it evicts the least recently used."""
    topic: str = "kv"
    host: str = "127.0.0.1"
    port: int = 0
    """PUB port; 0 picks a free one (kept across `restart`)."""
    replay_port: int = 0
    """ROUTER (replay) port; 0 picks a free one (kept across `restart`)."""
    buffer_steps: int = 10_000
    """Batches kept for replay."""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.cache_blocks < 1 or self.buffer_steps < 1:
            raise ValueError("block_size, cache_blocks and buffer_steps must be positive")


# --------------------------------------------------------------------------- events


def block_stored(
    block_hashes: Sequence[int],
    parent_block_hash: int | None,
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: Sequence[Sequence[str] | None],
    lora: LoraAdapter | None = None,
) -> JsonDict:
    """A `BlockStored` event, fields in vLLM's order (`extra_keys` one entry per block)."""
    return {
        "type": "BlockStored",
        "block_hashes": list(block_hashes),
        "parent_block_hash": parent_block_hash,
        "token_ids": list(token_ids),
        "block_size": block_size,
        "lora_id": lora.id if lora else None,
        "medium": MEDIUM_GPU,
        "lora_name": lora.name if lora else None,
        "extra_keys": [list(keys) if keys is not None else None for keys in extra_keys],
        "group_idx": 0,
    }


def block_removed(block_hash: int) -> JsonDict:
    """A `BlockRemoved` event; vLLM sends one per evicted block."""
    return {"type": "BlockRemoved", "block_hashes": [block_hash], "medium": MEDIUM_GPU,
            "group_idx": 0}


def all_blocks_cleared() -> JsonDict:
    return {"type": "AllBlocksCleared"}


def encode_batch(events: Sequence[Any], ts: float | None = None) -> bytes:
    """A batch payload as vLLM's msgspec encoder writes it: `[ts, events, dp_rank]`."""
    payload: bytes = msgpack.packb(
        [time.time() if ts is None else ts, list(events), 0], use_bin_type=True
    )
    return payload


# --------------------------------------------------------------------------- cache model


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter a request runs with: its name and path go into every block's hash."""

    name: str
    id: int
    path: str


@dataclass(frozen=True)
class Prefill:
    """One prompt as the cache sees it: its tokens and what else keys its blocks."""

    token_ids: Sequence[int]
    lora: LoraAdapter | None = None
    cache_salt: str | None = None
    """Keys the first block only, so salted prompts share nothing with unsalted ones."""
    report_hits: bool = False
    """vLLM's `kv_cache_report_mode: "full"`: hit blocks are sent as `BlockStored` too."""


@dataclass(frozen=True)
class PrefillResult:
    hit_tokens: int
    events: list[JsonDict]


class BlockCache:
    """vLLM's prefix cache reduced to what its events and counters show: hashed full blocks
    in an LRU of `capacity` blocks, duplicates included."""

    def __init__(self, block_size: int, capacity: int) -> None:
        self.block_size = block_size
        self.capacity = capacity
        self._blocks: OrderedDict[int, int] = OrderedDict()
        """Slot -> block hash, least recently used first."""
        self._slots_of: dict[int, list[int]] = {}
        """Block hash -> the slots holding it (more than one after a recomputed hit)."""
        self._slot_ids = itertools.count()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._slots_of

    def block_hashes(self, prefill: Prefill) -> list[int]:
        """The engine hashes of the prompt's full blocks, each chained from its parent."""
        hashes: list[int] = []
        parent = _NONE_HASH
        size = self.block_size
        for index in range(len(prefill.token_ids) // size):
            tokens = list(prefill.token_ids[index * size:(index + 1) * size])
            keys = _hash_keys(prefill, index)
            parent = hashlib.sha256(parent + json.dumps([tokens, keys]).encode()).digest()
            hashes.append(int.from_bytes(parent[-8:], "big"))  # vLLM: the low 64 bits
        return hashes

    def prefill(self, prefill: Prefill) -> PrefillResult:
        """Look the prompt up, store what it computed, evict to make room; the events are in
        vLLM's order: hits (if reported), evictions, then the stored blocks."""
        size = self.block_size
        tokens = prefill.token_ids
        hashes = self.block_hashes(prefill)
        keys = [_event_keys(prefill, index) for index in range(len(hashes))]
        max_hit = min(len(hashes), max(0, len(tokens) - 1) // size)
        hit = 0
        while hit < max_hit and hashes[hit] in self._slots_of:
            hit += 1
        used = [self._slots_of[block_hash][0] for block_hash in hashes[:hit]]
        events: list[JsonDict] = []
        if prefill.report_hits and hit:
            events.append(block_stored(
                hashes[:hit], None, tokens[:hit * size], size, keys[:hit], prefill.lora))
        stored: list[int] = []
        for block_hash in hashes[hit:]:
            if len(self._blocks) >= self.capacity:
                victim = self._least_recent(exclude=set(used) | set(stored))
                if victim is None:
                    break  # the prompt is larger than the cache: its tail is not kept
                events.append(block_removed(self._drop(victim)))
            slot = next(self._slot_ids)
            self._blocks[slot] = block_hash
            self._slots_of.setdefault(block_hash, []).append(slot)
            stored.append(slot)
        if stored:
            end = hit + len(stored)
            events.append(block_stored(
                hashes[hit:end], hashes[hit - 1] if hit else None, tokens[hit * size:end * size],
                size, keys[hit:end], prefill.lora))
        for slot in reversed(used + stored):  # freed tail first: the head is evicted last
            self._blocks.move_to_end(slot)
        return PrefillResult(hit_tokens=hit * size, events=events)

    def clear(self) -> None:
        self._blocks.clear()
        self._slots_of.clear()

    def _least_recent(self, exclude: set[int]) -> int | None:
        return next((slot for slot in self._blocks if slot not in exclude), None)

    def _drop(self, slot: int) -> int:
        block_hash = self._blocks.pop(slot)
        slots = self._slots_of[block_hash]
        slots.remove(slot)
        if not slots:
            del self._slots_of[block_hash]
        return block_hash


def _hash_keys(prefill: Prefill, index: int) -> list[list[str]] | None:
    """A block's extra hash keys, tagged by source as vLLM hashes them."""
    keys: list[list[str]] = []
    if prefill.lora is not None:
        keys.append(["lora", prefill.lora.name, prefill.lora.path])
    if index == 0 and prefill.cache_salt:
        keys.append(["cache_salt", prefill.cache_salt])
    return keys or None


def _event_keys(prefill: Prefill, index: int) -> list[str] | None:
    """A block's extra keys as events carry them: untagged (LoRA name, then cache salt)."""
    keys = _hash_keys(prefill, index)
    return [key[1] for key in keys] if keys else None


# --------------------------------------------------------------------------- publisher


class KvEventPublisher:
    """vLLM's ZMQ publisher on asyncio: numbered batches on PUB, a bounded replay buffer
    served on ROUTER, and test hooks (raw frames, batches only replay can see, restarts)."""

    def __init__(self, options: KvEventsOptions) -> None:
        self.options = options
        self.topic = options.topic.encode()
        self.port = options.port
        self.replay_port = options.replay_port
        self._context: zmq.asyncio.Context | None = None
        self._pub: zmq.asyncio.Socket | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=options.buffer_steps)
        self._next_seq = 0
        self._subscriptions = 0
        self._subscriptions_changed = asyncio.Condition()

    @property
    def next_seq(self) -> int:
        """The sequence number the next batch gets."""
        return self._next_seq

    @property
    def endpoint(self) -> str:
        """Where to connect a SUB socket."""
        return _tcp(self.options.host, self.port)

    @property
    def replay_endpoint(self) -> str:
        """Where to connect a DEALER socket for replay."""
        return _tcp(self.options.host, self.replay_port)

    async def start(self) -> None:
        if self._context is not None:
            raise RuntimeError("the publisher is already started")
        self._context = zmq.asyncio.Context()
        try:
            await self._open(retry=False)
        except BaseException:
            self._context.destroy(linger=0)
            self._context = None
            raise

    async def close(self) -> None:
        """Stop serving and close the sockets and their context; safe to call twice."""
        await self._shut()
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None

    async def restart(self) -> None:
        """What subscribers see when the engine restarts: the sockets close and come back on
        the same ports, the sequence starts again at 0, and the replay buffer is empty."""
        await self._shut()
        self._buffer.clear()
        self._next_seq = 0
        await self._open(retry=True)

    async def publish(
        self, events: Sequence[Any], *, live: bool = True, ts: float | None = None
    ) -> int:
        """Publish one batch of events (any maps, even ones vLLM never sends); returns its
        sequence number. `live=False`: only replay has it, as if subscribers had lost it."""
        return await self.publish_payload(encode_batch(events, ts), live=live)

    async def publish_payload(self, payload: bytes, *, live: bool = True) -> int:
        """Publish and buffer `payload` as the next batch, whatever its bytes."""
        pub = self._socket()
        seq = self._next_seq
        self._next_seq += 1
        self._buffer.append((seq, payload))
        if live:
            await pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    async def publish_raw(self, *frames: bytes) -> None:
        """Send these frames as one message, unnumbered and not buffered (malformed input)."""
        await self._socket().send_multipart(list(frames))

    async def wait_for_subscribers(self, count: int = 1, timeout: float = 5.0) -> None:
        """Wait until `count` subscriptions reached the socket, so nothing published from
        now on is lost to a subscriber still connecting (ZMQ's slow joiner). After `restart`
        a SUB socket reconnects by itself but subscribes again only once it is used (ZMQ
        runs the reconnection inside the socket's calls): have a receive pending on it."""
        async with asyncio.timeout(timeout), self._subscriptions_changed:
            await self._subscriptions_changed.wait_for(lambda: self._subscriptions >= count)

    @property
    def running(self) -> bool:
        """False once closed: an event stream that is down (the engine still serves)."""
        return self._pub is not None

    def _socket(self) -> zmq.asyncio.Socket:
        if self._pub is None:
            raise RuntimeError("the publisher is not running")
        return self._pub

    async def _open(self, *, retry: bool) -> None:
        assert self._context is not None
        pub = self._context.socket(zmq.XPUB)
        replay = self._context.socket(zmq.ROUTER)
        try:
            for sock in (pub, replay):
                sock.setsockopt(zmq.LINGER, 0)
            pub.setsockopt(zmq.SNDHWM, PUB_HIGH_WATER_MARK)
            pub.setsockopt(zmq.XPUB_VERBOSER, 1)  # every (un)subscription, for the count
            self.port = await _bind(pub, self.options.host, self.port, retry=retry)
            self.replay_port = await _bind(replay, self.options.host, self.replay_port,
                                           retry=retry)
        except BaseException:
            pub.close(linger=0)
            replay.close(linger=0)
            raise
        self._pub, self._replay = pub, replay
        self._subscriptions = 0
        self._tasks = [
            asyncio.create_task(self._count_subscriptions(pub), name="kv-events-subscriptions"),
            asyncio.create_task(self._serve_replay(replay), name="kv-events-replay"),
        ]

    async def _shut(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._replay = None

    async def _count_subscriptions(self, pub: zmq.asyncio.Socket) -> None:
        while True:
            frames = await pub.recv_multipart()
            kind = frames[0][:1]
            if kind in (b"\x00", b"\x01"):
                self._subscriptions += 1 if kind == b"\x01" else -1
                async with self._subscriptions_changed:
                    self._subscriptions_changed.notify_all()

    async def _serve_replay(self, replay: zmq.asyncio.Socket) -> None:
        while True:
            frames = await replay.recv_multipart()
            if len(frames) != 3:  # not (identity, b"", start_seq): ignored, as vLLM does
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    await replay.send_multipart(
                        [client, b"", self.topic, seq.to_bytes(8, "big"), payload])
            await replay.send_multipart([client, b"", b"", END_OF_REPLAY, b""])


def _tcp(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


async def _bind(sock: zmq.asyncio.Socket, host: str, port: int, *, retry: bool) -> int:
    """Bind `host:port` (0: a free port) and return the port; with `retry`, wait for a port
    just closed to be released."""
    if ":" in host:
        sock.setsockopt(zmq.IPV6, 1)
    deadline = asyncio.get_running_loop().time() + _REBIND_TIMEOUT
    while True:
        try:
            sock.bind(_tcp(host, port))
            break
        except zmq.ZMQError as exc:
            late = asyncio.get_running_loop().time() > deadline
            if not retry or port == 0 or exc.errno != zmq.EADDRINUSE or late:
                raise
            await asyncio.sleep(0.01)
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return int(endpoint.rsplit(":", 1)[1])


# --------------------------------------------------------------------------- the engine's side


@dataclass
class KvEvents:
    """The fake engine's prefix cache, its events and its counters (one per engine app)."""

    options: KvEventsOptions
    cache: BlockCache = field(init=False)
    publisher: KvEventPublisher = field(init=False)
    queries: int = 0
    """Prompt tokens looked up in the cache (`vllm:prefix_cache_queries_total`)."""
    hits: int = 0
    """Prompt tokens found there (`vllm:prefix_cache_hits_total`)."""

    def __post_init__(self) -> None:
        self.cache = BlockCache(self.options.block_size, self.options.cache_blocks)
        self.publisher = KvEventPublisher(self.options)

    async def prefill(self, prefills: Sequence[Prefill]) -> int | None:
        """Run the prompts of one request through the cache and publish what changed as one
        batch; returns its sequence number (None: nothing to say)."""
        events: list[JsonDict] = []
        for prefill in prefills:
            if not prefill.token_ids:
                continue
            result = self.cache.prefill(prefill)
            self.queries += len(prefill.token_ids)
            self.hits += result.hit_tokens
            events.extend(result.events)
        if not events or not self.publisher.running:
            return None
        return await self.publisher.publish(events)

    async def reset_prefix_cache(self) -> int:
        """Drop every block (vLLM's `POST /reset_prefix_cache`): `AllBlocksCleared`."""
        self.cache.clear()
        return await self.publisher.publish([all_blocks_cleared()])

    async def restart(self) -> None:
        """An engine restart: empty cache, counters at 0, sequence at 0, sockets reopened;
        nothing is sent about it (subscribers see the sequence start again)."""
        self.cache.clear()
        self.queries = self.hits = 0
        await self.publisher.restart()

    def sources(self) -> JsonDict:
        """`GET /kv_event_sources`: vLLM's `KVEventsConfig` per data-parallel rank; `*`
        stands for the engine's own host."""
        return {"0": {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{self.publisher.port}",
            "replay_endpoint": f"tcp://*:{self.publisher.replay_port}",
            "buffer_steps": self.options.buffer_steps,
            "hwm": PUB_HIGH_WATER_MARK,
            "max_queue_size": MAX_QUEUE_SIZE,
            "topic": self.options.topic,
        }}


KV_EVENTS = web.AppKey("kv_events", KvEvents)


def add_kv_events(app: web.Application, options: KvEventsOptions) -> KvEvents:
    """Give the engine app a prefix cache that publishes events; its sockets live from the
    app's startup to its cleanup."""
    kv = app[KV_EVENTS] = KvEvents(options)
    app.cleanup_ctx.append(_publisher_lifetime)
    app.on_response_prepare.append(_prefill_on_response)
    return kv


async def _publisher_lifetime(app: web.Application) -> AsyncIterator[None]:
    publisher = app[KV_EVENTS].publisher
    await publisher.start()
    try:
        yield
    finally:
        await publisher.close()


async def _prefill_on_response(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """The prompt goes through the cache when the engine starts answering a generation
    request with 200 (vLLM prefills before the first token): refused requests touch nothing."""
    if (not isinstance(request, web.Request) or request.method != "POST"
            or response.status != 200 or request.path not in _GENERATING_PATHS):
        return
    try:
        body = json.loads(await request.read())
    except (ValueError, RecursionError):
        return
    if isinstance(body, dict):
        app = request.app
        await app[KV_EVENTS].prefill(prefills_of(app[ENGINE_CONFIG], request.path, body))


def prefills_of(config: EngineConfig, path: str, body: JsonDict) -> list[Prefill]:
    """The prompts of a chat or completion request, as the engine's cache sees them."""
    model = body.get("model")
    if not isinstance(model, str):
        model = config.models[0]
    lora = None
    if model in config.lora_parents:  # ids as vLLM numbers adapters: from 1
        adapter_id = config.models.index(model) + 1 if model in config.models else 1
        lora = LoraAdapter(name=model, id=adapter_id, path=f"/adapters/{model}")
    salt = body.get("cache_salt")
    xargs = body.get("vllm_xargs")
    report_hits = isinstance(xargs, dict) and xargs.get("kv_cache_report_mode") == "full"
    if path == "/v1/chat/completions":
        prompts = [chat_token_ids(body.get("messages"))]
    else:
        prompts = _completion_prompts(body.get("prompt"))
    return [
        Prefill(tokens, lora, salt if isinstance(salt, str) and salt else None, report_hits)
        for tokens in prompts
    ]


def _completion_prompts(prompt: Any) -> list[list[int]]:
    """A completion's prompts: a batch (list of strings or of token lists) is one each."""
    if isinstance(prompt, list) and prompt and not is_token_ids(prompt) and all(
        isinstance(item, str) or is_token_ids(item) for item in prompt
    ):
        return [prompt_token_ids(item) for item in prompt]
    return [prompt_token_ids(prompt)]


async def kv_event_sources(request: web.Request) -> web.Response:
    """vLLM's answer: the publisher's config per rank, `{}` when events are off."""
    kv = request.app.get(KV_EVENTS)
    return json_reply(kv.sources() if kv is not None else {})


async def reset_prefix_cache(request: web.Request) -> web.Response:
    """vLLM's dev-mode `POST /reset_prefix_cache`; here it always succeeds (no request holds
    blocks in the fake)."""
    kv = request.app.get(KV_EVENTS)
    if kv is not None:
        await kv.reset_prefix_cache()
    return json_reply({"success": True})


_COUNTER_FAMILIES = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")


def with_prefix_cache_counters(handler: Handler) -> Handler:
    """`/metrics` with the cache's real prefix-cache counters in place of any synthetic ones
    (`EngineBehaviour.prefix_cache`)."""

    async def metrics(request: web.Request) -> web.StreamResponse:
        response = await handler(request)
        kv = request.app.get(KV_EVENTS)
        if kv is None or not isinstance(response, web.Response):
            return response
        body = response.body
        text = body.decode() if isinstance(body, bytes) else ""
        lines = [line for line in text.splitlines() if _family(line) not in _COUNTER_FAMILIES]
        label = 'model_name="' + _label_value(request.app[ENGINE_CONFIG].models[0]) + '"'
        lines += [
            "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in queried tokens.",
            "# TYPE vllm:prefix_cache_queries_total counter",
            f"vllm:prefix_cache_queries_total{{{label}}} {float(kv.queries)}",
            "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in cached tokens.",
            "# TYPE vllm:prefix_cache_hits_total counter",
            f"vllm:prefix_cache_hits_total{{{label}}} {float(kv.hits)}",
        ]
        response.body = ("\n".join(lines) + "\n").encode()
        return response

    return metrics


def _family(line: str) -> str:
    """The metric a line of the Prometheus text format is about."""
    if line.startswith("#"):
        parts = line.split(maxsplit=3)
        return parts[2] if len(parts) > 2 else ""
    return line.split("{", 1)[0].split(" ", 1)[0]


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
