"""External providers: production-stack's file checked key by key, then a provider stand-in (a
fake engine) behind the router beside the local fleet. It gets its own key and never the
client's, streams pass through byte for byte, its models show in `/v1/models`, `/engines`,
health and metrics, and `--service-discovery external-only` runs with no fleet at all."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDictProxy

from router.backends.pool import Backend, BackendPool
from router.config.load import load_config
from router.config.settings import Config, ConfigError
from router.discovery.external import (
    ExternalProvider,
    external_backends,
    load_external_providers,
    merge_aliases,
    parse_external_providers,
)
from router.keys import POOL
from router.serve.reload import Reloader
from router.testing import ENGINE_BEHAVIOUR, ENGINE_STATE, EngineBehaviour, EngineState
from router.testing import RunningEngine, make_engine_app
from router.testing.processes import free_port

from .conftest import RouterUnderTest, StartRouter

KEY_VARIABLE = "ROUTER_TEST_PROVIDER_KEY"
PROVIDER_KEY = "sk-provider-secret"
CLIENT_KEY = "router-client-key"
FLEET_KEY = "fleet-key"
ORG = "org-in-a-custom-header"

INTEGRATED = "kind" in {f.name for f in dataclasses.fields(Backend)}
integration = pytest.mark.skipif(
    not INTEGRATED, reason="needs Backend.kind/headers and the app wiring (issue 8, item 4)"
)

PRODUCTION_STACK_EXAMPLE = """\
external_providers:
  - name: openai
    type: openai
    api_base: https://api.openai.com
    api_key_env_var: ROUTER_TEST_PROVIDER_KEY
    timeout: 30.0
    max_retries: 3
    models:
      - id: gpt-4o
        type: chat
        aliases:
          - gpt4o
      - id: gpt-4o-mini
        type: chat
        aliases:
          - gpt4o-mini
