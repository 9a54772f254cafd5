"""Tests for the fake vLLM engine (router.testing.engine), over real loopback HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from router.testing import (
    ENGINE_BEHAVIOUR,
    ENGINE_STATE,
    RunningEngine,
    make_engine_app,
    start_engine,
)

MODEL = "m1"


@pytest.fixture
async def engine() -> AsyncIterator[RunningEngine]:
    running = await start_engine([MODEL, "m2"], name="e1")
    try:
        yield running
    finally:
        await running.close()


@pytest.fixture
async def client(engine: RunningEngine) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=engine.url + "/v1", api_key="x", max_retries=0)
    try:
        yield sdk
    finally:
        await sdk.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


async def _sse_data(resp: aiohttp.ClientResponse) -> list[str]:
    """Return the `data:` payloads of an SSE body, in order."""
    body = (await resp.read()).decode()
    assert body.endswith("\n\n")
    return [line[len("data: "):] for line in body.split("\n") if line.startswith("data: ")]


async def test_start_engine_url_and_close_idempotent() -> None:
    running = await start_engine([MODEL])
    assert running.url.startswith("http://127.0.0.1:")
    assert not running.url.endswith(":0")
    assert running.state is running.app[ENGINE_STATE]
    assert running.behaviour is running.app[ENGINE_BEHAVIOUR]
    await running.close()
    await running.close()


def test_make_engine_app_rejects_no_models() -> None:
    with pytest.raises(ValueError):
        make_engine_app([])
    with pytest.raises(ValueError):
        make_engine_app("m1")


async def test_chat_non_stream(engine: RunningEngine, client: openai.AsyncOpenAI) -> None:
    engine.behaviour.chunks = 3
    result = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert result.object == "chat.completion"
    assert result.model == MODEL
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == "tok0 tok1 tok2"
    assert result.choices[0].finish_reason == "stop"
    assert result.usage is not None
    assert result.usage.completion_tokens == 3
    assert result.usage.total_tokens == result.usage.prompt_tokens + 3
    assert engine.state.started == engine.state.completed == 1
    assert engine.state.open == 0
    assert engine.state.last_json is not None
    assert engine.state.last_json["messages"][0]["content"] == "hi"


async def test_chat_stream_with_usage(engine: RunningEngine, client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        max_tokens=5,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert engine.state.completed == 1


async def test_chat_stream_raw_sse(engine: RunningEngine, session: aiohttp.ClientSession) -> None:
    engine.behaviour.chunks = 2
    async with session.post(
        engine.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [], "stream": True},
        headers={"x-request-id": "rid-1"},
    ) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"] == "text/event-stream"
        assert resp.headers["x-request-id"] == "rid-1"
        data = await _sse_data(resp)
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert len(events) == 1 + 2 + 1  # role, two tokens, finish (no usage unless asked)
    assert engine.state.last_headers is not None
    assert engine.state.last_headers["x-request-id"] == "rid-1"


async def test_completions(engine: RunningEngine, client: openai.AsyncOpenAI) -> None:
    result = await client.completions.create(model="m2", prompt="hello", max_tokens=2)
    assert result.object == "text_completion"
    assert result.choices[0].text == "tok0 tok1"
    assert result.usage is not None and result.usage.prompt_tokens == 5
    stream = await client.completions.create(
        model="m2", prompt="hello", max_tokens=4, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "tok0 tok1 tok2 tok3"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


async def test_embeddings(
    engine: RunningEngine, client: openai.AsyncOpenAI, session: aiohttp.ClientSession
) -> None:
    result = await client.embeddings.create(model=MODEL, input=["a", "b", "a"])
    vectors = [d.embedding for d in result.data]
    assert [len(v) for v in vectors] == [8, 8, 8]
    assert vectors[0] == vectors[2] != vectors[1]
    assert engine.state.last_json is not None
    assert engine.state.last_json["encoding_format"] == "base64"
    async with session.post(
        engine.url + "/v1/embeddings",
        json={"model": MODEL, "input": "a", "encoding_format": "float"},
    ) as resp:
        body = await resp.json()
    assert body["object"] == "list"
    as_float = body["data"][0]["embedding"]
    assert as_float == pytest.approx(vectors[0], abs=1e-6)
    async with session.post(
        engine.url + "/v1/embeddings",
        json={"model": MODEL, "input": "a", "encoding_format": "base64"},
    ) as resp:
        raw = base64.b64decode((await resp.json())["data"][0]["embedding"])
    assert list(struct.unpack("<8f", raw)) == pytest.approx(as_float, abs=1e-6)


async def test_responses(engine: RunningEngine, client: openai.AsyncOpenAI) -> None:
    engine.behaviour.chunks = 3
    result = await client.responses.create(model=MODEL, input="hi")
    assert result.object == "response"
    assert result.status == "completed"
    assert result.output_text == "tok0 tok1 tok2"
    assert result.usage is not None and result.usage.output_tokens == 3

    stream = await client.responses.create(model=MODEL, input="hi", stream=True)
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == ["tok0", " tok1", " tok2"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.output_text == "tok0 tok1 tok2"

    async with client.responses.stream(model=MODEL, input="hi") as helper:
        async for _ in helper:
            pass
        response = await helper.get_final_response()
    assert response.output_text == "tok0 tok1 tok2"


async def test_transcription_upload(engine: RunningEngine, client: openai.AsyncOpenAI) -> None:
    audio = bytes(range(256)) * 1000
    digest = hashlib.sha256(audio).hexdigest()
    result = await client.audio.transcriptions.create(
        model=MODEL, file=("a.wav", audio, "audio/wav"), language="en"
    )
    assert str(len(audio)) in result.text and digest in result.text
    upload = engine.state.uploads[-1]
    assert upload.sha256 == digest
    assert upload.size == len(audio)
    assert upload.fields["model"] == MODEL
    assert upload.fields["language"] == "en"

    stream = await client.audio.transcriptions.create(
        model=MODEL, file=("a.wav", audio, "audio/wav"), stream=True
    )
    # vLLM's chunks carry no `type`, so the SDK yields loosely-constructed event models
    # (TranscriptionTextSegmentEvent with type=None) holding the vLLM fields as extras.
    events: list[Any] = [event async for event in stream]
    dumped = [e.model_dump() if hasattr(e, "model_dump") else e for e in events]
    assert all(d["object"] == "transcription.chunk" for d in dumped)
    text = "".join(d["choices"][0]["delta"]["content"] for d in dumped)
    assert digest in text
    assert dumped[-1]["choices"][0]["finish_reason"] == "stop"
    assert len(engine.state.uploads) == 2
    assert engine.state.uploads[-1].fields["stream"] == "true"


async def test_translation_stream_raw_fields_after_file(
    engine: RunningEngine, session: aiohttp.ClientSession
) -> None:
    audio = b"\x01\x02" * 50_000
    form = aiohttp.FormData()
    form.add_field("file", audio, filename="a.mp3", content_type="audio/mpeg")
    form.add_field("model", MODEL)
    form.add_field("stream", "true")
    async with session.post(engine.url + "/v1/audio/translations", data=form) as resp:
        assert resp.status == 200
        data = await _sse_data(resp)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert {c["object"] for c in chunks} == {"translation.chunk"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert engine.state.uploads[-1].sha256 == hashlib.sha256(audio).hexdigest()
    assert engine.state.uploads[-1].fields == {"model": MODEL, "stream": "true"}

    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("model", MODEL)
    async with session.post(engine.url + "/v1/audio/transcriptions", data=form) as resp:
        assert resp.status == 400
        assert "file" in (await resp.json())["error"]["message"]


async def test_rerank_score_tokenize(
    engine: RunningEngine, session: aiohttp.ClientSession
) -> None:
    docs = ["the cat sat", "dogs bark", "a cat"]
    for path in ("/v1/rerank", "/rerank"):
        async with session.post(
            engine.url + path, json={"model": MODEL, "query": "cat", "documents": docs}
        ) as resp:
            body = await resp.json()
        assert body["model"] == MODEL
        results = body["results"]
        assert sorted(r["index"] for r in results) == [0, 1, 2]
        assert results[-1]["index"] == 1 and results[-1]["relevance_score"] == 0.0
        assert results[0]["document"]["text"] == docs[results[0]["index"]]
        assert body["usage"]["total_tokens"] > 0
    for path in ("/v1/score", "/score"):
        async with session.post(
            engine.url + path, json={"model": MODEL, "text_1": "cat", "text_2": docs}
        ) as resp:
            body = await resp.json()
        assert body["object"] == "list"
        assert [d["index"] for d in body["data"]] == [0, 1, 2]
        assert all(d["object"] == "score" for d in body["data"])
        assert body["data"][1]["score"] == 0.0 < body["data"][2]["score"]
    async with session.post(engine.url + "/tokenize", json={"prompt": "héllo"}) as resp:
        tokenized = await resp.json()
    assert tokenized["count"] == len(tokenized["tokens"]) == 6
    assert tokenized["max_model_len"] == 4096
    async with session.post(
        engine.url + "/tokenize", json={"messages": [{"role": "user", "content": "x"}]}
    ) as resp:
        assert (await resp.json())["count"] > 0
    async with session.post(
        engine.url + "/detokenize", json={"tokens": tokenized["tokens"]}
    ) as resp:
        assert (await resp.json())["prompt"] == "héllo"


async def test_models_health_metrics(
    engine: RunningEngine, session: aiohttp.ClientSession
) -> None:
    async with session.get(engine.url + "/v1/models") as resp:
        models = await resp.json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL, "m2"]
    assert models["data"][0]["owned_by"] == "vllm"
    assert models["data"][0]["max_model_len"] == 4096
    async with session.get(engine.url + "/health") as resp:
        assert resp.status == 200 and await resp.read() == b""
    engine.behaviour.health_status = 503
    async with session.get(engine.url + "/health") as resp:
        assert resp.status == 503
    async with session.post(engine.url + "/tokenize", json={"prompt": "x"}) as resp:
        assert resp.status == 200
    async with session.get(engine.url + "/metrics") as resp:
        assert resp.content_type == "text/plain"
        text = await resp.text()
    for name, kind in (
        ("vllm:num_requests_running", "gauge"),
        ("vllm:num_requests_waiting", "gauge"),
        ("vllm:kv_cache_usage_perc", "gauge"),
        ("vllm:request_success_total", "counter"),
    ):
        assert f"# HELP {name} " in text
        assert f"# TYPE {name} {kind}\n" in text
    assert 'vllm:num_requests_running{model_name="m1"} 0.0\n' in text
    assert 'vllm:request_success_total{finished_reason="stop",model_name="m1"} 1.0\n' in text


async def test_errors(engine: RunningEngine, client: openai.AsyncOpenAI,
                      session: aiohttp.ClientSession) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        await client.chat.completions.create(model="nope", messages=[])
    assert not_found.value.status_code == 404
    async with session.post(
        engine.url + "/v1/completions", json={"model": "nope", "prompt": "x"}
    ) as resp:
        assert resp.status == 404
        error = (await resp.json())["error"]
    assert error == {
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
    async with session.post(
        engine.url + "/v1/chat/completions", data=b"{not json",
        headers={"Content-Type": "application/json", "x-request-id": "bad"},
    ) as resp:
        assert resp.status == 400
        assert resp.headers["x-request-id"] == "bad"
        assert (await resp.json())["error"]["code"] == 400

    engine.behaviour.fail_status = 503
    with pytest.raises(openai.APIStatusError) as failed:
        await client.chat.completions.create(model=MODEL, messages=[])
    assert failed.value.status_code == 503
    async with session.post(engine.url + "/v1/completions", json={}) as resp:
        assert resp.status == 503
        error = (await resp.json())["error"]
    assert error["code"] == 503 and error["type"] == "ServiceUnavailableError"
    assert error["param"] is None and "e1" in error["message"]


async def test_reset_after_chunks(
    engine: RunningEngine, client: openai.AsyncOpenAI, session: aiohttp.ClientSession
) -> None:
    engine.behaviour.reset_after_chunks = 3
    async with session.post(
        engine.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [], "stream": True},
    ) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    stream = await client.chat.completions.create(model=MODEL, messages=[], stream=True)
    received = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            received.append(chunk)
    assert len(received) <= 3
    assert engine.state.resets == 2
    assert engine.state.cancelled == 0 and engine.state.completed == 0
    assert engine.state.open == 0


async def test_client_disconnect_mid_stream(
    engine: RunningEngine, session: aiohttp.ClientSession
) -> None:
    engine.behaviour.token_delay = 0.05
    engine.behaviour.chunks = 1000
    resp = await session.post(
        engine.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [], "stream": True},
    )
    assert resp.status == 200
    assert (await resp.content.readline()).startswith(b"data: ")
    assert engine.state.open == 1
    resp.close()
    await asyncio.wait_for(engine.state.disconnected.wait(), 1.0)
    assert engine.state.cancelled == 1
    assert engine.state.open == 0
    assert engine.state.completed == 0


async def test_client_disconnect_before_first_token(
    engine: RunningEngine, session: aiohttp.ClientSession
) -> None:
    engine.behaviour.first_token_delay = 30.0
    with pytest.raises(asyncio.TimeoutError):
        await session.post(
            engine.url + "/v1/chat/completions",
            json={"model": MODEL, "messages": []},
            timeout=aiohttp.ClientTimeout(total=0.2),
        )
    await asyncio.wait_for(engine.state.disconnected.wait(), 1.0)
    assert engine.state.cancelled == 1 and engine.state.open == 0


async def test_hang_after_headers_and_fast_close(session: aiohttp.ClientSession) -> None:
    running = await start_engine([MODEL])
    try:
        running.behaviour.hang_after_headers = True
        resp = await session.post(
            running.url + "/v1/completions",
            json={"model": MODEL, "prompt": "x", "stream": True},
        )
        assert resp.status == 200
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(resp.content.readany(), 0.1)
        assert running.state.open == 1
    finally:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await running.close()
        assert loop.time() - started < 2.0
    assert running.state.open == 0
    assert running.state.cancelled == 1
    resp.close()


async def test_first_token_delay_and_token_delay(
    engine: RunningEngine, session: aiohttp.ClientSession
) -> None:
    engine.behaviour.first_token_delay = 0.1
    engine.behaviour.token_delay = 0.02
    engine.behaviour.chunks = 3
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with session.post(
        engine.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True}
    ) as resp:
        first = await resp.content.readline()
        ttft = loop.time() - started
        await resp.read()
    total = loop.time() - started
    assert first.startswith(b"data: ")
    assert 0.1 <= ttft < 0.5
    assert total >= 0.14
