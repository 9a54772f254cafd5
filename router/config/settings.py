"""The router's configuration: one frozen dataclass tree, validated once at start.

Nothing else in the package reads `argv` or the environment: `router.config.load` builds a
`Config` from the flags (`router.config.flags`) and the environment, and `router.__main__`
hands the environment to what must see it (systemd's notifier, the workers' supervisor).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

__all__ = [
    "Config", "StaticBackend", "ConfigError", "parse_size", "DEMO_MODELS", "K8sSettings",
    "DISCOVERY_TYPES", "SERVICE_ACCOUNT_DIR", "ExternalModel", "ExternalProvider",
    "DEFAULT_MAX_RETRIES", "DEFAULT_MODEL_TYPE",
]

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

DEMO_MODELS = ("demo-llm", "demo-whisper")
"""Models the built-in demo engines serve (`--demo`)."""

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DISCOVERY_TYPES = ("pod-ip", "service-name")
"""What discovery watches: pods, routed at their IPs, or services, routed at their DNS names."""


@dataclass(frozen=True)
class K8sSettings:
    """What to discover and how to reach the API server. Validated on creation (ValueError)."""

    namespace: str | None = None
    """None: the router pod's own namespace (service account), else the kubeconfig context's,
    else `default`."""
    label_selector: str = ""
    """As in `kubectl get pods -l`, e.g. `app=vllm,tier!=canary`; empty selects every pod (or
    service)."""
    port: int = 8000
    """The engine port on each pod (a pod's `router.vllm.ai/port` annotation overrides it); for
    services, see `router.discovery.k8s_targets`."""
    discovery_type: str = "pod-ip"
    """`pod-ip`: watch pods, route to `POD_IP:PORT`; `service-name`: watch services, route to
    `NAME:PORT` through the cluster's DNS (`DISCOVERY_TYPES`)."""
    scheme: str = "http"
    kubeconfig: str | None = None
    """A kubeconfig path; when set it wins over the in-cluster service account."""
    context: str | None = None
    """The kubeconfig context; None: its `current-context`."""
    api_server: str | None = None
    """In-cluster API server URL (`in_cluster_api_server(os.environ)`); None outside a pod."""
    service_account_dir: str = SERVICE_ACCOUNT_DIR
    models_refresh: float = 30.0
    """Seconds between re-reads of every engine's `/v1/models` (LoRA adapters come and go); also
    the longest wait between retries for an engine whose models are not known yet."""
    model_fetch_timeout: float = 5.0
    engine_api_key: str | None = field(default=None, repr=False)
    """Bearer token for the engines' `/v1/models` (vLLM `--api-key`)."""
    watch_timeout: int = 300
    """`timeoutSeconds` of each watch; the server ends it then and it is resumed."""
    request_timeout: float = 30.0
    """Seconds for one LIST page, and to connect for a WATCH."""
    token_reload: float = 60.0
    """Seconds between re-reads of a token file (kubelet rotates service-account tokens)."""
    max_answer_size: int = 16 * 1024 * 1024
    """Bytes read of one LIST page, one watch event or one engine's `/v1/models`; past them
    the answer is cut (a list or watch is retried with backoff, an engine asked again)."""
    retry_min: float = 0.5
    retry_max: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"k8s port must be between 1 and 65535, not {self.port}")
        if self.discovery_type not in DISCOVERY_TYPES:
            raise ValueError(f"k8s discovery_type must be one of {', '.join(DISCOVERY_TYPES)}, "
                             f"not {self.discovery_type!r}")
        if self.scheme not in ("http", "https"):
            raise ValueError(f"k8s scheme must be http or https, not {self.scheme!r}")
        if self.namespace is not None and not self.namespace.strip():
            raise ValueError("k8s namespace must not be empty (leave it unset for the pod's own)")
        for name in ("models_refresh", "model_fetch_timeout", "request_timeout", "token_reload",
                     "retry_min", "retry_max"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"k8s {name} must be a positive number of seconds, not {value}")
        if self.max_answer_size < 1:
            raise ValueError(f"k8s max_answer_size must be at least 1 byte, not "
                             f"{self.max_answer_size}")
        if self.watch_timeout < 1:
            raise ValueError(f"k8s watch_timeout must be at least 1 second, not "
                             f"{self.watch_timeout}")
        if self.retry_max < self.retry_min:
            raise ValueError("k8s retry_max must not be below retry_min")


DEFAULT_MAX_RETRIES = 3
"""An external provider's retries when its file says none."""
DEFAULT_MODEL_TYPE = "chat"


