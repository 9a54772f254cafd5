"""The inbound request: what routing needs to know, parsed once, plus the body to forward.

JSON bodies are forwarded as received (re-serialised only when an alias renames the model).
Multipart bodies are forwarded as a stream (see `router.proxy.multipart`).

A JSON body is made ready by `json_request`, which a batch line goes through too: the
request rewriter, the model's alias, the bytes to send.

A body sent with `Content-Encoding: gzip` or `deflate` is read decoded (aiohttp's server
decodes it as it is read, in steps as small as the reads: 64-256 KiB), every decoded byte
counts against the body's limit (`BodySize`), and it is forwarded decoded: vLLM does not
decode request bodies, and the router must read `model` to route. Any other coding is a 415.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import StreamReader, hdrs, web
from aiohttp.http_exceptions import ContentEncodingError
from multidict import CIMultiDictProxy

from router.backends.pool import BackendPool
from router.errors import (
    BadRequest, MalformedRequest, ModelNotFound, PayloadTooLarge, RequestTimeout,
    UnsupportedEncoding, shorten,
)
from router.flow import RequestFlow

if TYPE_CHECKING:  # the rewriter's interface; the plugins module is not on the request path
    from router.plugins import RequestRewriter

__all__ = [
    "JSON_ENDPOINTS", "LIVE_JSON_ENDPOINTS", "MULTIPART_ENDPOINTS", "UPLOAD_FIELDS",
    "BodySize", "InboundRequest", "UploadBody",
    "body_coding", "json_request", "read_body", "read_chunk", "read_json_object",
    "read_json_request",
    "resolve_model", "rewrite", "rewriting", "unreadable",
]

rewriter_log = logging.getLogger("router.api")
"""The rewriter's failures, under the name they were always logged with."""

JSON_ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/rerank",
    "/rerank",
    "/v1/score",
    "/score",
    "/tokenize",
    "/detokenize",
)
"""The proxied endpoints whose body is JSON (`read_json_request`); a batch may call those
under `/v1`."""
LIVE_JSON_ENDPOINTS = (
    "/v1/messages",
    "/v1/audio/speech",
    "/v1/images/generations",
)
"""Proxied endpoints whose body is JSON too, but that a batch may not call: an Anthropic
Messages answer, audio bytes and images are not what a batch's output file holds. Like every
JSON body, `model` is a top-level field and `stream: true` asks for a streamed answer."""
UPLOAD_FIELDS: dict[str, tuple[str, ...]] = {
    "/v1/audio/transcriptions": ("file",),
    "/v1/audio/translations": ("file",),
    "/v1/images/edits": ("image", "image[]"),
}
"""The proxied endpoints whose body is an upload (`router.proxy.multipart`), each with the
names its file part may have (the OpenAI SDK sends one image as `image`, several as
`image[]`)."""
MULTIPART_ENDPOINTS = tuple(UPLOAD_FIELDS)
JSON_BODY = "the JSON body"

DECODED = frozenset({"gzip", "deflate"})
"""Content codings the router accepts. aiohttp decodes `br` and `zstd` too, but only with
optional libraries whose bounds were not measured here: those are refused (415)."""
INFLATE_GRACE = 1024 * 1024
"""Decoded bytes a compressed body may reach before its inflation ratio is checked."""


def body_coding(request: web.BaseRequest) -> str | None:
    """The body's content coding: None when there is none (or `identity`), else one aiohttp's
    server decodes as the body is read. Anything else, or several codings, is a 415: the
    router would have to forward bytes it cannot read. The test is aiohttp's own (ASCII, any
    case, no spaces), so what is accepted here is exactly what aiohttp decoded."""
    values = request.headers.getall(hdrs.CONTENT_ENCODING, ())
    if not values:
        return None
    coding = values[0].lower() if len(values) == 1 and values[0].isascii() else "?"
    if coding in ("", "identity"):
        return None
    if coding not in DECODED:
        raise UnsupportedEncoding(
            "the request's Content-Encoding is not supported: send the body uncompressed, "
            "or with gzip or deflate"
        )
    return coding


