"""No failure of a backend puts a credential, a request header or an address in what a client
reads or in the log: the backend key, an external provider's key and custom header, the
client's cookie and a custom client header all go upstream, then the backend answers with a
head aiohttp rejects, a bad chunk, or is not there at all."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterable
from pathlib import Path

import aiohttp
import pytest
import yaml

from router.config.load import load_config
from router.testing.raw_engine import (
    RawEngine, RawRequest, Script, Step, chunk, http_response,
)
from tests.conftest import StartRouter

BACKEND_KEY = "backendkey-3c0d9e71"
PROVIDER_KEY = "providerkey-58aa2f40"
PROVIDER_HEADER = "providerorg-91be7c22"
CLIENT_KEY = "clientkey-0f6c1d93"
COOKIE = "cookievalue-7d21e4b8"
CUSTOM = "customvalue-e4f03a57"
SECRETS = (BACKEND_KEY, PROVIDER_KEY, PROVIDER_HEADER, CLIENT_KEY, COOKIE, CUSTOM)
PROVIDER_KEY_VARIABLE = "ROUTER_TEST_PROVIDER_KEY"

BAD_ANSWERS: dict[str, list[Step]] = {
    "too many headers": [http_response(200, b"{}", [(f"X-H{n}", "v") for n in range(300)])],
    "header over 8 KiB": [http_response(200, b"{}", [("X-Big", "a" * 9000)])],
    "transfer-encoding and content-length": [http_response(
        200, chunk(b"{}") + chunk(b""),
        [("Transfer-Encoding", "chunked"), ("Content-Length", "2")], length=False,
    )],
    "bad chunk mid-stream": [
        http_response(200, chunk(b'{"a":'), [("Transfer-Encoding", "chunked")], length=False),
        0.1, b"ZZ\r\nxx\r\n",
    ],
    "bad chunk with the head": [http_response(
        200, chunk(b'{"a":') + b"ZZ\r\nxx\r\n", [("Transfer-Encoding", "chunked")],
        length=False,
    )],
}


def answer_with(steps: list[Step]) -> Script:
    def script(request: RawRequest) -> Iterable[Step]:
        return steps

    return script


def providers_file(tmp_path: Path, api_base: str) -> str:
    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump({"external_providers": [{
        "name": "hosted", "type": "openai", "api_base": api_base,
        "api_key_env_var": PROVIDER_KEY_VARIABLE,
        "custom_headers": {"X-Provider-Org": PROVIDER_HEADER},
        "models": [{"id": "gpt-4o"}],
    }]}))
    return str(path)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def ask(url: str, model: str) -> tuple[int, bytes]:
    headers = {
        "Authorization": f"Bearer {CLIENT_KEY}", "Cookie": f"session={COOKIE}",
        "X-Custom-Client": CUSTOM,
    }
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/chat/completions", json=body,
                                headers=headers) as response:
            try:
                return response.status, await response.read()
            except aiohttp.ClientPayloadError:  # the router cut a broken stream
                return response.status, b""


async def failing_router(
    start_router: StartRouter, tmp_path: Path, fleet_url: str, provider_url: str
) -> str:
    argv = [
        "--static-backends", fleet_url, "--static-models", "chat-model",
        "--backend-api-key", BACKEND_KEY, "--api-keys", CLIENT_KEY,
        "--external-providers-config", providers_file(tmp_path, provider_url + "/v1"),
        "--max-retries", "0", "--health-check-interval", "0", "--engine-stats-interval", "0",
    ]
    config = await asyncio.to_thread(load_config, argv)
    return (await start_router(config)).url


def assert_clean(text: str, where: str, *addresses: str) -> None:
    for secret in (*SECRETS, *addresses, "Cannot connect", "RequestInfo", "Bearer"):
        assert secret not in text, f"{secret!r} in the {where}: {text[:2000]}"


@pytest.mark.parametrize("failure", sorted(BAD_ANSWERS))
@pytest.mark.parametrize("model", ["chat-model", "gpt-4o"])
async def test_a_broken_answer_reveals_no_header_key_or_address(
    start_router: StartRouter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, failure: str, model: str,
) -> None:
    monkeypatch.setenv(PROVIDER_KEY_VARIABLE, PROVIDER_KEY)
    steps = BAD_ANSWERS[failure]
    async with RawEngine(answer_with(steps)) as fleet, RawEngine(answer_with(steps)) as provider:
        url = await failing_router(start_router, tmp_path, fleet.url, provider.url)
        with caplog.at_level(logging.DEBUG):
            status, body = await ask(url, model)
            await asyncio.sleep(0.1)  # the access line follows the answer
        engine = fleet if model == "chat-model" else provider
        # The secrets did go upstream: the test would see them if they leaked back.
        sent = engine.requests[0].headers
        if model == "chat-model":
            assert sent["Authorization"] == f"Bearer {BACKEND_KEY}"
            assert COOKIE in sent["Cookie"] and sent["X-Custom-Client"] == CUSTOM
        else:
            assert sent["Authorization"] == f"Bearer {PROVIDER_KEY}"
            assert sent["X-Provider-Org"] == PROVIDER_HEADER
    addresses = (fleet.url.removeprefix("http://"), provider.url.removeprefix("http://"))
    if failure == "bad chunk mid-stream":  # the answer had started: the client's stream is cut
        assert status == 200
    else:
        assert status == 502, body
        assert "sent an invalid response" in body.decode()
    assert_clean(body.decode("utf-8", "replace"), "client's body", *addresses)
    assert_clean(caplog.text, "log", *addresses)
    access = [r.getMessage() for r in caplog.records if r.name == "router.access"]
    assert access and "error=" in access[-1]
    # The log keeps what happened (mid-stream: at once, not when a read timeout fires).
    assert "ClientResponseError" in caplog.text or "ClientPayloadError" in caplog.text


async def test_an_unreachable_backend_is_named_by_its_id_not_its_address(
    start_router: StartRouter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(PROVIDER_KEY_VARIABLE, PROVIDER_KEY)
    port = closed_port()
    url = await failing_router(start_router, tmp_path, f"http://127.0.0.1:{port}",
                               f"http://127.0.0.1:{port}")
    with caplog.at_level(logging.DEBUG):
        for model in ("chat-model", "gpt-4o"):
            status, body = await ask(url, model)
            assert status == 503
            error = body.decode()
            assert "is unreachable" in error
            assert_clean(error, "client's body", f"127.0.0.1:{port}", str(port))
        await asyncio.sleep(0.1)
    assert_clean(caplog.text, "log", f"127.0.0.1:{port}")
    assert "Connection refused" in caplog.text  # the log keeps what happened
