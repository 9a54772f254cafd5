"""The fake engine app (`make_engine_app`: every route in one place) and `start_engine`, which
runs it on a loopback port as a `RunningEngine`; `kv_events=` turns on vLLM's KV cache events
(`kv_events`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from aiohttp import web

from router.testing.engine.audio import audio_endpoint
from router.testing.engine.generate import chat_completions, completions, responses
from router.testing.engine.kv_events import (
    KV_EVENTS,
    KvEvents,
    KvEventsOptions,
    add_kv_events,
    kv_event_sources,
    reset_prefix_cache,
    with_prefix_cache_counters,
)
from router.testing.engine.media import images_edits, images_generations, speech
from router.testing.engine.messages import messages
from router.testing.engine.pooling import detokenize, embeddings, rerank, score, tokenize
from router.testing.engine.probes import health, list_models, metrics
from router.testing.engine.realtime import add_realtime
from router.testing.engine.stored import (
    cancel_response, delete_response, get_response, is_sleeping, sleep, wake_up,
)
from router.testing.engine.state import (
    ENGINE_BEHAVIOUR,
    ENGINE_CONFIG,
    ENGINE_STATE,
    EngineBehaviour,
    EngineConfig,
    EngineState,
)

__all__ = ["RunningEngine", "make_engine_app", "start_engine"]


_CLIENT_MAX_SIZE = 64 * 1024 * 1024


async def _echo_request_id(request: web.BaseRequest, response: web.StreamResponse) -> None:
    request_id = request.headers.get("x-request-id")
    if request_id is not None:
        response.headers["x-request-id"] = request_id


def make_engine_app(
    models: Sequence[str], name: str = "engine", *, kv_events: bool | KvEventsOptions = False
) -> web.Application:
    """Build the fake engine app serving ``models`` (the first one is the default).

    ``kv_events``: True (default options) or `KvEventsOptions` for a prefix cache that
    publishes vLLM's KV cache events over ZMQ while the app runs; off by default."""
    if isinstance(models, str) or not models:
        raise ValueError("models must be a non-empty sequence of model names")
    app = web.Application(client_max_size=_CLIENT_MAX_SIZE)
    if kv_events is not False:
        add_kv_events(app, KvEventsOptions() if kv_events is True else kv_events)
    app[ENGINE_CONFIG] = EngineConfig(models=tuple(models), name=name)
    app[ENGINE_STATE] = EngineState()
    app[ENGINE_BEHAVIOUR] = EngineBehaviour()
    app.on_response_prepare.append(_echo_request_id)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/responses", responses)
    for path in ("/v1/rerank", "/rerank"):
        app.router.add_post(path, rerank)
    for path in ("/v1/score", "/score"):
        app.router.add_post(path, score)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_post("/v1/audio/transcriptions", audio_endpoint("transcription"))
    app.router.add_post("/v1/audio/translations", audio_endpoint("translation"))
    app.router.add_get("/v1/responses/{response_id}", get_response)
    app.router.add_delete("/v1/responses/{response_id}", delete_response)
    app.router.add_post("/v1/responses/{response_id}/cancel", cancel_response)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/audio/speech", speech)
    app.router.add_post("/v1/images/generations", images_generations)
    app.router.add_post("/v1/images/edits", images_edits)
    app.router.add_post("/sleep", sleep)
    app.router.add_post("/wake_up", wake_up)
    app.router.add_get("/is_sleeping", is_sleeping)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get(
        "/metrics", metrics if kv_events is False else with_prefix_cache_counters(metrics)
    )
    app.router.add_get("/kv_event_sources", kv_event_sources)
    app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
    add_realtime(app)
    return app


@dataclass
class RunningEngine:
    """A fake engine listening on a TCP port."""

    url: str
    app: web.Application
    runner: web.AppRunner
    _closed: bool = field(default=False, init=False, repr=False)

    @property
    def state(self) -> EngineState:
        return self.app[ENGINE_STATE]

    @property
    def behaviour(self) -> EngineBehaviour:
        return self.app[ENGINE_BEHAVIOUR]

    @property
    def kv_events(self) -> KvEvents:
        """The prefix cache and its publisher (`.publisher.endpoint`, `.restart()`, ...)."""
        kv = self.app.get(KV_EVENTS)
        if kv is None:
            raise RuntimeError("KV cache events are off: start the engine with kv_events=...")
        return kv

    async def close(self) -> None:
        """Stop listening and cancel running handlers; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        await self.runner.cleanup()

    async def __aenter__(self) -> RunningEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def start_engine(
    models: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    name: str = "engine",
    shutdown_timeout: float = 0.25,
    kv_events: bool | KvEventsOptions = False,
) -> RunningEngine:
    """Start a fake engine on ``host:port`` (port 0 picks a free port); ``kv_events`` as in
    `make_engine_app`."""
    app = make_engine_app(models, name, kv_events=kv_events)
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        real_port = int(runner.addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    url_host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in url_host:
        url_host = f"[{url_host}]"
    return RunningEngine(url=f"http://{url_host}:{real_port}", app=app, runner=runner)
