"""The text-generation endpoints of the fake engine: chat completions, completions and the
Responses API, each as one JSON reply or an SSE stream."""

from __future__ import annotations

import itertools
import time

from aiohttp import web

from router.testing.engine.replies import (
    BadRequest,
    Sse,
    dumps,
    model_of,
    n_tokens,
    proxied,
    read_json,
    reply,
)
from router.testing.engine.state import ENGINE_CONFIG, ENGINE_STATE, JsonDict
from router.testing.engine.tokens import completion_text, count_tokens, token_text, token_usage

__all__ = ["chat_completions", "completions", "responses"]


@proxied
async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model = model_of(request, body.get("model"))
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadRequest(400, "Field `messages` must be a list.")
    n = n_tokens(request, body, "max_completion_tokens", "max_tokens")
    prompt_tokens = count_tokens(messages)
    rid = request.app[ENGINE_CONFIG].next_id("chatcmpl")
    created = int(time.time())
    if body.get("stream") is True:
        return await _stream_chat(request, body, rid, created, model, n, prompt_tokens)
    return await reply(request, {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": completion_text(n), "tool_calls": []},
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": None,
        }],
        "usage": token_usage(prompt_tokens, n),
        "kv_transfer_params": _kv_transfer(request, body),
    })


def _kv_transfer(request: web.Request, body: JsonDict) -> JsonDict | None:
    """Like vLLM with a KV connector: a prefill request (`do_remote_decode`) gets back the
    parameters its decode request needs to fetch the KV cache from this engine."""
    params = body.get("kv_transfer_params")
    if not isinstance(params, dict) or params.get("do_remote_decode") is not True:
        return None
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": request.app[ENGINE_CONFIG].name,
        "remote_block_ids": [0, 1, 2],
        "remote_host": request.url.host,
        "remote_port": request.url.port,
    }


def _include_usage(body: JsonDict) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


async def _stream_chat(
    request: web.Request, body: JsonDict, rid: str, created: int, model: str, n: int,
    prompt_tokens: int,
) -> web.StreamResponse:
    head = (
        f'{{"id":"{rid}","object":"chat.completion.chunk","created":{created},'
        f'"model":{dumps(model)},"choices":'
    )
    sse = Sse(request)
    await sse.start()
    await sse.data(
        head + '[{"index":0,"delta":{"role":"assistant","content":""},'
        '"logprobs":null,"finish_reason":null}]}'
    )
    for i in range(n):
        await sse.data(
            head + '[{"index":0,"delta":{"content":"' + token_text(i)
            + '"},"logprobs":null,"finish_reason":null}]}',
            delay=i > 0,
        )
    await sse.data(
        head + '[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop",'
        '"stop_reason":null}]}'
    )
    if _include_usage(body):
        await sse.data(head + '[],"usage":' + dumps(token_usage(prompt_tokens, n)) + "}")
    return await sse.done()


@proxied
async def completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model = model_of(request, body.get("model"))
    if "prompt" not in body:
        raise BadRequest(400, "Field `prompt` is required.")
    n = n_tokens(request, body, "max_tokens")
    prompt_tokens = count_tokens(body["prompt"])
    rid = request.app[ENGINE_CONFIG].next_id("cmpl")
    created = int(time.time())
    if body.get("stream") is True:
        head = (
            f'{{"id":"{rid}","object":"text_completion","created":{created},'
            f'"model":{dumps(model)},"choices":'
        )
        sse = Sse(request)
        await sse.start()
        for i in range(n):
            await sse.data(
                head + '[{"index":0,"text":"' + token_text(i)
                + '","logprobs":null,"finish_reason":null}]}',
                delay=i > 0,
            )
        await sse.data(
            head + '[{"index":0,"text":"","logprobs":null,"finish_reason":"stop",'
            '"stop_reason":null}]}'
        )
        if _include_usage(body):
            await sse.data(head + '[],"usage":' + dumps(token_usage(prompt_tokens, n)) + "}")
        return await sse.done()
    return await reply(request, {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "text": completion_text(n),
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": None,
        }],
        "usage": token_usage(prompt_tokens, n),
        "kv_transfer_params": _kv_transfer(request, body),
    })


def _response_object(
    rid: str, created: int, model: str, status: str, output: list[JsonDict],
    usage: JsonDict | None,
) -> JsonDict:
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "model": model,
        "status": status,
        "output": output,
        "usage": usage,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "metadata": None,
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "max_output_tokens": None,
        "previous_response_id": None,
        "reasoning": None,
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
    }


def _message_item(item_id: str, text: str, status: str) -> JsonDict:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content if status == "completed" else [],
    }


def _responses_usage(prompt_tokens: int, n: int) -> JsonDict:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": n,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + n,
    }


@proxied
async def responses(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model = model_of(request, body.get("model"))
    if "input" not in body:
        raise BadRequest(400, "Field `input` is required.")
    n = n_tokens(request, body, "max_output_tokens")
    prompt_tokens = count_tokens([body.get("instructions"), body["input"]])
    stored = request.app[ENGINE_STATE].responses
    previous = body.get("previous_response_id")
    if previous is not None and previous not in stored:
        raise BadRequest(404, f"Response with id '{previous}' not found.")
    config = request.app[ENGINE_CONFIG]
    rid = config.next_id("resp")
    item_id = config.next_id("msg")
    created = int(time.time())
    text = completion_text(n)
    usage = _responses_usage(prompt_tokens, n)
    final = _response_object(
        rid, created, model, "completed", [_message_item(item_id, text, "completed")], usage
    )
    if body.get("store", True) is not False:
        stored[rid] = final
    if body.get("stream") is not True:
        return await reply(request, final)

    sse = Sse(request)
    seq = itertools.count()

    async def event(kind: str, payload: JsonDict, *, delay: bool = False) -> None:
        payload = {"type": kind, "sequence_number": next(seq), **payload}
        await sse.send(f"event: {kind}\ndata: {dumps(payload)}", delay=delay)

    await sse.start()
    pending = _response_object(rid, created, model, "in_progress", [], None)
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    await event("response.created", {"response": pending})
    await event("response.in_progress", {"response": pending})
    await event("response.output_item.added", {
        "output_index": 0, "item": _message_item(item_id, "", "in_progress"),
    })
    await event("response.content_part.added", {**where, "part": part})
    for i in range(n):
        await event(
            "response.output_text.delta",
            {**where, "delta": token_text(i), "logprobs": []},
            delay=i > 0,
        )
    await event("response.output_text.done", {**where, "text": text, "logprobs": []})
    await event("response.content_part.done", {**where, "part": {**part, "text": text}})
    await event("response.output_item.done", {
        "output_index": 0, "item": _message_item(item_id, text, "completed"),
    })
    await event("response.completed", {"response": final})
    return sse.response
