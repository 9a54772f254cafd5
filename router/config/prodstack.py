"""production-stack compatibility: the flags of `vllm_router`'s parser that have no flag of
their own here. Each is accepted with its meaning there, mapped onto ours, accepted and
ignored with a notice (it configures a component this router does without), or refused at
start in one line naming what to use instead (it asks for a component we do not run: the
semantic cache, PII detection). docs/running.md has the table.

`add_prodstack_flags` adds them to the parser; `prodstack_settings` reads them back for
`router.config.load`: the mapped values and the notices logged at start."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from router.config.settings import ConfigError

__all__ = [
    "add_prodstack_flags", "prodstack_settings", "ProdstackSettings", "ROUTING_LOGIC_MAPPED",
    "LOG_LEVEL_MAPPED",
]

ROUTING_LOGIC_MAPPED = {
    # priority sends high-priority requests to the least-loaded engine; leastload does
    # that for every request. The body's `priority` field reaches vLLM unchanged.
    "priority": "leastload",
}
LOG_LEVEL_MAPPED = {"trace": "debug"}

SEMANTIC_CACHE_ADVICE = ("the router runs no semantic cache; drop it (vLLM's prefix caching "
                         "with --routing-logic prefixaware keeps repeated prompts cheap)")
REFUSED_GATES = {
    "semanticcache": SEMANTIC_CACHE_ADVICE,
    "piidetection": ("the router runs no PII detection; drop it, or screen bodies in a "
                     "--request-rewriter plugin"),
}


def count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def interval(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(text)
    return value


def sample_rate(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise ValueError(text)
    return value


def seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


count.__name__ = "integer >= 0"
interval.__name__ = "number >= 0"
sample_rate.__name__ = "rate between 0 and 1"
seconds.__name__ = "positive number"


def add_prodstack_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "production-stack compatibility",
        "vllm_router's flags that have another name here, or configure a component this "
        "router does without; docs/running.md maps each one",
    )
    add = group.add_argument
    # Same meaning, another name: they set the same value as our flag (the last one given
    # wins) and leave its default alone when absent.
    add("--static-backend-health-check-interval", dest="health_check_interval",
        type=interval, default=argparse.SUPPRESS, metavar="SECONDS",
        help="= --health-check-interval")
    add("--static-backend-health-check-timeout-seconds", "--backend-health-check-timeout-seconds",
        dest="health_check_timeout", type=seconds, default=argparse.SUPPRESS,
        metavar="SECONDS",
        help="= --health-check-timeout")
    add("--max-instance-failover-reroute-attempts", dest="max_retries", type=count,
        default=argparse.SUPPRESS, metavar="N",
        help="= --max-retries (reroutes of a request that failed before its answer started)")
    add("--k8s-watcher-timeout-seconds", type=count, default=0, metavar="SECONDS",
        help="timeoutSeconds of each Kubernetes watch, resumed when it ends; 0: the "
             "router's own (300)")
    add("--file-storage-class", choices=["local_file"], default="local_file",
        help="accepted: files are always stored under --file-storage-path")
    add("--batch-processor", choices=["local"], default="local",
        help="accepted: batches always run in the router, through its routing")
    # Accepted and ignored, with a notice at start.
    add("--kv-aware-threshold", type=int, default=None, metavar="N",
        help="ignored: kvaware routes on the engines' own KV events (no LMCache controller)")
    for flag in ("--lmcache-controller-port", "--lmcache-health-check-interval",
                 "--lmcache-worker-timeout"):
        add(flag, type=int, default=None, metavar="N",
            help="ignored: the router runs no LMCache controller; kvaware routes on the "
                 "engines' own KV events")
    add("--sentry-dsn", default=None, metavar="DSN",
        help="ignored: no Sentry reporting built in (errors are logged; traces: "
             "--otel-endpoint)")
    add("--sentry-traces-sample-rate", type=sample_rate, default=None, metavar="RATE",
        help="ignored")
    add("--sentry-profile-session-sample-rate", type=sample_rate, default=None,
        metavar="RATE", help="ignored")
    for flag, kind in (("--priority-header", str), ("--priority-field", str),
                       ("--priority-default", int), ("--priority-threshold", int)):
        add(flag, type=kind, default=None, metavar="VALUE",
            help="ignored: --routing-logic priority routes as leastload")
    add("--feature-gates", default="", metavar="GATES",
        help="Name=true,...: SemanticCache and PIIDetection are refused (not run here); "
             "others are ignored")
    # Refused: they only configure the semantic cache, which the router does not run.
    for flag in ("--semantic-cache-model", "--semantic-cache-dir",
                 "--semantic-cache-threshold"):
        add(flag, default=None, metavar="VALUE", help="refused: no semantic cache here")


@dataclass(frozen=True)
class ProdstackSettings:
    routing_logic: str
    log_level: str
    k8s_watch_timeout: int | None
    """None: K8sSettings' default."""
    notices: tuple[str, ...]


