"""Command line (and `--config FILE`) -> `Config`: the flags checked together, lists split,
keys and credentials read. With `router.__main__`, the one place that reads `argv` and the
environment."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from router.backends.pool import parse_url
from router.backends.prober import MODEL_TYPES
from router.config.dynamic import read_dynamic_config
from router.config.file import file_tokens, read_config_file
from router.config.flags import build_parser
from router.config.prodstack import prodstack_settings
from router.config.settings import Config, ConfigError, K8sSettings, StaticBackend
from router.discovery.external import load_external_providers, merge_aliases
from router.discovery.k8s_access import in_cluster_api_server
from router.observe.tracing import otlp_target, sdk_missing
from router.plugins import find_object

__all__ = ["parse_config", "load_config", "METRICS_DIR_ENV"]

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus_client's multiprocess directory: when set (by `--workers` for its workers, or by
the operator), the metrics of every process writing there are served together."""


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def split_group(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(";") if item.strip())


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """Parse flags; on a bad one print a one-line error naming it and exit with code 2."""
    try:
        return load_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as error:
        sys.stderr.write(f"router: error: {error}\n")
        raise SystemExit(2) from None


def load_config(argv: Sequence[str]) -> Config:
    """Flags on top of `--config FILE` when given; raises `ConfigError` naming the flag or
    the file's key. Reads the file: blocking, so a reload calls it from a thread."""
    parser = build_parser()
    args = parser.parse_args(argv)
    dynamic = args.dynamic_config_yaml or args.dynamic_config_json
    if args.config is not None and dynamic:
        raise ConfigError("argument --config: not with --dynamic-config-yaml/json (give "
                          "one settings file)")
    path = args.config or dynamic
    if path is not None:
        # Flags on the command line override the file's, repeatable ones included.
        given = {arg.partition("=")[0] for arg in argv if arg.startswith("--")}
        data = read_dynamic_config(path) if dynamic else read_config_file(path)
        tokens = file_tokens(data, parser, path, given)
        try:
            parser.parse_args(tokens)
        except ConfigError as error:
            raise ConfigError(f"config file {path}: {error}") from None
        args = parser.parse_args([*tokens, *argv])
    return config_from_args(args)


