"""`python -m router.testing.chaos --port P`: the steerable fake engine `EngineProcess`
starts as its child."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from aiohttp import web

from router.testing.chaos.engine import LOOPBACK, make_controlled_engine_app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m router.testing.chaos",
        description="A fake engine whose behaviour can be steered over HTTP (chaos tests).",
    )
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--models", default="demo-llm")
    parser.add_argument("--name", default="engine")
    args = parser.parse_args(argv)
    app = make_controlled_engine_app([m for m in args.models.split(",") if m], args.name)
    web.run_app(app, host=args.host, port=args.port, handler_cancellation=True,
                access_log=None, print=None, shutdown_timeout=0.25)


if __name__ == "__main__":
    main()