@dataclass(frozen=True)
class ExternalModel:
    id: str
    type: str = DEFAULT_MODEL_TYPE
    """`chat`, `completion`, `embeddings`...: what production-stack's file says the model is."""
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExternalProvider:
    """One provider from the file, its key already read from the environment."""

    name: str
    url: str
    """`api_base` normalised: no trailing slash, and no trailing `/v1`, since the router's
    request paths start with `/v1` (production-stack appends `/v1/...` to `api_base`)."""
    models: tuple[ExternalModel, ...]
    api_key_env_var: str
    api_key: str = field(repr=False)
    type: str = "openai"
    timeout: float | None = None
    """Seconds to the first byte and between two chunks; None: the router's
    --response-timeout and --read-timeout."""
    max_retries: int = DEFAULT_MAX_RETRIES
    custom_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    """Values may be secrets too (an Azure `api-key`): kept out of `repr`."""

    @property
    def model_ids(self) -> tuple[str, ...]:
        return tuple(model.id for model in self.models)

    @property
    def aliases(self) -> dict[str, str]:
        """alias -> model id."""
        return {alias: model.id for model in self.models for alias in model.aliases}

    def headers(self) -> dict[str, str]:
        """What every request to the provider carries: its key, then its custom headers."""
        return {"Authorization": f"Bearer {self.api_key}", **dict(self.custom_headers)}


class ConfigError(ValueError):
    """A bad setting; the message names the flag or key."""


@dataclass(frozen=True)
class StaticBackend:
    url: str
    models: tuple[str, ...]
    labels: tuple[str, ...] = ()
    model_type: str | None = None


