"""Clients that misbehave: they leave at random points (during the head, the body, the
upload, before the answer, mid-stream; closing or resetting), or send malformed JSON and
malformed multipart. Well-behaved traffic runs alongside and must not notice."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from router.flow import Outcome
from router.keys import CLIENT_SESSION
from router.testing import RunningEngine
from router.testing.chaos.clients import (
    ClientResult, Kind, call, leave_before_answer, leave_during_body, leave_during_head,
    leave_mid_stream, request_head,
)
from router.testing.chaos.tally import rss_kib

from ..conftest import CHAT, WHISPER, RouterUnderTest, StartRouter
from .conftest import (
    Scale, Scenario, bounded_gather, chaos_config, chat_body, expect_kinds, scales, traffic,
)

BOUNDARY = "----chaos-boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
CHAT_PATH = "/v1/chat/completions"
UPLOAD_PATH = "/v1/audio/transcriptions"


def upload_body(rng: random.Random, size: int) -> bytes:
    audio = rng.randbytes(size)
    return (
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{WHISPER}\r\n"
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
        f"Content-Type: audio/wav\r\n\r\n"
    ).encode() + audio + f"\r\n--{BOUNDARY}--\r\n".encode()


Leaver = Callable[[RouterUnderTest, random.Random, str], Awaitable[ClientResult]]


def _address(router: RouterUnderTest) -> tuple[str, int]:
    port = router.server.port
    assert port is not None
    return router.server.host, port


async def _during_head(router: RouterUnderTest, rng: random.Random, rid: str) -> ClientResult:
    body = json.dumps(chat_body(rng)).encode()
    head = request_head(CHAT_PATH, len(body), request_id=rid)
    return await leave_during_head(*_address(router), head, rng.randrange(len(head)),
                                   reset=rng.random() < 0.5, request_id=rid)


async def _during_json_body(router: RouterUnderTest, rng: random.Random,
                            rid: str) -> ClientResult:
    body = json.dumps(chat_body(rng)).encode()
    head = request_head(CHAT_PATH, len(body), request_id=rid)
    return await leave_during_body(*_address(router), head, body, rng.randrange(len(body)),
                                   reset=rng.random() < 0.5, request_id=rid)


async def _during_upload(router: RouterUnderTest, rng: random.Random, rid: str) -> ClientResult:
    body = upload_body(rng, rng.randint(1, 256 * 1024))
    head = request_head(UPLOAD_PATH, len(body), content_type=MULTIPART, request_id=rid)
    return await leave_during_body(*_address(router), head, body, rng.randrange(len(body)),
                                   reset=rng.random() < 0.5, request_id=rid)


async def _before_answer(router: RouterUnderTest, rng: random.Random, rid: str) -> ClientResult:
    body = json.dumps(chat_body(rng)).encode()
    request = request_head(CHAT_PATH, len(body), request_id=rid) + body
    return await leave_before_answer(*_address(router), request, rng.uniform(0.0, 0.2),
                                     reset=rng.random() < 0.5, request_id=rid)


async def _mid_stream(router: RouterUnderTest, rng: random.Random, rid: str) -> ClientResult:
    body = json.dumps(chat_body(rng, stream=True, max_tokens=100)).encode()
    request = request_head(CHAT_PATH, len(body), request_id=rid) + body
    return await leave_mid_stream(*_address(router), request, rng.randint(1, 8),
                                  reset=rng.random() < 0.5, request_id=rid)


LEAVERS: dict[str, Leaver] = {
    "during_head": _during_head,
    "during_json_body": _during_json_body,
    "during_upload": _during_upload,
    "before_answer": _before_answer,
    "mid_stream": _mid_stream,
}
# Whether a leaver's request always becomes exactly one flow (the head was complete).
MAKES_A_FLOW = {"during_json_body", "during_upload", "before_answer", "mid_stream"}


@pytest.mark.parametrize("how", [*sorted(LEAVERS), "mixed"])
@pytest.mark.parametrize("scale", scales())
async def test_clients_leaving(
    how: str, scale: Scale, start_router: StartRouter, engines: list[RunningEngine],
    scenario: Scenario, rng: random.Random,
) -> None:
    # Answers begin late (0.6 s) and stream slowly, so a leaving client (at most 0.2 s or 8
    # events in) always leaves first, with room for a busy loop; the timeouts are not what
    # this scenario is about.
    router = await start_router(chaos_config([e.url for e in engines], read_timeout=2.0,
                                             response_timeout=2.0))
    for engine in engines:
        engine.behaviour.headers_delay = 0.6
        engine.behaviour.token_delay = 0.02
    await scenario.begin(router)
    async for round_ in scenario.rounds(scale.rounds):
        tag = f"{how}-{round_}"
        names = [how if how != "mixed" else rng.choice(sorted(LEAVERS))
                 for _ in range(scale.requests)]
        jobs = [(lambda n=n, name=name: LEAVERS[name](router, rng, f"{tag}-{name}-{n}"))
                for n, name in enumerate(names)]
        completed_before = sum(e.state.completed for e in engines)
        leaving, normal = await asyncio.gather(
            bounded_gather(jobs, scale.concurrency),
            traffic(router, rng, f"{tag}-normal", max(4, scale.requests // 4),
                    concurrency=max(4, scale.concurrency // 2), timeout=10),
        )
        scenario.fault(f"client_left_{how}", len(leaving))
        scenario.results += leaving + normal
        expect_kinds(normal, lambda r: {Kind.COMPLETE})
        expect_kinds(leaving, lambda r: {Kind.LEFT})
        await asyncio.sleep(0.7)  # past the engines' headers delay: nothing left to finish
        # No engine finished a request whose client had left: the router closed them all.
        completed = sum(e.state.completed for e in engines) - completed_before
        assert completed == len(normal), (completed, len(normal))
        for result, name in zip(leaving, names):
            flow = router.log.flows.get(result.request_id)
            if name in MAKES_A_FLOW:
                assert flow is not None, result
            if name == "during_head":
                assert flow is None, flow
            if flow is not None:
                assert flow.outcome is Outcome.CLIENT_DISCONNECTED, (name, flow)
                # 499 (counted, never sent) unless the answer had begun.
                assert flow.status == (200 if name == "mid_stream" else 499), (name, flow)
    assert not any(e.state.uploads for e in engines)
    await scenario.finish(router, engines, max_seconds=4.0)


# --- a client that reads slowly: backpressure, not buffering ---------------------------------


def _router_write_buffers(router: RouterUnderTest) -> int:
    """Bytes waiting in the router's transports towards its clients."""
    runner = router.server.runner
    assert runner is not None and runner.server is not None
    return sum(handler.transport.get_write_buffer_size()
               for handler in runner.server.connections if handler.transport is not None)


