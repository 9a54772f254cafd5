"""`python -m router` and the `router` command: parse the flags, set up logging, serve (one
process, or a supervisor of `--workers` processes)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from router.observe.logging_setup import configure_logging
from router.config.flags import load_config, parse_config
from router.config.settings import Config
from router.discovery.k8s_access import K8sConfigError
from router.serve.server import serve
from router.serve.workers import supervise

__all__ = ["main", "run"]

log = logging.getLogger("router")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    run(parse_config(args), args)


def run(config: Config, argv: Sequence[str]) -> None:
    """Serve with `config` (parsed from `argv`, which a reload or a worker parses again)."""
    configure_logging(config.log_level, config.log_format, access_log=config.access_log)
    try:
        if config.workers > 1:
            raise SystemExit(supervise(config, argv))
        asyncio.run(serve(config, load=lambda: load_config(argv)))
    except (OSError, K8sConfigError) as error:  # e.g. the port is taken: one line
        log.critical("router stopped: %s", error)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
