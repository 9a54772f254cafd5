"""The Files and Batches endpoints (`--enable-batch-api`): thin handlers over `Batches`.

An upload goes to disk part by part as it arrives (`FileStore.receive`), never whole in
memory; its limit is `--max-body-size`, like an audio upload's, and the owner's storage
quotas. A file's content is sent from disk (`web.FileResponse`: sendfile, ranges).

Every endpoint spends the caller's `--rate-limit` like a proxied request, and sees only the
caller's own files and batches (`owner`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from router.api import limits
from router.api.limits import Handler, client_key
from router.api.middleware import expect_handler
from router.batch.files import OPEN, PURPOSES, Received
from router.errors import BadRequest, RequestTimeout, shorten
from router.keys import API_KEYS, BATCHES, CONFIG
from router.proxy.inbound import JSON_BODY, BodySize, read_json_object, unreadable
from router.proxy.multipart import multipart_boundary

__all__ = ["add_routes"]

log = logging.getLogger("router.batch")

UPLOAD_CHUNK = 256 * 1024
MAX_FIELD = 1024
"""Longest `purpose` (or other small field) kept from an upload form."""
MAX_METADATA = 16


def openai_errors(handler: Handler) -> Handler:
    """`router.api.limits.openai_errors`, with a log line for each refusal (these endpoints
    have no access line)."""
    return limits.openai_errors(handler, log)


def owner(request: web.Request) -> str:
    """Whose files and batches the caller sees: its API key's (as `client_key` names it, a
    digest), or with no keys configured everyone's (`OPEN`: one tenant)."""
    return client_key(request) if request.app[API_KEYS].enabled else OPEN


async def timed(chunk: Awaitable[bytes], timeout: float) -> bytes:
    try:
        async with asyncio.timeout(timeout):
            return await chunk
    except TimeoutError:
        raise RequestTimeout(f"the client sent nothing for {timeout:g} s") from None
    except web.RequestPayloadError as error:
        raise unreadable(error) from None


async def part_chunks(part: BodyPartReader, size: BodySize,
                      timeout: float) -> AsyncIterator[bytes]:
    while chunk := await timed(part.read_chunk(UPLOAD_CHUNK), timeout):
        await size.add(len(chunk))
        yield chunk


async def field_value(part: BodyPartReader, timeout: float) -> str:
    value = bytearray()
    while chunk := await timed(part.read_chunk(), timeout):
        value += chunk
        if len(value) > MAX_FIELD:
            raise BadRequest(f"the '{shorten(part.name or '')}' field is longer than "
                             f"{MAX_FIELD} bytes")
    return value.decode("utf-8", "replace").strip()


@openai_errors
async def create_file(request: web.Request) -> web.StreamResponse:
    """`POST /v1/files`: multipart `file` and `purpose`, in either order. A compressed body is
    stored decoded, its decoded bytes counted against the limit."""
    config = request.app[CONFIG]
    store = request.app[BATCHES].files
    timeout = config.client_body_timeout
    multipart_boundary(request)
    size = BodySize(request, config.max_body_size, config.max_inflate_ratio, "the file")
    received: Received | None = None
    try:
        filename, purpose = "file", None
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise BadRequest("a nested multipart body is not supported")
            if part.name == "file":
                if received is not None:
                    raise BadRequest("the body has more than one 'file' part")
                filename = (part.filename or "file")[-255:]
                received = await store.receive(part_chunks(part, size, timeout),
                                               owner(request))
            elif part.name == "purpose":
                purpose = await field_value(part, timeout)
        if received is None:
            raise BadRequest("the multipart body has no 'file' part")
        if purpose not in PURPOSES:
            raise BadRequest(f"'purpose' must be one of {', '.join(sorted(PURPOSES))}")
        item = await store.commit(received, filename, purpose)
    except (ValueError, BadHttpMessage) as error:  # aiohttp's words for a malformed body
        if received is not None:
            await store.discard(received)
        if isinstance(error, LineTooLong):
            raise BadRequest("malformed multipart body: a part header line is too long") \
                from None
        raise BadRequest(f"malformed multipart body: {shorten(str(error))}") from None
    except web.RequestPayloadError as error:
        if received is not None:
            await store.discard(received)
        raise unreadable(error) from None
    except BaseException:
        if received is not None:
            await store.discard(received)
        raise
    return web.json_response(item.to_json())