class BodySize:
    """Counts a request body's bytes as they are read (decoded) against `limit`; a compressed
    body may also inflate to no more than `ratio` times the bytes that came on the wire
    (0: no ratio limit), so a small bomb is refused long before the limit.

    An uncompressed body whose Content-Length is over the limit is refused at once."""

    __slots__ = ("content", "limit", "ratio", "what", "coding", "size")

    def __init__(self, request: web.BaseRequest, limit: int, ratio: float, what: str) -> None:
        self.content: StreamReader = request.content
        self.limit = limit
        self.what = what
        self.coding = body_coding(request)
        self.ratio = ratio if self.coding is not None else 0.0
        self.size = 0
        length = request.content_length
        if self.coding is None and length is not None and length > limit:
            raise self.too_large()

    async def add(self, count: int) -> None:
        """Count `count` more bytes read; raise the client's error past a limit."""
        self.size = size = self.size + count
        if size > self.limit:
            raise self.too_large()
        if self.coding is not None:
            if self.ratio and size > INFLATE_GRACE and (
                size > self.ratio * self.content.total_raw_bytes
            ):
                raise PayloadTooLarge(
                    f"{self.what} inflates to over {self.ratio:g} times its compressed size"
                )
            # Compressed bytes already received decode without waiting for the network, so
            # a read loop would never give the event loop back: give it back at each step.
            await asyncio.sleep(0)

    def too_large(self) -> PayloadTooLarge:
        return too_large(self.what, self.limit)