"""


def good() -> dict[str, Any]:
    return {"external_providers": [
        {
            "name": "openai", "type": "openai", "api_base": "https://api.openai.com",
            "api_key_env_var": KEY_VARIABLE, "timeout": 30.0, "max_retries": 2,
            "custom_headers": {"OpenAI-Organization": ORG},
            "models": [{"id": "gpt-4o", "type": "chat", "aliases": ["gpt4o"]},
                       {"id": "gpt-4o-mini"}],
        },
        {
            "name": "together", "type": "openai", "api_base": "https://api.together.xyz/v1/",
            "api_key_env_var": "ROUTER_TEST_OTHER_KEY",
            "models": [{"id": "llama-70b", "type": "completion"}],
        },
    ]}


ENVIRON = {KEY_VARIABLE: PROVIDER_KEY, "ROUTER_TEST_OTHER_KEY": "sk-other"}


# --- the file ---------------------------------------------------------------------------------


def test_production_stack_example_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text(PRODUCTION_STACK_EXAMPLE)
    (provider,) = load_external_providers(str(path), {KEY_VARIABLE: PROVIDER_KEY})
    assert provider.name == "openai" and provider.type == "openai"
    assert provider.url == "https://api.openai.com"
    assert provider.model_ids == ("gpt-4o", "gpt-4o-mini")
    assert provider.aliases == {"gpt4o": "gpt-4o", "gpt4o-mini": "gpt-4o-mini"}
    assert (provider.timeout, provider.max_retries) == (30.0, 3)
    assert provider.headers() == {"Authorization": f"Bearer {PROVIDER_KEY}"}


def test_every_setting_is_read() -> None:
    openai_, together = parse_external_providers(good(), ENVIRON)
    assert openai_.custom_headers == (("OpenAI-Organization", ORG),)
    assert openai_.headers() == {
        "Authorization": f"Bearer {PROVIDER_KEY}", "OpenAI-Organization": ORG,
    }
    assert [(m.id, m.type, m.aliases) for m in openai_.models] == [
        ("gpt-4o", "chat", ("gpt4o",)), ("gpt-4o-mini", "chat", ()),
    ]
    # An SDK-style base (ending in /v1) means the same as production-stack's bare host: the
    # router's request paths start with /v1.
    assert together.url == "https://api.together.xyz"
    assert together.api_key == "sk-other"
    assert together.models[0].type == "completion"


def test_defaults_follow_production_stack() -> None:
    data = {"external_providers": [
        {"name": "p", "type": "openai", "api_base": "http://10.0.0.9:8000/openai",
         "models": [{"id": "m"}], "timeout": None, "custom_headers": None},
    ]}
    (provider,) = parse_external_providers(data, {"OPENAI_API_KEY": "sk-default"})
    assert provider.api_key_env_var == "OPENAI_API_KEY"
    assert provider.api_key == "sk-default"
    assert provider.max_retries == 3
    assert provider.timeout is None  # the router's --read-timeout
    assert provider.url == "http://10.0.0.9:8000/openai"
    assert provider.models[0].type == "chat" and provider.models[0].aliases == ()


def test_keys_stay_out_of_repr() -> None:
    providers = parse_external_providers(good(), ENVIRON)
    text = repr(providers) + repr(Config(aliases={}, **(
        {"external_providers": providers} if INTEGRATED else {}
    )))
    assert PROVIDER_KEY not in text and ORG not in text and "sk-other" not in text


Mutate = Callable[[dict[str, Any]], object]


def provider0(change: Callable[[dict[str, Any]], None]) -> Mutate:
    def mutate(data: dict[str, Any]) -> object:
        change(data["external_providers"][0])
        return data
    return mutate


def model0(change: Callable[[dict[str, Any]], None]) -> Mutate:
    return provider0(lambda provider: change(provider["models"][0]))


def setting(key: str, value: object) -> Mutate:
    return provider0(lambda provider: provider.__setitem__(key, value))


def without(key: str) -> Mutate:
    return provider0(lambda provider: provider.pop(key))


def header(name: str, value: object) -> Mutate:
    return setting("custom_headers", {name: value})


def model_setting(key: str, value: object) -> Mutate:
    return model0(lambda model: model.__setitem__(key, value))


def second_provider(change: Callable[[dict[str, Any]], None]) -> Mutate:
    def mutate(data: dict[str, Any]) -> object:
        change(data["external_providers"][1])
        return data
    return mutate


EP0 = "external_providers[0]"
BAD_FILES: dict[str, tuple[Mutate, str]] = {
    # id: (how the good file is spoiled, what the error must say: the key first)
    "top-is-a-list": (lambda data: data["external_providers"],
                      "expected a mapping with the key 'external_providers'"),
    "unknown-top-key": (lambda data: {**data, "providers": []}, "providers: unknown key"),
    "no-providers": (lambda data: {}, "external_providers: expected a non-empty list"),
    "empty-providers": (lambda data: {"external_providers": []},
                        "external_providers: expected a non-empty list"),
    "provider-not-a-mapping": (lambda data: {"external_providers": ["openai"]},
                               f"{EP0}: expected a mapping"),
    "unknown-provider-key": (setting("api_key_env", "X"), f"{EP0}.api_key_env: unknown key"),
    "no-name": (without("name"), f"{EP0}.name: required"),
    "name-not-a-string": (setting("name", 7), f"{EP0}.name: expected a non-empty string"),
    "name-with-a-space": (setting("name", "my provider"), f"{EP0}.name: 'my provider' is not"),
    "two-providers-one-name": (second_provider(lambda p: p.__setitem__("name", "openai")),
                               "two providers are named 'openai'"),
    "no-type": (without("type"), f"{EP0}.type: required"),
    "unknown-type": (setting("type", "anthropic"), f"{EP0}.type: unknown provider type"),
    "no-api-base": (without("api_base"), f"{EP0}.api_base: required"),
    "api-base-not-http": (setting("api_base", "ftp://api.openai.com"),
                          f"{EP0}.api_base: not an http(s) URL"),
    "api-base-with-a-query": (setting("api_base", "https://api.openai.com/v1?key=1"),
                              f"{EP0}.api_base: a backend URL has no query"),
    "api-base-with-credentials": (setting("api_base", "https://u:p@api.openai.com"),
                                  f"{EP0}.api_base: a backend URL has no query, fragment or "
                                  "credentials"),
    "key-variable-not-a-string": (setting("api_key_env_var", 5),
                                  f"{EP0}.api_key_env_var: expected a non-empty string"),
    "key-variable-unset": (setting("api_key_env_var", "ROUTER_TEST_UNSET"),
                           f"{EP0}.api_key_env_var: environment variable ROUTER_TEST_UNSET "
                           "is not set"),
    "key-variable-empty": (setting("api_key_env_var", "ROUTER_TEST_EMPTY"),
                           f"{EP0}.api_key_env_var: environment variable ROUTER_TEST_EMPTY"),
    "timeout-zero": (setting("timeout", 0), f"{EP0}.timeout: expected a positive number"),
    "timeout-negative": (setting("timeout", -1.5), f"{EP0}.timeout: expected a positive"),
    "timeout-text": (setting("timeout", "30s"), f"{EP0}.timeout: expected a positive number"),
    "timeout-bool": (setting("timeout", True), f"{EP0}.timeout: expected a positive number"),
    "timeout-infinite": (setting("timeout", float("inf")), f"{EP0}.timeout: expected"),
    "max-retries-negative": (setting("max_retries", -1), f"{EP0}.max_retries: expected a whole"),
    "max-retries-fraction": (setting("max_retries", 1.5), f"{EP0}.max_retries: expected"),
    "max-retries-bool": (setting("max_retries", False), f"{EP0}.max_retries: expected"),
    "headers-not-a-mapping": (setting("custom_headers", ["X-A: b"]),
                              f"{EP0}.custom_headers: expected a mapping"),
    "header-name-with-a-space": (header("Bad Header", "x"),
                                 f"{EP0}.custom_headers.Bad Header: 'Bad Header' is not an HTTP"),
    "header-authorization": (header("authorization", "Bearer mine"),
                             f"{EP0}.custom_headers.authorization: the provider's "
                             "Authorization comes from api_key_env_var"),
    "header-host": (header("Host", "evil.example"),
                    f"{EP0}.custom_headers.Host: the router sets this header itself"),
    "header-content-length": (header("Content-Length", "3"), "the router sets this header"),
    "header-twice": (setting("custom_headers", {"X-A": "1", "x-a": "2"}),
                     f"{EP0}.custom_headers.x-a: given twice (also as 'X-A')"),
    "header-value-a-mapping": (header("X-A", {"b": 1}),
                               f"{EP0}.custom_headers.X-A: expected a string value"),
    "header-value-a-bool": (header("X-A", True), "(quote it)"),
    "header-value-smuggles-a-line": (header("X-A", "a\r\nX-B: b"),
                                     f"{EP0}.custom_headers.X-A: a header value cannot hold"),
    "no-models": (without("models"), f"{EP0}.models: expected a non-empty list"),
    "empty-models": (setting("models", []), f"{EP0}.models: expected a non-empty list"),
    "model-not-a-mapping": (setting("models", ["gpt-4o"]),
                            f"{EP0}.models[0]: expected a mapping"),
    "unknown-model-key": (model_setting("name", "GPT"), f"{EP0}.models[0].name: unknown key"),
    "model-without-id": (model0(lambda model: model.pop("id")), f"{EP0}.models[0].id: required"),
    "model-id-empty": (model_setting("id", " "), f"{EP0}.models[0].id: expected a non-empty"),
    "model-type-not-a-string": (model_setting("type", 3),
                                f"{EP0}.models[0].type: expected a non-empty string"),
    "aliases-not-a-list": (model_setting("aliases", "gpt4o"),
                           f"{EP0}.models[0].aliases: expected a list"),
    "alias-not-a-string": (model_setting("aliases", [4]),
                           f"{EP0}.models[0].aliases[0]: expected a non-empty string"),
    "model-of-two-providers": (
        second_provider(lambda p: p.__setitem__("models", [{"id": "gpt-4o"}])),
        "external_providers.models: model 'gpt-4o' is listed by 'openai' and 'together'",
    ),
    "model-twice-in-a-provider": (
        setting("models", [{"id": "gpt-4o"}, {"id": "gpt-4o"}]),
        "model 'gpt-4o' is listed by 'openai' and 'openai'",
    ),
    "alias-names-a-model": (
        model_setting("aliases", ["gpt-4o-mini"]),
        "external_providers.models.aliases: alias 'gpt-4o-mini' of 'gpt-4o' ('openai') is "
        "already a model or alias of 'openai'",
    ),
    "alias-of-two-providers": (
        second_provider(lambda p: p["models"][0].__setitem__("aliases", ["gpt4o"])),
        "alias 'gpt4o' of 'llama-70b' ('together') is already a model or alias of 'openai'",
    ),
}


@pytest.mark.parametrize("spoil,expected", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_file_is_refused_naming_the_key(spoil: Mutate, expected: str) -> None:
    data = spoil(copy.deepcopy(good()))
    environ = {**ENVIRON, "ROUTER_TEST_EMPTY": ""}
    with pytest.raises(ConfigError) as refused:
        parse_external_providers(data, environ, "external providers config p.yaml")
    message = str(refused.value)
    assert message.startswith("external providers config p.yaml: ")
    assert expected in message
    assert "\n" not in message


def test_unreadable_or_broken_file_is_refused_naming_the_flag(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="--external-providers-config: .*absent.yaml"):
        load_external_providers(str(missing), ENVIRON)
    broken = tmp_path / "broken.yaml"
    broken.write_text("external_providers: [\n  - name: a\n")
    with pytest.raises(ConfigError, match="--external-providers-config: .*broken.yaml") as e:
        load_external_providers(str(broken), ENVIRON)
    assert "\n" not in str(e.value)


def test_provider_names_may_not_shadow_local_names() -> None:
    providers = parse_external_providers(good(), ENVIRON)
    assert merge_aliases({"fast": "llama-8b"}, providers, {"llama-8b"}) == {
        "fast": "llama-8b", "gpt4o": "gpt-4o",
    }
    with pytest.raises(ConfigError, match="'gpt-4o' of provider 'openai' is also a model of "
                                          "--static-backends"):
        merge_aliases({}, providers, {"gpt-4o"})
    with pytest.raises(ConfigError, match="'gpt4o' of provider 'openai' is also a model"):
        merge_aliases({}, providers, {"gpt4o"})
    with pytest.raises(ConfigError, match="'gpt4o' of provider 'openai' is also a "
                                          "--static-aliases alias"):
        merge_aliases({"gpt4o": "llama-8b"}, providers, {"llama-8b"})


# --- the backends -----------------------------------------------------------------------------


@integration
def test_each_provider_is_one_fixed_external_backend() -> None:
    providers = parse_external_providers(good(), ENVIRON)
    hosted, together = external_backends(providers)
    assert (hosted.id, hosted.kind, hosted.url) == ("openai", "external", "https://api.openai.com")
    assert hosted.models == ("gpt-4o", "gpt-4o-mini")
    assert hosted.headers == {"Authorization": f"Bearer {PROVIDER_KEY}",
                              "OpenAI-Organization": ORG}
    assert (hosted.read_timeout, hosted.max_retries) == (30.0, 2)
    assert (together.read_timeout, together.max_retries) == (None, 3)
    assert PROVIDER_KEY not in repr(hosted)
    # Discovery replaces what it finds; the providers stay.
    pool = BackendPool(fixed=[hosted, together])
    local = Backend(url="http://10.0.0.7:8000", models=("llama-8b",))
    pool.replace([local])
    assert pool.backends == (local, hosted, together)
    pool.replace([])
    assert pool.models() == ["gpt-4o", "gpt-4o-mini", "llama-70b"]


# --- the router with a provider stand-in ------------------------------------------------------


@dataclass
class Provider:
    """A fake engine standing in for a hosted API; records what every request carried."""

    url: str
    app: web.Application
    server: TestServer
    seen: list[tuple[str, CIMultiDictProxy[str]]] = field(default_factory=list)

    @property
    def state(self) -> EngineState:
        return self.app[ENGINE_STATE]

    @property
    def behaviour(self) -> EngineBehaviour:
        return self.app[ENGINE_BEHAVIOUR]

    def asked(self, what: str) -> list[CIMultiDictProxy[str]]:
        """Headers of the requests for `what` ("GET /v1/models")."""
        return [headers for request, headers in self.seen if request == what]


@pytest.fixture
async def provider(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Provider:
    app = make_engine_app(["gpt-4o", "gpt-4o-mini"], name="provider")
    seen: list[tuple[str, CIMultiDictProxy[str]]] = []

    async def record(request: web.Request, response: web.StreamResponse) -> None:
        seen.append((f"{request.method} {request.path}", request.headers))

    app.on_response_prepare.append(record)
    server = await aiohttp_server(app)
    return Provider(str(server.make_url("")).rstrip("/"), app, server, seen)


def providers_file(tmp_path: Path, api_base: str, **settings: object) -> str:
    """A file with one provider, `hosted`, at `api_base` (SDK style, ending in /v1)."""
    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump({"external_providers": [{
        "name": "hosted", "type": "openai", "api_base": api_base,
        "api_key_env_var": KEY_VARIABLE, "custom_headers": {"X-Provider-Org": ORG},
        "models": [{"id": "gpt-4o", "aliases": ["gpt4o"]}, {"id": "gpt-4o-mini"}],
        **settings,
    }]}))
    return str(path)


def fleet_flags(engines: list[RunningEngine]) -> list[str]:
    return [
        "--static-backends", ",".join(engine.url for engine in engines),
        "--static-models", ",".join("chat-model;whisper-model" for _ in engines),
        "--backend-api-key", FLEET_KEY, "--api-keys", CLIENT_KEY,
    ]


async def start_with(start_router: StartRouter, argv: list[str]) -> RouterUnderTest:
    """The router as `router ARGV` would build it; the files are read off the event loop."""
    config = await asyncio.to_thread(load_config, argv)
    return await start_router(config)


@pytest.fixture
def provider_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_VARIABLE, PROVIDER_KEY)
    return PROVIDER_KEY


def client(**headers: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(headers={"Authorization": f"Bearer {CLIENT_KEY}", **headers})


CHAT_BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@integration
@pytest.mark.parametrize("forward_client_auth", [False, True])
async def test_provider_gets_its_key_and_never_the_clients(
    start_router: StartRouter, engines: list[RunningEngine], provider: Provider,
    provider_key: str, tmp_path: Path, forward_client_auth: bool,
) -> None:
    argv = [*fleet_flags(engines), "--external-providers-config",
            providers_file(tmp_path, provider.url + "/v1")]
    router = await start_with(
        start_router, argv + (["--forward-client-auth"] if forward_client_auth else []))
    credentials = {"api-key": "client-azure-key", "Cookie": "session=client"}
    async with client(**credentials) as http:
        for model in ("gpt-4o", "chat-model"):
            async with http.post(router.url + "/v1/chat/completions",
                                 json={"model": model, **CHAT_BODY}) as response:
                assert response.status == 200, await response.text()
    sent = provider.state.last_headers
    assert sent is not None
    assert sent.getall("Authorization") == [f"Bearer {PROVIDER_KEY}"]
    assert sent["X-Provider-Org"] == ORG
    assert "api-key" not in sent and "Cookie" not in sent
    assert CLIENT_KEY not in str(dict(sent)) and FLEET_KEY not in str(dict(sent))
    assert provider.state.last_path == "/v1/chat/completions"  # api_base's /v1 not doubled
    # The fleet keeps what it always got.
    local = [engine.state.last_headers for engine in engines if engine.state.last_headers]
    assert [h["Authorization"] for h in local] == [
        f"Bearer {CLIENT_KEY if forward_client_auth else FLEET_KEY}"
    ]
    await router.settled(2)


@integration
async def test_stream_from_the_provider_passes_through_unchanged(
    start_router: StartRouter, engines: list[RunningEngine], provider: Provider,
    provider_key: str, tmp_path: Path,
) -> None:
    argv = [*fleet_flags(engines), "--external-providers-config",
            providers_file(tmp_path, provider.url + "/v1")]
    router = await start_with(start_router, argv)
    provider.behaviour.token_delay = 0.1
    body = {"model": "gpt-4o", **CHAT_BODY, "stream": True,
            "stream_options": {"include_usage": True}}
    received = b""
    provider_open_at_first_chunk = None
    async with client() as http:
        async with http.post(router.url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/event-stream"
            assert response.headers["x-router-backend"] == "hosted"
            async for chunk in response.content.iter_any():
                if provider_open_at_first_chunk is None:
                    provider_open_at_first_chunk = provider.state.open
                received += chunk
    # Not buffered: the first bytes came while the provider was still generating; and every
    # byte the provider wrote arrived, nothing added.
    assert provider_open_at_first_chunk == 1
    assert len(received) == provider.state.bytes_sent
    events = [line[6:] for line in received.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.split() == ["tok0", "tok1", "tok2", "tok3"]
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    await router.settled(1)
    flow = router.log.only()
    assert flow.backend is not None and flow.backend.id == "hosted"
    assert flow.bytes_down == len(received)


@integration
async def test_openai_sdk_reaches_the_provider_through_an_alias(
    start_router: StartRouter, engines: list[RunningEngine], provider: Provider,
    provider_key: str, tmp_path: Path,
) -> None:
    argv = [*fleet_flags(engines), "--external-providers-config",
            providers_file(tmp_path, provider.url + "/v1")]
    router = await start_with(start_router, argv)
    sdk = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    stream = await sdk.chat.completions.create(
        model="gpt4o", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True)
    pieces = [c.choices[0].delta.content async for c in stream
              if c.choices and c.choices[0].delta.content]
    assert "".join(pieces).split() == ["tok0", "tok1", "tok2"]
    assert provider.state.last_json is not None
    assert provider.state.last_json["model"] == "gpt-4o"  # the provider's own name for it
    await router.settled(1)


@integration
async def test_models_lists_provider_models_beside_local_ones(
    start_router: StartRouter, engines: list[RunningEngine], provider: Provider,
    provider_key: str, tmp_path: Path,
) -> None:
    argv = [*fleet_flags(engines), "--external-providers-config",
            providers_file(tmp_path, provider.url + "/v1")]
    router = await start_with(start_router, argv)
    async with client() as http:
        async with http.get(router.url + "/v1/models") as response:
            listing = await response.json()
    roots = {entry["id"]: entry["root"] for entry in listing["data"]}
    assert roots == {
        "chat-model": "chat-model", "whisper-model": "whisper-model",
        "gpt-4o": "gpt-4o", "gpt-4o-mini": "gpt-4o-mini", "gpt4o": "gpt-4o",
    }


def sample(exposition: str, name: str, labels: set[str]) -> float | None:
    """The value of the series `name` whose labels include `labels`, in any order."""
    for line in exposition.splitlines():
        series, _, value = line.rpartition(" ")
        if series.startswith(name + "{") and labels <= set(series[len(name) + 1:-1].split(",")):
            return float(value)
    return None


@integration
async def test_engines_health_and_metrics_show_the_provider_without_its_key(
    start_router: StartRouter, engines: list[RunningEngine], provider: Provider,
    provider_key: str, tmp_path: Path,
) -> None:
    argv = [*fleet_flags(engines), "--external-providers-config",
            providers_file(tmp_path, provider.url + "/v1"),
            "--health-check-interval", "0.05", "--engine-stats-interval", "0.05"]
    router = await start_with(start_router, argv)
    async with client() as http:
        async with http.post(router.url + "/v1/chat/completions",
                             json={"model": "gpt-4o", **CHAT_BODY}) as response:
            assert response.status == 200

        async def engines_listing() -> dict[str, Any]:
            async with http.get(router.url + "/engines") as response:
                text = await response.text()
            assert PROVIDER_KEY not in text and ORG not in text
            listing: list[dict[str, Any]] = json.loads(text)
            return {entry["id"]: entry for entry in listing}

        deadline = time.monotonic() + 3
        while True:
            listed = await engines_listing()
            local = [entry for entry in listed.values() if entry["kind"] == "engine"]
            if (listed["hosted"]["probe_ok"] and all(entry["engine"] for entry in local)
                    and len(provider.asked("GET /v1/models")) >= 2):
                break
            assert time.monotonic() < deadline, listed
            await asyncio.sleep(0.05)
        hosted = listed["hosted"]
        assert hosted["kind"] == "external" and hosted["url"] == provider.url
        assert hosted["models"] == ["gpt-4o", "gpt-4o-mini"] and hosted["healthy"] is True
        assert hosted["engine"] is None and hosted["last_scrape_error"] is None
        # Probed at /v1/models with its own key; never scraped for /metrics it does not have.
        for probe in provider.asked("GET /v1/models"):
            assert probe.getall("Authorization") == [f"Bearer {PROVIDER_KEY}"]
            assert probe["X-Provider-Org"] == ORG
        assert not provider.asked("GET /health") and not provider.asked("GET /metrics")

        async with http.get(router.url + "/metrics") as response:
            metrics = await response.text()
        labels = {f'server="{provider.url}"', 'model="gpt-4o"'}
        assert sample(metrics, "vllm:healthy_pods_total", labels) == 1.0
        assert sample(metrics, "vllm:num_incoming_requests_total", labels) == 1.0

        # The provider goes away: its probe ejects it, and its models answer 503.
        await provider.server.close()
        deadline = time.monotonic() + 3
        while (await engines_listing())["hosted"]["healthy"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        hosted = (await engines_listing())["hosted"]
        assert "cannot connect" in hosted["last_probe_error"]
        async with http.post(router.url + "/v1/chat/completions",
                             json={"model": "gpt-4o", **CHAT_BODY}) as response:
            assert response.status == 503
        async with http.post(router.url + "/v1/chat/completions",
                             json={"model": "chat-model", **CHAT_BODY}) as response:
            assert response.status == 200


@integration
@pytest.mark.parametrize("max_retries,attempts", [(0, 0), (1, 1), (5, 2)])
async def test_failed_provider_attempts_are_retried_on_the_provider(
    start_router: StartRouter, engines: list[RunningEngine], provider_key: str,
    tmp_path: Path, max_retries: int, attempts: int,
) -> None:
    # Nothing listens there. A provider is one backend, so its own max_retries (bounded by the
    # router's --max-retries, 2 here) retries it rather than another backend.
    dead = f"http://127.0.0.1:{free_port()}/v1"
    argv = [*fleet_flags(engines), "--external-providers-config",
            providers_file(tmp_path, dead, max_retries=max_retries),
            "--health-check-interval", "0", "--max-retries", "2", "--retry-backoff", "0"]
    router = await start_with(start_router, argv)
    async with client() as http:
        async with http.post(router.url + "/v1/chat/completions",
                             json={"model": "gpt-4o", **CHAT_BODY}) as response:
            assert response.status == 503
    await router.settled(1)
    flow = router.log.only()
    assert [attempt.backend.id for attempt in flow.attempts] == ["hosted"] * attempts


@integration
async def test_provider_timeout_replaces_the_read_timeout_for_it_only(
    start_router: StartRouter, engines: list[RunningEngine], provider: Provider,
    provider_key: str, tmp_path: Path,
) -> None:
    argv = [*fleet_flags(engines), "--external-providers-config",
            providers_file(tmp_path, provider.url, timeout=0.3, max_retries=0),
            "--read-timeout", "600"]
    router = await start_with(start_router, argv)
    provider.behaviour.headers_delay = 2.0
    for engine in engines:
        engine.behaviour.headers_delay = 0.5  # beyond the provider's timeout, within ours
    async with client() as http:
        started = time.monotonic()
        async with http.post(router.url + "/v1/chat/completions",
                             json={"model": "gpt-4o", **CHAT_BODY}) as response:
            assert response.status == 504
        assert time.monotonic() - started < 1.5
        async with http.post(router.url + "/v1/chat/completions",
                             json={"model": "chat-model", **CHAT_BODY}) as response:
            assert response.status == 200
    await router.settled(2)


@integration
async def test_reload_of_the_fleet_keeps_the_provider(
    start_router: StartRouter, engines: list[RunningEngine], provider: Provider,
    provider_key: str, tmp_path: Path,
) -> None:
    file = providers_file(tmp_path, provider.url + "/v1")
    router = await start_with(
        start_router, [*fleet_flags(engines), "--external-providers-config", file])
    smaller = await asyncio.to_thread(
        load_config, [*fleet_flags(engines[:1]), "--external-providers-config", file])
    Reloader(router.app, lambda: smaller).apply(smaller)
    pool = router.app[POOL]
    assert [b.url for b in pool.backends] == [engines[0].url, provider.url]
    assert pool.resolve("gpt4o") == "gpt-4o"


@integration
async def test_external_only_runs_with_no_local_fleet(
    start_router: StartRouter, provider: Provider, provider_key: str, tmp_path: Path,
) -> None:
    argv = ["--service-discovery", "external-only",
            "--external-providers-config", providers_file(tmp_path, provider.url + "/v1")]
    router = await start_with(start_router, argv)
    async with aiohttp.ClientSession() as http:
        async with http.get(router.url + "/v1/models") as response:
            assert [e["id"] for e in (await response.json())["data"]] == [
                "gpt-4o", "gpt-4o-mini", "gpt4o"]
        async with http.get(router.url + "/ready") as response:
            assert response.status == 200
        async with http.get(router.url + "/engines") as response:
            listed = await response.json()
        assert [(e["id"], e["kind"]) for e in listed] == [("hosted", "external")]
        async with http.post(router.url + "/v1/chat/completions",
                             json={"model": "gpt-4o-mini", **CHAT_BODY}) as response:
            assert response.status == 200
            assert (await response.json())["choices"][0]["message"]["content"] == (
                "tok0 tok1 tok2 tok3")
        async with http.post(router.url + "/v1/chat/completions",
                             json={"model": "chat-model", **CHAT_BODY}) as response:
            assert response.status == 404
    await router.settled(2)


@integration
@pytest.mark.parametrize("argv,expected", [
    (["--service-discovery", "external-only"],
     "--service-discovery: external-only needs --external-providers-config"),
    (["--service-discovery", "external-only", "--external-providers-config", "{file}",
      "--static-backends", "http://10.0.0.7:8000", "--static-models", "m"],
     "--service-discovery: external-only runs no local fleet"),
    (["--external-providers-config", "{file}",
      "--static-backends", "http://10.0.0.7:8000", "--static-models", "gpt-4o"],
     "--external-providers-config: 'gpt-4o' of provider 'hosted' is also a model of "
     "--static-backends"),
    (["--external-providers-config", "{file}", "--static-aliases", "gpt4o:m",
      "--static-backends", "http://10.0.0.7:8000", "--static-models", "m"],
     "'gpt4o' of provider 'hosted' is also a --static-aliases alias"),
    (["--external-providers-config", "{missing}", "--demo"],
     "--external-providers-config: "),
    (["--external-providers-config", "{file}"],
     "--static-backends: required (or use --demo or --service-discovery external-only)"),
], ids=["external-only-without-file", "external-only-with-fleet", "model-shadows-local",
        "alias-shadows-static-alias", "missing-file", "no-fleet-in-static-mode"])
def test_bad_flags_name_the_flag(
    tmp_path: Path, provider_key: str, argv: list[str], expected: str
) -> None:
    file = providers_file(tmp_path, "https://api.example.com/v1")
    argv = [arg.format(file=file, missing=tmp_path / "absent.yaml") for arg in argv]
    with pytest.raises(ConfigError, match="argument ") as refused:
        load_config(argv)
    assert expected in str(refused.value)


@integration
def test_unset_key_variable_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_VARIABLE, raising=False)
    file = providers_file(tmp_path, "https://api.example.com/v1")
    with pytest.raises(ConfigError, match=f"environment variable {KEY_VARIABLE} is not set"):
        load_config(["--service-discovery", "external-only",
                     "--external-providers-config", file])


def test_loaded_providers_compare_equal(tmp_path: Path) -> None:
    """A reload that reads the same file finds nothing changed (no restart warning)."""
    path = tmp_path / "providers.yaml"
    path.write_text(PRODUCTION_STACK_EXAMPLE)
    first: tuple[ExternalProvider, ...] = load_external_providers(str(path), ENVIRON)
    assert first == load_external_providers(str(path), ENVIRON)
