"""Command-line flags, parsed: the router's argparse parser and the type of each value. Flag
names follow production-stack's vllm_router, so the same Helm values and unit files work.
`router.config.load` turns the parsed flags (and `--config FILE`) into a `Config`."""

from __future__ import annotations

import argparse
import math
from typing import NoReturn

from router import __version__
from router.config.prodstack import LOG_LEVEL_MAPPED, ROUTING_LOGIC_MAPPED, add_prodstack_flags
from router.config.settings import DISCOVERY_TYPES, ConfigError, parse_size
from router.observe.tracing import PROTOCOLS
from router.policies import POLICIES

__all__ = ["build_parser", "LOG_LEVELS"]

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class OneLineParser(argparse.ArgumentParser):
    """Raises a bad flag as a `ConfigError` naming it (`parse_config` prints it in one line
    and exits with code 2; a reload logs it and keeps the old configuration)."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(text)
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(text)
    return value


def ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise ValueError(text)
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def percent(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 100:
        raise ValueError(text)
    return value


def rate_limit(text: str) -> tuple[float, float]:
    rate_text, _, burst_text = text.partition(":")
    rate = positive_float(rate_text)
    burst = positive_float(burst_text) if burst_text else max(1.0, rate)
    if burst < 1:
        raise ValueError(text)
    return rate, burst


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


def non_negative_size(text: str) -> int:
    value = parse_size(text)
    if value < 0:
        raise ValueError(text)
    return value


def buffer_size(text: str) -> int:
    value = size(text)
    if value < 4096:
        raise ValueError(text)
    return value


# argparse names the type function in its message ("invalid size value"): give them names.
positive_float.__name__ = "positive number"
non_negative_float.__name__ = "number >= 0"
ratio.__name__ = "ratio between 0 and 1"
rate_limit.__name__ = "RPS[:BURST]"
positive_int.__name__ = "integer >= 1"
non_negative_int.__name__ = "integer >= 0"
port_number.__name__ = "port"
size.__name__ = "size"
non_negative_size.__name__ = "size"
buffer_size.__name__ = "size of at least 4KiB"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="router",
        description="Streaming request router for OpenAI-compatible LLM engines (vLLM).",
    )
    add = parser.add_argument
    add("--version", action="version", version=f"router {__version__}")
    add("--config", default=None,
        help="YAML or JSON file with any of these settings, keys named like the flags; "
             "flags given on the command line override it")
    add("--config-watch", action="store_true",
        help="reload --config when the file changes (SIGHUP always reloads)")
    add("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    add("--port", type=port_number, default=8001, help="port to listen on (default 8001)")
    add("--root-path", default="",
        help="the path prefix a proxy in front strips, e.g. /router (uvicorn's root_path, "
             "as in production-stack): routes are served at /, not under the prefix")
    add("--service-discovery", choices=["static", "k8s", "external-only"], default="static",
        help="where backends come from: static (the flags), k8s (pods) or external-only (no "
             "local fleet: only --external-providers-config; default static)")
    add("--static-backends", default="",
        help="comma-separated backend base URLs, e.g. http://10.0.0.7:8000,http://10.0.0.8:8000")
    add("--static-models", default="",
        help="comma-separated models, one entry per backend; an entry may list several "
             "models separated by ';'")
    add("--static-aliases", default="",
        help="comma-separated alias:model pairs, e.g. gpt-4o:llama-3-8b")
    add("--external-providers-config", default=None,
        help="YAML file of hosted OpenAI-compatible providers served beside the local fleet "
             "(production-stack's format); their keys are read from the environment "
             "variables it names")
    add("--routing-logic", choices=sorted({*POLICIES, *ROUTING_LOGIC_MAPPED}),
        default="roundrobin",
        help="routing policy (default roundrobin); disaggregated_prefill sends the prefill "
             "engine a one-token copy of the request, then the request as it came to a decode "
             "engine, and disaggregated_prefill_orchestrated also passes the prefill's "
             "kv_transfer_params to the decode (see docs/routing.md); kvaware routes on the "
             "engines' KV cache events (vLLM --kv-events-config); production-stack's "
             "priority routes as leastload")
    add("--log-level", choices=(*LOG_LEVELS, *LOG_LEVEL_MAPPED), default="info",
        type=str.lower, help="(default info; trace, from production-stack, logs at debug)")
    add("--log-stats", action="store_true",
        help="log a one-line summary per backend every --log-stats-interval seconds")
    add("--log-stats-interval", type=positive_float, default=10.0,
        help="seconds between --log-stats summaries (default 10)")
    add("--log-format", choices=("text", "json"), default="text", type=str.lower,
        help="text (default) or json: one JSON object per line, access lines included")
    add("--no-access-log", dest="access_log", action="store_false",
        help="no access line per request")
    add("--request-stats-window", type=positive_float, default=60.0,
        help="seconds of history for QPS, average TTFT and latency (default 60)")
    add("--demo", action="store_true",
        help="start two built-in demo engines in-process and route to them")
    add("--connect-timeout", type=positive_float, default=5.0,
        help="seconds to connect to a backend (default 5)")
    add("--response-timeout", type=positive_float, default=1800.0,
        help="seconds from a request sent to the first byte of the backend's answer; a "
             "non-streamed answer comes only when generated; never retried (default 1800)")
    add("--response-head-timeout", type=positive_float, default=30.0,
        help="seconds from the first byte of a backend's response head to its end "
             "(default 30)")
    add("--read-timeout", type=positive_float, default=600.0,
        help="seconds a backend's answer may go silent once it started, e.g. between two "
             "chunks of a stream (default 600)")
    add("--max-body-size", type=size, default="2GiB",
        help="largest multipart (audio) body (default 2GiB)")
    add("--max-json-body-size", type=size, default="64MiB",
        help="largest JSON body (default 64MiB)")
    add("--max-inflate-ratio", type=non_negative_float, default=100.0,
        help="how many times its compressed size a gzip/deflate request body may inflate to, "
             "past its first MiB; 0 = no limit (default 100)")
    add("--max-upstream-connections", type=int, default=0,
        help="cap on concurrent backend connections; 0 = no cap (default)")
    add("--workers", type=positive_int, default=1,
        help="processes serving the same port (SO_REUSEPORT), for more than one core "
             "(default 1)")
    add("--drain-timeout", type=non_negative_float, default=30.0,
        help="seconds running requests get to finish after SIGTERM before they are cut "
             "(default 30)")
    add("--shutdown-delay", type=non_negative_float, default=0.0,
        help="seconds to keep accepting after SIGTERM, with /ready answering 503 (default 0)")
    add("--spool-dir", default=None,
        help="directory for multipart bodies that must be spooled (default: system temp)")

    access = parser.add_argument_group("access control, admission and limits")
    add = access.add_argument
    add("--api-keys", default=None,
        help="comma-separated keys clients must send as 'Authorization: Bearer <key>' "
             "(also from $ROUTER_API_KEYS); none: no authentication")
    add("--api-keys-file", default=None,
        help="file with one key per line (re-read on reload)")
    add("--protect-admin", action="store_true",
        help="also require a key for /metrics, /engines, /dashboard and /version")
    add("--forward-client-auth", action="store_true",
        help="pass the client's Authorization header on to backends")
    add("--backend-api-key", default=None,
        help="key sent to backends as 'Authorization: Bearer' (also from $VLLM_API_KEY)")
    add("--max-concurrent-requests", type=non_negative_int, default=0,
        help="proxied requests running at once; 0 = no cap (default)")
    add("--queue-size", type=non_negative_int, default=100,
        help="requests waiting for a slot past the cap; more get 429 (default 100)")
    add("--queue-timeout", type=positive_float, default=30.0,
        help="seconds a request may wait for a slot before a 429 (default 30)")
    add("--rate-limit", type=rate_limit, default=None,
        help="per-client limit RPS[:BURST] (clients: API key, else address), e.g. 10:20")
    add("--max-header-size", type=size, default="8190",
        help="longest request line and header field (default 8190 bytes)")
    add("--max-headers-total-size", type=size, default="32KiB",
        help="the request line and all headers together (default 32KiB)")
    add("--client-header-timeout", type=positive_float, default=30.0,
        help="seconds a new connection has to send its request headers (default 30)")
    add("--client-body-timeout", type=positive_float, default=60.0,
        help="seconds for a JSON body, or between two chunks of an upload (default 60)")
    add("--client-write-timeout", type=positive_float, default=120.0,
        help="seconds a client may leave an answer unread before it is cut off (default 120)")
    add("--keepalive-timeout", type=positive_float, default=75.0,
        help="seconds an idle client connection stays open (default 75)")
    add("--stream-buffer-size", type=buffer_size, default="64KiB",
        help="bytes of an answer buffered per stream on each side before the router stops "
             "reading from the backend (default 64KiB; smaller: less memory per stalled "
             "client, more CPU per MiB of large answers)")

    k8s = parser.add_argument_group("Kubernetes discovery (--service-discovery k8s)")
    add = k8s.add_argument
    add("--k8s-namespace", default=None,
        help="namespace of the engine pods (default: the router pod's own)")
    add("--k8s-label-selector", default="",
        help="label selector of the engine pods (or services), e.g. app=vllm")
    add("--k8s-port", type=port_number, default=8000,
        help="engine port on the pods (default 8000; a pod annotation "
             "router.vllm.ai/port overrides it); services: when they expose it")
    add("--k8s-service-discovery-type", choices=list(DISCOVERY_TYPES), default="pod-ip",
        help="what to watch: pod-ip (pods, routed at POD_IP:PORT) or service-name (services, "
             "routed at http://NAME:PORT through the cluster DNS) (default pod-ip)")
    add("--k8s-kubeconfig", default=None,
        help="kubeconfig to use outside a cluster (default $KUBECONFIG)")
    add("--k8s-max-answer-size", type=size, default="16MiB",
        help="largest list page, watch event or engine /v1/models answer read (default "
             "16MiB)")

    # --- WebSocket sessions (/v1/realtime: router/api/realtime.py) ---
    websocket = parser.add_argument_group("WebSocket sessions (/v1/realtime)")
    add = websocket.add_argument
    add("--websocket-max-message-size", type=size, default="16MiB",
        help="largest WebSocket message relayed either way; a bigger one closes the session "
             "(1009) (default 16MiB)")
    add("--websocket-heartbeat", type=non_negative_float, default=30.0,
        help="seconds between the router's pings on each side of a session; a peer that "
             "does not answer within half of it is cut; 0 = no pings (default 30)")
    add("--websocket-idle-timeout", type=positive_float, default=600.0,
        help="seconds a session may pass no message either way before the router closes "
             "it (default 600)")
    # --- end of WebSocket sessions ---

    batch = parser.add_argument_group("Batch and Files APIs")
    add = batch.add_argument
    add("--enable-batch-api", action="store_true",
        help="serve /v1/files and /v1/batches; batch lines run through this router's routing")
    add("--file-storage-path", default="/tmp/vllm_files",
        help="directory for uploaded files, batch results and batch state, kept across "
             "restarts (default /tmp/vllm_files)")
    add("--batch-concurrency", type=positive_int, default=8,
        help="batch lines in flight at once, over all batches (default 8)")
    add("--batch-max-answer-size", type=size, default="8MiB",
        help="largest answer kept for one batch line; a bigger one fails the line "
             "(default 8MiB: with --batch-concurrency 8, at most 64 MiB of answers held)")
    add("--max-batch-requests", type=positive_int, default=50_000,
        help="lines in one batch's input file; more fail the batch (default 50000)")
    add("--max-batch-input-size", type=size, default="200MiB",
        help="bytes of one batch's input file; more fail the batch (default 200MiB)")
    add("--file-storage-quota-per-key", type=size, default="100GiB",
        help="bytes of stored files per API key (without keys: in all) (default 100GiB)")
    add("--file-storage-quota", type=non_negative_size, default="0",
        help="bytes of stored files over all keys; 0 = no cap but the disk (default 0)")

    extensions = parser.add_argument_group("extensions")
    add = extensions.add_argument
    add("--callbacks", action="append", default=[],
        help="plugin class as module:Class, or production-stack's module.instance (a "
             "module path, or a file path without .py, then the name of a class or an "
             "instance in it); repeat the flag or separate several with commas")
    add("--request-rewriter", default=None,
        help="class as module:Class whose rewrite(flow, body) changes JSON bodies before "
             "routing; noop (production-stack's default) is no rewriter")

    # --- production-stack drop-in: dynamic config files and prefix matching (issue 15) ---
    dynamic = parser.add_argument_group(
        "dynamic config file (production-stack)",
        "a JSON or YAML file in production-stack's format, read at start and watched: a "
        "change is applied like a reload (flags on the command line override it)")
    one_file = dynamic.add_mutually_exclusive_group()
    one_file.add_argument(
        "--dynamic-config-yaml", default=None,
        help="production-stack's dynamic config as YAML (static_models may be a mapping of "
             "model -> {static_backends, static_model_type})")
    one_file.add_argument(
        "--dynamic-config-json", default=None,
        help="production-stack's dynamic config as JSON")
    dynamic.add_argument(
        "--dynamic-config-interval", type=positive_float, default=1.0,
        help="seconds between checks of the dynamic config file for a change (default 1; "
             "production-stack re-reads it every 10)")
    # --- end of the production-stack drop-in block ---

    tracing = parser.add_argument_group("tracing (OpenTelemetry)")
    add = tracing.add_argument
    add("--otel-endpoint", default=None,
        help="export a span per request (and one per backend attempt) over OTLP to this "
             "collector: host:4317 (gRPC) or http://host:4318 (HTTP); off by default")
    add("--otel-protocol", choices=PROTOCOLS, default=None,
        help="grpc or http (default: port 4317 or a bare host:port is grpc, port 4318 or "
             "an http(s):// URL is http)")
    add("--otel-service-name", default="router",
        help="service.name of the router's spans (default router)")
    add("--otel-secure", action="store_true",
        help="TLS to the collector (for OTLP/HTTP, an https:// endpoint does the same)")

    routing = parser.add_argument_group("routing policies")
    add = routing.add_argument
    add("--static-model-labels", default="",
        help="comma-separated labels, one entry per backend (';' for several), e.g. "
             "prefill,prefill,decode,decode")
    add("--static-model-types", default="",
        help="comma-separated model types, one per backend: chat, completion, embeddings, "
             "rerank, score, transcription (for --static-backend-health-checks)")
    add("--static-backend-health-checks", action="store_true",
        help="probe each backend with a minimal real request of its model type instead of "
             "GET --health-check-path")
    add("--session-key", default="x-session-id",
        help="session policy: header, then top-level body field, holding the session key "
             "('-' and '_' interchangeable; default x-session-id)")
    add("--prefix-match-threshold", type=ratio, default=0.5,
        help="prefixaware: share of the prompt a backend's cached prefix must match "
             "(default 0.5)")
    add("--balance-abs-threshold", type=non_negative_float, default=32.0,
        help="prefixaware: load gap in requests beyond which affinity yields to balance "
             "(default 32)")
    add("--balance-rel-threshold", type=positive_float, default=1.5,
        help="prefixaware: ...when the busiest backend also has this many times the load "
             "of the idlest (default 1.5)")
    add("--prefix-min-match-length", type=non_negative_int, default=0,
        help="prefixaware: characters of the prompt a backend's cached prefix must match "
             "at least, else the least loaded backend serves it (production-stack's flag, "
             "in characters as there; default 0)")
    add("--load-cost-tokens", type=non_negative_float, default=64.0,
        help="kvaware, prefixaware: prompt tokens one request of load is worth: an engine "
             "holding N more tokens of the prompt wins until it carries N / this many "
             "requests more (default 64; see docs/routing.md)")
    add("--kv-events-endpoint", default=None,
        help="kvaware: where every engine publishes its KV events, {host} for the engine's "
             "host, e.g. tcp://{host}:5557 (default: each engine's GET /kv_event_sources)")
    add("--kv-events-replay-endpoint", default=None,
        help="kvaware: with --kv-events-endpoint, the replay endpoint, e.g. "
             "tcp://{host}:5558")
    add("--kv-index-max-blocks", type=positive_int, default=1_000_000,
        help="kvaware: KV cache blocks indexed over all engines at most; past it the "
             "busiest engine's oldest go (default 1e6, about 200 MB)")
    add("--kv-tokenize-timeout", type=positive_float, default=0.25,
        help="kvaware: seconds for an engine's /tokenize of the prompt; past it the request "
             "routes on load (default 0.25)")
    add("--prefix-cache-max-chars", type=positive_int, default=10_000_000,
        help="prefixaware: bound on each model's prefix tree, in characters, each node "
             "counting for its overhead too (about the tree's size in bytes; default 1e7)")
    add("--prefill-model-labels", default="prefill",
        help="disaggregated_prefill: labels of prefill backends (default prefill)")
    add("--decode-model-labels", default="decode",
        help="disaggregated_prefill: labels of decode backends (default decode)")
    add("--prefill-timeout", type=positive_float, default=300.0,
        help="disaggregated_prefill: seconds for the whole prefill hop, its answer included "
             "(default 300)")
    add("--prefill-max-answer-size", type=size, default="1MiB",
        help="disaggregated_prefill: largest prefill answer read; more is a 502 (default 1MiB)")

    fleet = parser.add_argument_group("engine stats, health and failover")
    add = fleet.add_argument
    add("--engine-stats-interval", type=non_negative_float, default=10.0,
        help="seconds between scrapes of each engine's /metrics; 0 turns scraping off "
             "(default 10)")
    add("--engine-stats-timeout", type=positive_float, default=5.0,
        help="seconds a whole scrape may take, body included (default 5)")
    add("--engine-stats-max-size", type=size, default="16MiB",
        help="largest /metrics page read; past it the scrape fails (default 16MiB)")
    add("--health-check-interval", type=non_negative_float, default=10.0,
        help="seconds between active health probes; 0 turns them off (default 10)")
    add("--health-check-path", default="/health", help="probe path (default /health)")
    add("--health-check-timeout", type=positive_float, default=5.0,
        help="seconds a probe may take (default 5)")
    add("--cb-failure-threshold", type=positive_int, default=5,
        help="consecutive failures that open a backend's circuit breaker (default 5)")
    add("--cb-cooldown", type=positive_float, default=30.0,
        help="seconds before an open breaker lets one trial request through (default 30)")
    add("--max-ejection-percent", type=percent, default=50,
        help="most of a model's backends that circuit breakers may take out, in percent of "
             "those whose health probe passes, rounded down: below 100 the last one always "
             "stays; 100: no cap (default 50)")
    add("--max-retries", type=non_negative_int, default=2,
        help="retries on other backends for a request that failed before its answer "
             "started (default 2)")
    add("--retry-backoff", type=non_negative_float, default=0.05,
        help="seconds before the first retry, doubled for each next one (default 0.05)")
    add("--retry-budget-percent", type=non_negative_float, default=20.0,
        help="retries in flight at most this percent of the requests in flight, or "
             "--retry-budget-min, whichever is more (default 20)")
    add("--retry-budget-min", type=non_negative_int, default=3,
        help="retries in flight always allowed, whatever the load (default 3)")

    add_prodstack_flags(parser)
    return parser