def _router_read_buffers(router: RouterUnderTest) -> int:
    """Bytes the router read from backends and holds, not yet sent on."""
    connector = router.app[CLIENT_SESSION].connector
    total = 0
    for protocol in getattr(connector, "_acquired", ()):
        payload = getattr(protocol, "_payload", None)
        total += getattr(payload, "_size", 0) or 0
    return total


@pytest.mark.parametrize("scale", scales())
async def test_slow_readers_get_backpressure_not_buffering(
    scale: Scale, start_router: StartRouter, engine: RunningEngine, scenario: Scenario,
    rng: random.Random,
) -> None:
    router = await start_router(chaos_config([engine.url], read_timeout=30.0))
    padding = 16 * 1024
    events = 2000 if scale.name == "short" else 6000  # ~32 MiB or ~96 MiB per stream
    readers = 1 if scale.name == "short" else 3
    engine.behaviour.chunk_padding = padding
    await scenario.begin(router)
    peaks = {"write": 0, "read": 0, "rss": 0}
    stalled: dict[str, int] = {}
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            peaks["write"] = max(peaks["write"], _router_write_buffers(router))
            peaks["read"] = max(peaks["read"], _router_read_buffers(router))
            peaks["rss"] = max(peaks["rss"], await asyncio.to_thread(rss_kib))
            await asyncio.sleep(0.01)

    async def slow_reader(n: int, session: aiohttp.ClientSession) -> ClientResult:
        body = {"model": CHAT, "messages": [{"role": "user", "content": "x"}],
                "stream": True, "max_tokens": events}
        result = ClientResult(Kind.UNCLEAR, f"slow-{n}", stream=True)
        received = 0
        async with asyncio.timeout(60):
            async with session.post(router.url + CHAT_PATH, json=body,
                                    headers={"x-request-id": result.request_id}) as response:
                result.status = response.status
                await asyncio.sleep(0.5)  # not reading at all: everything backs up
                stalled_at = engine.state.bytes_sent
                for _ in range(50):  # small reads with pauses
                    received += len(await response.content.read(4096))
                    await asyncio.sleep(0.005)
                tail = b""
                async for piece in response.content.iter_any():
                    received += len(piece)
                    tail = (tail + piece)[-64:]
        total = engine.state.bytes_sent
        result.kind = Kind.COMPLETE if tail.rstrip().endswith(b"data: [DONE]") else Kind.UNCLEAR
        stalled[result.request_id] = stalled_at
        result.detail = f"engine had sent {stalled_at} of {total} bytes while stalled"
        result.events = received
        return result

    sampler = asyncio.create_task(sample())
    try:
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(slow_reader(n, session) for n in range(readers)))
    finally:
        stop.set()
        await sampler
    scenario.results += results
    scenario.fault("slow_reader", readers)
    total = engine.state.bytes_sent
    print(f"\nslow readers: {total / 2**20:.0f} MiB streamed; router write buffer peak "
          f"{peaks['write'] // 1024} KiB, read buffer peak {peaks['read'] // 1024} KiB, "
          f"RSS {scenario.rss // 1024} -> peak {peaks['rss'] // 1024} MiB; "
          + "; ".join(r.detail for r in results))
    expect_kinds(results, lambda r: {Kind.COMPLETE})
    assert total >= readers * events * padding
    # Backpressure reached the engine: it could not push the whole stream while nobody read.
    for result in results:
        assert stalled[result.request_id] < total / readers / 2, result.detail
    # And the router held little of it at any time.
    assert peaks["write"] <= readers * 1024 * 1024
    assert peaks["read"] <= readers * 1024 * 1024
    assert peaks["rss"] - scenario.rss <= 24 * 1024 + readers * 4 * 1024
    await scenario.finish(router, [engine], max_seconds=60)


