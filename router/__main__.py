"""`python -m router` and the `router` command: parse the flags, set up logging, serve (one
process, or a supervisor of `--workers` processes). With `router.config.load`, the only code
that reads `argv` and the environment: what else needs the environment (systemd's notifier,
the workers' supervisor) is handed it from here."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from router.config.load import load_config, parse_config
from router.config.settings import Config
from router.discovery.k8s_access import K8sConfigError
from router.observe.logging_setup import configure_logging
from router.serve.server import serve
from router.serve.systemd import Notifier
from router.serve.workers import supervise

__all__ = ["main", "run"]

log = logging.getLogger("router")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    run(parse_config(args), args, dict(os.environ))


def run(config: Config, argv: Sequence[str], environ: Mapping[str, str]) -> None:
    """Serve with `config` (parsed from `argv`, which a reload or a worker parses again);
    `environ` holds systemd's variables and is the workers' environment."""
    configure_logging(config.log_level, config.log_format, access_log=config.access_log)
    for notice in config.notices:  # production-stack flags mapped or ignored
        log.warning("%s", notice)
    try:
        if config.workers > 1:
            raise SystemExit(supervise(config, argv, environ))
        asyncio.run(serve(config, load=lambda: load_config(argv), notifier=Notifier(environ)))
    except (OSError, K8sConfigError) as error:  # e.g. the port is taken: one line
        log.critical("router stopped: %s", error)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