def prodstack_settings(args: argparse.Namespace) -> ProdstackSettings:
    """Mapped values and start-up notices; `ConfigError` for a refused flag."""
    for name in ("semantic_cache_model", "semantic_cache_dir", "semantic_cache_threshold"):
        if getattr(args, name) is not None:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"argument {flag}: {SEMANTIC_CACHE_ADVICE}")
    notices: list[str] = []
    for gate, value in feature_gates(args.feature_gates):
        advice = REFUSED_GATES.get(gate.lower())
        if advice and value:
            raise ConfigError(f"argument --feature-gates: {gate}: {advice}")
        if value and not advice:
            notices.append(f"--feature-gates {gate}: no such feature here, ignored")
    routing_logic = ROUTING_LOGIC_MAPPED.get(args.routing_logic, args.routing_logic)
    if routing_logic != args.routing_logic:
        notices.append(f"--routing-logic {args.routing_logic}: routing as {routing_logic}, "
                       "its closest policy here")
    log_level = LOG_LEVEL_MAPPED.get(args.log_level, args.log_level)
    if log_level != args.log_level:
        notices.append(f"--log-level {args.log_level}: logging at {log_level}")
    ignored = [name for name in ("kv_aware_threshold", "lmcache_controller_port",
                                 "lmcache_health_check_interval", "lmcache_worker_timeout")
               if getattr(args, name) is not None]
    if ignored:
        notices.append(f"{flags(ignored)} ignored: the router runs no LMCache controller; "
                       "--routing-logic kvaware routes on the engines' own KV events "
                       "(vLLM --kv-events-config), and on the prompts it saw while an "
                       "engine publishes none")
    sentry = [name for name in ("sentry_dsn", "sentry_traces_sample_rate",
                                "sentry_profile_session_sample_rate")
              if getattr(args, name) is not None]
    if sentry:
        notices.append(f"{flags(sentry)} ignored: no Sentry reporting here; errors are "
                       "logged, and --otel-endpoint exports traces")
    priority = [name for name in ("priority_header", "priority_field", "priority_default",
                                  "priority_threshold") if getattr(args, name) is not None]
    if priority:
        notices.append(f"{flags(priority)} ignored: --routing-logic priority routes as "
                       "leastload; a body's priority field reaches the engine unchanged")
    return ProdstackSettings(
        routing_logic=routing_logic, log_level=log_level,
        k8s_watch_timeout=args.k8s_watcher_timeout_seconds or None,
        notices=tuple(notices),
    )


def flags(names: list[str]) -> str:
    return ", ".join("--" + name.replace("_", "-") for name in names)


def feature_gates(text: str) -> list[tuple[str, bool]]:
    """production-stack's `Name=true,Other=false`; a bare name counts as enabled."""
    gates = []
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name.strip():
            gates.append((name.strip(), value.strip().lower() in ("", "true", "1", "yes")))
    return gates