def page(data: list[dict[str, Any]], has_more: bool) -> web.Response:
    return web.json_response({
        "object": "list", "data": data, "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None, "has_more": has_more,
    })


def int_query(request: web.Request, name: str, default: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= high:
        raise BadRequest(f"'{name}' must be a number from 1 to {high}")
    return value


@openai_errors
async def list_files(request: web.Request) -> web.StreamResponse:
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest("'order' must be asc or desc")
    items, more = request.app[BATCHES].files.list(
        owner(request), purpose=request.query.get("purpose") or None,
        after=request.query.get("after"), limit=int_query(request, "limit", 10_000, 10_000),
        descending=order == "desc",
    )
    return page([item.to_json() for item in items], more)


@openai_errors
async def retrieve_file(request: web.Request) -> web.StreamResponse:
    item = request.app[BATCHES].files.get(request.match_info["file_id"], owner(request))
    return web.json_response(item.to_json())


@openai_errors
async def file_content(request: web.Request) -> web.StreamResponse:
    path = request.app[BATCHES].files.path(request.match_info["file_id"], owner(request))
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


@openai_errors
async def delete_file(request: web.Request) -> web.StreamResponse:
    file_id = request.match_info["file_id"]
    await request.app[BATCHES].delete_file(file_id, owner(request))
    return web.json_response({"id": file_id, "object": "file", "deleted": True})


def string_field(body: dict[str, Any], name: str, default: str | None = None) -> str:
    value = body.get(name, default)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"'{name}' is required and must be a string")
    return value


def metadata_field(body: dict[str, Any]) -> dict[str, str] | None:
    """OpenAI's limits: up to 16 pairs, keys up to 64 characters, values up to 512."""
    metadata = body.get("metadata")
    if metadata is None:
        return None
    if (
        not isinstance(metadata, dict) or len(metadata) > MAX_METADATA
        or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                   for k, v in metadata.items())
    ):
        raise BadRequest("'metadata' must map up to 16 keys (64 characters at most) to "
                         "strings (512 characters at most)")
    return metadata


@openai_errors
async def create_batch(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    size = BodySize(request, config.max_json_body_size, config.max_inflate_ratio, JSON_BODY)
    _, body = await read_json_object(request, size, config.client_body_timeout)
    batch = await request.app[BATCHES].create(
        owner=owner(request), client=client_key(request),
        input_file_id=string_field(body, "input_file_id"),
        endpoint=string_field(body, "endpoint"),
        completion_window=string_field(body, "completion_window", "24h"),
        metadata=metadata_field(body),
    )
    return web.json_response(batch.to_json())


@openai_errors
async def list_batches(request: web.Request) -> web.StreamResponse:
    batches, more = request.app[BATCHES].list(owner(request), after=request.query.get("after"),
                                              limit=int_query(request, "limit", 20, 100))
    return page([batch.to_json() for batch in batches], more)


@openai_errors
async def retrieve_batch(request: web.Request) -> web.StreamResponse:
    batch = request.app[BATCHES].get(request.match_info["batch_id"], owner(request))
    return web.json_response(batch.to_json())


@openai_errors
async def cancel_batch(request: web.Request) -> web.StreamResponse:
    batch = await request.app[BATCHES].cancel(request.match_info["batch_id"], owner(request))
    return web.json_response(batch.to_json())


def add_routes(app: web.Application) -> None:
    add = app.router
    add.add_post("/v1/files", create_file, expect_handler=expect_handler)
    add.add_get("/v1/files", list_files, expect_handler=expect_handler)
    add.add_get("/v1/files/{file_id}", retrieve_file, expect_handler=expect_handler)
    add.add_delete("/v1/files/{file_id}", delete_file, expect_handler=expect_handler)
    add.add_get("/v1/files/{file_id}/content", file_content, expect_handler=expect_handler)
    add.add_post("/v1/batches", create_batch, expect_handler=expect_handler)
    add.add_get("/v1/batches", list_batches, expect_handler=expect_handler)
    add.add_get("/v1/batches/{batch_id}", retrieve_batch, expect_handler=expect_handler)
    add.add_post("/v1/batches/{batch_id}/cancel", cancel_batch, expect_handler=expect_handler)
    # production-stack's cancel
    add.add_delete("/v1/batches/{batch_id}", cancel_batch, expect_handler=expect_handler)
