"""Flags -> `Config`, bad flags -> exit 2 with one line naming the flag, and `--demo` for real."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import aiohttp
import pytest

from router.config.load import parse_config
from router.config.settings import GIB, KIB, MIB, Config, StaticBackend
from router.testing.processes import free_port, wait_until_healthy

BAD_FLAGS = {
    # id: (argv, the flag the error line must name)
    "port-not-an-int": (["--demo", "--port", "http"], "--port"),
    "port-too-big": (["--demo", "--port", "70000"], "--port"),
    "port-negative": (["--demo", "--port", "-1"], "--port"),
    "unknown-routing-logic": (["--demo", "--routing-logic", "leastloaded"], "--routing-logic"),
    "unknown-log-level": (["--demo", "--log-level", "verbose"], "--log-level"),
    "headers-total-under-one-field": (
        ["--demo", "--max-header-size", "64KiB"], "--max-headers-total-size",
    ),
    "negative-inflate-ratio": (["--demo", "--max-inflate-ratio", "-1"], "--max-inflate-ratio"),
    "fewer-models-than-backends": (
        ["--static-backends", "http://a:8000,http://b:8000", "--static-models", "m"],
        "--static-models",
    ),
    "more-models-than-backends": (
        ["--static-backends", "http://a:8000", "--static-models", "m,n"], "--static-models",
    ),
    "empty-model-entry": (
        ["--static-backends", "http://a:8000", "--static-models", ";"], "--static-models",
    ),
    "models-without-backends": (["--demo", "--static-models", "m"], "--static-models"),
    "url-not-http": (["--static-backends", "ftp://a:21", "--static-models", "m"],
                     "--static-backends"),
    "url-without-scheme": (["--static-backends", "localhost:8000", "--static-models", "m"],
                           "--static-backends"),
    "url-with-bad-port": (["--static-backends", "http://a:port", "--static-models", "m"],
                          "--static-backends"),
    "url-without-host": (["--static-backends", "http://", "--static-models", "m"],
                         "--static-backends"),
    # A base URL with a query or fragment: the proxy appends the request path after it.
    "url-with-query": (["--static-backends", "http://a:8000?x=1", "--static-models", "m"],
                       "--static-backends"),
    "url-with-fragment": (["--static-backends", "http://a:8000#x", "--static-models", "m"],
                          "--static-backends"),
    "duplicate-url": (
        ["--static-backends", "http://a:8000,http://a:8000/", "--static-models", "m,n"],
        "--static-backends",
    ),
    "alias-without-colon": (["--demo", "--static-aliases", "gpt-4o"], "--static-aliases"),
    "alias-without-model": (["--demo", "--static-aliases", "gpt-4o:"], "--static-aliases"),
    "alias-without-name": (["--demo", "--static-aliases", ":llama"], "--static-aliases"),
    "neither-backends-nor-demo": ([], "--static-backends"),
    "both-backends-and-demo": (
        ["--demo", "--static-backends", "http://a:8000", "--static-models", "m"], "--demo",
    ),
    "zero-connect-timeout": (["--demo", "--connect-timeout", "0"], "--connect-timeout"),
    "negative-read-timeout": (["--demo", "--read-timeout", "-5"], "--read-timeout"),
    "word-read-timeout": (["--demo", "--read-timeout", "soon"], "--read-timeout"),
    "zero-response-timeout": (["--demo", "--response-timeout", "0"], "--response-timeout"),
    "zero-response-head-timeout": (
        ["--demo", "--response-head-timeout", "0"], "--response-head-timeout",
    ),
    "negative-retry-budget": (["--demo", "--retry-budget-percent", "-1"], "--retry-budget-percent"),
    "fractional-retry-budget-min": (["--demo", "--retry-budget-min", "1.5"], "--retry-budget-min"),
    "zero-stats-window": (["--demo", "--request-stats-window", "0"], "--request-stats-window"),
    # aiohttp cannot schedule an infinite connect timeout: every request would be a 500.
    "infinite-connect-timeout": (["--demo", "--connect-timeout", "inf"], "--connect-timeout"),
    # An infinite window never expires a bucket (unbounded memory) and makes QPS always 0.
    "infinite-stats-window": (
        ["--demo", "--request-stats-window", "inf"], "--request-stats-window",
    ),
    "size-is-a-word": (["--demo", "--max-body-size", "lots"], "--max-body-size"),
    "zero-json-size": (["--demo", "--max-json-body-size", "0"], "--max-json-body-size"),
    "size-unit-without-prefix": (["--demo", "--max-body-size", "5i"], "--max-body-size"),
    "negative-upstream-connections": (
        ["--demo", "--max-upstream-connections", "-1"], "--max-upstream-connections",
    ),
    "ejection-percent-over-100": (
        ["--demo", "--max-ejection-percent", "101"], "--max-ejection-percent",
    ),
    # production-stack's flags keep their checks: a sample rate is a ratio, a count whole.
    "sentry-rate-over-1": (
        ["--demo", "--sentry-traces-sample-rate", "1.5"], "--sentry-traces-sample-rate",
    ),
    "negative-failover-attempts": (
        ["--demo", "--max-instance-failover-reroute-attempts", "-1"],
        "--max-instance-failover-reroute-attempts",
    ),
    "other-file-storage-class": (
        ["--demo", "--file-storage-class", "s3"], "--file-storage-class",
    ),
    "unknown-routing-logic-value-of-theirs-neither": (
        ["--demo", "--routing-logic", "kv_aware"], "--routing-logic",
    ),
}

# Run as real `python -m router` processes (all at once: each costs ~0.4 s of imports). One
# per way an error reaches the user: argparse's type check, its choices, our ConfigError.
SUBPROCESS_CASES = (
    "port-too-big",
    "unknown-routing-logic",
    "fewer-models-than-backends",
    "neither-backends-nor-demo",
    "size-unit-without-prefix",
)


def test_production_stack_flags_build_the_config() -> None:
    config = parse_config([
        "--host", "127.0.0.1",
        "--port", "9000",
        "--static-backends", "http://10.0.0.7:8000, http://10.0.0.8:8000/",
        "--static-models", "llama;llama-lora,whisper",
        "--static-aliases", "gpt-4o:llama, whisper-1:whisper",
        "--routing-logic", "roundrobin",
        "--log-level", "DEBUG",
        "--request-stats-window", "30",
        "--connect-timeout", "1.5",
        "--read-timeout", "120",
        "--max-body-size", "2GiB",
        "--max-json-body-size", "64MiB",
    ])
    assert config == Config(
        host="127.0.0.1",
        port=9000,
        static_backends=(
            StaticBackend("http://10.0.0.7:8000", ("llama", "llama-lora")),
            StaticBackend("http://10.0.0.8:8000", ("whisper",)),
        ),
        aliases={"gpt-4o": "llama", "whisper-1": "whisper"},
        routing_logic="roundrobin",
        log_level="debug",
        request_stats_window=30.0,
        connect_timeout=1.5,
        read_timeout=120.0,
        max_body_size=2 * GIB,
        max_json_body_size=64 * MIB,
    )


def test_timeout_and_retry_budget_flags_build_the_config() -> None:
    config = parse_config(["--demo", "--response-timeout", "900", "--response-head-timeout",
                           "10", "--read-timeout", "60", "--retry-budget-percent", "50",
                           "--retry-budget-min", "0"])
    assert (config.response_timeout, config.response_head_timeout, config.read_timeout) == (
        900.0, 10.0, 60.0)
    assert (config.retry_budget_percent, config.retry_budget_min) == (50.0, 0)


def test_flag_defaults_are_the_config_defaults() -> None:
    assert parse_config(["--demo"]) == Config(demo=True)


def test_max_ejection_percent_reaches_the_config() -> None:
    assert parse_config(["--demo", "--max-ejection-percent", "100"]).max_ejection_percent == 100
    assert Config().max_ejection_percent == 50


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1048576", 1048576),
        ("512k", 512 * KIB),
        ("512KiB", 512 * KIB),
        ("64M", 64 * MIB),
        ("64mb", 64 * MIB),
        ("64 MiB", 64 * MIB),
        ("1.5GiB", 3 * GIB // 2),
        ("2G", 2 * GIB),
        ("1T", 1024 * GIB),
        ("512B", 512),
    ],
)
def test_size_flags_take_binary_suffixes(text: str, expected: int) -> None:
    config = parse_config(["--demo", "--max-body-size", text, "--max-json-body-size", text])
    assert (config.max_body_size, config.max_json_body_size) == (expected, expected)


@pytest.mark.parametrize("argv, flag", BAD_FLAGS.values(), ids=BAD_FLAGS.keys())
def test_bad_flag_exits_2_with_one_line_naming_it(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured.err
    assert captured.out == ""
    assert_one_line_naming(captured.err, flag)


def assert_one_line_naming(stderr: str, flag: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("router: error: argument " + flag), stderr


@pytest.fixture(scope="module")
def cli_runs() -> Iterator[dict[str, tuple[int, str, str]]]:
    """(exit code, stdout, stderr) of `python -m router` for each of SUBPROCESS_CASES."""
    processes = {
        case: subprocess.Popen(
            [sys.executable, "-m", "router", *BAD_FLAGS[case][0]],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for case in SUBPROCESS_CASES
    }
    try:
        results = {}
        for case, process in processes.items():
            out, err = process.communicate(timeout=30)
            results[case] = (process.returncode, out, err)
        yield results
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_python_m_router_with_a_bad_flag_exits_2_with_one_line(
    case: str, cli_runs: dict[str, tuple[int, str, str]]
) -> None:
    code, out, err = cli_runs[case]
    assert code == 2, err
    assert out == ""
    assert_one_line_naming(err, BAD_FLAGS[case][1])


async def test_demo_router_answers_and_exits_0_on_sigint() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "--demo", "--port", str(port), "--host", "127.0.0.1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_healthy(session, url, process)
            async with session.post(url + "/v1/chat/completions", json={
                "model": "demo-llm", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3,
            }) as response:
                assert response.status == 200, await response.text()
                reply = await response.json()
        assert reply["model"] == "demo-llm"
        assert reply["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
        process.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(process.communicate(), timeout=10)
        assert process.returncode == 0, err.decode()
        log = err.decode()
        assert f"listening on http://127.0.0.1:{port}" in log
        assert "Traceback" not in log
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_k8s_discovery_without_credentials_stops_with_one_line() -> None:
    environ = {key: value for key, value in os.environ.items()
               if not key.startswith("KUBERNETES_") and key != "KUBECONFIG"}
    done = subprocess.run(
        [sys.executable, "-m", "router", "--service-discovery", "k8s", "--port",
         str(free_port()), "--host", "127.0.0.1"],
        capture_output=True, text=True, timeout=20, env=environ,
    )
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "router stopped" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_k8s_discovery_refuses_static_backends() -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--service-discovery", "k8s", "--static-backends", "http://a:1",
                      "--static-models", "m"])
    assert exit_info.value.code == 2


def test_static_model_types_pair_with_backends_and_enable_real_probes() -> None:
    config = parse_config(["--static-backends", "http://a:1,http://b:1", "--static-models",
                           "m,w", "--static-model-types", "chat,transcription",
                           "--static-backend-health-checks"])
    assert [b.model_type for b in config.static_backends] == ["chat", "transcription"]
    assert config.static_backend_health_checks
    for bad in (["--static-model-types", "chat"], ["--static-model-types", "chat,video"],
                ["--static-backend-health-checks"]):
        with pytest.raises(SystemExit):
            parse_config(["--static-backends", "http://a:1,http://b:1",
                          "--static-models", "m,w", *bad])