@dataclass(frozen=True)
class Config:
    host: str = "0.0.0.0"
    root_path: str = ""
    """The path prefix a proxy in front strips, e.g. `/router` (uvicorn's `root_path`): the
    routes are served at `/` all the same."""
    port: int = 8001
    service_discovery: str = "static"
    static_backends: tuple[StaticBackend, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)
    """alias -> served model name."""
    routing_logic: str = "roundrobin"
    log_level: str = "info"
    log_format: str = "text"
    """`text` (key=value lines) or `json` (one object per line), for every log line."""
    access_log: bool = True
    """One line per request on the `router.access` logger."""
    request_stats_window: float = 60.0
    """Seconds of history behind QPS, average TTFT and average latency."""
    demo: bool = False
    """Start two in-process demo engines and route to them."""
    demo_engines: int = 2
    connect_timeout: float = 5.0
    """Seconds to open a TCP connection to a backend (a pool slot wait included)."""
    response_timeout: float = 1800.0
    """Seconds from the request sent to the first byte of the backend's answer: vLLM sends a
    non-streamed answer's head only when generation ends. Not retried when it runs out."""
    response_head_timeout: float = 30.0
    """Seconds from the first byte of the response head to its end (a trickling head)."""
    read_timeout: float = 600.0
    """Seconds the backend's answer may go silent once its head started (between two
    chunks); streams have no total limit."""
    max_body_size: int = 2 * GIB
    """Largest multipart (audio) request body."""
    max_json_body_size: int = 64 * MIB
    """Largest JSON request body."""
    max_inflate_ratio: float = 100.0
    """How many times its compressed size a gzip/deflate request body may inflate to (past
    its first MiB); 0 means no limit. The size limits count decoded bytes in any case."""
    max_upstream_connections: int = 0
    """Concurrent connections to all backends together; 0 means no limit (aiohttp's default
    of 100 would quietly cap concurrent streams)."""
    upstream_keepalive: float = 4.0
    """Seconds an idle pooled backend connection is kept; shorter than engines' idle timeout
    (uvicorn closes idle connections after 5 s), because a POST is not retried on a stale one."""
    spool_dir: str | None = None
    """Where multipart bodies with the file before `model` are spooled; None: the system temp."""
    k8s: K8sSettings | None = None
    """Kubernetes discovery settings, with `service_discovery == "k8s"`."""
    external_providers: tuple[ExternalProvider, ...] = ()
    """Hosted OpenAI-compatible providers (`--external-providers-config`), keys included;
    with `service_discovery == "external-only"` the only backends."""

    config_file: str | None = None
    config_watch: bool = False
    """Poll `config_file` and reload when it changes (SIGHUP reloads in any case)."""
    # Access control (router/api/auth.py).
    api_keys: tuple[str, ...] = ()
    """Keys clients must present as `Authorization: Bearer <key>`; none: the router is open."""
    api_keys_file: str | None = None
    protect_admin: bool = False
    """Also require a key for /metrics, /engines, /dashboard and /version (/health and /ready
    stay open)."""
    forward_client_auth: bool = False
    backend_api_key: str | None = None
    """Sent to backends as `Authorization: Bearer` on proxied requests, probes and scrapes."""

    # Admission control and limits (router/proxy/admission.py, router/serve/server.py).
    max_concurrent_requests: int = 0
    """Proxied requests running at once; 0 means no cap."""
    queue_size: int = 100
    """Requests that may wait for a slot when the cap is reached; more get a 429."""
    queue_timeout: float = 30.0
    rate_limit: float = 0.0
    """Requests per second per client (API key, else address); 0 means none."""
    rate_limit_burst: float = 0.0
    max_header_size: int = 8190
    """Longest request line and header field, in bytes."""
    max_headers_total_size: int = 32 * KIB
    """The request line and all the headers together, in bytes (nginx's default buffers)."""
    client_header_timeout: float = 30.0
    """Seconds a new connection has to deliver its first request's headers."""
    client_body_timeout: float = 60.0
    """Seconds a client has to send a JSON body, or between two chunks of an upload."""
    client_write_timeout: float = 120.0
    """Seconds a client may leave an answer unread (a stalled write) before it is cut off,
    so a client that stops reading cannot hold a backend request for ever."""
    keepalive_timeout: float = 75.0
    """Seconds an idle client connection is kept open."""
    stream_buffer_size: int = 64 * KIB
    """Bytes of an answer the router holds per stream on each side: past it in a client's
    write buffer the router stops reading from the backend, whose read buffer stops at the
    same size, so a client that stops reading holds a few times this, not megabytes."""

    workers: int = 1
    """Processes serving the same port (SO_REUSEPORT); metrics aggregate across them."""
    metrics_dir: str | None = None
    """prometheus_client's multiprocess directory (`$PROMETHEUS_MULTIPROC_DIR`, which
    `--workers` sets for its workers): when set, `/metrics` shows the figures of every
    process writing there."""
    # Extensions (router/plugins.py).
    callbacks: tuple[str, ...] = ()
    """Plugins as `module:Class` (or `module.Class`)."""
    request_rewriter: str | None = None
    """`module:Class`; None (production-stack's `noop` too): no rewriter."""

    # production-stack drop-in (router/config/dynamic.py): its dynamic config file.
    dynamic_config_file: str | None = None
    """`--dynamic-config-yaml` or `--dynamic-config-json`: read at start, polled every
    `dynamic_config_interval` seconds, a change applied like a reload."""
    dynamic_config_interval: float = 1.0

    log_stats: bool = False
    """Log a one-line summary per backend every `log_stats_interval` seconds."""
    log_stats_interval: float = 10.0
    drain_timeout: float = 30.0
    """Seconds running requests get to finish after SIGTERM/SIGINT before they are cut."""
    shutdown_delay: float = 0.0
    """Seconds the router keeps accepting after SIGTERM (with `/ready` at 503), so load
    balancers stop sending before the socket closes."""

    # --- WebSocket sessions (/v1/realtime: router/api/realtime.py) ---
    websocket_max_message_size: int = 16 * MIB
    """Largest message relayed either way; a bigger one closes the session with 1009."""
    websocket_heartbeat: float = 30.0
    """Seconds between pings on each side of a session (a peer silent for half of it is
    cut); 0: no pings."""
    websocket_idle_timeout: float = 600.0
    """Seconds a session may pass no message either way before the router closes it."""
    # --- end of WebSocket sessions ---

    # Batch and Files APIs (router/batch/).
    enable_batch_api: bool = False
    file_storage_path: str = "/tmp/vllm_files"
    """Uploaded files, batch results and batch state; kept across restarts."""
    batch_concurrency: int = 8
    """Batch lines in flight at once, over all batches."""
    batch_max_answer_size: int = 8 * MIB
    """Largest answer kept for one batch line (a bigger one fails the line): the batch runner
    holds at most `batch_concurrency` times this in answers."""
    max_batch_requests: int = 50_000
    """Lines of one batch's input file (OpenAI's limit); past it the batch fails validating."""
    max_batch_input_size: int = 200 * MIB
    """Bytes of one batch's input file (OpenAI's 200 MB); past it the batch fails validating."""
    file_storage_quota_per_key: int = 100 * GIB
    """Bytes of stored files per owner (API key; the one open tenant without keys)."""
    file_storage_quota: int = 0
    """Bytes of stored files over all owners; 0 means no cap but the disk."""

    # Routing policies (router/policies/).
    session_key: str = "x-session-id"
    """`session` policy: the header (then top-level body field) holding the session key;
    `-` and `_` are interchangeable."""
    prefix_match_threshold: float = 0.5
    """`prefixaware`: the share of the prompt that must match a backend's cached prefix."""
    balance_abs_threshold: float = 32.0
    """`prefixaware`: load gap (in requests) beyond which the fleet counts as imbalanced..."""
    balance_rel_threshold: float = 1.5
    """...when also the busiest backend carries this many times the load of the idlest."""
    prefix_min_match_length: int = 0
    """`prefixaware`: characters a cached prefix must match at least (production-stack's
    `--prefix-min-match-length`); below it the least loaded backend serves the request."""
    load_cost_tokens: float = 64.0
    """`kvaware`, `prefixaware`: prompt tokens one request of load is worth in the cache
    score (`router.policies.cache_score`)."""
    kv_events_endpoint: str | None = None
    """`kvaware`: where every engine publishes its KV events, `{host}` standing for the
    engine's host (e.g. `tcp://{host}:5557`); None: ask each engine (`/kv_event_sources`)."""
    kv_events_replay_endpoint: str | None = None
    """`kvaware`: the replay endpoint, with `kv_events_endpoint`."""
    kv_index_max_blocks: int = 1_000_000
    """`kvaware`: bound on the blocks indexed over all engines."""
    kv_tokenize_timeout: float = 0.25
    """`kvaware`: seconds for the engine's `/tokenize`; past it the request routes on load."""
    prefix_cache_max_chars: int = 10_000_000
    """`prefixaware`: bound on each model's prefix tree, in characters with each node counted
    for its overhead as well (roughly the tree's size in bytes); LRU eviction."""
    static_backend_health_checks: bool = False
    """Probe each backend with a minimal real request of its `--static-model-types` type."""
    prefill_model_labels: tuple[str, ...] = ("prefill",)
    decode_model_labels: tuple[str, ...] = ("decode",)
    prefill_timeout: float = 300.0
    """Seconds for the whole prefill hop of disaggregated prefill (its answer is one token)."""
    prefill_max_answer_size: int = 1 * MIB
    """Largest prefill answer read; a bigger one is a 502."""

    # Engine stats (router/stats/engine.py).
    engine_stats_interval: float = 10.0
    engine_stats_timeout: float = 5.0
    """Seconds for a whole scrape, the body's last byte included."""
    engine_stats_max_size: int = 16 * MIB
    """Largest `/metrics` page read; past it the scrape fails and is cut."""

    # Health (router/backends/breaker.py, tracker.py, prober.py).
    health_check_interval: float = 10.0
    health_check_path: str = "/health"
    health_check_timeout: float = 5.0
    cb_failure_threshold: int = 5
    """Consecutive failures that open a backend's circuit breaker."""
    cb_cooldown: float = 30.0
    """Seconds an open breaker waits before letting one trial request through."""
    max_ejection_percent: int = 50
    """The most breakers may hold out of a model's backends that the probes do not fail, in
    percent, rounded down (so never the last one below 100); 100: no cap."""

    # Tracing (router/observe/tracing.py).
    otel_endpoint: str | None = None
    """OTLP collector for traces (`host:4317`, `http://host:4318`); None: no tracing, and
    OpenTelemetry is not even imported."""
    otel_protocol: str | None = None
    """`grpc` or `http`; None: from the endpoint (`router.observe.tracing.otlp_target`)."""
    otel_service_name: str = "router"
    otel_secure: bool = False
    """TLS to a gRPC collector (an HTTP one takes an `https://` endpoint)."""

    # Failover (router/proxy/forward.py).
    max_retries: int = 2
    retry_backoff: float = 0.05
    """Seconds before the first retry; doubled for each next one."""
    retry_budget_percent: float = 20.0
    """Retries in flight may be at most this share of the requests in flight..."""
    retry_budget_min: int = 3
    """...or this many, whichever is more (Envoy's `min_retry_concurrency`)."""
    notices: tuple[str, ...] = ()
    """Lines logged at start: production-stack flags mapped onto ours or ignored
    (`router.config.prodstack`)."""


SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
SIZE_UNITS = {"": 1, "b": 1, "k": KIB, "m": MIB, "g": GIB, "t": 1024 * GIB}


def parse_size(text: str) -> int:
    """Bytes from `123`, `64MiB`, `2G`, `512k` (binary units)."""
    match = SIZE_PATTERN.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 64MiB, 2GiB, 1048576)")
    number, unit = match.groups()
    scale = SIZE_UNITS[(unit or "")[:1].lower()]
    return int(float(number) * scale)
