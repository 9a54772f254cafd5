"""Compressed request bodies: read decoded, counted decoded, forwarded decoded (no stale
Content-Encoding or Content-Length upstream); bombs refused cheaply; bad or unknown
encodings refused with JSON errors."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import time
import tracemalloc
import zlib
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from router.config.settings import Config, StaticBackend
from router.flow import Outcome
from router.serve.server import serve
from router.testing import RunningEngine
from router.testing.processes import free_port, wait_until_healthy

from .conftest import CHAT, MODELS, WHISPER, RouterUnderTest, StartRouter, config_for
from .test_multipart import audio_bytes, content_type, multipart_body

CHAT_BODY = {"model": CHAT, "messages": [{"role": "user", "content": "hello " * 200}]}
MIB = 1024 * 1024


def deflate(data: bytes) -> bytes:
    return zlib.compress(data)


def bomb(decoded_mib: int, prefix: bytes = b'{"model": "chat-model", "prompt": "',
         suffix: bytes = b'"}') -> bytes:
    """A gzip body that inflates to about `decoded_mib` MiB (1000 times its size): gzip
    members one after the other (a valid gzip stream), so it is built in milliseconds."""
    member = gzip.compress(b" " * MIB, 9)
    return (gzip.compress(prefix) + member * decoded_mib + gzip.compress(suffix))


async def post(url: str, data: Any, headers: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=data, headers=headers) as response:
            return response.status, await response.json(content_type=None)


# --- decoded, counted, forwarded decoded ------------------------------------------------------

@pytest.mark.parametrize("encoding, encode", [("gzip", gzip.compress), ("GZIP", gzip.compress),
                                              ("deflate", deflate)])
async def test_compressed_json_reaches_the_engine_decoded_without_its_encoding(
    router: RouterUnderTest, engines: list[RunningEngine], encoding: str, encode: Any
) -> None:
    raw = json.dumps(CHAT_BODY).encode()
    status, reply = await post(router.url + "/v1/chat/completions", encode(raw),
                               {"Content-Type": "application/json", "Content-Encoding": encoding})
    assert status == 200, reply
    (engine,) = [engine for engine in engines if engine.state.last_headers is not None]
    headers = engine.state.last_headers
    assert headers is not None and "Content-Encoding" not in headers
    assert headers["Content-Length"] == str(len(raw))
    assert engine.state.last_json == CHAT_BODY
    await router.settled(1)


@pytest.mark.parametrize("file_first", [False, True])
async def test_gzip_audio_upload_reaches_the_engine_decoded_without_waiting(
    start_router: StartRouter, engines: list[RunningEngine], file_first: bool
) -> None:
    # Before, the compressed Content-Length went up with the decoded body: the engine
    # waited for the rest until a read timeout.
    router = await start_router(config_for(engines, read_timeout=10.0))
    audio = audio_bytes(2_500_000)  # past the peek limit: streamed (or spooled) through
    parts: list[tuple[str, bytes, str | None]] = [("model", WHISPER.encode(), None)]
    parts.insert(0 if file_first else 1, ("file", audio, "a.wav"))
    body = multipart_body(parts)
    started = time.monotonic()
    status, reply = await post(router.url + "/v1/audio/transcriptions", gzip.compress(body),
                               {"Content-Type": content_type(), "Content-Encoding": "gzip"})
    assert status == 200, reply
    assert time.monotonic() - started < 5.0
    (engine,) = [engine for engine in engines if engine.state.uploads]
    assert engine.state.uploads[0].sha256 == hashlib.sha256(audio).hexdigest()
    headers = engine.state.last_headers
    assert headers is not None and "Content-Encoding" not in headers
    assert headers.get("Content-Length", str(len(body))) == str(len(body))
    await router.settled(1)


async def test_decoded_bytes_count_against_the_json_limit(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    router = await start_router(config_for(engines, max_json_body_size=4096,
                                           max_inflate_ratio=0))
    raw = json.dumps({**CHAT_BODY, "pad": "x" * 8000}).encode()
    compressed = gzip.compress(raw)
    assert len(compressed) < 4096 < len(raw)
    status, reply = await post(router.url + "/v1/chat/completions", compressed,
                               {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert (status, reply["error"]["code"]) == (413, "payload_too_large")
    assert "over the limit of 4096 bytes" in reply["error"]["message"]
    assert sum(engine.state.started for engine in engines) == 0


async def test_a_gzip_bomb_is_refused_early_with_little_memory(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    body = bomb(200)  # 200 MiB of JSON in 200 KB
    tracemalloc.start()
    try:
        status, reply = await post(router.url + "/v1/chat/completions", body,
                                   {"Content-Type": "application/json",
                                    "Content-Encoding": "gzip"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (status, reply["error"]["code"]) == (413, "payload_too_large")
    assert "inflates to over 100 times" in reply["error"]["message"]
    # The router and the client share this process: all of it counts here. Reading the
    # whole JSON limit (64 MiB), as before, peaked past 200 MB.
    assert peak < 32 * MIB, peak
    assert sum(engine.state.started for engine in engines) == 0
    await router.settled(1)


async def test_a_bomb_left_unread_does_not_hold_the_event_loop(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    # After its answer aiohttp reads what is left of a body; a bomb's rest decoded on the
    # spot held the loop for seconds (this client keeps its connection open meanwhile).
    host, port = router.server.host, router.server.port
    assert port is not None
    body = bomb(1000)
    slowest = 0.0

    async def probe(session: aiohttp.ClientSession) -> None:
        nonlocal slowest
        while True:
            started = time.monotonic()
            async with session.get(router.url + "/health") as response:
                await response.read()
            slowest = max(slowest, time.monotonic() - started)
            await asyncio.sleep(0.01)

    async with aiohttp.ClientSession() as session:
        prober = asyncio.create_task(probe(session))
        for path in ("/v1/chat/completions", "/v1/not-a-route"):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            )
            status_line = await asyncio.wait_for(reader.readline(), 10)
            assert status_line.split()[1] in (b"413", b"404"), status_line
            await asyncio.sleep(0.5)
            writer.close()
        prober.cancel()
    assert slowest < 1.0, slowest


# --- bad and unknown encodings ----------------------------------------------------------------

@pytest.mark.parametrize("endpoint, content", [
    ("/v1/chat/completions", "application/json"),
    ("/v1/audio/transcriptions", content_type()),
])
async def test_invalid_gzip_is_a_json_400(
    router: RouterUnderTest, engines: list[RunningEngine], endpoint: str, content: str
) -> None:
    status, reply = await post(router.url + endpoint, b"\x1f\x8b\x08\x00not gzip at all",
                               {"Content-Type": content, "Content-Encoding": "gzip"})
    assert (status, reply["error"]["code"]) == (400, "invalid_request")
    assert "Content-Encoding" in reply["error"]["message"]
    assert sum(engine.state.started for engine in engines) == 0
    await router.settled(1)
    assert router.log.only().outcome is Outcome.REJECTED


@pytest.mark.parametrize("headers", [
    {"Content-Encoding": "foo"},
    {"Content-Encoding": "x-gzip"},
    {"Content-Encoding": "gzip, gzip"},
    {"Content-Encoding": "compress"},
])
async def test_an_encoding_the_router_does_not_decode_is_a_json_415(
    router: RouterUnderTest, engines: list[RunningEngine], headers: dict[str, str]
) -> None:
    status, reply = await post(router.url + "/v1/chat/completions",
                               gzip.compress(json.dumps(CHAT_BODY).encode()),
                               {"Content-Type": "application/json", **headers})
    assert (status, reply["error"]["code"]) == (415, "unsupported_content_encoding")
    assert sum(engine.state.started for engine in engines) == 0


async def test_two_content_encoding_headers_are_a_415(router: RouterUnderTest) -> None:
    headers = CIMultiDict(
        [("Content-Type", "application/json"), ("Content-Encoding", "identity"),
         ("Content-Encoding", "gzip")]
    )
    status, reply = await post(router.url + "/v1/chat/completions",
                               json.dumps(CHAT_BODY).encode(), headers)
    assert (status, reply["error"]["code"]) == (415, "unsupported_content_encoding")


async def test_identity_encoding_is_accepted_and_not_forwarded(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    status, reply = await post(router.url + "/v1/chat/completions",
                               json.dumps(CHAT_BODY).encode(),
                               {"Content-Type": "application/json",
                                "Content-Encoding": "identity"})
    assert status == 200, reply
    (engine,) = [engine for engine in engines if engine.state.last_headers is not None]
    assert "Content-Encoding" not in engine.state.last_headers  # type: ignore[operator]


async def raw_status(port: int, head: bytes, body: bytes) -> tuple[int, dict[str, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        raw = await asyncio.wait_for(reader.read(), 10)  # the router closes after a refusal
    finally:
        writer.close()
    head_part, _, reply = raw.partition(b"\r\n\r\n")
    return int(head_part.split()[1]), json.loads(reply)


async def test_refused_encodings_get_json_errors_and_one_log_line_each(
    engines: list[RunningEngine], caplog: pytest.LogCaptureFixture
) -> None:
    # Through the real server: br and zstd are refused by aiohttp's parser itself when their
    # libraries are missing, and a body aiohttp cannot decode used to log ~90 lines.
    caplog.set_level(logging.INFO)
    port = free_port()
    stop = asyncio.Event()
    config = Config(host="127.0.0.1", port=port,
                    static_backends=tuple(StaticBackend(e.url, MODELS) for e in engines))
    server = asyncio.create_task(serve(config, stop))
    chat = json.dumps(CHAT_BODY).encode()
    cases = {
        b"br": (chat, 415, "unsupported_content_encoding"),
        b"zstd": (chat, 415, "unsupported_content_encoding"),
        b"gzip": (b"\x1f\x8b\x08\x00not gzip at all" * 100, 400, "invalid_request"),
    }
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_healthy(session, f"http://127.0.0.1:{port}")
        caplog.clear()
        for encoding, (body, status, code) in cases.items():
            head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\nContent-Encoding: " + encoding + b"\r\n")
            got = await raw_status(port, head, body)
            assert (got[0], got[1]["error"]["code"]) == (status, code), encoding
        await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.wait_for(server, 5)
    lines = [r for r in caplog.records if r.name in ("router.access", "router.server")
             and "drain" not in r.getMessage()]
    assert len(lines) == len(cases), [r.getMessage() for r in lines]
    assert not any(r.exc_info for r in caplog.records)
    assert sum(engine.state.started for engine in engines) == 0
