"""The proxy path end to end: the official openai client -> router -> fake vLLM engines."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import openai
import pytest

from router.app import make_app
from router.config.settings import Config, StaticBackend
from router.flow import Outcome
from router.keys import CHOOSER
from router.testing import RunningEngine
from router.testing.flood import start_flood
from router.testing.raw_engine import RawEngine, http_response

from .conftest import CHAT, MODELS, RouterUnderTest, StartRouter, config_for


def client_for(router: RouterUnderTest) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)


async def test_chat_completion_through_router(router: RouterUnderTest) -> None:
    client = client_for(router)
    reply = await client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3"
    await router.settled(1)
    flow = router.log.only()
    assert (flow.outcome, flow.status, flow.stream) == (Outcome.OK, 200, False)
    assert flow.ttft is not None and flow.duration is not None


async def test_chat_stream_arrives_chunk_by_chunk(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    for engine in engines:
        engine.behaviour.token_delay = 0.2
    client = client_for(router)
    stream = await client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True,
        stream_options={"include_usage": True},
    )
    pieces = []
    engine_busy_at_first_piece = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if engine_busy_at_first_piece is None:
                engine_busy_at_first_piece = sum(e.state.open for e in engines)
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage
    # The first piece reached the client while the engine was still generating: no buffering.
    assert engine_busy_at_first_piece == 1
    assert "".join(pieces).split() == ["tok0", "tok1", "tok2"]
    assert usage is not None and usage.completion_tokens == 3
    await router.settled(1)
    assert router.log.only().stream is True


async def test_completions_stream_and_not(router: RouterUnderTest) -> None:
    client = client_for(router)
    reply = await client.completions.create(model=CHAT, prompt="say", max_tokens=2)
    assert reply.choices[0].text == "tok0 tok1"
    stream = await client.completions.create(model=CHAT, prompt="say", max_tokens=2, stream=True)
    text = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
    assert text.split() == ["tok0", "tok1"]
    await router.settled(2)


async def test_embeddings(router: RouterUnderTest) -> None:
    client = client_for(router)
    reply = await client.embeddings.create(model=CHAT, input=["one", "two"])
    assert len(reply.data) == 2 and len(reply.data[0].embedding) == 8
    await router.settled(1)


async def test_responses_stream_and_not(router: RouterUnderTest) -> None:
    client = client_for(router)
    reply = await client.responses.create(model=CHAT, input="hello")
    assert reply.output_text
    events = [event.type async for event in await client.responses.create(
        model=CHAT, input="hello", stream=True
    )]
    assert events[0] == "response.created" and events[-1] == "response.completed"
    await router.settled(2)


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/rerank", {"query": "q", "documents": ["a", "b"]}),
        ("/rerank", {"query": "q", "documents": ["a", "b"]}),
        ("/v1/score", {"text_1": "a", "text_2": "b"}),
        ("/score", {"text_1": "a", "text_2": "b"}),
        ("/tokenize", {"prompt": "a b c"}),
        ("/detokenize", {"tokens": [1, 2]}),
    ],
)
async def test_other_endpoints_are_proxied(
    router: RouterUnderTest, engines: list[RunningEngine], path: str, body: dict[str, object]
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + path, json={"model": CHAT, **body}) as response:
            assert response.status == 200, await response.text()
            assert response.content_type == "application/json"
            await response.json()
    await router.settled(1)
    assert sum(engine.state.completed for engine in engines) == 1
    assert router.log.only().endpoint == path


async def test_round_robin_alternates_backends(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            async with session.post(router.url + "/v1/completions",
                                    json={"model": CHAT, "prompt": "x"}) as response:
                assert response.status == 200
    assert [engine.state.completed for engine in engines] == [2, 2]
    await router.settled(4)


async def test_request_id_is_kept_forwarded_and_echoed(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/v1/completions",
                                json={"model": CHAT, "prompt": "x"},
                                headers={"X-Request-Id": "client-id-1"}) as response:
            assert response.headers["x-request-id"] == "client-id-1"
        async with session.post(router.url + "/v1/completions",
                                json={"model": CHAT, "prompt": "x"},
                                headers={"X-Request-Id": "bad id\twith junk"}) as response:
            generated = response.headers["x-request-id"]
    assert generated != "bad id\twith junk" and len(generated) == 32
    seen = [engine.state.last_headers for engine in engines]
    assert {headers["x-request-id"] for headers in seen if headers} == {"client-id-1", generated}
    await router.settled(2)


async def test_hop_by_hop_headers_are_not_forwarded(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            router.url + "/v1/completions",
            json={"model": CHAT, "prompt": "x"},
            headers={"Connection": "keep-alive, X-Private", "X-Private": "secret",
                     "Proxy-Authorization": "Basic abc", "X-Kept": "yes"},
        ) as response:
            assert response.status == 200
            assert "Transfer-Encoding" not in response.headers or response.headers[
                "Transfer-Encoding"] == "chunked"
    headers = engines[0].state.last_headers
    assert headers is not None
    assert headers["X-Kept"] == "yes"
    assert "X-Private" not in headers and "Proxy-Authorization" not in headers


async def test_aliases_are_resolved_and_listed(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    router = await start_router(config_for(engines, aliases={"gpt-4o": CHAT}))
    client = client_for(router)
    reply = await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.model == CHAT
    assert engines[0].state.last_json is not None
    assert engines[0].state.last_json["model"] == CHAT
    listed = {model.id: model for model in (await client.models.list()).data}
    assert set(listed) == {*MODELS, "gpt-4o"}
    assert listed["gpt-4o"].model_extra is not None
    assert listed["gpt-4o"].model_extra["root"] == CHAT
    await router.settled(1)


async def test_models_is_the_union_over_backends(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    config = Config(static_backends=(
        StaticBackend(engines[0].url, ("a", "b")), StaticBackend(engines[1].url, ("b", "c"))
    ))
    router = await start_router(config)
    ids = [model.id for model in (await client_for(router).models.list()).data]
    assert ids == ["a", "b", "c"]


async def test_backend_error_status_passes_through_unchanged(
    solo_router: RouterUnderTest, engine: RunningEngine
) -> None:
    engine.behaviour.fail_status = 429
    async with aiohttp.ClientSession() as session:
        async with session.post(solo_router.url + "/v1/completions",
                                json={"model": CHAT, "prompt": "x"}) as response:
            assert response.status == 429
            body = await response.json()
            assert body["error"]["code"] == 429
            assert response.headers["x-request-id"]
    await solo_router.settled(1)
    flow = solo_router.log.only()
    assert (flow.status, flow.outcome) == (429, Outcome.OK)


class BrokenPolicy:
    def choose(self, request: object, candidates: object) -> object:
        raise RuntimeError("policy bug")


async def test_a_router_bug_is_a_json_500_with_request_id(
    aiohttp_client: Any, engines: list[RunningEngine]
) -> None:
    app = make_app(config_for(engines))
    app[CHOOSER].policy = BrokenPolicy()  # type: ignore[assignment]
    client = await aiohttp_client(app)
    response = await client.post("/v1/completions", json={"model": CHAT, "prompt": "x"},
                                 headers={"X-Request-Id": "bug-1"})
    assert response.status == 500
    assert response.headers["x-request-id"] == "bug-1"
    assert (await response.json())["error"]["type"] == "internal_error"
    assert sum(engine.state.started for engine in engines) == 0


async def test_the_router_adds_no_headers_of_its_own_choosing(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    async with aiohttp.ClientSession(skip_auto_headers=("User-Agent",)) as session:
        async with session.post(router.url + "/v1/completions",
                                data=b'{"model": "chat-model", "prompt": "x"}',
                                skip_auto_headers=("Content-Type",)) as response:
            assert response.status == 200
    headers = next(e.state.last_headers for e in engines if e.state.last_headers)
    assert "User-Agent" not in headers and "Content-Type" not in headers
    await router.settled(1)


# --------------------------------------------------------------------------- prefill bounds

CHAT_BODY = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def disaggregated(start_router: StartRouter, prefill_url: str, decode: RunningEngine,
                        **overrides: Any) -> RouterUnderTest:
    return await start_router(Config(
        static_backends=(StaticBackend(prefill_url, MODELS, ("prefill",)),
                         StaticBackend(decode.url, MODELS, ("decode",))),
        routing_logic="disaggregated_prefill", health_check_interval=0,
        engine_stats_interval=0, **overrides,
    ))


async def test_endless_prefill_answer_is_a_502_at_the_size_limit_and_closes_the_hop(
    start_router: StartRouter, engine: RunningEngine,
) -> None:
    async with await start_flood(["/v1/chat/completions"]) as flood:
        router = await disaggregated(start_router, flood.url, engine)
        latencies = []
        async with aiohttp.ClientSession() as session:
            async def health_meanwhile() -> None:
                while True:
                    began = time.monotonic()
                    async with session.get(router.url + "/health") as response:
                        assert response.status == 200
                    latencies.append(time.monotonic() - began)
                    await asyncio.sleep(0.01)

            watcher = asyncio.create_task(health_meanwhile())
            began = time.monotonic()
            async with session.post(router.url + "/v1/chat/completions",
                                    json=CHAT_BODY) as response:
                answer = await response.json()
                status, request_id = response.status, response.headers.get("x-request-id")
            took = time.monotonic() - began
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        assert status == 502 and took < 3.0
        assert answer["error"]["code"] == "upstream_answer_too_large"
        assert answer["error"]["message"].endswith("answered more than 1048576 bytes")
        assert flood.url not in answer["error"]["message"]
        assert request_id == router.log.only().id
        async with asyncio.timeout(2):
            await flood.state.cut_event.wait()  # the prefill engine's connection was closed
        assert flood.state.bytes_sent < 16 * 1024 * 1024
        assert engine.state.started == 0  # no decode without a prefill
        await router.settled(1)
        assert router.log.only().outcome is Outcome.BACKEND_ERROR
        assert max(latencies, default=0.0) < 0.3


async def test_prefill_answer_that_trickles_is_cut_by_the_prefill_timeout(
    start_router: StartRouter, engine: RunningEngine,
) -> None:
    # Never over the size limit, never silent for a read timeout: only the deadline ends it.
    async with await start_flood(["/v1/chat/completions"], chunk_size=10, delay=0.02) as flood:
        router = await disaggregated(start_router, flood.url, engine, prefill_timeout=0.5)
        began = time.monotonic()
        status, answer = await post_json(router, CHAT_BODY)
        assert 0.5 <= time.monotonic() - began < 2.0
        assert status == 504 and answer["error"]["code"] == "gateway_timeout"
        async with asyncio.timeout(2):
            await flood.state.cut_event.wait()
        await router.settled(1)
        assert router.log.only().outcome is Outcome.TIMEOUT


async def post_json(router: RouterUnderTest, body: dict[str, Any]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/v1/chat/completions", json=body) as response:
            return response.status, await response.json()


async def raw_exchange(port: int, head: bytes, body: bytes) -> bytes:
    """Send bytes no HTTP client library would (a raw target, a Latin-1 header value)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