def too_large(what: str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{what} is over the limit of {limit} bytes")


def unreadable(error: web.RequestPayloadError) -> BadRequest:
    """aiohttp's failure to read a body (bad compressed data, broken chunked framing)."""
    if isinstance(error.__cause__, ContentEncodingError):
        return BadRequest("the request body is not valid data for its Content-Encoding")
    return MalformedRequest("the request body is not valid HTTP")


async def read_chunk(content: StreamReader, timeout: float) -> bytes:
    """The next chunk of a client's body; a client silent for `timeout` seconds is cut off."""
    try:
        async with asyncio.timeout(timeout):
            return await content.readany()
    except TimeoutError:
        raise RequestTimeout(f"the client sent nothing for {timeout:g} s") from None
    except web.RequestPayloadError as error:
        raise unreadable(error) from None


async def read_body(request: web.BaseRequest, size: BodySize, timeout: float) -> bytes:
    """The whole body, decoded, counted by `size`; the client has `timeout` seconds to send
    it all. Read chunk by chunk (`request.read()` would let aiohttp decode a compressed body
    in steps as large as the limit)."""
    content = request.content
    chunks: list[bytes] = []

    async def collect() -> None:
        while chunk := await content.readany():
            await size.add(len(chunk))
            chunks.append(chunk)

    try:
        if content.is_eof():  # it came with the headers: no timer to wait on
            await collect()
        else:
            async with asyncio.timeout(timeout):
                await collect()
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {timeout:g} s") from None
    except web.RequestPayloadError as error:
        raise unreadable(error) from None
    return b"".join(chunks)


class UploadBody(Protocol):
    """A request body forwarded as a stream of chunks, with its own cleanup."""

    content_length: int | None
    error: Exception | None
    """Set when the stream failed on the client's side (too large, client gone)."""

    @property
    def replayable(self) -> bool:
        """True while `chunks()` can (still) produce the whole body from its start."""
        ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class InboundRequest:
    """A parsed client request, ready to route and forward."""

    model: str
    """The served model name (an alias already resolved)."""
    stream: bool
    """The client asked for a streamed answer (for multipart: when `stream` preceded the file)."""
    headers: CIMultiDictProxy[str]
    json: dict[str, Any] | None = None
    """The parsed JSON body; None for multipart requests."""
    body: bytes | None = None
    """The JSON body to forward."""
    upload: UploadBody | None = None
    """The multipart body to forward."""
    pinned: str | None = None
    """The backend id this request must go to, learned from its body (a follow-up of a
    stored response, `previous_response_id`); the client's `?id=` comes first."""
    prepared: object = None
    """What the routing policy learned of this request before choosing (`kvaware`: the
    prompt's blocks), reused when a retry chooses again."""

    @property
    def replayable(self) -> bool:
        """The body can be sent again to another backend."""
        return self.upload is None or self.upload.replayable

    async def aclose(self) -> None:
        if self.upload is not None:
            await self.upload.aclose()


def resolve_model(pool: BackendPool, model: object) -> str:
    """Validate the requested model and follow an alias; raise the client's error if unknown."""
    if model is None or model == "":
        raise BadRequest("the request has no 'model'")
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string")
    served = pool.resolve(model)
    if not pool.candidates(served):
        known = sorted({*pool.models(), *pool.routable_aliases()})
        raise ModelNotFound(
            f"The model `{shorten(model)}` does not exist. "
            f"Known models: {', '.join(known) or 'none'}."
        )
    return served


Rewrite = Callable[[dict[str, Any]], dict[str, Any] | None]
"""Changes a parsed body before routing; returns the new body, or None when unchanged."""


def rewriting(rewriter: RequestRewriter | None, flow: RequestFlow) -> Rewrite | None:
    """The `--request-rewriter` as a `Rewrite` of `flow`'s body; None without one."""
    if rewriter is None:
        return None
    return lambda body: rewrite(rewriter, flow, body)


def rewrite(
    rewriter: RequestRewriter, flow: RequestFlow, body: dict[str, Any]
) -> dict[str, Any] | None:
    """Run the rewriter on a copy; the new body, or None when it changed nothing (or failed:
    a failing rewriter is logged and the request goes on as received)."""
    original = copy.deepcopy(body)
    try:
        result: object = rewriter.rewrite(flow, body)
    except Exception:
        rewriter_log.exception("request rewriter %r failed; the request goes on unchanged",
                               rewriter)
        body.clear()
        body.update(original)
        return None
    if not isinstance(result, dict):
        rewriter_log.error("request rewriter %r returned %s, not a dict; ignored", rewriter,
                           type(result))
        body.clear()
        body.update(original)
        return None
    return None if result == original else result


async def read_json_request(
    request: web.Request, pool: BackendPool, limit: int, timeout: float,
    rewrite: Rewrite | None = None, inflate_ratio: float = 0.0,
) -> InboundRequest:
    """Read and check a JSON body of at most `limit` bytes (decoded; a compressed one inflating
    at most `inflate_ratio` times); the client has `timeout` seconds to send it all. The body
    is serialised again only when `rewrite` or an alias changed it."""
    raw, body = await read_json_object(request, BodySize(request, limit, inflate_ratio, JSON_BODY),
                                       timeout)
    return json_request(body, request.headers, pool, rewrite, limit, raw)


async def read_json_object(
    request: web.BaseRequest, size: BodySize, timeout: float
) -> tuple[bytes, dict[str, Any]]:
    """A body that must be a JSON object, read within `size` and `timeout`: its bytes and
    the object; any other body is a `BadRequest`."""
    raw = await read_body(request, size, timeout)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return raw, body


def json_request(
    body: dict[str, Any], headers: CIMultiDictProxy[str], pool: BackendPool,
    rewrite: Rewrite | None, limit: int, received: bytes | None = None,
) -> InboundRequest:
    """A parsed JSON body made ready to route, for a client's request and a batch line alike:
    `rewrite` applied, the model's alias resolved, and the bytes to send.

    `received` is the body as the client sent it (counted against `limit` as it was read),
    sent as it is unless changed. A body that came without bytes of its own (a batch line)
    is serialised, and refused as a client's would be when that is over `limit`."""
    changed = received is None
    if rewrite is not None and (rewritten := rewrite(body)) is not None:
        body, changed = rewritten, True
    requested = body.get("model")
    served = resolve_model(pool, requested)
    if served != requested:
        body["model"] = served
        changed = True
    raw = json.dumps(body).encode() if changed or received is None else received
    if received is None and len(raw) > limit:  # counted on what would be sent
        raise too_large(JSON_BODY, limit)
    return InboundRequest(
        model=served, stream=body.get("stream") is True, headers=headers, json=body, body=raw,
    )
