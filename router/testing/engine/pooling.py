"""The fake engine's endpoints that generate no text: embeddings, rerank, score, tokenize and
detokenize, with deterministic vectors and word-overlap similarities; and the prompt
rendering `/tokenize` shares with the prefix cache (`prompt_token_ids`, `chat_token_ids`)."""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import time
from typing import Any

from aiohttp import web

from router.testing.engine.replies import BadRequest, dumps, model_of, proxied, read_json, reply
from router.testing.engine.state import ENGINE_CONFIG, MAX_MODEL_LEN, JsonDict
from router.testing.engine.tokens import count_tokens, text_of, token_usage, utf8

__all__ = [
    "chat_token_ids",
    "detokenize",
    "embeddings",
    "is_token_ids",
    "prompt_token_ids",
    "rerank",
    "score",
    "tokenize",
]

_MAX_TOKEN_ID = 2**63 - 1  # vLLM's bound on a token id in `/detokenize`


def _words(text: str) -> set[str]:
    return set(text.lower().split())


def _similarity(a: str, b: str) -> float:
    wa, wb = _words(a), _words(b)
    if not wa and not wb:
        return 1.0
    return len(wa & wb) / len(wa | wb)


def _embedding(value: Any) -> list[float]:
    text = value if isinstance(value, str) else dumps(value)
    digest = hashlib.sha256(utf8(text)).digest()
    raw = struct.unpack("<8i", digest)
    vec = [v / 2**31 for v in raw]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


@proxied
async def embeddings(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model = model_of(request, body.get("model"))
    raw = body.get("input")
    inputs: list[Any]
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(v, int) for v in raw):
        inputs = [raw]  # one pre-tokenised input
    elif isinstance(raw, list) and raw:
        inputs = raw
    else:
        raise BadRequest(400, "Field `input` must be a string or a non-empty list.")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise BadRequest(400, f"Unsupported encoding_format `{encoding}`.")
    data: list[JsonDict] = []
    for index, item in enumerate(inputs):
        vec = _embedding(item)
        emb: Any = vec
        if encoding == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"index": index, "object": "embedding", "embedding": emb})
    prompt_tokens = sum(count_tokens(item) for item in inputs)
    return await reply(request, {
        "id": request.app[ENGINE_CONFIG].next_id("embd"),
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": token_usage(prompt_tokens, 0),
    })


def _documents(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise BadRequest(400, "Field `documents` must be a list.")
    docs: list[str] = []
    for doc in value:
        if isinstance(doc, str):
            docs.append(doc)
        elif isinstance(doc, dict) and isinstance(doc.get("text"), str):
            docs.append(str(doc["text"]))
        else:
            raise BadRequest(400, "Each document must be a string or {\"text\": ...}.")
    return docs


@proxied
async def rerank(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model = model_of(request, body.get("model"))
    query = body.get("query")
    if not isinstance(query, str):
        raise BadRequest(400, "Field `query` must be a string.")
    docs = _documents(body.get("documents"))
    results: list[JsonDict] = [
        {"index": i, "document": {"text": doc}, "relevance_score": _similarity(query, doc)}
        for i, doc in enumerate(docs)
    ]
    results.sort(key=lambda r: -float(r["relevance_score"]))
    top_n = body.get("top_n")
    if isinstance(top_n, int) and not isinstance(top_n, bool) and top_n > 0:
        results = results[:top_n]
    tokens = sum(count_tokens(query) + count_tokens(doc) for doc in docs)
    return await reply(request, {
        "id": request.app[ENGINE_CONFIG].next_id("rerank"),
        "model": model,
        "usage": {"total_tokens": tokens},
        "results": results,
    })


def _texts(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise BadRequest(400, f"Field `{name}` must be a string or a non-empty list of strings.")


@proxied
async def score(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model = model_of(request, body.get("model"))
    left = _texts(body.get("text_1"), "text_1")
    right = _texts(body.get("text_2"), "text_2")
    if len(left) == 1:
        left = left * len(right)
    if len(left) != len(right):
        raise BadRequest(400, "`text_1` and `text_2` must have the same length.")
    data = [
        {"index": i, "object": "score", "score": _similarity(a, b)}
        for i, (a, b) in enumerate(zip(left, right))
    ]
    tokens = sum(count_tokens(a) + count_tokens(b) for a, b in zip(left, right))
    return await reply(request, {
        "id": request.app[ENGINE_CONFIG].next_id("score"),
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": token_usage(tokens, 0),
    })


def is_token_ids(value: Any) -> bool:
    """A pre-tokenised prompt: a non-empty list of token ids (not bools, not negative)."""
    return isinstance(value, list) and bool(value) and all(
        type(item) is int and 0 <= item <= _MAX_TOKEN_ID for item in value
    )


def prompt_token_ids(prompt: Any) -> list[int]:
    """A prompt's token ids as the engine sees them: given ids as they are, anything else
    through the byte-level tokenizer. `/tokenize` and the prefix cache both use this."""
    if is_token_ids(prompt):
        return list(prompt)
    return list(utf8(text_of(prompt)))


def chat_token_ids(messages: Any) -> list[int]:
    """The fake's one chat rendering ("role: content" lines), for `/tokenize` with `messages`
    and for the prompt of a chat completion alike: they must never disagree, or a router
    hashing `/tokenize`'s answer would miss the blocks the engine really stored."""
    return list(utf8(text_of(messages)))


@proxied
async def tokenize(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model_of(request, body.get("model"))
    if "prompt" in body:
        tokens = prompt_token_ids(body["prompt"])
    elif isinstance(body.get("messages"), list):
        tokens = chat_token_ids(body["messages"])
    else:
        raise BadRequest(400, "Either `prompt` or `messages` is required.")
    return await reply(request, {
        "count": len(tokens),
        "max_model_len": MAX_MODEL_LEN,
        "tokens": tokens,
        "token_strs": None,
    })


@proxied
async def detokenize(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model_of(request, body.get("model"))
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 256 for t in tokens
    ):
        raise BadRequest(400, "Field `tokens` must be a list of token ids in [0, 256).")
    return await reply(request, {"prompt": bytes(tokens).decode(errors="replace")})
