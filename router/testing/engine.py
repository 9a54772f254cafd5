"""A fake vLLM engine: an aiohttp app that speaks vLLM's OpenAI-compatible HTTP API.

It generates deterministic output ("tok0 tok1 ..."), cheaply, and lets tests steer its
timing and failures at run time through :class:`EngineBehaviour` while recording what it
saw in :class:`EngineState`. Used by the tests, the router's ``--demo`` mode and benchmarks.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import math
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDictProxy

__all__ = [
    "ENGINE_BEHAVIOUR",
    "ENGINE_STATE",
    "EngineBehaviour",
    "EngineState",
    "RunningEngine",
    "Upload",
    "make_engine_app",
    "start_engine",
]

MAX_MODEL_LEN = 4096
MAX_CHUNKS = 10_000
EMBEDDING_DIM = 8
_KV_CACHE_SLOTS = 64  # requests that would fill the fake KV cache
_READ_SIZE = 64 * 1024
_CLIENT_MAX_SIZE = 64 * 1024 * 1024

JsonDict = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
    """`time.monotonic()` of each proxied request's arrival, to see how requests were paced."""


ENGINE_STATE = web.AppKey("engine_state", EngineState)
ENGINE_BEHAVIOUR = web.AppKey("engine_behaviour", EngineBehaviour)


@dataclass
class _Config:
    models: tuple[str, ...]
    name: str
    ids: itertools.count[int] = field(default_factory=itertools.count)

    def next_id(self, prefix: str) -> str:
        return f"{prefix}-{self.name}-{next(self.ids)}"


_CONFIG = web.AppKey("engine_config", _Config)


# --------------------------------------------------------------------------- helpers


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _ConnectionGone(Exception):
    """The stream's connection ended: aborted by us (reset), closed by us before the end of
    the body (truncated), or lost (client went away)."""

    def __init__(
        self, response: web.StreamResponse, *, reset: bool, truncated: bool = False
    ) -> None:
        super().__init__("connection gone")
        self.response = response
        self.reset = reset
        self.truncated = truncated


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _error_type(status: int) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "Error"
    return "".join(phrase.replace("-", " ").split()) + "Error"


def _error(status: int, message: str) -> web.Response:
    body = {
        "error": {
            "message": message,
            "type": _error_type(status),
            "param": None,
            "code": status,
        }
    }
    return web.Response(status=status, text=_dumps(body), content_type="application/json")


def _json(obj: Any) -> web.Response:
    return web.Response(text=_dumps(obj), content_type="application/json")


