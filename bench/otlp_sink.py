"""The collector of `router+otel`: a loopback OTLP/HTTP endpoint that counts spans.

`python -m bench.otlp_sink --port P`: `POST /v1/traces` takes an OTLP/HTTP export (protobuf,
gzip or not), counts its spans and answers as a collector does; `GET /stats` gives
`{"spans": N, "exports": M, "bytes": B, "refused": R}`, which the benchmark reads at the end
to check that the traced router really exported what it traced.

It counts and forgets: unlike the tests' receiver (`tests/otlp_receiver.py`), which decodes
every span and keeps it for assertions, a benchmark run sends hundreds of thousands of spans
and the sink shares the machine with what is measured.
"""

from __future__ import annotations

import argparse
import gzip
from dataclasses import asdict, dataclass

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

__all__ = ["Received", "RECEIVED", "make_app"]

PROTOBUF = "application/x-protobuf"
ANSWER = ExportTraceServiceResponse().SerializeToString()


@dataclass
class Received:
    spans: int = 0
    exports: int = 0
    bytes: int = 0
    refused: int = 0
    """Requests that were not an OTLP/HTTP protobuf export."""


RECEIVED = web.AppKey("received", Received)


async def traces(request: web.Request) -> web.Response:
    received = request.app[RECEIVED]
    if request.content_type != PROTOBUF:
        received.refused += 1
        return web.Response(status=415, text=f"expected {PROTOBUF}")
    body = await request.read()
    received.bytes += len(body)
    if request.headers.get("Content-Encoding", "").lower() == "gzip":
        body = gzip.decompress(body)
    message = ExportTraceServiceRequest()
    message.ParseFromString(body)
    received.exports += 1
    received.spans += sum(len(scope.spans) for resource in message.resource_spans
                          for scope in resource.scope_spans)
    return web.Response(body=ANSWER, content_type=PROTOBUF)


async def stats(request: web.Request) -> web.Response:
    return web.json_response(asdict(request.app[RECEIVED]))


def make_app() -> web.Application:
    app = web.Application(client_max_size=64 * 2**20)  # a batch of 512 spans is ~200 KB
    app[RECEIVED] = Received()
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/stats", stats)
    app.router.add_get("/health", stats)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.otlp_sink", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(make_app(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
