"""Multipart (audio) requests: learn `model` from the head of the stream, forward the rest.

Routing needs the `model` field before a backend is chosen, but the body may be gigabytes.
`read_multipart_request` reads only until it has seen `model` and the start of the `file`
part, then forwards what it read followed by the rest of the client's stream, so memory stays
flat in the size of the upload. When the file comes first (curl sends fields in command-line
order), it spools the body to a temporary file, then sends that.
"""

from __future__ import annotations

import asyncio
import tempfile
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import IO

from aiohttp import web
from aiohttp.helpers import parse_mimetype
from aiohttp.multipart import (
    BadContentDispositionHeader,
    BadContentDispositionParam,
    content_disposition_filename,
    parse_content_disposition,
)

from router.backends.pool import BackendPool
from router.errors import BadRequest, PayloadTooLarge
from router.proxy.inbound import BodySize, InboundRequest, read_chunk, resolve_model

__all__ = ["MultipartScanner", "Part", "read_multipart_request"]

# aiohttp warns once per distinct malformed Content-Disposition and keeps every message in
# its module's warning registry for good: a client sending many would grow the router's
# memory (and its stderr). The scanner reports them as 400s instead.
warnings.filterwarnings("ignore", category=BadContentDispositionHeader)
warnings.filterwarnings("ignore", category=BadContentDispositionParam)

PEEK_LIMIT = 1024 * 1024
"""Bytes read into memory looking for `model` before the body is spooled instead."""
MAX_FIELD_SIZE = 64 * 1024
"""Field values larger than this are not kept (they are forwarded all the same)."""
MAX_PARTS = 1000
"""Parts a body may have (vLLM's audio requests have a few dozen fields and one file)."""
MAX_FIELDS_BYTES = 1024 * 1024
"""Bytes all the parts other than the file may have together: when the file comes first the
scanner reads to the end of the body, and what it keeps must stay small."""
MAX_HEADERS_SIZE = 16 * 1024
SPOOL_CHUNK = 256 * 1024
TRUE_VALUES = ("true", "1", "yes", "on")


class MalformedMultipart(BadRequest):
    pass


@dataclass(slots=True)
class Part:
    name: str | None
    filename: str | None
    start: int
    """Stream offset of the part's first body byte."""
    end: int | None = None
    """Stream offset just past the part's last body byte; None while the part is open."""
    value: bytearray | None = field(default_factory=bytearray)
    """The body of a small non-file part; None for files and oversized values."""
    is_file: bool = False
    """A file part: it has a filename, or one of the endpoint's file part names."""


