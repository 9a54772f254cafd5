"""Run a fake engine on its own: `python -m router.testing --port 8100 --models a,b`
(`--kv-events` to publish vLLM's KV cache events).

For benchmarks and manual tries against a separate process."""

from __future__ import annotations

import argparse

from aiohttp import web

from router.testing.engine.app import make_engine_app
from router.testing.engine.kv_events import KvEventsOptions


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m router.testing")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--models", default="demo-llm,demo-whisper",
                        help="comma-separated model names")
    parser.add_argument("--name", default="engine")
    kv = parser.add_argument_group("KV cache events (as vLLM's --kv-events-config)")
    kv.add_argument("--kv-events", action="store_true", help="publish KV cache events")
    kv.add_argument("--block-size", type=int, default=32)
    kv.add_argument("--cache-blocks", type=int, default=1_000_000,
                    help="blocks the prefix cache holds before evicting")
    kv.add_argument("--kv-port", type=int, default=5557, help="PUB port (0: any)")
    kv.add_argument("--kv-replay-port", type=int, default=5558, help="replay port (0: any)")
    kv.add_argument("--kv-topic", default="kv")
    args = parser.parse_args()
    kv_events: bool | KvEventsOptions = False
    if args.kv_events:
        kv_events = KvEventsOptions(
            block_size=args.block_size, cache_blocks=args.cache_blocks, topic=args.kv_topic,
            host=args.host, port=args.kv_port, replay_port=args.kv_replay_port,
        )
    app = make_engine_app([m for m in args.models.split(",") if m], name=args.name,
                          kv_events=kv_events)
    web.run_app(app, host=args.host, port=args.port, handler_cancellation=True,
                access_log=None, print=None)


if __name__ == "__main__":
    main()
