"""The fake engine's Anthropic Messages endpoint (`/v1/messages`, which vLLM serves): a JSON
message, or with `stream: true` Anthropic's named SSE events (no `[DONE]`)."""

from __future__ import annotations

from aiohttp import web

from router.testing.engine.replies import (
    BadRequest, Sse, dumps, model_of, n_tokens, proxied, read_json, reply,
)
from router.testing.engine.state import ENGINE_CONFIG, JsonDict
from router.testing.engine.tokens import completion_text, count_tokens, token_text

__all__ = ["messages"]


def _message(mid: str, model: str, content: list[JsonDict], stop: str | None,
             usage: JsonDict) -> JsonDict:
    return {"id": mid, "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop, "stop_sequence": None, "usage": usage}


@proxied
async def messages(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model = model_of(request, body.get("model"))
    if not isinstance(body.get("messages"), list) or "max_tokens" not in body:
        raise BadRequest(400, "Fields `messages` and `max_tokens` are required.")
    n = n_tokens(request, body, "max_tokens")
    prompt_tokens = count_tokens([body.get("system"), body["messages"]])
    mid = request.app[ENGINE_CONFIG].next_id("msg")
    text = completion_text(n)
    if body.get("stream") is not True:
        usage = {"input_tokens": prompt_tokens, "output_tokens": n}
        return await reply(request, _message(
            mid, model, [{"type": "text", "text": text}], "end_turn", usage))

    sse = Sse(request)

    async def event(kind: str, payload: JsonDict, *, delay: bool = False) -> None:
        await sse.send(f"event: {kind}\ndata: {dumps({'type': kind, **payload})}", delay=delay)

    await sse.start()
    start = _message(mid, model, [], None, {"input_tokens": prompt_tokens, "output_tokens": 0})
    await event("message_start", {"message": start})
    await event("content_block_start",
                {"index": 0, "content_block": {"type": "text", "text": ""}})
    await event("ping", {})
    for i in range(n):
        await event("content_block_delta",
                    {"index": 0, "delta": {"type": "text_delta", "text": token_text(i)}},
                    delay=i > 0)
    await event("content_block_stop", {"index": 0})
    await event("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                  "usage": {"output_tokens": n}})
    await event("message_stop", {})
    return sse.response
