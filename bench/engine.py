"""The fake engine of `router.testing`, as a benchmark process: its knobs come from flags.

`python -m bench.engine --port P --models a,b [--token-delay S] [--reuse-port] [--uvloop]
[--upload-sink raw]`

Several processes started with `--reuse-port` on one port share its connections
(SO_REUSEPORT), so one engine URL can use more than one core. `--uvloop` runs the engine on
uvloop when it is installed (the engine is then cheaper per chunk; the router under test is
not affected). `--upload-sink raw` answers the audio endpoints by hashing the raw request
body instead of parsing it as multipart: the fake engine's multipart parser takes only
100-200 MB/s here, which would make the engine, not the router, the limit of an upload.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib

from aiohttp import web
from aiohttp.typedefs import Handler

from router.testing.engine.app import make_engine_app
from router.testing.engine.kv_events import KvEventsOptions
from router.testing.engine.state import ENGINE_BEHAVIOUR


AUDIO_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")


@web.middleware
async def raw_upload_sink(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The audio endpoints, cheaply: sha256 and size of the raw body, as `text`."""
    if request.method != "POST" or request.path not in AUDIO_PATHS:
        return await handler(request)
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    return web.json_response({"text": f"raw body of {size} bytes with sha256 "
                                      f"{digest.hexdigest()}"})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--models", required=True, help="comma-separated model names")
    parser.add_argument("--name", default="engine")
    parser.add_argument("--token-delay", type=float, default=0.0,
                        help="seconds between two streamed tokens (default 0)")
    parser.add_argument("--first-token-delay", type=float, default=0.0,
                        help="seconds before the first token or a non-streamed answer")
    parser.add_argument("--reuse-port", action="store_true",
                        help="bind with SO_REUSEPORT, to run several processes on one port")
    parser.add_argument("--uvloop", action="store_true",
                        help="use uvloop when it is installed")
    parser.add_argument("--upload-sink", choices=("multipart", "raw"), default="multipart",
                        help="how audio uploads are read (default: the engine's multipart)")
    parser.add_argument("--kv-events", action="store_true",
                        help="publish vLLM's KV cache events (ports picked free; the engine's "
                             "/kv_event_sources says which)")
    args = parser.parse_args()
    if args.uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    kv_events = KvEventsOptions(host=args.host) if args.kv_events else False
    app = make_engine_app([m for m in args.models.split(",") if m], name=args.name,
                          kv_events=kv_events)
    behaviour = app[ENGINE_BEHAVIOUR]
    behaviour.token_delay = args.token_delay
    behaviour.first_token_delay = args.first_token_delay
    if args.upload_sink == "raw":
        app.middlewares.append(raw_upload_sink)
    web.run_app(app, host=args.host, port=args.port, reuse_port=args.reuse_port or None,
                backlog=4096, handler_cancellation=True, access_log=None, print=None,
                shutdown_timeout=1.0)


if __name__ == "__main__":
    main()
