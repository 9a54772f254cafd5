"""Every flag of production-stack's `vllm_router` parser starts this router (same meaning, or
mapped onto ours, or accepted and ignored with a notice), or, for the semantic cache and PII
detection it does not run, stops at start in one line naming the flag and what to do instead;
never argparse's "unrecognized arguments", never a traceback. The argument lists their Helm
chart renders start the router and serve a chat."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from router.config.flags import build_parser
from router.config.load import load_config
from router.config.settings import ConfigError, K8sSettings
from router.testing import RunningEngine, start_engine
from router.testing.processes import free_port, wait_until_healthy

MODEL = "m"
BASE = ["--static-backends", "http://127.0.0.1:9", "--static-models", MODEL]

# Each flag of production-stack's parser (src/vllm_router/parsers/parser.py, with the flags of
# its newer versions and its semantic-cache extension) with a representative value, and
# what it must come to here: Config attributes it sets, or None for "accepted, no effect".
ACCEPTED: dict[str, tuple[list[str], dict[str, Any] | None]] = {
    "--host": (["--host", "127.0.0.1"], {"host": "127.0.0.1"}),
    "--port": (["--port", "8080"], {"port": 8080}),
    "--service-discovery": (["--service-discovery", "static"],
                            {"service_discovery": "static"}),
    "--k8s-service-discovery-type": (["--k8s-service-discovery-type", "service-name"], None),
    "--static-backends": ([], {"static_backends": lambda b: b[0].url == "http://127.0.0.1:9"}),
    "--static-models": ([], {"static_backends": lambda b: b[0].models == (MODEL,)}),
    "--static-aliases": (["--static-aliases", "gpt-4o:m"], {"aliases": {"gpt-4o": MODEL}}),
    "--static-model-types": (["--static-model-types", "chat"],
                             {"static_backends": lambda b: b[0].model_type == "chat"}),
    "--static-model-labels": (["--static-model-labels", "prefill"],
                              {"static_backends": lambda b: b[0].labels == ("prefill",)}),
    "--static-backend-health-checks": (
        ["--static-model-types", "chat", "--static-backend-health-checks"],
        {"static_backend_health_checks": True},
    ),
    "--static-backend-health-check-interval": (
        ["--static-backend-health-check-interval", "30"], {"health_check_interval": 30.0},
    ),
    "--static-backend-health-check-timeout-seconds": (
        ["--static-backend-health-check-timeout-seconds", "7"], {"health_check_timeout": 7.0},
    ),
    "--backend-health-check-timeout-seconds": (
        ["--backend-health-check-timeout-seconds", "8"], {"health_check_timeout": 8.0},
    ),
    "--max-instance-failover-reroute-attempts": (
        ["--max-instance-failover-reroute-attempts", "1"], {"max_retries": 1},
    ),
    "--k8s-port": (["--k8s-port", "8000"], None),
    "--k8s-namespace": (["--k8s-namespace", "default"], None),
    "--k8s-label-selector": (["--k8s-label-selector", "environment=test,release=test"], None),
    "--k8s-watcher-timeout-seconds": (["--k8s-watcher-timeout-seconds", "0"], None),
    "--routing-logic": (["--routing-logic", "roundrobin"], {"routing_logic": "roundrobin"}),
    "--lmcache-controller-port": (["--lmcache-controller-port", "9000"],
                                  {"notices": "--lmcache-controller-port"}),
    "--lmcache-health-check-interval": (["--lmcache-health-check-interval", "5"],
                                        {"notices": "--lmcache-health-check-interval"}),
    "--lmcache-worker-timeout": (["--lmcache-worker-timeout", "30"],
                                 {"notices": "--lmcache-worker-timeout"}),
    "--kv-aware-threshold": (["--kv-aware-threshold", "2000"],
                             {"notices": "--kv-aware-threshold"}),
    "--session-key": (["--session-key", "x-user-id"], {"session_key": "x-user-id"}),
    "--callbacks": (["--callbacks", "tests.production_stack_callbacks.callbacks_handler"],
                    {"callbacks": ("tests.production_stack_callbacks.callbacks_handler",)}),
    "--request-rewriter": (["--request-rewriter", "noop"], {"request_rewriter": None}),
    "--enable-batch-api": (["--enable-batch-api"], {"enable_batch_api": True}),
    "--file-storage-class": (["--file-storage-class", "local_file"], None),
    "--file-storage-path": (["--file-storage-path", "{tmp}"], {"file_storage_path": "{tmp}"}),
    "--batch-processor": (["--batch-processor", "local"], None),
    "--engine-stats-interval": (["--engine-stats-interval", "15"],
                                {"engine_stats_interval": 15.0}),
    "--request-stats-window": (["--request-stats-window", "60"],
                               {"request_stats_window": 60.0}),
    "--log-stats": (["--log-stats"], {"log_stats": True}),
    "--log-stats-interval": (["--log-stats-interval", "10"], {"log_stats_interval": 10.0}),
    "--dynamic-config-yaml": (["--dynamic-config-yaml", "{tmp}/dynamic.yaml"],
                              {"dynamic_config_file": "{tmp}/dynamic.yaml",
                               "session_key": "x-user-id"}),
    "--dynamic-config-json": (["--dynamic-config-json", "{tmp}/dynamic.json"],
                              {"dynamic_config_file": "{tmp}/dynamic.json",
                               "session_key": "x-user-id"}),
    "--feature-gates": (["--feature-gates", "SemanticCache=false"], {"notices": ()}),
    "--log-level": (["--log-level", "warning"], {"log_level": "warning"}),
    "--sentry-dsn": (["--sentry-dsn", "https://key@sentry.example/1"],
                     {"notices": "--sentry-dsn"}),
    "--sentry-traces-sample-rate": (["--sentry-traces-sample-rate", "0.1"],
                                    {"notices": "--sentry-traces-sample-rate"}),
    "--sentry-profile-session-sample-rate": (
        ["--sentry-profile-session-sample-rate", "1.0"],
        {"notices": "--sentry-profile-session-sample-rate"},
    ),
    "--otel-endpoint": (["--otel-endpoint", "127.0.0.1:4317"],
                        {"otel_endpoint": "127.0.0.1:4317"}),
    "--otel-service-name": (["--otel-service-name", "vllm-router"],
                            {"otel_service_name": "vllm-router"}),
    "--otel-secure": (["--otel-secure"], {"otel_secure": True}),
    "--prefill-model-labels": (["--prefill-model-labels", "prefill"],
                               {"prefill_model_labels": ("prefill",)}),
    "--decode-model-labels": (["--decode-model-labels", "decode"],
                              {"decode_model_labels": ("decode",)}),
    "--priority-header": (["--priority-header", "x-request-priority"],
                          {"notices": "--priority-header"}),
    "--priority-field": (["--priority-field", "priority"], {"notices": "--priority-field"}),
    "--priority-default": (["--priority-default", "0"], {"notices": "--priority-default"}),
    "--priority-threshold": (["--priority-threshold", "0"],
                             {"notices": "--priority-threshold"}),
    "--root-path": (["--root-path", "/router"], {"root_path": "/router"}),
    "--prefix-min-match-length": (["--prefix-min-match-length", "128"],
                                  {"prefix_min_match_length": 128}),
}

# Refused at start: they configure a component this router does not run.
REFUSED: dict[str, list[str]] = {
    "--semantic-cache-model": ["--semantic-cache-model", "all-MiniLM-L6-v2"],
    "--semantic-cache-dir": ["--semantic-cache-dir", "semantic_cache"],
    "--semantic-cache-threshold": ["--semantic-cache-threshold", "0.95"],
    "--feature-gates": ["--feature-gates", "SemanticCache=true"],
    "--feature-gates PIIDetection": ["--feature-gates", "PIIDetection=true"],
}

# Their --routing-logic and --log-level values, and what each is here.
ROUTING_LOGIC = {
    "roundrobin": "roundrobin", "session": "session", "prefixaware": "prefixaware",
    "disaggregated_prefill": "disaggregated_prefill", "kvaware": "kvaware",
    "priority": "leastload",
    "disaggregated_prefill_orchestrated": "disaggregated_prefill_orchestrated",
}
LOG_LEVEL = {"critical": "critical", "error": "error", "warning": "warning", "info": "info",
             "debug": "debug", "trace": "debug"}


def filled(tokens: Sequence[str], tmp: Path) -> list[str]:
    return [token.replace("{tmp}", str(tmp)) for token in tokens]


@pytest.mark.parametrize("flag", sorted(ACCEPTED))
def test_production_stack_flag_is_accepted(flag: str, tmp_path: Path) -> None:
    tokens, expected = ACCEPTED[flag]
    # The dynamic-config files of production-stack's format that the samples name.
    (tmp_path / "dynamic.yaml").write_text("session_key: x-user-id\n")
    (tmp_path / "dynamic.json").write_text('{"session_key": "x-user-id"}')
    config = load_config([*BASE, *filled(tokens, tmp_path)])
    for name, want in (expected or {}).items():
        got = getattr(config, name)
        if name == "notices":
            if want == ():
                assert got == (), got
            else:
                assert any(want in notice for notice in got), got
        elif callable(want):
            assert want(got), got
        else:
            assert got == (want.replace("{tmp}", str(tmp_path))
                           if isinstance(want, str) else want)


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_component_we_do_not_run_is_refused_in_one_line(flag: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config([*BASE, *REFUSED[flag]])
    message = str(error.value)
    assert message.startswith(f"argument {REFUSED[flag][0]}: "), message
    assert "\n" not in message
    assert "drop it" in message  # says what to do instead


@pytest.mark.parametrize("value", sorted(ROUTING_LOGIC))
def test_routing_logic_values(value: str) -> None:
    config = load_config([*BASE, "--routing-logic", value])
    assert config.routing_logic == ROUTING_LOGIC[value]
    mapped = [notice for notice in config.notices if notice.startswith("--routing-logic")]
    assert bool(mapped) == (value != ROUTING_LOGIC[value]), config.notices


@pytest.mark.parametrize("value", sorted(LOG_LEVEL))
def test_log_level_values(value: str) -> None:
    config = load_config([*BASE, "--log-level", value.upper()])
    assert config.log_level == LOG_LEVEL[value]


def test_version_is_answered() -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_config(["--version"])
    assert exit_info.value.code == 0


def test_aliases_leave_our_defaults_alone_and_the_last_one_wins() -> None:
    plain = load_config(BASE)
    assert (plain.health_check_interval, plain.health_check_timeout, plain.max_retries) == (
        10.0, 5.0, 2)
    assert plain.notices == ()
    config = load_config([*BASE, "--health-check-timeout", "3",
                          "--backend-health-check-timeout-seconds", "9"])
    assert config.health_check_timeout == 9.0


def test_k8s_watcher_timeout_sets_the_watch_timeout() -> None:
    k8s = ["--service-discovery", "k8s", "--k8s-namespace", "default"]
    config = load_config([*k8s, "--k8s-watcher-timeout-seconds", "45"])
    assert config.k8s is not None and config.k8s.watch_timeout == 45
    config = load_config([*k8s, "--k8s-watcher-timeout-seconds", "0"])
    assert config.k8s is not None and config.k8s.watch_timeout == K8sSettings.watch_timeout


def test_help_names_every_production_stack_flag_and_its_mapping() -> None:
    text = " ".join(build_parser().format_help().split())
    for flag in [*ACCEPTED, *(tokens[0] for tokens in REFUSED.values())]:
        assert flag in text, flag
    for theirs, ours in (("--static-backend-health-check-interval", "--health-check-interval"),
                         ("--backend-health-check-timeout-seconds", "--health-check-timeout"),
                         ("--max-instance-failover-reroute-attempts", "--max-retries")):
        assert f"{theirs} " in text and f"= {ours}" in text
    assert "kvaware routes on the engines' KV cache events" in text


# --- real starts: `python -m router` with the argument lists their chart renders ---------

def chart_args(port: int, backends: Sequence[str], routing_logic: str,
               session_key: str | None = None, extra: Sequence[str] = (),
               lmcache_controller_port: int | None = None) -> list[str]:
    """As helm/templates/deployment-router.yaml renders routerSpec for static discovery
    (only --host differs: loopback for the test)."""
    args = ["--host", "127.0.0.1", "--port", str(port), "--service-discovery", "static",
            "--static-backends", ",".join(backends),
            "--static-models", ",".join(MODEL for _ in backends),
            "--routing-logic", routing_logic]
    if session_key:
        args += ["--session-key", session_key]
    args += ["--engine-stats-interval", "15", "--request-stats-window", "60", *extra]
    if lmcache_controller_port:
        args += ["--lmcache-controller-port", str(lmcache_controller_port)]
    return args


@pytest.fixture
async def engines() -> AsyncIterator[list[RunningEngine]]:
    running = [await start_engine([MODEL], name=f"engine{n}") for n in range(2)]
    try:
        yield running
    finally:
        for engine in running:
            await engine.runner.cleanup()


async def serve_a_chat(args: Sequence[str], port: int) -> str:
    """Start `python -m router args`, send a chat through it, stop it with SIGINT; its log."""
    url = f"http://127.0.0.1:{port}"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_healthy(session, url, process)
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        async with client:
            reply = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                extra_headers={"x-user-id": "alice"},
            )
        assert reply.choices[0].message.content
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), timeout=15)
        log = err.decode()
        assert process.returncode == 0, log
        assert "Traceback" not in log and "unrecognized arguments" not in log, log
        return log
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


CHARTS = {
    "roundrobin": {"routing_logic": "roundrobin"},
    "session": {"routing_logic": "session", "session_key": "x-user-id"},
    # Their kvaware tutorial: routingLogic kvaware and lmcacheControllerPort set.
    "kvaware": {"routing_logic": "kvaware", "lmcache_controller_port": 9000,
                "extra": ["--log-level", "trace"]},
    # extraArgs from their docs: health checks, failover, Sentry, feature gates, batch API.
    "extra-args": {"routing_logic": "prefixaware", "extra": [
        "--static-model-types", "chat,chat", "--static-backend-health-checks",
        "--static-backend-health-check-interval", "30",
        "--backend-health-check-timeout-seconds", "10",
        "--max-instance-failover-reroute-attempts", "1", "--k8s-watcher-timeout-seconds", "0",
        "--kv-aware-threshold", "2000", "--sentry-dsn", "https://key@sentry.example/1",
        "--sentry-traces-sample-rate", "0.1", "--feature-gates", "SemanticCache=false",
        "--file-storage-class", "local_file", "--batch-processor", "local",
    ]},
}


@pytest.mark.parametrize("chart", sorted(CHARTS))
async def test_chart_rendered_arguments_start_and_serve_a_chat(
    chart: str, engines: list[RunningEngine]
) -> None:
    port = free_port()
    values: dict[str, Any] = CHARTS[chart]
    log = await serve_a_chat(chart_args(port, [e.url for e in engines], **values), port)
    if chart == "kvaware":
        assert "routing as" not in log, log  # kvaware is a policy of its own here
        assert "--log-level trace: logging at debug" in log, log
        assert "--lmcache-controller-port ignored" in log, log
    if chart == "extra-args":
        assert "--sentry-dsn, --sentry-traces-sample-rate ignored" in log, log


async def test_refused_flag_stops_the_start_in_one_line() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", *BASE, "--port", str(free_port()),
        "--feature-gates", "SemanticCache=true",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    lines = err.decode().splitlines()
    assert process.returncode == 2 and out == b""
    assert len(lines) == 1, lines
    assert lines[0].startswith("router: error: argument --feature-gates: SemanticCache: "), lines
    assert "semantic cache" in lines[0] and "drop it" in lines[0]
