"""OpenTelemetry tracing (`--otel-endpoint`): a SERVER span per request, a CLIENT span per
upstream attempt, exported over OTLP in the SDK's background thread.

Without `--otel-endpoint` this module is imported but nothing of OpenTelemetry is: the SDK is
imported inside `make_tracer` (and `Tracer.__init__`), which only a router with the flag calls,
and no subscriber is registered, so an untraced request pays nothing.

The spans of one request (all timestamps wall-clock, from the flow's monotonic times):

- `POST /v1/chat/completions` (`{method} {route}`), kind SERVER, from the request's arrival to
  its end. It continues the client's W3C `traceparent` (and `tracestate`) when there is a
  valid one, else it starts a trace. Attributes: `http.request.method`, `http.route`,
  `http.response.status_code`, `gen_ai.request.model`, `router.request_id`, `router.stream`,
  `router.backend.id`, `router.backend.url` (the backend that served it), `router.outcome`,
  `router.retries`, `router.ttft_s`, `router.duration_s`; on failure (a failed outcome, or a
  5xx) `error.type` (the outcome, or the status) and an ERROR status with the flow's error.
  A `first_token` event marks the backend's first body byte.
- one child per attempt on a backend, same name, kind CLIENT: `http.request.method`,
  `url.full`, `router.backend.id`, `router.attempt` (1, 2...); a failed attempt (retried)
  ends with `error.type` and an ERROR status saying why; the last one ends with the request
  and carries `http.response.status_code` when the backend answered; it is an error when the
  backend failed or timed out (before or during the answer) or answered a 4xx or 5xx (as
  HTTP client spans do).

Each attempt's context goes to the backend as `traceparent` (and `tracestate`) through
`flow.trace_headers`, which the proxy sets on that attempt's upstream request, so a vLLM
started with `--otlp-traces-endpoint` continues the trace under the CLIENT span.

Sampling is parent-based (a client's "not sampled" is obeyed, and such requests cost almost
nothing); the SDK's standard variables apply as usual: `OTEL_TRACES_SAMPLER(_ARG)`,
`OTEL_RESOURCE_ATTRIBUTES` (but `service.name` is `--otel-service-name`),
`OTEL_EXPORTER_OTLP_HEADERS` (collector credentials), `OTEL_BSP_*` (batching).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from router import __version__
from router.flow import Outcome, RequestFlow

if TYPE_CHECKING:
    from aiohttp import web
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span
    from opentelemetry.util.types import AttributeValue

__all__ = ["PROTOCOLS", "OtlpTarget", "otlp_target", "sdk_missing", "make_tracer", "Tracer"]

log = logging.getLogger("router.tracing")

PROTOCOLS = ("grpc", "http")
GRPC_PORT = 4317
HTTP_PORT = 4318
TRACES_PATH = "/v1/traces"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
FAILED = frozenset({Outcome.BACKEND_ERROR, Outcome.TIMEOUT, Outcome.ROUTER_ERROR,
                    Outcome.CANCELLED})
"""Outcomes that make the SERVER span an error whatever the status (a 5xx always does)."""
SDK_MODULES = {
    "grpc": ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.grpc"),
    "http": ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"),
}


@dataclass(frozen=True)
class OtlpTarget:
    """Where and how spans are exported."""

    protocol: str
    """`grpc` or `http`."""
    endpoint: str
    """gRPC: `host:port`; HTTP: the full URL of the traces path."""
    secure: bool
    """TLS (for HTTP: an `https://` endpoint)."""


def otlp_target(endpoint: str, protocol: str | None = None, secure: bool = False) -> OtlpTarget:
    """Read `--otel-endpoint` (with `--otel-protocol` and `--otel-secure`); ValueError if bad.

    The protocol, unless given: port 4317 is gRPC and port 4318 HTTP; otherwise an
    `http(s)://` URL is HTTP and a bare `host:port` gRPC (production-stack's form). gRPC uses
    TLS with `--otel-secure` or an `https://` endpoint. An HTTP URL without a path gets
    `/v1/traces`; a bare `host:port` for HTTP gets `https://` with `--otel-secure`, else
    `http://`.
    """
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r} (use grpc or http)")
    text = endpoint.strip()
    scheme = None
    if "://" in text:
        scheme = text.partition("://")[0].lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"{endpoint!r}: use http://, https:// or host:port")
        parts = urlsplit(text)
    else:
        parts = urlsplit("//" + text)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{endpoint!r}: bad port") from None
    if not parts.hostname or parts.username is not None:
        raise ValueError(f"{endpoint!r}: expected host:port or http(s)://host:port")
    if protocol is None:
        if port in (GRPC_PORT, HTTP_PORT):
            protocol = "grpc" if port == GRPC_PORT else "http"
        else:
            protocol = "http" if scheme else "grpc"
    if scheme == "http" and secure:
        raise ValueError(f"{endpoint!r} is plain http:// but --otel-secure asks for TLS")
    secure = secure or scheme == "https"
    if protocol == "grpc":
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(f"{endpoint!r}: a gRPC endpoint has no path")
        netloc = parts.netloc if port is not None else f"{parts.netloc}:{GRPC_PORT}"
        return OtlpTarget("grpc", netloc, secure)
    path = parts.path if parts.path not in ("", "/") else TRACES_PATH
    query = f"?{parts.query}" if parts.query else ""
    url = f"{'https' if secure else 'http'}://{parts.netloc}{path}{query}"
    return OtlpTarget("http", url, secure)


def sdk_missing(protocol: str) -> str | None:
    """The first module `protocol` needs that is not installed, or None (imports only the
    `opentelemetry` namespace packages on the way: call it only when tracing is asked for)."""
    for name in SDK_MODULES[protocol]:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:
            found = False
        if not found:
            return name
    return None


def make_tracer(
    endpoint: str, service_name: str = "router", secure: bool = False,
    protocol: str | None = None,
) -> Tracer:
    """The subscriber for `--otel-endpoint`: imports the SDK and its OTLP exporter (ImportError
    without them: `pip install 'router[otel]'`) and starts the exporting thread."""
    target = otlp_target(endpoint, protocol, secure)
    exporter: SpanExporter
    if target.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        exporter = GrpcExporter(endpoint=target.endpoint, insecure=not target.secure)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        exporter = HttpExporter(endpoint=target.endpoint)
    tracer = Tracer.exporting_to(exporter, service_name)
    log.info("tracing: spans of service %r go over OTLP/%s to %s%s", service_name,
             target.protocol, target.endpoint, " (TLS)" if target.secure else "")
    return tracer


def wall_clock(monotonic: float, now_ns: int) -> int:
    """`time.monotonic()` value -> nanoseconds since the epoch (the OTLP timestamps)."""
    return now_ns - int((time.monotonic() - monotonic) * 1e9)


class _Spans:
    """The open spans of one request."""

    __slots__ = ("server", "context", "client", "stale_state")

    def __init__(self, server: Span, context: Context, stale_state: bool) -> None:
        self.server = server
        self.context = context
        """The server span's context: the parent of every attempt's span."""
        self.client: Span | None = None
        self.stale_state = stale_state
        """The client sent a `tracestate` that our trace does not carry on."""


class Tracer:
    """Request-event subscriber that turns each flow into spans (see the module docstring).

    Spans in flight are kept per flow until `on_complete` (exactly once per `on_new`), then
    ended and handed to the batch processor, whose thread exports them.
    """

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import trace
        from opentelemetry.context import Context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._provider = provider
        self._tracer = provider.get_tracer("router", __version__)
        self._server = trace.SpanKind.SERVER
        self._client = trace.SpanKind.CLIENT
        self._error = trace.StatusCode.ERROR
        self._in_context = trace.set_span_in_context
        self._root = Context()
        self._extract = TraceContextTextMapPropagator().extract
        self._open: dict[RequestFlow, _Spans] = {}
        self._closed = False

    @classmethod
    def exporting_to(cls, exporter: SpanExporter, service_name: str = "router") -> Tracer:
        """A tracer whose spans go through a batch processor (its own thread) to `exporter`."""
        from opentelemetry.sdk.resources import (
            SERVICE_NAME, SERVICE_VERSION, TELEMETRY_SDK_LANGUAGE, TELEMETRY_SDK_NAME,
            TELEMETRY_SDK_VERSION, OTELResourceDetector, Resource,
        )
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.version import __version__ as sdk_version

        # Not `Resource.create`: it runs its detectors in a thread pool and waits for them,
        # on the event loop. The environment's detector (OTEL_RESOURCE_ATTRIBUTES) only reads
        # variables.
        resource = OTELResourceDetector().detect().merge(Resource({
            TELEMETRY_SDK_LANGUAGE: "python", TELEMETRY_SDK_NAME: "opentelemetry",
            TELEMETRY_SDK_VERSION: sdk_version,
            SERVICE_NAME: service_name, SERVICE_VERSION: __version__,
        }))
        # No atexit hook: the app's cleanup_ctx (`lifetime`) owns the shutdown.
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Tracer {state} requests_in_flight={len(self._open)}>"

    def on_new(self, flow: RequestFlow) -> None:
        now = time.time_ns()
        start = wall_clock(flow.t_start, now)
        parent = self._root
        stale_state = False
        request = flow.request
        if request is not None:
            headers = request.headers
            if TRACEPARENT in headers:
                parent = self._extract(headers)
            stale_state = TRACESTATE in headers
        server = self._tracer.start_span(
            f"{flow.method} {flow.endpoint}", parent, self._server,
            {"http.request.method": flow.method, "http.route": flow.endpoint,
             "router.request_id": flow.id},
            start_time=start,
        )
        spans = _Spans(server, self._in_context(server), stale_state)
        self._open[flow] = spans
        if flow.backend is not None:
            self._start_attempt(flow, spans, now)

    def on_retry(self, flow: RequestFlow) -> None:
        spans = self._open.get(flow)
        if spans is None:
            return
        now = time.time_ns()
        client = spans.client
        if client is not None:
            failed = flow.attempts[-1]
            client.set_attribute("error.type", failed.outcome.value)
            client.set_status(self._error, failed.error)
            client.end(now)
        self._start_attempt(flow, spans, now)

    def on_response(self, flow: RequestFlow) -> None:
        spans = self._open.get(flow)
        if spans is not None:
            spans.server.add_event("first_token")

    def on_complete(self, flow: RequestFlow) -> None:
        spans = self._open.pop(flow, None)
        if spans is None:
            return
        end = time.time_ns()
        if flow.t_end is not None:  # so the span lasts exactly `flow.duration`
            end = wall_clock(flow.t_end, end)
        outcome = flow.outcome or Outcome.ROUTER_ERROR
        status = flow.status
        backend = flow.backend
        client = spans.client
        if client is not None:
            answered = status if flow.t_headers is not None else None
            if answered is not None:
                client.set_attribute("http.response.status_code", answered)
            if outcome in (Outcome.BACKEND_ERROR, Outcome.TIMEOUT):  # also mid-stream
                client.set_attribute("error.type", outcome.value)
                client.set_status(self._error, flow.error)
            elif answered is not None and answered >= 400:  # a CLIENT span's 4xx is an error
                client.set_attribute("error.type", str(status))
                client.set_status(self._error, f"backend answered {status}")
            client.end(end)
        server = spans.server
        attributes: dict[str, AttributeValue] = {
            "router.outcome": outcome.value,
            "router.retries": len(flow.attempts),
            "router.stream": flow.stream,
        }
        if status is not None:
            attributes["http.response.status_code"] = status
        if flow.model is not None:
            attributes["gen_ai.request.model"] = flow.model
        if backend is not None:
            attributes["router.backend.id"] = backend.id
            attributes["router.backend.url"] = backend.url
        ttft = flow.ttft
        if ttft is not None:
            attributes["router.ttft_s"] = ttft
        duration = flow.duration
        if duration is not None:
            attributes["router.duration_s"] = duration
        if outcome in FAILED:
            attributes["error.type"] = outcome.value
            server.set_status(self._error, flow.error or outcome.value)
        elif status is not None and status >= 500:
            attributes["error.type"] = str(status)
            server.set_status(self._error, flow.error or f"answered {status}")
        server.set_attributes(attributes)
        server.end(end)

    def _start_attempt(self, flow: RequestFlow, spans: _Spans, now: int) -> None:
        backend = flow.backend
        assert backend is not None
        client = self._tracer.start_span(
            f"{flow.method} {flow.endpoint}", spans.context, self._client,
            {"http.request.method": flow.method, "url.full": backend.url + flow.endpoint,
             "router.backend.id": backend.id, "router.attempt": len(flow.attempts) + 1},
            start_time=now,
        )
        spans.client = client
        context = client.get_span_context()
        headers = {
            TRACEPARENT: f"00-{context.trace_id:032x}-{context.span_id:016x}-"
                         f"{context.trace_flags:02x}",
        }
        if context.trace_state:
            headers[TRACESTATE] = context.trace_state.to_header()
        elif spans.stale_state:
            # The client's tracestate belongs to a traceparent we could not continue: it
            # must not reach the backend beside our new one (the proxy replaces, not adds).
            headers[TRACESTATE] = ""
        flow.trace_headers = headers

    def flush(self, timeout: float = 30.0) -> bool:
        """Export every ended span now. Blocks: call it from a thread."""
        return self._provider.force_flush(int(timeout * 1000))

    def shutdown(self) -> None:
        """Export what is left and stop the exporting thread; idempotent. Blocks (up to about
        30 s with an unreachable collector): `lifetime` runs it in a thread."""
        if self._closed:
            return
        self._closed = True
        self._provider.shutdown()

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: on the app's cleanup, the spans still queued are exported."""
        yield
        await asyncio.to_thread(self.shutdown)
