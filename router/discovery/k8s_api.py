"""Talking to the Kubernetes API server, for the watch in `router.discovery.kubernetes`: what
its error answers mean, and the watch stream split into events (one JSON object a line)."""

from __future__ import annotations

import json

import aiohttp

__all__ = ["ApiError", "Gone", "WatchBroken", "WatchLines", "api_error"]


class ApiError(Exception):
    """A non-200 answer, or a 200 that is not what was asked for."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class Gone(Exception):
    """410: the resourceVersion is too old (compacted); only a new LIST helps."""


class WatchBroken(Exception):
    """The watch stream cannot be trusted any more: events may have been lost."""


class WatchLines:
    """Splits the watch stream into lines, bounded by `limit` bytes a line."""

    def __init__(self, limit: int) -> None:
        self._buffer = bytearray()
        self._limit = limit

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer
        scan_from = len(buffer)  # what was kept holds no newline
        buffer += chunk
        lines = []
        start = 0
        while (end := buffer.find(b"\n", max(start, scan_from))) >= 0:
            lines.append(bytes(buffer[start:end]))
            start = end + 1
        del buffer[:start]
        if len(buffer) > self._limit:
            raise WatchBroken(f"a watch event longer than {self._limit} bytes "
                              "(--k8s-max-answer-size)")
        return lines

    def rest(self) -> bytes:
        return bytes(self._buffer)


async def api_error(response: aiohttp.ClientResponse) -> Exception:
    """The error a non-200 answer means; Kubernetes sends a `Status` object with a message."""
    try:
        raw = await response.content.read(64 * 1024)
    except (aiohttp.ClientError, TimeoutError):
        raw = b""
    message = ""
    try:
        status = json.loads(raw)
        if isinstance(status, dict):
            message = str(status.get("message") or status.get("reason") or "")
    except ValueError:
        message = raw.decode("utf-8", errors="replace").strip()[:300]
    message = message or response.reason or "no message"
    if response.status == 410:
        return Gone(message)
    return ApiError(response.status, message)
