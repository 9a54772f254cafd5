"""A loopback OTLP receiver for tests: what a collector would receive, decoded into plain spans.

`OtlpReceiver.app()` serves OTLP/HTTP (`POST /v1/traces`, `application/x-protobuf`, gzip or
not); `OtlpReceiver.grpc_server()` serves OTLP/gRPC (`TraceService/Export`) into the same
span list.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

__all__ = ["ReceivedSpan", "OtlpReceiver", "spans_of"]

PROTOBUF = "application/x-protobuf"

AttributeValue = str | bool | int | float | tuple[object, ...] | None


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    kind: str
    """`SERVER`, `CLIENT`, `INTERNAL`..."""
    trace_id: str
    """32 hex digits, as in a `traceparent`."""
    span_id: str
    """16 hex digits."""
    parent_span_id: str
    """16 hex digits, or "" for a root span."""
    trace_state: str
    attributes: dict[str, AttributeValue]
    events: tuple[str, ...]
    status: str
    """`UNSET`, `OK` or `ERROR`."""
    status_message: str
    service_name: str
    start_ns: int
    end_ns: int


def value_of(value: AnyValue) -> AttributeValue:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        return value.double_value
    if kind == "array_value":
        return tuple(value_of(item) for item in value.array_value.values)
    return None


def attributes_of(pairs: Iterable[KeyValue]) -> dict[str, AttributeValue]:
    return {pair.key: value_of(pair.value) for pair in pairs}


def spans_of(request: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans = []
    for resource_spans in request.resource_spans:
        service = attributes_of(resource_spans.resource.attributes).get("service.name")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(ReceivedSpan(
                    name=span.name,
                    kind=Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(),
                    trace_state=span.trace_state,
                    attributes=attributes_of(span.attributes),
                    events=tuple(event.name for event in span.events),
                    status=Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
                    status_message=span.status.message,
                    service_name=str(service),
                    start_ns=span.start_time_unix_nano,
                    end_ns=span.end_time_unix_nano,
                ))
    return spans


class OtlpReceiver:
    """Collects every span exported to it, in arrival order."""

    def __init__(self) -> None:
        self.url = ""
        """The OTLP/HTTP base URL, once a test serves `app()`."""
        self.spans: list[ReceivedSpan] = []
        self.exports = 0
        """Export calls received (batches)."""
        self._arrived = asyncio.Condition()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self._handle_http)
        return app

    async def grpc_server(self) -> tuple[Any, int]:
        """A started OTLP/gRPC `grpc.aio.Server` on a free loopback port (stop it with
        `await server.stop(None)`)."""
        # grpcio has no type hints of its own (types-grpcio has them, not needed here).
        import grpc.aio  # type: ignore[import-untyped, unused-ignore]
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        receiver = self

        class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
            async def Export(  # noqa: N802 (the gRPC method's name)
                self, request: ExportTraceServiceRequest, context: object
            ) -> ExportTraceServiceResponse:
                await receiver.add(spans_of(request))
                return ExportTraceServiceResponse()

        server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            TraceService(), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    async def add(self, spans: Sequence[ReceivedSpan]) -> None:
        async with self._arrived:
            self.exports += 1
            self.spans.extend(spans)
            self._arrived.notify_all()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[ReceivedSpan]:
        """Wait until at least `count` spans arrived; all of them."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.spans) >= count)
        return list(self.spans)

    async def _handle_http(self, request: web.Request) -> web.Response:
        if request.content_type != PROTOBUF:
            return web.Response(status=415, text=f"expected {PROTOBUF}")
        body = await request.read()
        if request.headers.get("Content-Encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        await self.add(spans_of(message))
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type=PROTOBUF)