# --- malformed bodies -------------------------------------------------------------------------

VALID_CHAT = json.dumps({"model": CHAT, "messages": [{"role": "user", "content": "hi"}]})

MALFORMED_JSON: list[bytes] = [
    b"", b" ", b"{", b"}", b"[]", b"null", b"42", b'"chat-model"', b"{'model': 'x'}",
    b'{"model": }', b'{"model": "chat-model",}', b"\xff\xfe\x00", b"\x00" * 16,
    b"[" * 100_000, b'{"a":' * 50_000, b'{"model": ["chat-model"]}', b'{"model": {"a": 1}}',
    b'{"model": 1}', b'{"model": null}', b'{"model": ""}', b'{"model": true}',
    b'{"model": "no-such-model"}', b'{"model": "\\ud800"}', VALID_CHAT.encode()[:-1],
    b'{"model": "chat-model", "messages": [', b'{"model": "chat-model"} trailing',
    b'{"model": 1' + b"0" * 5000 + b"}", b'{"model": NaN', b"\xef\xbb\xbf",
    VALID_CHAT.encode("utf-16")[:-3],
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """Truncate, flip, insert or delete a few bytes."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        at = rng.randrange(len(out) + 1)
        if op == 0:
            del out[at:]
        elif op == 1 and out:
            out[min(at, len(out) - 1)] = rng.randrange(256)
        elif op == 2:
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        elif out:
            del out[at : at + rng.randint(1, 8)]
    return bytes(out)


def clear_non_500(result: ClientResult) -> set[Kind]:
    if result.status is not None and result.status >= 500:
        return set()
    return {Kind.COMPLETE, Kind.ERROR}


@pytest.mark.parametrize("scale", scales())
async def test_malformed_json_gets_a_4xx_json_error(
    scale: Scale, start_router: StartRouter, engine: RunningEngine, scenario: Scenario,
    rng: random.Random,
) -> None:
    router = await start_router(chaos_config([engine.url], max_json_body_size=256 * 1024))
    await scenario.begin(router)
    corpus = MALFORMED_JSON + [b"{" + b" " * (300 * 1024) + b"}"]  # over the size limit
    mutated = [mutate(rng, VALID_CHAT.encode())
               for _ in range(scale.requests * scale.rounds)]
    async with aiohttp.ClientSession() as session:
        fixed = await bounded_gather([
            (lambda n=n, b=b: call(session, router.url + CHAT_PATH, b,
                                   request_id=f"badjson-{n}", timeout=10))
            for n, b in enumerate(corpus)], scale.concurrency)
        fuzzed = await bounded_gather([
            (lambda n=n, b=b: call(session, router.url + CHAT_PATH, b,
                                   request_id=f"mutjson-{n}", timeout=10))
            for n, b in enumerate(mutated)], scale.concurrency)
    scenario.results += fixed + fuzzed
    scenario.fault("malformed_json", len(corpus) + len(mutated))
    # The fixed corpus never reaches an engine: the router refuses it itself, with a 4xx.
    expect_kinds(fixed, lambda r: {Kind.ERROR} if r.status and 400 <= r.status < 500
                 else set())
    assert {r.status for r in fixed} <= {400, 404, 413}, [(r.request_id, r.status)
                                                          for r in fixed]
    assert all(r.backend is None for r in fixed)
    # Mutations of a valid body: an answer, or a 4xx (the router's or the engine's).
    expect_kinds(fuzzed, clear_non_500)
    await scenario.finish(router, [engine], max_seconds=5)


def multipart(*parts: tuple[str, bytes, str | None], boundary: str = BOUNDARY,
              close: bool = True) -> bytes:
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += value + b"\r\n"
    return out + (f"--{boundary}--\r\n".encode() if close else b"")


MODEL = ("model", WHISPER.encode(), None)
FILE = ("file", b"RIFF" + bytes(range(256)) * 8, "a.wav")
# (content type, body, expected statuses): each one malformed or incomplete.
MALFORMED_MULTIPART: list[tuple[str, bytes, set[int]]] = [
    ("multipart/mixed; boundary=x", multipart(MODEL, FILE), {400}),
    ("multipart/form-data", multipart(MODEL, FILE), {400}),
    (f"multipart/form-data; boundary={'b' * 71}", multipart(MODEL, FILE, boundary="b" * 71),
     {400}),
    ("application/json", multipart(MODEL, FILE), {400}),
    (MULTIPART, b"", {400}),
    (MULTIPART, b"no boundary anywhere", {400}),
    (MULTIPART, multipart(MODEL), {400}),
    (MULTIPART, multipart(FILE), {400}),
    (MULTIPART, multipart(("model", b"no-such-model", None), FILE), {404}),
    (MULTIPART, multipart(MODEL, close=False)[:-2], {400}),
    (MULTIPART, f"--{BOUNDARY}XX\r\n".encode() + multipart(MODEL, FILE), {400}),
    (MULTIPART, f"--{BOUNDARY}\r\nX-Long: {'a' * 20_000}".encode(), {400}),
    (MULTIPART, f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n"
                f"\r\n{WHISPER}".encode(), {400}),
    # The file comes first (so it is spooled), then the body ends inside a part.
    (MULTIPART, multipart(FILE, MODEL, close=False)[:-10], {400}),
    # model and the file's start are seen, so it is routed; the engine finds it cut short.
    (MULTIPART, multipart(MODEL, FILE, close=False)[:-200], {400}),
]


@pytest.mark.filterwarnings("ignore::aiohttp.multipart.BadContentDispositionHeader")
@pytest.mark.filterwarnings("ignore::aiohttp.multipart.BadContentDispositionParam")
@pytest.mark.parametrize("scale", scales())
async def test_malformed_multipart_gets_a_4xx_json_error(
    scale: Scale, start_router: StartRouter, engine: RunningEngine, scenario: Scenario,
    rng: random.Random,
) -> None:
    router = await start_router(chaos_config([engine.url], max_body_size=1024 * 1024))
    await scenario.begin(router)
    good = multipart(MODEL, ("stream", b"false", None), FILE)
    cases = list(MALFORMED_MULTIPART) + [
        (MULTIPART, good + b"x" * (1024 * 1024), {413}),  # over the upload limit
    ] + [(MULTIPART, mutate(rng, good), {200, 400, 404, 413})
         for _ in range(scale.requests * scale.rounds)]
    async with aiohttp.ClientSession() as session:
        results = await bounded_gather([
            (lambda n=n, c=c: call(session, router.url + UPLOAD_PATH, c[1],
                                   request_id=f"badmultipart-{n}", timeout=10,
                                   headers={"Content-Type": c[0]}))
            for n, c in enumerate(cases)], scale.concurrency)
    scenario.results += results
    scenario.fault("malformed_multipart", len(cases) - 1)
    wrong = [(n, r.kind.value, r.status, r.detail[:200]) for n, (r, case)
             in enumerate(zip(results, cases))
             if r.status not in case[2] or r.kind not in {Kind.COMPLETE, Kind.ERROR}]
    assert not wrong, wrong
    await scenario.finish(router, [engine], max_seconds=5)
