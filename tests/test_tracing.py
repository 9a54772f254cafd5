"""OpenTelemetry tracing (--otel-endpoint): spans at a loopback OTLP receiver, through a router."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

# Imported here, not first by the router in a test: this module's import runs the SDK's
# `Resource.create`, which waits for a thread pool. A router pays that once at start, before
# it listens; in a test blockbuster would take it for a blocked event loop.
import opentelemetry.exporter.otlp.proto.grpc.trace_exporter  # noqa: F401
from aiohttp.test_utils import TestServer, make_mocked_request
from blockbuster import BlockBuster

from router.backends.pool import Backend
from router.config.load import load_config
from router.config.settings import ConfigError
from router.flow import Outcome, RequestFlow
from router.observe.tracing import OtlpTarget, Tracer, otlp_target
from router.testing import RunningEngine

from .conftest import CHAT, RouterUnderTest, StartRouter, config_for
from .otlp_receiver import OtlpReceiver, ReceivedSpan

BODY = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
ROUTE = "/v1/chat/completions"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
ROOT = Path(__file__).absolute().parent.parent


@pytest.fixture
async def receiver(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> OtlpReceiver:
    """An OTLP/HTTP receiver; its base URL is `receiver.url`."""
    otlp = OtlpReceiver()
    server = await aiohttp_server(otlp.app())
    otlp.url = f"http://127.0.0.1:{server.port}"
    return otlp


async def traced_router(
    start_router: StartRouter, engines: list[RunningEngine], receiver: OtlpReceiver,
    **overrides: Any,
) -> RouterUnderTest:
    return await start_router(config_for(
        engines, otel_endpoint=receiver.url, health_check_interval=0, engine_stats_interval=0,
        **overrides,
    ))


async def post(
    router: RouterUnderTest, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, str, bytes]:
    """Status, request id and body of one request."""
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + ROUTE, json=body, headers=headers) as response:
            return response.status, response.headers["x-request-id"], await response.read()


async def exported(router: RouterUnderTest, receiver: OtlpReceiver, flows: int,
                   count: int | None = None) -> list[ReceivedSpan]:
    """Stop the router once `flows` requests are over (its cleanup exports the spans still
    queued) and return the spans: by default one per request, plus one per attempt on a
    backend."""
    await router.settled(flows)
    await router.server.close()
    if count is None:
        count = sum(1 + (flow.backend is not None) + len(flow.attempts)
                    for flow in router.log.flows.values())
    spans = await receiver.wait_for(count)
    assert len(spans) == count, spans
    return spans


def only(spans: list[ReceivedSpan], kind: str) -> ReceivedSpan:
    found = [span for span in spans if span.kind == kind]
    assert len(found) == 1, spans
    return found[0]


def traceparent(headers: Any) -> tuple[str, str, bool]:
    """Trace id, parent span id and sampled flag of the `traceparent` an engine received."""
    values = headers.getall("traceparent")
    assert len(values) == 1, values  # ours replaced the client's, never beside it
    version, trace_id, parent, flags = values[0].split("-")
    assert version == "00"
    return trace_id, parent, bool(int(flags, 16) & 1)


def served(engines: list[RunningEngine]) -> RunningEngine:
    found = [engine for engine in engines if engine.state.completed]
    assert len(found) == 1
    return found[0]


# --------------------------------------------------------------------------- end to end


async def test_a_streamed_request_gives_a_server_span_with_a_client_child(
    start_router: StartRouter, engines: list[RunningEngine], receiver: OtlpReceiver
) -> None:
    router = await traced_router(start_router, engines, receiver)
    status, request_id, body = await post(router, {**BODY, "stream": True})
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    spans = await exported(router, receiver, 1)
    server, client = only(spans, "SERVER"), only(spans, "CLIENT")
    engine = served(engines)
    flow = router.log.only()
    assert flow.backend is not None

    assert server.name == client.name == "POST /v1/chat/completions"
    assert server.service_name == "router"
    assert server.parent_span_id == ""  # no traceparent came in: a new trace
    assert server.status == client.status == "UNSET"
    assert server.events == ("first_token",)
    attributes = server.attributes
    assert {key: attributes[key] for key in (
        "http.request.method", "http.route", "http.response.status_code",
        "gen_ai.request.model", "router.request_id", "router.stream", "router.backend.id",
        "router.backend.url", "router.outcome", "router.retries",
    )} == {
        "http.request.method": "POST", "http.route": ROUTE, "http.response.status_code": 200,
        "gen_ai.request.model": CHAT, "router.request_id": request_id, "router.stream": True,
        "router.backend.id": flow.backend.id, "router.backend.url": engine.url,
        "router.outcome": "ok", "router.retries": 0,
    }
    ttft, duration = attributes["router.ttft_s"], attributes["router.duration_s"]
    assert isinstance(ttft, float) and isinstance(duration, float) and 0 < ttft <= duration
    assert abs((server.end_ns - server.start_ns) / 1e9 - duration) < 0.001

    assert (client.trace_id, client.parent_span_id) == (server.trace_id, server.span_id)
    assert client.attributes == {
        "http.request.method": "POST", "url.full": engine.url + ROUTE,
        "router.backend.id": flow.backend.id, "router.attempt": 1,
        "http.response.status_code": 200,
    }
    assert server.start_ns <= client.start_ns <= client.end_ns <= server.end_ns
    # The engine continues the trace under the client span.
    assert traceparent(engine.state.last_headers) == (server.trace_id, client.span_id, True)


async def test_an_incoming_traceparent_is_continued(
    start_router: StartRouter, engines: list[RunningEngine], receiver: OtlpReceiver
) -> None:
    router = await traced_router(start_router, engines, receiver)
    client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    async with client:
        answer = await client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            extra_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
                           "tracestate": "vendor=abc,other=1"},
        )
    assert answer.choices[0].message.content
    spans = await exported(router, receiver, 1)
    server, upstream = only(spans, "SERVER"), only(spans, "CLIENT")
    assert server.trace_id == upstream.trace_id == CLIENT_TRACE
    assert server.parent_span_id == CLIENT_SPAN
    assert upstream.parent_span_id == server.span_id
    assert server.trace_state == upstream.trace_state == "vendor=abc,other=1"
    assert server.attributes["router.stream"] is False
    headers = served(engines).state.last_headers
    assert traceparent(headers) == (CLIENT_TRACE, upstream.span_id, True)
    assert headers is not None and headers.getall("tracestate") == ["vendor=abc,other=1"]


async def test_an_unsampled_trace_is_passed_on_but_not_exported(
    start_router: StartRouter, engines: list[RunningEngine], receiver: OtlpReceiver
) -> None:
    router = await traced_router(start_router, engines, receiver)
    status, _, _ = await post(router, BODY, {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"})
    assert status == 200
    trace_id, parent, sampled = traceparent(served(engines).state.last_headers)
    assert (trace_id, sampled) == (CLIENT_TRACE, False) and parent != CLIENT_SPAN
    # A sampled request after it: the export works, and holds that one only.
    assert (await post(router, BODY))[0] == 200
    spans = await exported(router, receiver, 2, count=2)
    assert all(span.trace_id != CLIENT_TRACE for span in spans)


async def test_a_broken_traceparent_starts_a_new_trace_without_the_clients_tracestate(
    start_router: StartRouter, engines: list[RunningEngine], receiver: OtlpReceiver
) -> None:
    router = await traced_router(start_router, engines, receiver)
    status, _, _ = await post(router, BODY, {"traceparent": "00-nothex-00f067aa0ba902b7-01",
                                             "tracestate": "vendor=stale"})
    assert status == 200
    spans = await exported(router, receiver, 1)
    server, client = only(spans, "SERVER"), only(spans, "CLIENT")
    assert server.parent_span_id == "" and server.trace_state == ""
    headers = served(engines).state.last_headers
    assert traceparent(headers) == (server.trace_id, client.span_id, True)
    assert headers is not None and headers.getall("tracestate") == [""]


async def test_a_retry_gives_two_client_spans_under_one_server_span(
    start_router: StartRouter, engines: list[RunningEngine], receiver: OtlpReceiver
) -> None:
    draining, healthy = engines
    draining.behaviour.fail_status = 503
    router = await traced_router(start_router, engines, receiver, retry_backoff=0.01)
    # Round robin starts one of any two requests on the draining engine: stop at that one,
    # so the engines' last requests are its attempts.
    for sent in range(1, 3):
        assert (await post(router, BODY))[0] == 200
        await router.settled(sent)
        if any(flow.attempts for flow in router.log.flows.values()):
            break
    spans = await exported(router, receiver, sent)
    retried = next(flow for flow in router.log.flows.values() if flow.attempts)
    server = next(span for span in spans if span.kind == "SERVER"
                  and span.attributes["router.request_id"] == retried.id)
    first, second = sorted(
        (span for span in spans if span.parent_span_id == server.span_id),
        key=lambda span: span.start_ns,
    )
    assert first.kind == second.kind == "CLIENT" and first.trace_id == server.trace_id
    assert first.attributes["router.attempt"] == 1 and second.attributes["router.attempt"] == 2
    assert first.attributes["router.backend.id"] == retried.attempts[0].backend.id
    assert first.attributes["url.full"] == draining.url + ROUTE
    assert first.status == "ERROR" and first.attributes["error.type"] == "backend_error"
    assert "503" in first.status_message
    assert "http.response.status_code" not in first.attributes
    assert second.attributes["url.full"] == healthy.url + ROUTE
    assert second.status == "UNSET" and second.attributes["http.response.status_code"] == 200
    assert first.end_ns <= second.start_ns
    assert server.status == "UNSET" and server.attributes["router.retries"] == 1
    assert server.attributes["router.backend.url"] == healthy.url
    # Each engine was told its own attempt's span as the parent.
    assert traceparent(draining.state.last_headers) == (server.trace_id, first.span_id, True)
    assert traceparent(healthy.state.last_headers)[0] == server.trace_id


async def test_refused_and_failed_requests_get_their_status_on_the_spans(
    start_router: StartRouter, engines: list[RunningEngine], receiver: OtlpReceiver
) -> None:
    router = await traced_router(start_router, engines, receiver)
    status, _, _ = await post(router, {**BODY, "model": "no-such-model"})
    assert status == 404
    for engine in engines:
        engine.behaviour.fail_status = 500  # not retried: passed on as it is
    assert (await post(router, BODY))[0] == 500
    spans = await exported(router, receiver, 2)
    refused, failed = sorted((span for span in spans if span.kind == "SERVER"),
                             key=lambda span: span.start_ns)
    # Refused before routing: no backend, no client span; a 4xx is no server error.
    assert refused.status == "UNSET" and refused.attributes["router.outcome"] == "rejected"
    assert refused.attributes["http.response.status_code"] == 404
    assert "router.backend.id" not in refused.attributes
    assert not [span for span in spans if span.parent_span_id == refused.span_id]
    client = only(spans, "CLIENT")
    assert client.parent_span_id == failed.span_id
    assert failed.status == client.status == "ERROR"
    assert failed.attributes["error.type"] == client.attributes["error.type"] == "500"
    assert client.attributes["http.response.status_code"] == 500


async def test_a_backend_failing_mid_stream_marks_both_spans(
    start_router: StartRouter, engines: list[RunningEngine], receiver: OtlpReceiver
) -> None:
    router = await traced_router(start_router, engines, receiver)
    for engine in engines:
        engine.behaviour.reset_after_chunks = 2
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + ROUTE, json={**BODY, "stream": True}) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    spans = await exported(router, receiver, 1)
    server, client = only(spans, "SERVER"), only(spans, "CLIENT")
    assert server.status == client.status == "ERROR"
    assert server.attributes["error.type"] == client.attributes["error.type"] == "backend_error"
    assert "mid-stream" in server.status_message and "mid-stream" in client.status_message
    assert client.attributes["http.response.status_code"] == 200


async def test_spans_go_over_grpc_to_a_bare_host_port(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    otlp = OtlpReceiver()
    server, port = await otlp.grpc_server()
    try:
        router = await start_router(config_for(
            engines, otel_endpoint=f"127.0.0.1:{port}", otel_service_name="edge-router",
            health_check_interval=0, engine_stats_interval=0,
        ))
        assert (await post(router, {**BODY, "stream": True}))[0] == 200
        spans = await exported(router, otlp, 1)
    finally:
        await server.stop(None)
    server_span, client = only(spans, "SERVER"), only(spans, "CLIENT")
    assert client.parent_span_id == server_span.span_id
    assert {span.service_name for span in spans} == {"edge-router"}


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(("endpoint", "protocol", "secure", "expected"), [
    ("collector:4317", None, False, OtlpTarget("grpc", "collector:4317", False)),
    ("collector:4317", None, True, OtlpTarget("grpc", "collector:4317", True)),
    ("collector", None, False, OtlpTarget("grpc", "collector:4317", False)),
    ("http://collector:4317", None, False, OtlpTarget("grpc", "collector:4317", False)),
    ("https://collector:4317", None, False, OtlpTarget("grpc", "collector:4317", True)),
    ("http://collector:4318", None, False,
     OtlpTarget("http", "http://collector:4318/v1/traces", False)),
    ("collector:4318", None, True, OtlpTarget("http", "https://collector:4318/v1/traces", True)),
    ("https://otel.example.com/otlp/v1/traces", None, False,
     OtlpTarget("http", "https://otel.example.com/otlp/v1/traces", True)),
    ("http://collector:9000", "grpc", False, OtlpTarget("grpc", "collector:9000", False)),
    ("collector:9000", "http", False, OtlpTarget("http", "http://collector:9000/v1/traces",
                                                 False)),
    ("[::1]:4317", None, False, OtlpTarget("grpc", "[::1]:4317", False)),
])
def test_the_endpoint_picks_protocol_and_tls(
    endpoint: str, protocol: str | None, secure: bool, expected: OtlpTarget
) -> None:
    assert otlp_target(endpoint, protocol, secure) == expected


@pytest.mark.parametrize(("endpoint", "protocol", "secure", "message"), [
    ("ftp://collector:4317", None, False, "use http://, https:// or host:port"),
    ("collector:notaport", None, False, "bad port"),
    ("http://collector:4318", None, True, "plain http://"),
    ("collector:4317/v1/traces", None, False, "gRPC endpoint has no path"),
    ("user@collector:4317", None, False, "expected host:port"),
    ("collector:4317", "udp", False, "unknown protocol"),
])
def test_a_bad_endpoint_is_refused(
    endpoint: str, protocol: str | None, secure: bool, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        otlp_target(endpoint, protocol, secure)


def test_flags_set_the_tracing_config() -> None:
    backends = ["--static-backends", "http://e1:8000", "--static-models", CHAT]
    config = load_config([*backends, "--otel-endpoint", "collector:4317", "--otel-secure",
                          "--otel-service-name", "edge", "--otel-protocol", "grpc"])
    assert (config.otel_endpoint, config.otel_protocol, config.otel_service_name,
            config.otel_secure) == ("collector:4317", "grpc", "edge", True)
    config = load_config(backends)
    assert (config.otel_endpoint, config.otel_service_name) == (None, "router")
    with pytest.raises(ConfigError, match="--otel-endpoint: 'ftp://x'"):
        load_config([*backends, "--otel-endpoint", "ftp://x"])


NO_IMPORT_CHECK = """
import json, sys
from router.app import make_app
from router.config.load import load_config
backends = ["--static-backends", "http://127.0.0.1:9", "--static-models", "m"]
make_app(load_config(backends))
before = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
make_app(load_config([*backends, "--otel-endpoint", "http://127.0.0.1:9"]))
after = "opentelemetry.sdk.trace" in sys.modules
print(json.dumps([before, after]))
"""


async def test_without_the_flag_opentelemetry_is_never_imported() -> None:
    # In a fresh interpreter: this one has imported the SDK for the other tests.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", NO_IMPORT_CHECK, cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    before, after = json.loads(out.splitlines()[-1])
    assert before == [] and after is True


# --------------------------------------------------------------------------- cost


def traced_requests(tracer: Tracer | None, request: Any, n: int) -> float:
    """CPU µs per request of the events of `n` requests, with `tracer` subscribed or not."""
    backend = Backend(url="http://10.0.0.7:8000", models=(CHAT,))
    flows = [RequestFlow(id=f"req-{i}", endpoint=ROUTE, model=CHAT, backend=backend,
                         request=request) for i in range(n)]
    start = time.thread_time()  # CPU time: the machine's other load does not count
    for flow in flows:
        if tracer is not None:
            tracer.on_new(flow)
        flow.t_first_byte = flow.t_headers = time.monotonic()
        flow.status = 200
        if tracer is not None:
            tracer.on_response(flow)
        flow.outcome, flow.t_end = Outcome.OK, time.monotonic()
        if tracer is not None:
            tracer.on_complete(flow)
    return (time.thread_time() - start) / n * 1e6


@pytest.mark.slow
def test_tracing_cost_per_request(blockbuster: BlockBuster) -> None:
    """CPU per request with the real SDK, its batch processor and an in-memory exporter:
    what the event loop pays (on_new + on_response + on_complete, two spans), and what the
    export thread pays to encode those spans to OTLP protobuf (in the same process, so under
    the same GIL). Printed with `pytest -m slow -s tests/test_tracing.py`."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    blockbuster.deactivate()  # its wrappers around every lock and clock would count too
    n = 10_000
    exporter = InMemorySpanExporter()
    tracer = Tracer.exporting_to(exporter)
    headers = {"content-type": "application/json"}
    plain = make_mocked_request("POST", ROUTE, headers=headers)
    unsampled = make_mocked_request("POST", ROUTE, headers={
        **headers, "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"})
    continued = make_mocked_request("POST", ROUTE, headers={
        **headers, "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    baseline = min(traced_requests(None, plain, n) for _ in range(3))
    costs: dict[str, float] = {}
    exported_spans = 0
    spans: Any = ()
    for label, request in [("new trace", plain), ("traceparent continued", continued),
                           ("not sampled (by the client's traceparent)", unsampled)]:
        rounds = []
        for _ in range(3):
            rounds.append(traced_requests(tracer, request, n))
            # Let go of the spans between rounds: a heap growing by 20,000 spans a round
            # would make each round's garbage collections slower than a router's.
            assert tracer.flush()
            spans = spans or exporter.get_finished_spans()
            exported_spans += len(exporter.get_finished_spans())
            exporter.clear()
        costs[label] = min(rounds) - baseline
    tracer.shutdown()
    # Two spans a sampled request; at this rate (far above a router's) the batch queue may
    # overflow and drop some, which the printout tells.
    dropped = 2 * 2 * 3 * n - exported_spans
    start = time.thread_time()
    for offset in range(0, len(spans), 512):  # the batch processor's batches
        encode_spans(spans[offset:offset + 512]).SerializePartialToString()
    encoding = (time.thread_time() - start) / len(spans) * 2 * 1e6
    print()
    for label, micros in costs.items():
        print(f"tracing, {label}: {micros:.1f} µs/request on the event loop")
    print(f"tracing, export thread: {encoding:.1f} µs/request (OTLP encoding of 2 spans)")
    print(f"({exported_spans} spans exported, {dropped} dropped by a full queue)")
    assert costs["not sampled (by the client's traceparent)"] < costs["new trace"]
