"""Multipart (audio) requests: the field scanner, and uploads through the router."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from router.errors import BadRequest, PayloadTooLarge
from router.flow import Outcome
from router.proxy.multipart import MAX_FIELDS_BYTES, MAX_PARTS, MultipartScanner, splice
from router.testing import RunningEngine

from .conftest import WHISPER, RouterUnderTest, StartRouter, config_for

BOUNDARY = "----router-test-boundary"


def multipart_body(parts: list[tuple[str, bytes, str | None]], boundary: str = BOUNDARY) -> bytes:
    out = b"preamble to ignore"
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename:
            disposition += f'; filename="{filename}"'
        out += (f"\r\n--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n").encode()
        out += value
    return out + f"\r\n--{boundary}--\r\n".encode()


def content_type(boundary: str = BOUNDARY) -> str:
    return f"multipart/form-data; boundary={boundary}"


async def chunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def audio_bytes(size: int) -> bytes:
    # Random bytes: they may contain anything, CRLFs and dashes included.
    return os.urandom(size)


# --- the scanner, fed in every chunking -------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [1, 2, 7, 64, 10_000])
def test_scanner_finds_fields_and_file_offsets_in_any_chunking(chunk_size: int) -> None:
    audio = b"--\r\n--" + BOUNDARY.encode()[:-1] + b"\r\n" + audio_bytes(3000)
    body = multipart_body([("model", b"whisper", None), ("file", audio, "a.wav"),
                           ("stream", b"true", None)])
    scanner = MultipartScanner(BOUNDARY)
    for start in range(0, len(body), chunk_size):
        scanner.feed(body[start : start + chunk_size])
    assert scanner.complete
    assert scanner.fields == {"model": "whisper", "stream": "true"}
    model, file, _ = scanner.parts
    assert body[model.start : model.end] == b"whisper"
    assert body[file.start : file.end] == audio
    assert file.filename == "a.wav" and file.value is None


def test_scanner_rejects_a_bad_boundary_line() -> None:
    scanner = MultipartScanner(BOUNDARY)
    with pytest.raises(BadRequest):
        scanner.feed(f"--{BOUNDARY}XX garbage".encode())


async def test_splice_replaces_a_range_across_chunk_edges() -> None:
    data = bytes(range(100))
    for size in (1, 3, 10, 100):
        out = b"".join([chunk async for chunk in splice(chunked(data, size), 10, 20, b"xyz")])
        assert out == data[:10] + b"xyz" + data[20:]


# --- uploads through the router ---------------------------------------------------------------

def openai_client(router: RouterUnderTest) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)


async def test_openai_transcription_reaches_engine_intact(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    audio = audio_bytes(300_000)
    digest = hashlib.sha256(audio).hexdigest()
    client = openai_client(router)
    result = await client.audio.transcriptions.create(
        model=WHISPER, file=("a.wav", audio, "audio/wav"), language="en"
    )
    assert digest in result.text
    stream = await client.audio.transcriptions.create(
        model=WHISPER, file=("a.wav", audio, "audio/wav"), stream=True
    )
    events: list[Any] = [event.model_dump() async for event in stream]
    assert all(event["object"] == "transcription.chunk" for event in events)
    assert digest in "".join(event["choices"][0]["delta"]["content"] for event in events)
    uploads = [upload for engine in engines for upload in engine.state.uploads]
    assert [upload.sha256 for upload in uploads] == [digest, digest]
    await router.settled(2)
    assert [flow.stream for flow in router.log.flows.values()] == [False, True]


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
async def test_openai_translation(router: RouterUnderTest) -> None:
    audio = audio_bytes(50_000)
    result = await openai_client(router).audio.translations.create(
        model=WHISPER, file=("a.mp3", audio, "audio/mpeg")
    )
    assert hashlib.sha256(audio).hexdigest() in result.text
    await router.settled(1)


@pytest.mark.parametrize("file_first", [False, True])
@pytest.mark.parametrize("send_length", [True, False])
async def test_upload_with_file_first_or_last_and_with_or_without_length(
    router: RouterUnderTest, engines: list[RunningEngine], file_first: bool, send_length: bool
) -> None:
    audio = audio_bytes(2_500_000)  # past the peek limit
    parts: list[tuple[str, bytes, str | None]] = [("model", WHISPER.encode(), None),
                                                  ("stream", b"true", None)]
    parts.insert(0 if file_first else 2, ("file", audio, "a.wav"))
    body = multipart_body(parts)
    data: Any = body if send_length else chunked(body, 65536)
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/v1/audio/transcriptions", data=data,
                                headers={"Content-Type": content_type()}) as response:
            assert response.status == 200, await response.text()
            assert response.content_type == "text/event-stream"
            text = await response.text()
    assert text.rstrip().endswith("data: [DONE]")
    (upload,) = [upload for engine in engines for upload in engine.state.uploads]
    assert upload.sha256 == hashlib.sha256(audio).hexdigest()
    assert upload.fields == {"model": WHISPER, "stream": "true"}
    await router.settled(1)


@pytest.mark.parametrize("file_first", [False, True])
async def test_alias_in_a_multipart_body_is_renamed(
    start_router: StartRouter, engines: list[RunningEngine], file_first: bool
) -> None:
    router = await start_router(config_for(engines, aliases={"whisper-1": WHISPER}))
    audio = audio_bytes(100_000)
    parts: list[tuple[str, bytes, str | None]] = [("model", b"whisper-1", None)]
    parts.insert(0 if file_first else 1, ("file", audio, "a.wav"))
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/v1/audio/transcriptions",
                                data=multipart_body(parts),
                                headers={"Content-Type": content_type()}) as response:
            assert response.status == 200, await response.text()
    (upload,) = [upload for engine in engines for upload in engine.state.uploads]
    assert upload.fields["model"] == WHISPER
    assert upload.sha256 == hashlib.sha256(audio).hexdigest()
    await router.settled(1)


@pytest.mark.parametrize(
    "parts, headers, status, message",
    [
        ([("model", WHISPER.encode(), None)], None, 400, "no 'file'"),
        ([("file", b"abc", "a.wav")], None, 400, "no 'model'"),
        ([("model", b"nope", None), ("file", b"abc", "a.wav")], None, 404, "does not exist"),
        ([("model", WHISPER.encode(), None)], {"Content-Type": "application/json"}, 400,
         "multipart/form-data"),
    ],
)
async def test_bad_multipart_requests_get_json_errors(
    router: RouterUnderTest,
    parts: list[tuple[str, bytes, str | None]],
    headers: dict[str, str] | None,
    status: int,
    message: str,
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/v1/audio/transcriptions",
                                data=multipart_body(parts),
                                headers=headers or {"Content-Type": content_type()}) as response:
            assert response.status == status
            assert message in (await response.json())["error"]["message"]
            assert response.headers["x-request-id"]
    await router.settled(1)
    assert router.log.only().outcome is Outcome.REJECTED


async def test_truncated_multipart_body_is_rejected(router: RouterUnderTest) -> None:
    body = multipart_body([("file", b"abc", "a.wav"), ("model", WHISPER.encode(), None)])
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/v1/audio/transcriptions",
                                data=chunked(body[:-20], 10),
                                headers={"Content-Type": content_type()}) as response:
            assert response.status == 400
            assert "malformed" in (await response.json())["error"]["message"]
    await router.settled(1)


@pytest.mark.parametrize("send_length", [True, False])
@pytest.mark.parametrize("file_first", [False, True])
async def test_upload_over_the_size_limit_gets_413(
    start_router: StartRouter, engines: list[RunningEngine], send_length: bool, file_first: bool
) -> None:
    router = await start_router(config_for(engines, max_body_size=1_000_000))
    parts: list[tuple[str, bytes, str | None]] = [("model", WHISPER.encode(), None)]
    parts.insert(0 if file_first else 1, ("file", audio_bytes(3_000_000), "a.wav"))
    body = multipart_body(parts)
    data: Any = body if send_length else chunked(body, 65536)
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/v1/audio/transcriptions", data=data,
                                headers={"Content-Type": content_type()}) as response:
            assert response.status == 413
            assert (await response.json())["error"]["code"] == "payload_too_large"
    await router.settled(1)
    assert not [upload for engine in engines for upload in engine.state.uploads]


@pytest.mark.parametrize("chunk_size", [4096, 1_000_000])
def test_oversized_part_headers_are_refused_however_they_arrive(chunk_size: int) -> None:
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n"
            f"X-Padding: {'p' * 40_000}\r\n\r\nm\r\n--{BOUNDARY}--\r\n").encode()
    scanner = MultipartScanner(BOUNDARY)
    with pytest.raises(BadRequest, match="too large"):
        for start in range(0, len(body), chunk_size):
            scanner.feed(body[start : start + chunk_size])


@pytest.mark.parametrize("fields, size, message", [
    (MAX_PARTS, 10, "parts"),  # with the file: one part too many
    (20, 60 * 1024, "fields other than 'file'"),
])
def test_scanner_bounds_the_fields_it_keeps(fields: int, size: int, message: str) -> None:
    parts = [("file", b"audio", "a.wav")] + [(f"f{n}", b"v" * size, None) for n in range(fields)]
    scanner = MultipartScanner(BOUNDARY)
    with pytest.raises(PayloadTooLarge, match=message):
        scanner.feed(multipart_body(parts))
    assert len(scanner.parts) <= MAX_PARTS
    assert sum(len(value) for value in scanner.fields.values()) <= MAX_FIELDS_BYTES


def test_scanner_takes_a_body_at_the_field_bounds() -> None:
    per_field = MAX_FIELDS_BYTES // (MAX_PARTS - 2)
    parts = [("file", b"audio", "a.wav"), ("model", WHISPER.encode(), None)]
    parts += [(f"f{n}", b"v" * per_field, None) for n in range(MAX_PARTS - 2)]
    scanner = MultipartScanner(BOUNDARY)
    scanner.feed(multipart_body(parts))
    assert scanner.complete and scanner.fields["model"] == WHISPER


async def test_file_first_upload_with_too_many_fields_gets_413(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    # File first: the router reads to the end for `model`; the fields it meets on the way
    # are bounded (3,000 fields of 60 KiB took the router from 44 to 391 MB).
    parts = [("file", audio_bytes(10_000), "a.wav")]
    parts += [(f"f{n}", b"v" * 60 * 1024, None) for n in range(100)]
    parts.append(("model", WHISPER.encode(), None))
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/v1/audio/transcriptions",
                                data=chunked(multipart_body(parts), 65536),
                                headers={"Content-Type": content_type()}) as response:
            assert response.status == 413
            assert (await response.json())["error"]["code"] == "payload_too_large"
    await router.settled(1)
    assert not [upload for engine in engines for upload in engine.state.uploads]