@pytest.mark.parametrize("pinned", [False, True])
async def test_the_query_reaches_the_engine_as_the_client_encoded_it(
    start_router: StartRouter, pinned: bool
) -> None:
    async with RawEngine(lambda request: [http_response(200, b"{}")]) as engine:
        router = await start_router(Config(
            static_backends=(StaticBackend(url=engine.url, models=(CHAT,)),),
            health_check_interval=0, engine_stats_interval=0,
        ))
        query = b"a=%23frag&b=1&c=%26x&d=a+b&e=%C3%A9"
        pin = b"id=" + router.app[CHOOSER].pool.backends[0].id.encode() + b"&" if pinned else b""
        answer = await raw_exchange(
            router.server.port or 0,
            b"POST /v1/chat/completions?" + pin + query + b" HTTP/1.1\r\nHost: r\r\n"
            b"Content-Type: application/json\r\n", json.dumps({"model": CHAT}).encode(),
        )
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert engine.requests[0].path == "/v1/chat/completions?" + query.decode()


async def test_a_header_value_that_is_not_utf8_is_refused_never_altered(
    start_router: StartRouter,
) -> None:
    async with RawEngine(lambda request: [http_response(200, b"{}")]) as engine:
        router = await start_router(Config(
            static_backends=(StaticBackend(url=engine.url, models=(CHAT,)),),
            health_check_interval=0, engine_stats_interval=0,
        ))
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\n"
                b"Content-Type: application/json\r\nX-Utf8: caf\xc3\xa9\r\n")
        body = json.dumps({"model": CHAT}).encode()
        answer = await raw_exchange(router.server.port or 0, head, body)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert engine.requests[0].headers["X-Utf8"].encode("latin-1") == b"caf\xc3\xa9"
        answer = await raw_exchange(router.server.port or 0, head + b"X-Latin: caf\xe9\r\n", body)
        status, _, rest = answer.partition(b"\r\n")
        assert status.startswith(b"HTTP/1.1 400") and b"x-request-id" in rest.lower()
        error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
        assert "X-Latin" in error["message"] and error["type"] == "invalid_request_error"
        assert len(engine.requests) == 1
        await router.settled(1)  # refused before any handler: no flow, like a 431