class MultipartScanner:
    """Finds the parts of a multipart/form-data stream fed chunk by chunk.

    It keeps only the small field values and a few bytes of look-behind, never a file.
    """

    PREAMBLE, DELIMITER, HEADERS, BODY, END = range(5)

    def __init__(self, boundary: str, file_names: tuple[str, ...] = ("file",)) -> None:
        self._file_names = file_names
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        # A virtual CRLF lets the first delimiter match like all the others.
        self._buffer = bytearray(b"\r\n")
        self._offset = -2
        self._state = self.PREAMBLE
        self.parts: list[Part] = []
        self.fields: dict[str, str] = {}
        self._field_bytes = 0

    @property
    def current(self) -> Part | None:
        """The part whose body is being read, if any."""
        return self.parts[-1] if self._state == self.BODY else None

    @property
    def complete(self) -> bool:
        return self._state == self.END

    def has_part(self, name: str) -> bool:
        return any(part.name == name for part in self.parts)

    def has_file(self) -> bool:
        """A part named as the endpoint's file part (`file`, `image`...) has begun."""
        return any(part.name in self._file_names for part in self.parts)

    def feed(self, chunk: bytes) -> None:
        buffer = self._buffer
        buffer += chunk
        while True:
            if self._state in (self.PREAMBLE, self.BODY):
                found = buffer.find(self._delimiter)
                if found < 0:
                    # Keep just enough to recognise a delimiter split across chunks.
                    self._body_bytes(len(buffer) - len(self._delimiter) + 1)
                    return
                self._body_bytes(found)
                if self._state == self.BODY:
                    self._close_part()
                self._consume(len(self._delimiter))
                self._state = self.DELIMITER
            elif self._state == self.DELIMITER:
                if len(buffer) < 2:
                    return
                if buffer.startswith(b"--"):
                    self._state = self.END
                elif not buffer.startswith(b"\r\n"):
                    raise MalformedMultipart("malformed multipart body: bad boundary line")
                else:
                    self._state = self.HEADERS
            elif self._state == self.HEADERS:
                # The buffer starts with the CRLF that ended the delimiter line.
                end = buffer.find(b"\r\n\r\n")
                if end < 0 and len(buffer) <= MAX_HEADERS_SIZE:
                    return
                if end < 0 or end > MAX_HEADERS_SIZE:  # the same, however the body is chunked
                    raise MalformedMultipart("malformed multipart body: part headers too large")
                self._open_part(bytes(buffer[2:end]), start=self._offset + end + 4)
                self._consume(end + 4)
                self._state = self.BODY
            else:
                self._consume(len(buffer))
                return

    def _consume(self, count: int) -> None:
        del self._buffer[:count]
        self._offset += count

    def _body_bytes(self, count: int) -> None:
        if count <= 0:
            return
        part = self.current
        if part is not None and not part.is_file:
            self._field_bytes += count
            if self._field_bytes > MAX_FIELDS_BYTES:
                raise PayloadTooLarge(
                    f"the multipart fields other than 'file' are over {MAX_FIELDS_BYTES} bytes"
                )
        if part is not None and part.value is not None:
            if len(part.value) + count <= MAX_FIELD_SIZE:
                part.value += self._buffer[:count]
            else:
                part.value = None
        self._consume(count)

    def _open_part(self, raw_headers: bytes, start: int) -> None:
        name = filename = None
        for line in raw_headers.split(b"\r\n"):
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-disposition":
                try:
                    _, params = parse_content_disposition(
                        value.decode("utf-8", "replace").strip()
                    )
                    name = content_disposition_filename(params, "name")
                    filename = content_disposition_filename(params, "filename")
                except (ValueError, UnicodeError):  # e.g. filename*=punycode''...
                    raise MalformedMultipart(
                        "malformed multipart body: bad Content-Disposition"
                    ) from None
        if len(self.parts) >= MAX_PARTS:
            raise PayloadTooLarge(f"the multipart body has over {MAX_PARTS} parts")
        part = Part(name=name, filename=filename, start=start,
                    is_file=filename is not None or name in self._file_names)
        if part.is_file:
            part.value = None
        self.parts.append(part)

    def _close_part(self) -> None:
        part = self.parts[-1]
        part.end = self._offset
        if part.name is not None and part.value is not None:
            self.fields.setdefault(part.name, part.value.decode("utf-8", "replace"))


class _Spool:
    """A temporary file written and read off the event loop."""

    def __init__(self, directory: str | None) -> None:
        self._directory = directory
        self._file: IO[bytes] | None = None
        self.size = 0

    async def write(self, chunk: bytes) -> None:
        if self._file is None:
            self._file = await asyncio.to_thread(self._open)
        await asyncio.to_thread(self._file.write, chunk)
        self.size += len(chunk)

    def _open(self) -> IO[bytes]:
        return tempfile.TemporaryFile(dir=self._directory)

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._file is None:
            return
        await asyncio.to_thread(self._file.seek, 0)
        while chunk := await asyncio.to_thread(self._file.read, SPOOL_CHUNK):
            yield chunk

    async def aclose(self) -> None:
        if self._file is not None:
            spool, self._file = self._file, None
            await asyncio.to_thread(spool.close)


