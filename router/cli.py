"""Command-line flags -> `Config`. Flag names follow production-stack's vllm_router, so the
same Helm values and unit files work."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from typing import NoReturn

from router import __version__
from router.backends import parse_url
from router.config import Config, ConfigError, StaticBackend, parse_size
from router.policies import POLICIES

__all__ = ["build_parser", "parse_config"]

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class OneLineParser(argparse.ArgumentParser):
    """Reports a bad flag in one line naming it, then exits with code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(text)
    return value


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(text)
    return value


def size(text: str) -> int:
    value = parse_size(text)
    if value <= 0:
        raise ValueError(text)
    return value


# argparse names the type function in its message ("invalid size value"): give them names.
positive_float.__name__ = "positive number"
port_number.__name__ = "port"
size.__name__ = "size"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="router",
        description="Streaming request router for OpenAI-compatible LLM engines (vLLM).",
    )
    add = parser.add_argument
    add("--version", action="version", version=f"router {__version__}")
    add("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    add("--port", type=port_number, default=8001, help="port to listen on (default 8001)")
    add("--service-discovery", choices=["static"], default="static",
        help="where backends come from (default static)")
    add("--static-backends", default="",
        help="comma-separated backend base URLs, e.g. http://10.0.0.7:8000,http://10.0.0.8:8000")
    add("--static-models", default="",
        help="comma-separated models, one entry per backend; an entry may list several "
             "models separated by ';'")
    add("--static-aliases", default="",
        help="comma-separated alias:model pairs, e.g. gpt-4o:llama-3-8b")
    add("--routing-logic", choices=sorted(POLICIES), default="roundrobin",
        help="routing policy (default roundrobin)")
    add("--log-level", choices=LOG_LEVELS, default="info", type=str.lower)
    add("--request-stats-window", type=positive_float, default=60.0,
        help="seconds of history for QPS, average TTFT and latency (default 60)")
    add("--demo", action="store_true",
        help="start two built-in demo engines in-process and route to them")
    add("--connect-timeout", type=positive_float, default=5.0,
        help="seconds to connect to a backend (default 5)")
    add("--read-timeout", type=positive_float, default=600.0,
        help="seconds to wait for a backend's first byte and between chunks (default 600)")
    add("--max-body-size", type=size, default="2GiB",
        help="largest multipart (audio) body (default 2GiB)")
    add("--max-json-body-size", type=size, default="64MiB",
        help="largest JSON body (default 64MiB)")
    add("--max-upstream-connections", type=int, default=0,
        help="cap on concurrent backend connections; 0 = no cap (default)")
    add("--spool-dir", default=None,
        help="directory for multipart bodies that must be spooled (default: system temp)")
    return parser


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """Parse flags; on a bad one print a one-line error naming it and exit with code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ConfigError as error:
        parser.error(str(error))


def config_from_args(args: argparse.Namespace) -> Config:
    urls = split_list(args.static_backends)
    model_groups = split_list(args.static_models)
    if urls and args.demo:
        raise ConfigError("argument --demo: not allowed with --static-backends")
    if not urls and not args.demo:
        raise ConfigError("argument --static-backends: required (or use --demo)")
    if model_groups and not urls:
        raise ConfigError("argument --static-models: needs --static-backends")
    if urls and len(model_groups) != len(urls):
        raise ConfigError(
            f"argument --static-models: {len(model_groups)} entries for {len(urls)} backends "
            "(give one entry per backend; separate several models of one backend with ';')"
        )
    backends = []
    for url, group in zip(urls, model_groups):
        try:
            normalised = parse_url(url)
        except ValueError as error:
            raise ConfigError(f"argument --static-backends: {error}") from None
        models = tuple(m.strip() for m in group.split(";") if m.strip())
        if not models:
            raise ConfigError(f"argument --static-models: no model for backend {url}")
        backends.append(StaticBackend(url=normalised, models=models))
    if len({b.url for b in backends}) != len(backends):
        raise ConfigError("argument --static-backends: a backend URL is listed twice")
    aliases: dict[str, str] = {}
    for pair in split_list(args.static_aliases):
        alias, sep, model = pair.partition(":")
        if not sep or not alias.strip() or not model.strip():
            raise ConfigError(f"argument --static-aliases: expected alias:model, got {pair!r}")
        aliases[alias.strip()] = model.strip()
    spool_dir = args.spool_dir
    if spool_dir is not None and not (
        os.path.isdir(spool_dir) and os.access(spool_dir, os.W_OK | os.X_OK)
    ):
        raise ConfigError(f"argument --spool-dir: {args.spool_dir!r} is not a writable directory")
    if args.max_upstream_connections < 0:
        raise ConfigError("argument --max-upstream-connections: must be 0 or more")
    return Config(
        host=args.host,
        port=args.port,
        service_discovery=args.service_discovery,
        static_backends=tuple(backends),
        aliases=aliases,
        routing_logic=args.routing_logic,
        log_level=args.log_level,
        request_stats_window=args.request_stats_window,
        demo=args.demo,
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        max_body_size=args.max_body_size,
        max_json_body_size=args.max_json_body_size,
        max_upstream_connections=args.max_upstream_connections,
        spool_dir=args.spool_dir,
    )
