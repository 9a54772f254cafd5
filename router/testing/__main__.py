"""Run a fake engine on its own: `python -m router.testing --port 8100 --models a,b`.

For benchmarks and manual tries against a separate process."""

from __future__ import annotations

import argparse

from aiohttp import web

from router.testing.engine.app import make_engine_app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m router.testing")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--models", default="demo-llm,demo-whisper",
                        help="comma-separated model names")
    parser.add_argument("--name", default="engine")
    args = parser.parse_args()
    app = make_engine_app([m for m in args.models.split(",") if m], name=args.name)
    web.run_app(app, host=args.host, port=args.port, handler_cancellation=True,
                access_log=None, print=None)


if __name__ == "__main__":
    main()