def config_from_args(args: argparse.Namespace) -> Config:
    compat = prodstack_settings(args)
    urls = split_list(args.static_backends)
    model_groups = split_list(args.static_models)
    if urls and args.demo:
        raise ConfigError("argument --demo: not allowed with --static-backends")
    if args.enable_batch_api and args.workers > 1:
        raise ConfigError("argument --enable-batch-api: not with --workers (one process runs "
                          "the batches and owns --file-storage-path)")
    storage = args.file_storage_path
    if args.enable_batch_api and os.path.exists(storage) and not (
        os.path.isdir(storage) and os.access(storage, os.W_OK | os.X_OK)
    ):
        raise ConfigError(f"argument --file-storage-path: {storage!r} is not a writable "
                          "directory")
    if args.max_headers_total_size < args.max_header_size:
        raise ConfigError("argument --max-headers-total-size: smaller than --max-header-size "
                          "(one header field may be that long)")
    if args.workers > 1 and args.demo:
        raise ConfigError("argument --workers: not with --demo (each worker would run its "
                          "own demo engines)")
    k8s = None
    providers = (
        load_external_providers(args.external_providers_config, os.environ)
        if args.external_providers_config else ()
    )
    if args.service_discovery == "external-only":
        if not providers:
            raise ConfigError("argument --service-discovery: external-only needs "
                              "--external-providers-config")
        if urls or args.demo:
            raise ConfigError("argument --service-discovery: external-only runs no local "
                              "fleet; drop --static-backends and --demo")
    elif args.service_discovery == "k8s":
        if urls or args.demo:
            raise ConfigError("argument --service-discovery: k8s finds backends itself; "
                              "drop --static-backends and --demo")
        try:
            k8s = K8sSettings(
                namespace=args.k8s_namespace, label_selector=args.k8s_label_selector,
                port=args.k8s_port, discovery_type=args.k8s_service_discovery_type,
                kubeconfig=args.k8s_kubeconfig or os.environ.get("KUBECONFIG") or None,
                api_server=in_cluster_api_server(os.environ),
                engine_api_key=args.backend_api_key or os.environ.get("VLLM_API_KEY") or None,
                max_answer_size=args.k8s_max_answer_size,
                watch_timeout=compat.k8s_watch_timeout or K8sSettings.watch_timeout,
            )
        except ValueError as error:
            raise ConfigError(f"argument --k8s-*: {error}") from None
    elif not urls and not args.demo:
        hint = " or --service-discovery external-only" if providers else ""
        raise ConfigError(f"argument --static-backends: required (or use --demo{hint})")
    if model_groups and not urls:
        raise ConfigError("argument --static-models: needs --static-backends")
    if urls and len(model_groups) != len(urls):
        raise ConfigError(
            f"argument --static-models: {len(model_groups)} entries for {len(urls)} backends "
            "(give one entry per backend; separate several models of one backend with ';')"
        )
    label_groups = split_list(args.static_model_labels)
    if label_groups and not urls:
        raise ConfigError("argument --static-model-labels: needs --static-backends")
    if label_groups and len(label_groups) != len(urls):
        raise ConfigError(
            f"argument --static-model-labels: {len(label_groups)} entries for {len(urls)} "
            "backends (give one entry per backend; separate several labels with ';')"
        )
    types = split_list(args.static_model_types)
    if types and len(types) != len(urls):
        raise ConfigError(f"argument --static-model-types: {len(types)} entries for "
                          f"{len(urls)} backends (give one per backend)")
    if bad := sorted(set(types) - set(MODEL_TYPES)):
        raise ConfigError(f"argument --static-model-types: unknown {', '.join(bad)} "
                          f"(choose from {', '.join(MODEL_TYPES)})")
    if args.static_backend_health_checks and not types:
        raise ConfigError("argument --static-backend-health-checks: needs "
                          "--static-model-types")
    backends = []
    for number, (url, group) in enumerate(zip(urls, model_groups)):
        try:
            normalised = parse_url(url)
        except ValueError as error:
            raise ConfigError(f"argument --static-backends: {error}") from None
        models = split_group(group)
        if not models:
            raise ConfigError(f"argument --static-models: no model for backend {url}")
        labels = split_group(label_groups[number]) if label_groups else ()
        backends.append(StaticBackend(url=normalised, models=models, labels=labels,
                                      model_type=types[number] if types else None))
    if len({b.url for b in backends}) != len(backends):
        raise ConfigError("argument --static-backends: a backend URL is listed twice")
    aliases: dict[str, str] = {}
    for pair in split_list(args.static_aliases):
        alias, sep, model = pair.partition(":")
        if not sep or not alias.strip() or not model.strip():
            raise ConfigError(f"argument --static-aliases: expected alias:model, got {pair!r}")
        aliases[alias.strip()] = model.strip()
    aliases = merge_aliases(
        aliases, providers, {model for backend in backends for model in backend.models}
    )
    spool_dir = args.spool_dir
    if spool_dir is not None and not (
        os.path.isdir(spool_dir) and os.access(spool_dir, os.W_OK | os.X_OK)
    ):
        raise ConfigError(f"argument --spool-dir: {args.spool_dir!r} is not a writable directory")
    api_keys = [*split_list(args.api_keys or os.environ.get("ROUTER_API_KEYS", ""))]
    if args.api_keys_file is not None:
        try:
            with open(args.api_keys_file) as lines:
                api_keys += [line.strip() for line in lines if line.strip()]
        except OSError as error:
            raise ConfigError(f"argument --api-keys-file: {error}") from None
    rate, burst = args.rate_limit or (0.0, 0.0)
    callbacks = tuple(spec for item in args.callbacks for spec in split_list(item))
    # production-stack's default value: no rewriter.
    rewriter = None if args.request_rewriter in (None, "", "noop") else args.request_rewriter
    for spec, flag in [*((s, "--callbacks") for s in callbacks),
                       *(((rewriter, "--request-rewriter"),) if rewriter else ())]:
        find_object(spec, flag)  # import now, so a typo stops the start
    if args.otel_endpoint:
        try:
            target = otlp_target(args.otel_endpoint, args.otel_protocol, args.otel_secure)
        except ValueError as error:
            raise ConfigError(f"argument --otel-endpoint: {error}") from None
        missing = sdk_missing(target.protocol)
        if missing:
            raise ConfigError(f"argument --otel-endpoint: {missing} is not installed "
                              "(pip install 'router[otel]')")
    root_path = args.root_path.rstrip("/")
    if root_path and not root_path.startswith("/"):
        raise ConfigError("argument --root-path: must start with '/', e.g. /router")
    if not args.health_check_path.startswith("/"):
        raise ConfigError("argument --health-check-path: must start with '/'")
    if args.max_upstream_connections < 0:
        raise ConfigError("argument --max-upstream-connections: must be 0 or more")
    return Config(
        host=args.host,
        root_path=root_path,
        port=args.port,
        service_discovery=args.service_discovery,
        static_backends=tuple(backends),
        aliases=aliases,
        routing_logic=compat.routing_logic,
        log_level=compat.log_level,
        log_format=args.log_format,
        access_log=args.access_log,
        request_stats_window=args.request_stats_window,
        demo=args.demo,
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        response_timeout=args.response_timeout,
        response_head_timeout=args.response_head_timeout,
        max_body_size=args.max_body_size,
        max_json_body_size=args.max_json_body_size,
        max_inflate_ratio=args.max_inflate_ratio,
        max_upstream_connections=args.max_upstream_connections,
        spool_dir=args.spool_dir,
        k8s=k8s,
        external_providers=providers,
        config_file=args.config,
        config_watch=args.config_watch,
        api_keys=tuple(api_keys),
        api_keys_file=args.api_keys_file,
        protect_admin=args.protect_admin,
        forward_client_auth=args.forward_client_auth,
        backend_api_key=args.backend_api_key or os.environ.get("VLLM_API_KEY") or None,
        max_concurrent_requests=args.max_concurrent_requests,
        queue_size=args.queue_size,
        queue_timeout=args.queue_timeout,
        rate_limit=rate,
        rate_limit_burst=burst,
        max_header_size=args.max_header_size,
        max_headers_total_size=args.max_headers_total_size,
        client_header_timeout=args.client_header_timeout,
        client_body_timeout=args.client_body_timeout,
        client_write_timeout=args.client_write_timeout,
        keepalive_timeout=args.keepalive_timeout,
        stream_buffer_size=args.stream_buffer_size,
        workers=args.workers,
        metrics_dir=os.environ.get(METRICS_DIR_ENV) or None,
        websocket_max_message_size=args.websocket_max_message_size,
        websocket_heartbeat=args.websocket_heartbeat,
        websocket_idle_timeout=args.websocket_idle_timeout,
        enable_batch_api=args.enable_batch_api,
        file_storage_path=args.file_storage_path,
        batch_concurrency=args.batch_concurrency,
        batch_max_answer_size=args.batch_max_answer_size,
        max_batch_requests=args.max_batch_requests,
        max_batch_input_size=args.max_batch_input_size,
        file_storage_quota_per_key=args.file_storage_quota_per_key,
        file_storage_quota=args.file_storage_quota,
        log_stats=args.log_stats,
        log_stats_interval=args.log_stats_interval,
        callbacks=callbacks,
        request_rewriter=rewriter,
        dynamic_config_file=args.dynamic_config_yaml or args.dynamic_config_json,
        dynamic_config_interval=args.dynamic_config_interval,
        drain_timeout=args.drain_timeout,
        shutdown_delay=args.shutdown_delay,
        session_key=args.session_key,
        prefix_match_threshold=args.prefix_match_threshold,
        balance_abs_threshold=args.balance_abs_threshold,
        balance_rel_threshold=args.balance_rel_threshold,
        prefix_min_match_length=args.prefix_min_match_length,
        prefix_cache_max_chars=args.prefix_cache_max_chars,
        load_cost_tokens=args.load_cost_tokens,
        kv_events_endpoint=args.kv_events_endpoint,
        kv_events_replay_endpoint=args.kv_events_replay_endpoint,
        kv_index_max_blocks=args.kv_index_max_blocks,
        kv_tokenize_timeout=args.kv_tokenize_timeout,
        static_backend_health_checks=args.static_backend_health_checks,
        prefill_model_labels=tuple(split_list(args.prefill_model_labels)),
        decode_model_labels=tuple(split_list(args.decode_model_labels)),
        prefill_timeout=args.prefill_timeout,
        prefill_max_answer_size=args.prefill_max_answer_size,
        engine_stats_interval=args.engine_stats_interval,
        engine_stats_timeout=args.engine_stats_timeout,
        engine_stats_max_size=args.engine_stats_max_size,
        health_check_interval=args.health_check_interval,
        health_check_path=args.health_check_path,
        health_check_timeout=args.health_check_timeout,
        cb_failure_threshold=args.cb_failure_threshold,
        cb_cooldown=args.cb_cooldown,
        max_ejection_percent=args.max_ejection_percent,
        otel_endpoint=args.otel_endpoint or None,
        otel_protocol=args.otel_protocol,
        otel_service_name=args.otel_service_name,
        otel_secure=args.otel_secure,
        max_retries=args.max_retries,
        retry_backoff=args.retry_backoff,
        retry_budget_percent=args.retry_budget_percent,
        retry_budget_min=args.retry_budget_min,
        notices=compat.notices,
    )
