"""The router in front of two real vLLM engines (CPU build, a tiny random Llama), driven by
the official `openai` client: what the fake engines stand in for, checked against the truth.

`make e2e` (installs vLLM into its own virtualenv first; a few minutes the first time).
"""

from __future__ import annotations

import json
import time
import urllib.request

import openai
import pytest

from tests.e2e.conftest import MODEL, WHISPER, Fleet, get_text, metric

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "tell a story about the router"}]


def client(fleet: Fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.router + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def engine_metric(url: str, name: str, **labels: str) -> float:
    return metric(get_text(url + "/metrics"), name, **labels)


def eventually(check: object, timeout: float = 20.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def test_models_and_engines_come_from_the_real_fleet(fleet: Fleet) -> None:
    assert {model.id for model in client(fleet).models.list()} == {MODEL, WHISPER}

    def scraped() -> None:
        listing = json.loads(get_text(fleet.router + "/engines"))
        assert {engine["url"] for engine in listing} == {*fleet.engines, fleet.whisper}
        for engine in listing:
            assert engine["healthy"] and engine["last_scrape_error"] is None, engine
            # vLLM's own gauges, read from its /metrics by the router.
            assert engine["engine"] is not None and engine["engine"]["num_requests_running"] == 0

    eventually(scraped)


def test_chat_and_completions_spread_over_both_engines(fleet: Fleet) -> None:
    before = [engine_metric(url, "vllm:request_success_total") for url in fleet.engines]
    api = client(fleet)
    for _ in range(2):
        chat = api.chat.completions.create(model=MODEL, messages=MESSAGES,  # type: ignore[arg-type]
                                           max_tokens=8, temperature=0)
        assert chat.choices[0].message.content
        assert chat.usage is not None and 0 < chat.usage.completion_tokens <= 8
        completion = api.completions.create(model=MODEL, prompt="hello the model",
                                            max_tokens=8, temperature=0)
        assert completion.choices[0].text
    after = [engine_metric(url, "vllm:request_success_total") for url in fleet.engines]
    assert [a - b for a, b in zip(after, before)] == [2, 2]  # round robin, 4 requests


def test_streamed_usage_reaches_the_router_metrics(fleet: Fleet) -> None:
    def tokens() -> float:
        return metric(get_text(fleet.router + "/metrics"), "vllm:output_tokens_total")

    before = tokens()
    stream = client(fleet).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0,  # type: ignore[arg-type]
        stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert pieces and usage is not None
    assert 0 < usage.completion_tokens <= 24
    # Token counts come from the usage in the stream's last bytes, never from parsing chunks.
    eventually(lambda: tokens() - before == usage.completion_tokens)


def test_a_client_that_leaves_mid_stream_aborts_the_request_in_vllm(fleet: Fleet) -> None:
    """vLLM counts no finished request for an abort; what shows it is the tokens: a client
    gone a few tokens into a 480-token answer must leave the engine with a few more generated
    tokens, not 480 (a full answer takes ~2 s here)."""
    engines = fleet.engines

    def total(name: str) -> float:
        return sum(engine_metric(url, name) for url in engines)

    tokens_before = total("vllm:generation_tokens_total")
    finished_before = total("vllm:request_success_total")
    request = urllib.request.Request(
        fleet.router + "/v1/chat/completions",
        data=json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 480,
                         "temperature": 0, "ignore_eos": True, "stream": True}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        for _ in range(3):
            assert response.readline()
    # The connection is closed here, a few tokens into the answer.

    def engines_idle() -> None:
        assert total("vllm:num_requests_running") == 0

    eventually(engines_idle, timeout=30)
    time.sleep(5)  # long enough for the whole answer, had the engine kept generating it
    generated = total("vllm:generation_tokens_total") - tokens_before
    assert 0 < generated < 100, generated
    assert total("vllm:request_success_total") == finished_before
    health = json.loads(get_text(fleet.router + "/health"))
    assert health["in_flight"] == 0, health


def test_a_vllm_error_passes_through_as_its_json(fleet: Fleet) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client(fleet).chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=100_000)  # type: ignore[arg-type]
    error = raised.value
    assert error.status_code == 400
    body = error.response.json()
    assert body["error"]["message"] and body["error"]["type"], body  # vLLM's own words
    assert error.response.headers.get("x-request-id")


def test_an_unknown_model_is_refused_by_the_router(fleet: Fleet) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client(fleet).chat.completions.create(model="no-such-model",
                                              messages=MESSAGES)  # type: ignore[arg-type]
    assert raised.value.response.json()["error"]["code"] == "model_not_found"