class MultipartUpload:
    """The multipart body to forward: the bytes already read, then the rest of the stream
    (or the spool file), with the `model` value replaced when an alias renamed it."""

    def __init__(
        self,
        request: web.Request,
        head: list[bytes],
        spool: _Spool | None,
        size: BodySize,
        content_length: int | None,
        timeout: float,
    ) -> None:
        self._request = request
        self._timeout = timeout
        self._head = head
        self._spool = spool
        self._size = size
        self._rename: tuple[int, int, bytes] | None = None
        self._started = False
        self.content_length = content_length
        self.error: Exception | None = None

    @property
    def replayable(self) -> bool:
        """A spooled body can be read again; a streamed one only until its first byte went."""
        return self._spool is not None or not self._started

    def rename_field(self, part: Part, value: str) -> None:
        """Send `value` instead of the body of `part`."""
        assert part.end is not None
        replacement = value.encode()
        self._rename = (part.start, part.end, replacement)
        if self.content_length is not None:
            self.content_length += len(replacement) - (part.end - part.start)

    async def chunks(self) -> AsyncIterator[bytes]:
        source = self._source()
        if self._rename is not None:
            source = splice(source, *self._rename)
        async for chunk in source:
            yield chunk

    async def _source(self) -> AsyncIterator[bytes]:
        if self._spool is not None:
            async for chunk in self._spool.chunks():
                yield chunk
            return
        self._started = True
        head, self._head = self._head, []
        for chunk in head:
            yield chunk
        content = self._request.content
        try:
            while chunk := await read_chunk(content, self._timeout):
                await self._size.add(len(chunk))
                yield chunk
        except Exception as error:
            self.error = error
            raise

    async def aclose(self) -> None:
        if self._spool is not None:
            await self._spool.aclose()


async def splice(
    chunks: AsyncIterator[bytes], start: int, end: int, replacement: bytes
) -> AsyncIterator[bytes]:
    """Yield `chunks` with the stream bytes `[start, end)` replaced by `replacement`."""
    position = 0
    async for chunk in chunks:
        chunk_start, position = position, position + len(chunk)
        if position <= start or chunk_start >= end:
            yield chunk
            continue
        pieces = []
        if chunk_start <= start:
            pieces += [chunk[: start - chunk_start], replacement]
        if end <= position:
            pieces.append(chunk[end - chunk_start :])
        if joined := b"".join(pieces):
            yield joined


def multipart_boundary(request: web.Request) -> str:
    mimetype = parse_mimetype(request.headers.get("Content-Type", ""))
    boundary = mimetype.parameters.get("boundary")
    if (mimetype.type, mimetype.subtype) != ("multipart", "form-data") or not boundary:
        raise BadRequest("expected a multipart/form-data body with a boundary")
    if len(boundary) > 70:
        raise BadRequest("malformed multipart body: boundary longer than 70 characters")
    return boundary


async def read_multipart_request(
    request: web.Request, pool: BackendPool, limit: int, spool_dir: str | None,
    timeout: float, inflate_ratio: float = 0.0, file_names: tuple[str, ...] = ("file",),
) -> InboundRequest:
    """Read the head of a multipart body until `model` and the start of its file part (named
    one of `file_names`) are known.

    A compressed body is read (and forwarded) decoded: its Content-Length, which counts the
    compressed bytes, is not forwarded; the decoded length is when the whole body was read."""
    boundary = multipart_boundary(request)
    size = BodySize(request, limit, inflate_ratio, "the body")
    scanner = MultipartScanner(boundary, file_names)
    head: list[bytes] = []
    spool: _Spool | None = None
    at_eof = False
    try:
        while chunk := await read_chunk(request.content, timeout):
            await size.add(len(chunk))
            scanner.feed(chunk)
            if spool is not None:
                await spool.write(chunk)
                continue
            head.append(chunk)
            if scanner.has_file() and "model" in scanner.fields:
                break  # forward the head, then stream the rest
            if scanner.has_file() or size.size > PEEK_LIMIT:
                spool = _Spool(spool_dir)
                for held in head:
                    await spool.write(held)
                head = []
        else:
            at_eof = True
            if not scanner.complete:
                raise MalformedMultipart("malformed multipart body: it ends inside a part")
        if not scanner.has_file():
            raise BadRequest(f"the multipart body has no '{file_names[0]}' part")
        if "model" not in scanner.fields:
            raise BadRequest("the multipart body has no 'model' field")
        requested = scanner.fields["model"]
        served = resolve_model(pool, requested)
        if spool is not None:
            length: int | None = spool.size
        elif at_eof:
            length = size.size
        else:
            length = request.content_length if size.coding is None else None
        upload = MultipartUpload(request, head, spool, size, length, timeout)
    except BaseException:
        if spool is not None:
            await spool.aclose()
        raise
    if served != requested:
        model_part = next(p for p in scanner.parts if p.name == "model" and p.end is not None)
        upload.rename_field(model_part, served)
    stream = scanner.fields.get("stream", "").strip().lower() in TRUE_VALUES
    return InboundRequest(model=served, stream=stream, headers=request.headers, upload=upload)
