"""The fake engine's `/v1/realtime`: a WebSocket speaking the shape of vLLM's Realtime API
(`session.created` at once, `session.update` checks the model, `input_audio_buffer.append` and
`.commit` give `transcription.delta` events and a `transcription.done` with usage), plus test
events to steer it: `test.echo` (sent back), `test.close` (the engine closes with `code` and
`reason`), `test.die` (its connection drops without a close frame). Binary messages are sent
back as they came. What it saw is `RealtimeState`, under `REALTIME_STATE`."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from multidict import CIMultiDictProxy

from router.testing.engine.state import ENGINE_CONFIG, EngineConfig

__all__ = ["REALTIME_STATE", "RealtimeState", "add_realtime"]


@dataclass
class RealtimeState:
    """What the engine's realtime endpoint observed."""

    opened: int = 0
    open: int = 0
    """Sessions open now."""
    close_codes: list[int | None] = field(default_factory=list)
    """The close code of each session that ended (None: its connection dropped)."""
    last_path: str | None = None
    """Path and query string of the last session."""
    last_headers: CIMultiDictProxy[str] | None = None
    received: list[Any] = field(default_factory=list)
    """Every message received (text as parsed JSON, binary as bytes), over all sessions."""


REALTIME_STATE = web.AppKey("realtime_state", RealtimeState)


def _event(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields})


async def _answer(socket: web.WebSocketResponse, event: dict[str, Any],
                  config: EngineConfig, audio: list[int]) -> None:
    kind = event.get("type")
    if kind == "session.update":
        model = event.get("model")
        if model not in config.models:
            await socket.send_str(_event("error", error=f"The model `{model}` does not exist.",
                                         code="model_not_found"))
            return
        await socket.send_str(_event("session.updated", model=model))
    elif kind == "input_audio_buffer.append":
        try:
            audio[0] += len(base64.b64decode(str(event.get("audio", "")), validate=True))
        except (binascii.Error, ValueError):
            await socket.send_str(_event("error", error="Invalid audio data",
                                         code="invalid_audio"))
    elif kind == "input_audio_buffer.commit":
        words = ["heard", str(audio[0]), "bytes"]
        for number, word in enumerate(words):
            await socket.send_str(_event("transcription.delta",
                                         delta=word if number == 0 else " " + word))
        await socket.send_str(_event(
            "transcription.done", text=" ".join(words),
            usage={"prompt_tokens": audio[0] // 320, "completion_tokens": len(words),
                   "total_tokens": audio[0] // 320 + len(words)},
        ))
        audio[0] = 0
    elif kind == "test.echo":
        await socket.send_str(json.dumps(event))
    else:
        await socket.send_str(_event("error", error=f"Unknown event type: {kind}",
                                     code="unknown_event"))


async def realtime(request: web.Request) -> web.StreamResponse:
    state = request.app[REALTIME_STATE]
    config = request.app[ENGINE_CONFIG]
    socket = web.WebSocketResponse(max_msg_size=64 * 1024 * 1024)
    await socket.prepare(request)
    state.opened += 1
    state.open += 1
    state.last_path = request.path_qs
    state.last_headers = request.headers
    audio = [0]
    try:
        await socket.send_str(_event("session.created", id=config.next_id("sess")))
        async for message in socket:
            if message.type is WSMsgType.BINARY:
                state.received.append(message.data)
                await socket.send_bytes(message.data)
                continue
            if message.type is not WSMsgType.TEXT:
                break
            event = json.loads(message.data)
            state.received.append(event)
            if event.get("type") == "test.close":
                await socket.close(code=int(event.get("code", 1000)),
                                   message=str(event.get("reason", "")).encode())
                break
            if event.get("type") == "test.die":
                assert request.transport is not None
                request.transport.abort()
                break
            await _answer(socket, event, config, audio)
    finally:
        state.open -= 1
        state.close_codes.append(socket.close_code)
    return socket


def add_realtime(app: web.Application) -> None:
    """Serve `/v1/realtime` on the fake engine `app`, with its state."""
    app[REALTIME_STATE] = RealtimeState()
    app.router.add_get("/v1/realtime", realtime)
