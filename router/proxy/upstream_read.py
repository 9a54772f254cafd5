"""Reading an upstream answer whole, with a bound: a backend or API server that answers
without end (or just too much) costs at most `limit` bytes, never the router's memory.

Everything the router reads whole from the network goes through here; answers streamed to
a client do not (they are passed on chunk by chunk, under backpressure).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from router.errors import AnswerTooLarge

__all__ = ["read_bounded", "chunks_bounded", "loads_stepwise"]


async def chunks_bounded(
    response: aiohttp.ClientResponse, limit: int, source: str = "the backend"
) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive; `AnswerTooLarge` before yielding any byte past
    `limit` (at once when `Content-Length` already says so). The caller closes the response
    (`async with`), which drops a connection whose body was not read to the end."""
    declared = response.content_length
    if declared is not None and declared > limit:
        raise AnswerTooLarge(source, limit)
    size = 0
    content = response.content
    while chunk := await content.readany():
        size += len(chunk)
        if size > limit:
            raise AnswerTooLarge(source, limit)
        yield chunk


async def read_bounded(
    response: aiohttp.ClientResponse, limit: int, source: str = "the backend"
) -> bytes:
    """The whole body, at most `limit` bytes (`AnswerTooLarge` past it)."""
    # Chunks joined once at the end: growing one buffer chunk by chunk reallocates it over
    # and over, which left the heap fragmented (RSS up by ~75 MB under 4 endless answers).
    chunks = [chunk async for chunk in chunks_bounded(response, limit, source)]
    return b"".join(chunks)


_DECODER = json.JSONDecoder()
STEP = 0.005
"""Seconds of parsing between two yields to the event loop."""


async def loads_stepwise(raw: bytes | bytearray, step: float = STEP) -> Any:
    """`json.loads` of a possibly big answer without holding the event loop: a top-level
    object's members, and the elements of a list among them (a Kubernetes list's `items`,
    an embeddings answer's `data`), are parsed one by one, with a yield whenever `step`
    seconds went by. A thread would not help: `json.loads` keeps the GIL throughout.

    Raises what `json.loads` raises (`ValueError`, `RecursionError`)."""
    text = raw.decode("utf-8")
    pos = _skip(text, 0)
    if not text.startswith("{", pos):
        return _DECODER.decode(text)
    pace = _Pace(step)
    result: dict[str, Any] = {}
    pos = _skip(text, pos + 1)
    if text.startswith("}", pos):
        return _end(text, pos + 1, result)
    while True:
        key, pos = _DECODER.raw_decode(text, pos)
        if not isinstance(key, str):
            raise json.JSONDecodeError("Expecting property name", text, pos)
        pos = _skip(text, pos)
        if not text.startswith(":", pos):
            raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
        pos = _skip(text, pos + 1)
        if text.startswith("[", pos):
            items: list[Any] = []
            pos = _skip(text, pos + 1)
            closed = text.startswith("]", pos)
            if closed:
                pos += 1
            while not closed:
                item, pos = _DECODER.raw_decode(text, pos)
                items.append(item)
                await pace()
                pos, closed = _after_value(text, pos, "]")
            result[key] = items
        else:
            result[key], pos = _DECODER.raw_decode(text, pos)
        await pace()
        pos, closed = _after_value(text, pos, "}")
        if closed:
            return _end(text, pos, result)


class _Pace:
    """Gives the event loop back whenever `step` seconds of parsing went by."""

    __slots__ = ("step", "deadline")

    def __init__(self, step: float) -> None:
        self.step = step
        self.deadline = time.monotonic() + step

    async def __call__(self) -> None:
        if time.monotonic() >= self.deadline:
            await asyncio.sleep(0)
            self.deadline = time.monotonic() + self.step


def _after_value(text: str, pos: int, close: str) -> tuple[int, bool]:
    """Past a member or an element: the position of the next one, or past `close`, and
    whether it was `close`."""
    pos = _skip(text, pos)
    if text.startswith(",", pos):
        return _skip(text, pos + 1), False
    if text.startswith(close, pos):
        return pos + 1, True
    raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)


def _skip(text: str, pos: int) -> int:
    """The first position from `pos` that is not JSON whitespace."""
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos


def _end(text: str, pos: int, result: dict[str, Any]) -> dict[str, Any]:
    if _skip(text, pos) != len(text):
        raise json.JSONDecodeError("Extra data", text, pos)
    return result