async def _read_json(request: web.Request) -> JsonDict:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _BadRequest(400, f"Invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise _BadRequest(400, "The request body must be a JSON object.")
    request.app[ENGINE_STATE].last_json = body
    return body


def _model(request: web.Request, requested: Any) -> str:
    models = request.app[_CONFIG].models
    if requested is None:
        return models[0]
    if not isinstance(requested, str) or requested not in models:
        raise _BadRequest(404, f"The model `{requested}` does not exist.")
    return requested


def _n_tokens(request: web.Request, body: JsonDict, *keys: str) -> int:
    for key in keys:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return max(0, min(value, MAX_CHUNKS))
    return max(0, min(request.app[ENGINE_BEHAVIOUR].chunks, MAX_CHUNKS))


def _token_text(i: int) -> str:
    return f"tok{i}" if i == 0 else f" tok{i}"


def _content(n: int) -> str:
    return " ".join(f"tok{i}" for i in range(n))


def _text_of(value: Any) -> str:
    """Flatten a prompt / message content / Responses input into plain text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(_text_of(item) for item in value)
    if isinstance(value, dict):
        if isinstance(value.get("text"), str):
            return str(value["text"])
        role = value.get("role")
        content = _text_of(value.get("content"))
        return f"{role}: {content}" if isinstance(role, str) else content
    if value is None:
        return ""
    return str(value)


def _count_tokens(value: Any) -> int:
    """Byte-level "tokenizer": one token per UTF-8 byte (token ids given as ints count 1)."""
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return len(value)
    return len(_utf8(_text_of(value)))


def _utf8(text: str) -> bytes:
    # surrogatepass: a JSON string may carry lone surrogates ("\ud800").
    return text.encode("utf-8", "surrogatepass")


def _usage(prompt_tokens: int, completion_tokens: int) -> JsonDict:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def _words(text: str) -> set[str]:
    return set(text.lower().split())


def _similarity(a: str, b: str) -> float:
    wa, wb = _words(a), _words(b)
    if not wa and not wb:
        return 1.0
    return len(wa & wb) / len(wa | wb)


def _embedding(value: Any) -> list[float]:
    text = value if isinstance(value, str) else _dumps(value)
    digest = hashlib.sha256(_utf8(text)).digest()
    raw = struct.unpack("<8i", digest)
    vec = [v / 2**31 for v in raw]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


async def _forever() -> None:
    await asyncio.get_running_loop().create_future()


async def _headers_delay(request: web.Request) -> None:
    delay = request.app[ENGINE_BEHAVIOUR].headers_delay
    if delay > 0:
        await asyncio.sleep(delay)


def _injected_failure(request: web.Request) -> int | None:
    """The status to fail this request with, if a failure is due (counts a burst down)."""
    behaviour = request.app[ENGINE_BEHAVIOUR]
    status = behaviour.fail_status
    if status is None:
        return None
    if behaviour.fail_burst is not None:
        if behaviour.fail_burst <= 0:
            return None
        behaviour.fail_burst -= 1
    request.app[ENGINE_STATE].failures_injected += 1
    return status


# --------------------------------------------------------------------------- streaming


class _Sse:
    """Writes one server-sent-event stream, honouring the behaviour knobs."""

    __slots__ = ("request", "behaviour", "response", "sent")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.behaviour = request.app[ENGINE_BEHAVIOUR]
        self.response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        self.sent = 0

    async def start(self) -> None:
        await _headers_delay(self.request)
        await self.response.prepare(self.request)
        if self.behaviour.hang_after_headers:
            self.request.app[ENGINE_STATE].hangs += 1
            await _forever()
        if self.behaviour.first_token_delay > 0:
            await asyncio.sleep(self.behaviour.first_token_delay)

    async def send(self, data: str, *, delay: bool = False, pad: bool = True) -> None:
        """Send ``data`` (one or more complete SSE lines, without the blank line)."""
        behaviour = self.behaviour
        if delay and behaviour.token_delay > 0:
            await asyncio.sleep(behaviour.token_delay)
        limit = behaviour.reset_after_chunks
        if limit is not None and self.sent >= limit:
            transport = self.request.transport
            if transport is not None:
                transport.abort()
            raise _ConnectionGone(self.response, reset=True)
        limit = behaviour.truncate_after_chunks
        if limit is not None and self.sent >= limit:
            transport = self.request.transport
            if transport is not None:
                transport.close()  # what was written goes out, then FIN: no last chunk
            raise _ConnectionGone(self.response, reset=False, truncated=True)
        if pad and behaviour.chunk_padding > 0:
            data += "\n: " + "x" * behaviour.chunk_padding
        raw = (data + "\n\n").encode()
        try:
            await self.response.write(raw)
        except ConnectionResetError:
            raise _ConnectionGone(self.response, reset=False) from None
        self.request.app[ENGINE_STATE].bytes_sent += len(raw)
        self.sent += 1

    async def data(self, payload: str, *, delay: bool = False) -> None:
        await self.send("data: " + payload, delay=delay)

    async def done(self) -> web.StreamResponse:
        await self.send("data: [DONE]", pad=False)
        return self.response


async def _reply(request: web.Request, obj: Any) -> web.StreamResponse:
    """Non-stream reply: honours hang_after_headers and first_token_delay."""
    behaviour = request.app[ENGINE_BEHAVIOUR]
    await _headers_delay(request)
    if behaviour.hang_after_headers:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        request.app[ENGINE_STATE].hangs += 1
        await _forever()
    if behaviour.first_token_delay > 0:
        await asyncio.sleep(behaviour.first_token_delay)
    if isinstance(obj, web.StreamResponse):
        return obj
    return _json(obj)


# --------------------------------------------------------------------------- proxied wrapper


def _proxied(handler: Handler) -> Handler:
    async def wrapper(request: web.Request) -> web.StreamResponse:
        state = request.app[ENGINE_STATE]
        state.started += 1
        state.arrivals.append(time.monotonic())
        state.open += 1
        state.last_headers = request.headers
        state.last_path = request.path_qs
        if request.app[ENGINE_BEHAVIOUR].record_request_ids:
            state.request_ids.append(request.headers.get("x-request-id", ""))
        try:
            fail_status = _injected_failure(request)
            if fail_status is not None:
                name = request.app[_CONFIG].name
                response: web.StreamResponse = _error(
                    fail_status, f"Injected failure from engine {name}."
                )
            else:
                try:
                    response = await handler(request)
                except _BadRequest as exc:
                    response = _error(exc.status, exc.message)
                except RecursionError:  # deeply nested JSON, like vLLM's 400
                    response = _error(400, "The request body is nested too deeply.")
        except asyncio.CancelledError:
            state.cancelled += 1
            state.disconnected.set()
            raise
        except _ConnectionGone as gone:
            if gone.truncated:
                state.truncated += 1
            elif gone.reset:
                state.resets += 1
            else:
                state.cancelled += 1
                state.disconnected.set()
            return gone.response
        else:
            state.completed += 1
            return response
        finally:
            state.open -= 1

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper


# --------------------------------------------------------------------------- endpoints


@_proxied
async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await _read_json(request)
    model = _model(request, body.get("model"))
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _BadRequest(400, "Field `messages` must be a list.")
    n = _n_tokens(request, body, "max_completion_tokens", "max_tokens")
    prompt_tokens = _count_tokens(messages)
    rid = request.app[_CONFIG].next_id("chatcmpl")
    created = int(time.time())
    if body.get("stream") is True:
        return await _stream_chat(request, body, rid, created, model, n, prompt_tokens)
    return await _reply(request, {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": _content(n), "tool_calls": []},
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": None,
        }],
        "usage": _usage(prompt_tokens, n),
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
        "remote_engine_id": request.app[_CONFIG].name,
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
        f'"model":{_dumps(model)},"choices":'
    )
    sse = _Sse(request)
    await sse.start()
    await sse.data(
        head + '[{"index":0,"delta":{"role":"assistant","content":""},'
        '"logprobs":null,"finish_reason":null}]}'
    )
    for i in range(n):
        await sse.data(
            head + '[{"index":0,"delta":{"content":"' + _token_text(i)
            + '"},"logprobs":null,"finish_reason":null}]}',
            delay=i > 0,
        )
    await sse.data(
        head + '[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop",'
        '"stop_reason":null}]}'
    )
    if _include_usage(body):
        await sse.data(head + '[],"usage":' + _dumps(_usage(prompt_tokens, n)) + "}")
    return await sse.done()


@_proxied
async def completions(request: web.Request) -> web.StreamResponse:
    body = await _read_json(request)
    model = _model(request, body.get("model"))
    if "prompt" not in body:
        raise _BadRequest(400, "Field `prompt` is required.")
    n = _n_tokens(request, body, "max_tokens")
    prompt_tokens = _count_tokens(body["prompt"])
    rid = request.app[_CONFIG].next_id("cmpl")
    created = int(time.time())
    if body.get("stream") is True:
        head = (
            f'{{"id":"{rid}","object":"text_completion","created":{created},'
            f'"model":{_dumps(model)},"choices":'
        )
        sse = _Sse(request)
        await sse.start()
        for i in range(n):
            await sse.data(
                head + '[{"index":0,"text":"' + _token_text(i)
                + '","logprobs":null,"finish_reason":null}]}',
                delay=i > 0,
            )
        await sse.data(
            head + '[{"index":0,"text":"","logprobs":null,"finish_reason":"stop",'
            '"stop_reason":null}]}'
        )
        if _include_usage(body):
            await sse.data(head + '[],"usage":' + _dumps(_usage(prompt_tokens, n)) + "}")
        return await sse.done()
    return await _reply(request, {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "text": _content(n),
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": None,
        }],
        "usage": _usage(prompt_tokens, n),
        "kv_transfer_params": _kv_transfer(request, body),
    })


@_proxied
async def embeddings(request: web.Request) -> web.StreamResponse:
    body = await _read_json(request)
    model = _model(request, body.get("model"))
    raw = body.get("input")
    inputs: list[Any]
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(v, int) for v in raw):
        inputs = [raw]  # one pre-tokenised input
    elif isinstance(raw, list) and raw:
        inputs = raw
    else:
        raise _BadRequest(400, "Field `input` must be a string or a non-empty list.")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _BadRequest(400, f"Unsupported encoding_format `{encoding}`.")
    data: list[JsonDict] = []
    for index, item in enumerate(inputs):
        vec = _embedding(item)
        emb: Any = vec
        if encoding == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"index": index, "object": "embedding", "embedding": emb})
    prompt_tokens = sum(_count_tokens(item) for item in inputs)
    return await _reply(request, {
        "id": request.app[_CONFIG].next_id("embd"),
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": _usage(prompt_tokens, 0),
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


@_proxied
async def responses(request: web.Request) -> web.StreamResponse:
    body = await _read_json(request)
    model = _model(request, body.get("model"))
    if "input" not in body:
        raise _BadRequest(400, "Field `input` is required.")
    n = _n_tokens(request, body, "max_output_tokens")
    prompt_tokens = _count_tokens([body.get("instructions"), body["input"]])
    config = request.app[_CONFIG]
    rid = config.next_id("resp")
    item_id = config.next_id("msg")
    created = int(time.time())
    text = _content(n)
    usage = _responses_usage(prompt_tokens, n)
    final = _response_object(
        rid, created, model, "completed", [_message_item(item_id, text, "completed")], usage
    )
    if body.get("stream") is not True:
        return await _reply(request, final)

    sse = _Sse(request)
    seq = itertools.count()

    async def event(kind: str, payload: JsonDict, *, delay: bool = False) -> None:
        payload = {"type": kind, "sequence_number": next(seq), **payload}
        await sse.send(f"event: {kind}\ndata: {_dumps(payload)}", delay=delay)

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
            {**where, "delta": _token_text(i), "logprobs": []},
            delay=i > 0,
        )
    await event("response.output_text.done", {**where, "text": text, "logprobs": []})
    await event("response.content_part.done", {**where, "part": {**part, "text": text}})
    await event("response.output_item.done", {
        "output_index": 0, "item": _message_item(item_id, text, "completed"),
    })
    await event("response.completed", {"response": final})
    return sse.response


def _documents(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise _BadRequest(400, "Field `documents` must be a list.")
    docs: list[str] = []
    for doc in value:
        if isinstance(doc, str):
            docs.append(doc)
        elif isinstance(doc, dict) and isinstance(doc.get("text"), str):
            docs.append(str(doc["text"]))
        else:
            raise _BadRequest(400, "Each document must be a string or {\"text\": ...}.")
    return docs


@_proxied
async def rerank(request: web.Request) -> web.StreamResponse:
    body = await _read_json(request)
    model = _model(request, body.get("model"))
    query = body.get("query")
    if not isinstance(query, str):
        raise _BadRequest(400, "Field `query` must be a string.")
    docs = _documents(body.get("documents"))
    results: list[JsonDict] = [
        {"index": i, "document": {"text": doc}, "relevance_score": _similarity(query, doc)}
        for i, doc in enumerate(docs)
    ]
    results.sort(key=lambda r: -float(r["relevance_score"]))
    top_n = body.get("top_n")
    if isinstance(top_n, int) and not isinstance(top_n, bool) and top_n > 0:
        results = results[:top_n]
    tokens = sum(_count_tokens(query) + _count_tokens(doc) for doc in docs)
    return await _reply(request, {
        "id": request.app[_CONFIG].next_id("rerank"),
        "model": model,
        "usage": {"total_tokens": tokens},
        "results": results,
    })


def _texts(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise _BadRequest(400, f"Field `{name}` must be a string or a non-empty list of strings.")


@_proxied
async def score(request: web.Request) -> web.StreamResponse:
    body = await _read_json(request)
    model = _model(request, body.get("model"))
    left = _texts(body.get("text_1"), "text_1")
    right = _texts(body.get("text_2"), "text_2")
    if len(left) == 1:
        left = left * len(right)
    if len(left) != len(right):
        raise _BadRequest(400, "`text_1` and `text_2` must have the same length.")
    data = [
        {"index": i, "object": "score", "score": _similarity(a, b)}
        for i, (a, b) in enumerate(zip(left, right))
    ]
    tokens = sum(_count_tokens(a) + _count_tokens(b) for a, b in zip(left, right))
    return await _reply(request, {
        "id": request.app[_CONFIG].next_id("score"),
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": _usage(tokens, 0),
    })


@_proxied
async def tokenize(request: web.Request) -> web.StreamResponse:
    body = await _read_json(request)
    _model(request, body.get("model"))
    if "prompt" in body:
        text = _text_of(body["prompt"])
    elif isinstance(body.get("messages"), list):
        text = _text_of(body["messages"])
    else:
        raise _BadRequest(400, "Either `prompt` or `messages` is required.")
    tokens = list(_utf8(text))
    return await _reply(request, {
        "count": len(tokens),
        "max_model_len": MAX_MODEL_LEN,
        "tokens": tokens,
        "token_strs": None,
    })


@_proxied
async def detokenize(request: web.Request) -> web.StreamResponse:
    body = await _read_json(request)
    _model(request, body.get("model"))
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 256 for t in tokens
    ):
        raise _BadRequest(400, "Field `tokens` must be a list of token ids in [0, 256).")
    return await _reply(request, {"prompt": bytes(tokens).decode(errors="replace")})


async def _read_upload(request: web.Request) -> Upload:
    """Stream a multipart body: hash the `file` part chunk by chunk, keep the other fields."""
    digest = hashlib.sha256()
    size = 0
    have_file = False
    fields: dict[str, str] = {}
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise _BadRequest(400, "Nested multipart bodies are not supported.")
            if part.name == "file":
                have_file = True
                while chunk := await part.read_chunk(_READ_SIZE):
                    digest.update(chunk)
                    size += len(chunk)
            elif part.name is not None:
                fields[part.name] = await part.text()
            else:
                await part.release()
    except (AssertionError, ValueError, KeyError, HttpProcessingError) as exc:
        raise _BadRequest(400, f"Invalid multipart/form-data body: {exc}") from None
    if not have_file:
        raise _BadRequest(400, "Field `file` is required.")
    return Upload(sha256=digest.hexdigest(), size=size, fields=fields)


def _audio(kind: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        upload = await _read_upload(request)
        request.app[ENGINE_STATE].uploads.append(upload)
        fields = upload.fields
        model = _model(request, fields.get("model"))
        text = f"{kind} of {upload.size} bytes with sha256 {upload.sha256}"
        if fields.get("stream", "").lower() != "true":
            if fields.get("response_format") == "text":
                return await _reply(request, web.Response(text=text))
            return await _reply(request, {
                "text": text, "usage": {"type": "duration", "seconds": 1},
            })
        config = request.app[_CONFIG]
        head = (
            f'{{"id":"{config.next_id(kind)}","object":"{kind}.chunk",'
            f'"created":{int(time.time())},"model":{_dumps(model)},"choices":'
        )
        sse = _Sse(request)
        await sse.start()
        words = text.split(" ")
        for i, word in enumerate(words):
            delta = _dumps({"content": word if i == 0 else " " + word})
            await sse.data(
                head + '[{"delta":' + delta + ',"finish_reason":null,"stop_reason":null}]}',
                delay=i > 0,
            )
        await sse.data(
            head + '[{"delta":{"content":""},"finish_reason":"stop","stop_reason":null}]}'
        )
        if fields.get("stream_include_usage", "").lower() == "true":
            usage = _usage(upload.size, len(words))
            await sse.data(head + '[],"usage":' + _dumps(usage) + "}")
        return await sse.done()

    handler.__name__ = f"audio_{kind}s"
    return _proxied(handler)


async def list_models(request: web.Request) -> web.Response:
    created = int(time.time())
    data = [
        {
            "id": model,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": model,
            "parent": None,
            "max_model_len": MAX_MODEL_LEN,
        }
        for model in request.app[_CONFIG].models
    ]
    return _json({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    return web.Response(status=request.app[ENGINE_BEHAVIOUR].health_status)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def metrics(request: web.Request) -> web.Response:
    state = request.app[ENGINE_STATE]
    behaviour = request.app[ENGINE_BEHAVIOUR]
    label = f'model_name="{_label(request.app[_CONFIG].models[0])}"'
    kv = behaviour.kv_cache_usage
    if kv is None:
        kv = state.open / _KV_CACHE_SLOTS
    kv = min(1.0, max(0.0, kv))
    text = (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f"vllm:num_requests_running{{{label}}} {float(state.open)}\n"
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        f"vllm:num_requests_waiting{{{label}}} {float(behaviour.num_requests_waiting)}\n"
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        f"vllm:kv_cache_usage_perc{{{label}}} {kv}\n"
        "# HELP vllm:request_success_total Count of successfully processed requests.\n"
        "# TYPE vllm:request_success_total counter\n"
        f'vllm:request_success_total{{finished_reason="stop",{label}}} '
        f"{float(state.completed)}\n"
    )
    return web.Response(
        body=text.encode(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


async def _echo_request_id(request: web.BaseRequest, response: web.StreamResponse) -> None:
    request_id = request.headers.get("x-request-id")
    if request_id is not None:
        response.headers["x-request-id"] = request_id


# --------------------------------------------------------------------------- app & runner


def make_engine_app(models: Sequence[str], name: str = "engine") -> web.Application:
    """Build the fake engine app serving ``models`` (the first one is the default)."""
    if isinstance(models, str) or not models:
        raise ValueError("models must be a non-empty sequence of model names")
    app = web.Application(client_max_size=_CLIENT_MAX_SIZE)
    app[_CONFIG] = _Config(models=tuple(models), name=name)
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
    app.router.add_post("/v1/audio/transcriptions", _audio("transcription"))
    app.router.add_post("/v1/audio/translations", _audio("translation"))
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
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
) -> RunningEngine:
    """Start a fake engine on ``host:port`` (port 0 picks a free port)."""
    app = make_engine_app(models, name)
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
