"""What the fake engine serves, the knobs tests turn at run time (`EngineBehaviour`) and what
it saw (`EngineState`), each under an AppKey on the engine app."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy

__all__ = [
    "ENGINE_BEHAVIOUR",
    "ENGINE_CONFIG",
    "ENGINE_STATE",
    "EngineBehaviour",
    "EngineConfig",
    "EngineState",
    "JsonDict",
    "MAX_MODEL_LEN",
    "Upload",
]

MAX_MODEL_LEN = 4096

JsonDict = dict[str, Any]


@dataclass
class EngineBehaviour:
    """Mutable knobs; tests flip them at run time (read per request / per chunk)."""

    first_token_delay: float = 0.0
    token_delay: float = 0.0
    chunks: int = 8
    fail_status: int | None = None
    """Answer proxied requests with this error status instead of serving them."""
    fail_burst: int | None = None
    """With `fail_status`: only the next this many proxied requests fail (counted down; at 0
    the engine serves normally again). None: every request fails while `fail_status` is set."""
    reset_after_chunks: int | None = None
    """Abort the connection after this many SSE events, dropping anything unsent."""
    truncate_after_chunks: int | None = None
    """Close the connection cleanly after this many SSE events, without ending the chunked
    body (the peer sees the body end early, not a reset)."""
    hang_after_headers: bool = False
    headers_delay: float = 0.0
    """Seconds to wait, once the request body is read, before sending status and headers."""
    chunk_padding: int = 0
    """Bytes of SSE comment (`: xxx`) added to every event: a big, fast stream on demand."""
    health_status: int = 200
    record_request_ids: bool = False
    """Keep the `x-request-id` of every proxied request in `EngineState.request_ids`."""
    kv_cache_usage: float | None = None
    num_requests_waiting: int = 0
    prefix_cache: bool = False
    """Export vLLM's prefix-cache counters on `/metrics` (32 queried tokens a request, half
    of them hits after the first)."""


@dataclass
class Upload:
    """One audio upload as the engine received it."""

    sha256: str
    size: int
    fields: dict[str, str]


@dataclass
class EngineState:
    """What the engine observed."""

    started: int = 0
    completed: int = 0
    cancelled: int = 0
    open: int = 0
    resets: int = 0
    truncated: int = 0
    """Streams ended early on purpose (`truncate_after_chunks`)."""
    failures_injected: int = 0
    """Requests answered with `fail_status`."""
    hangs: int = 0
    """Requests that hung after their headers (`hang_after_headers`)."""
    bytes_sent: int = 0
    """SSE bytes written, over all streams."""
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    uploads: list[Upload] = field(default_factory=list)
    last_headers: CIMultiDictProxy[str] | None = None
    last_path: str | None = None
    """Path and query string of the last proxied request."""
    last_json: JsonDict | None = None
    request_ids: list[str] = field(default_factory=list)
    """With `record_request_ids`: every proxied request's `x-request-id`, in arrival order."""
    arrivals: list[float] = field(default_factory=list)
    responses: dict[str, JsonDict] = field(default_factory=dict)
    """The `/v1/responses` answers this engine made, by id (what `GET /v1/responses/{id}`
    finds)."""
    sleep_level: int = 0
    """vLLM's sleep mode: 0 awake, else the level of the last `/sleep`."""
    """`time.monotonic()` of each proxied request's arrival, to see how requests were paced."""


ENGINE_STATE = web.AppKey("engine_state", EngineState)
ENGINE_BEHAVIOUR = web.AppKey("engine_behaviour", EngineBehaviour)


@dataclass
class EngineConfig:
    """The models the engine serves (the first is the default), its name, and the counter
    behind its response ids."""

    models: tuple[str, ...]
    name: str
    ids: itertools.count[int] = field(default_factory=itertools.count)
    lora_parents: dict[str, str] = field(default_factory=dict)
    """Models that are LoRA adapters -> their base model, as `/v1/models` shows them
    (`parent`); tests set it."""

    def next_id(self, prefix: str) -> str:
        return f"{prefix}-{self.name}-{next(self.ids)}"


ENGINE_CONFIG = web.AppKey("engine_config", EngineConfig)
