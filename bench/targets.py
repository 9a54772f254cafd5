"""What the benchmark measures side by side, and how each one is started.

- `direct`: a call straight to one engine (its process is the engine's);
- `bare`: `bench.bare_proxy`, the floor an aiohttp pass-through can reach;
- `router`: ours, `python -m router` with its default policy (roundrobin);
- `sglang-router`, `vllm-router` (Rust, from PyPI) and `nginx` (Debian's nginx-light) when
  installed: references;
- with `--experiments`: `bare+uvloop`, and `router+PATCH...`, the router with in-memory
  patches that model proposed changes (`bench.experiments`);
- with `--baseline REV`: `router@REV`, the router of an earlier commit (extracted with
  `git archive` into a temporary directory), measured right after `router` in every round:
  an interleaved A/B of a change, priced like an extension;
- with `--extensions`: the router with a feature turned on, to price it per request:
  `router+plugin` and `router+plugin-async` (one idle plugin, `bench.idle_plugin`, sync or
  async), `router+otel` (tracing every request to a loopback OTLP/HTTP sink,
  `bench.otlp_sink`, which the benchmark starts and whose URL `start` then receives).

All listen on 127.0.0.1 and route round robin over the same engines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Proc, free_port, python_module

__all__ = ["Target", "TARGETS", "EXTENSIONS", "BASELINE_PREFIX", "available_targets",
           "executable", "target", "start_otlp_sink", "start_canned_engines", "CHAT", "WHISPER",
           "SLOW"]

CHAT = "bench-llm"
WHISPER = "bench-whisper"
SLOW = "bench-slow"
ENGINE_MODELS = f"{CHAT},{WHISPER}"


def executable(name: str) -> str | None:
    """A console script next to this Python (the venv's bin) or on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@dataclass(frozen=True)
class Target:
    name: str
    kind: str
    """`direct`, `floor`, `ours`, `reference`, `experiment` or `extension`."""
    available: Callable[[], str | None]
    """None when it can run here, else why not."""
    start: Callable[..., Proc] | None
    """`start(engine_urls, log_dir)`: start it in front of these engines; None for `direct`
    (no process of its own). A target with `otlp` is started as `start(engine_urls, log_dir,
    otlp_url)`."""
    otlp: bool = False
    """It exports spans: it needs the benchmark's OTLP sink (`start_otlp_sink`)."""


def _always() -> str | None:
    return None


def _needs(name: str) -> Callable[[], str | None]:
    def check() -> str | None:
        return None if executable(name) else f"{name} is not installed"
    return check


def _needs_module(name: str) -> Callable[[], str | None]:
    def check() -> str | None:
        return None if has_module(name) else f"Python module {name} is not installed"
    return check


def router_argv(port: int, engines: Sequence[str], models: Sequence[str] | None = None,
                extra: Sequence[str] = ()) -> list[str]:
    groups = models or [f"{CHAT};{WHISPER}"] * len(engines)
    return ["--host", "127.0.0.1", "--port", str(port), "--static-backends", ",".join(engines),
            "--static-models", ",".join(groups), "--log-level", "warning", *extra]


def start_router(engines: Sequence[str], log_dir: Path, name: str = "router",
                 patches: Sequence[str] = (), models: Sequence[str] | None = None,
                 extra: Sequence[str] = ()) -> Proc:
    """Our router (with `extra` flags); with `patches`, run through `bench.experiments`."""
    port = free_port()
    args = router_argv(port, engines, models, extra)
    argv = (python_module("bench.experiments", ",".join(patches), *args) if patches
            else python_module("router", *args))
    return Proc.start(name, argv, log_dir, url=f"http://127.0.0.1:{port}")


def start_bare(engines: Sequence[str], log_dir: Path, name: str = "bare",
               uvloop: bool = False) -> Proc:
    port = free_port()
    args = ["--port", str(port), "--upstream", ",".join(engines)]
    argv = (python_module("bench.with_uvloop", "bench.bare_proxy", *args) if uvloop
            else python_module("bench.bare_proxy", *args))
    return Proc.start(name, argv, log_dir, url=f"http://127.0.0.1:{port}")


def start_sglang(engines: Sequence[str], log_dir: Path) -> Proc:
    port = free_port()
    argv = [str(executable("sglang-router")), "launch", "--host", "127.0.0.1", "--port",
            str(port), "--worker-urls", *engines, "--policy", "round_robin",
            "--log-level", "warn", "--prometheus-host", "127.0.0.1",
            "--prometheus-port", str(free_port())]
    return Proc.start("sglang-router", argv, log_dir, url=f"http://127.0.0.1:{port}")


def start_vllm(engines: Sequence[str], log_dir: Path) -> Proc:
    port = free_port()
    argv = [str(executable("vllm-router")), "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", *engines, "--policy", "round_robin", "--log-level", "warning",
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    return Proc.start("vllm-router", argv, log_dir, url=f"http://127.0.0.1:{port}")


NGINX_HEAD = """\
worker_processes 1;
worker_rlimit_nofile 65536;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 20000; }}
"""
"""One worker (like the single-process Python targets), in the foreground, files in {dir}."""

NGINX_CONF = NGINX_HEAD + """\
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream engines {{
{servers}
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://engines;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
    }}
}}
"""


def start_nginx(engines: Sequence[str], log_dir: Path) -> Proc:
    """nginx with one worker (like the single-process Python targets), no buffering either
    way (a streaming proxy), keep-alive to the engines, no access log."""
    port = free_port()
    servers = "\n".join(f"        server {url.split('://', 1)[1]};" for url in engines)
    return run_nginx("nginx", NGINX_CONF, log_dir, f"http://127.0.0.1:{port}",
                     servers=servers, port=port)


def run_nginx(name: str, template: str, log_dir: Path, url: str, **values: object) -> Proc:
    """nginx on the config `template` filled with `values` (and `dir`, its own directory)."""
    directory = log_dir / name
    directory.mkdir(exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(template.format(dir=directory, **values))
    argv = [str(executable("nginx")), "-p", str(directory), "-c", str(conf),
            "-e", str(directory / "nginx-error.log")]
    return Proc.start(name, argv, log_dir, url=url)


CANNED_CONF = NGINX_HEAD + """\
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    server {{
{listens}
        keepalive_requests 10000000;
        location / {{
            default_type application/json;
            return 200 '{answer}';
        }}
    }}
}}
"""


def canned_chat_answer() -> str:
    """A 64-token chat completion shaped like the fake engine's (same size, ~740 bytes)."""
    content = " ".join(f"tok{index}" for index in range(64))
    return json.dumps({
        "id": "chatcmpl-canned", "object": "chat.completion", "created": 1, "model": CHAT,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content,
                                             "tool_calls": []},
                     "logprobs": None, "finish_reason": "stop", "stop_reason": None}],
        "usage": {"prompt_tokens": 20, "total_tokens": 84, "completion_tokens": 64},
    }, separators=(",", ":"))


def start_canned_engines(count: int, log_dir: Path) -> tuple[list[str], Proc]:
    """`count` engine URLs served by one nginx worker that answers every request with the
    same chat completion: an engine that costs next to nothing (tens of µs per request), so
    that on a small machine the router, not its engines, is what limits throughput."""
    ports = [free_port() for _ in range(count)]
    listens = "\n".join(f"        listen 127.0.0.1:{port};" for port in ports)
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    return urls, run_nginx("canned-engine", CANNED_CONF, log_dir, urls[0], listens=listens,
                           answer=canned_chat_answer())


def _needs_otel() -> str | None:
    """Why `router+otel` cannot run here (the SDK, its OTLP/HTTP exporter and, for the sink,
    the OTLP protobuf messages), or None."""
    from router.observe.tracing import sdk_missing

    missing = sdk_missing("http")
    if missing is None:
        try:
            found = has_module("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
        except ImportError:
            found = False
        missing = None if found else "opentelemetry.proto"
    return (None if missing is None
            else f"OpenTelemetry is not installed ({missing} missing; pip install '.[otel]')")


IDLE_PLUGIN = "bench.idle_plugin:IdlePlugin"
IDLE_ASYNC_PLUGIN = "bench.idle_plugin:IdleAsyncPlugin"


def start_otlp_sink(log_dir: Path) -> Proc:
    port = free_port()
    return Proc.start("otlp-sink", python_module("bench.otlp_sink", "--port", str(port)),
                      log_dir, url=f"http://127.0.0.1:{port}")


def start_traced_router(engines: Sequence[str], log_dir: Path, otlp_url: str) -> Proc:
    return start_router(engines, log_dir, "router+otel",
                        extra=["--otel-endpoint", otlp_url + "/v1/traces"])


TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target("direct", "direct", _always, None),
        Target("bare", "floor", _always, start_bare),
        Target("router", "ours", _always, start_router),
        # Measured right after the router in every round: the same noise, a fair difference.
        Target("router+plugin", "extension", _always,
               lambda engines, log_dir: start_router(
                   engines, log_dir, "router+plugin", extra=["--callbacks", IDLE_PLUGIN])),
        Target("router+plugin-async", "extension", _always,
               lambda engines, log_dir: start_router(
                   engines, log_dir, "router+plugin-async",
                   extra=["--callbacks", IDLE_ASYNC_PLUGIN])),
        Target("router+otel", "extension", _needs_otel, start_traced_router, otlp=True),
        Target("sglang-router", "reference", _needs("sglang-router"), start_sglang),
        Target("vllm-router", "reference", _needs("vllm-router"), start_vllm),
        Target("nginx", "reference", _needs("nginx"), start_nginx),
        Target("bare+uvloop", "experiment", _needs_module("uvloop"),
               lambda engines, log_dir: start_bare(engines, log_dir, "bare+uvloop", True)),
    )
}
DEFAULT_TARGETS = ("direct", "bare", "router", "sglang-router", "vllm-router", "nginx")
LEAN = ("nometrics", "notimeout", "orjson")
EXTENSIONS = {
    "plugin": "router+plugin",
    "plugin-async": "router+plugin-async",
    "otel": "router+otel",
}
"""`--extensions NAME`: the router with that feature on, priced against `router`."""
EXPERIMENTS = {
    "uvloop": ("bare+uvloop", "router+uvloop"),
    "lean": (*(f"router+{name}" for name in LEAN), "router+" + "+".join(LEAN)),
}


def experiment_target(name: str) -> Target | None:
    """`router+PATCH[+PATCH...]`: the router with `bench.experiments` patches."""
    from bench.experiments import PATCHES

    head, _, tail = name.partition("+")
    patches = tail.split("+") if tail else []
    if head != "router" or not patches or any(p not in PATCHES for p in patches):
        return None
    needs = {"uvloop": "uvloop", "orjson": "orjson"}
    missing = [needs[p] for p in patches if p in needs and not has_module(needs[p])]

    def check() -> str | None:
        return f"{', '.join(missing)} not installed" if missing else None

    def start(engines: Sequence[str], log_dir: Path) -> Proc:
        return start_router(engines, log_dir, name, patches)

    return Target(name, "experiment", check, start)


BASELINE_PREFIX = "router@"


def baseline_target(name: str) -> Target | None:
    """`router@REV`: the router as it was at git revision REV, from a copy of that tree, so
    that a change is measured against its parent in the same rounds."""
    if not name.startswith(BASELINE_PREFIX):
        return None
    revision = name.removeprefix(BASELINE_PREFIX)
    repo = Path(__file__).resolve().parent.parent

    def check() -> str | None:
        found = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet",
                                revision + "^{commit}"], capture_output=True)
        return None if found.returncode == 0 else f"no git revision {revision!r} here"

    def start(engines: Sequence[str], log_dir: Path) -> Proc:
        tree = Path(tempfile.mkdtemp(prefix="router-baseline-", dir=log_dir))
        archive = subprocess.run(["git", "-C", str(repo), "archive", revision, "router"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        port = free_port()
        # The copy comes first on the path: `python -m router` there imports the old package,
        # not the installed (editable) one.
        env = {**os.environ, "PYTHONPATH": str(tree)}
        return Proc.start(name, python_module("router", *router_argv(port, engines)),
                          log_dir, url=f"http://127.0.0.1:{port}", env=env, cwd=str(tree))

    return Target(name, "extension", check, start)


def target(name: str) -> Target:
    found = TARGETS.get(name) or experiment_target(name) or baseline_target(name)
    if found is None:
        raise KeyError(name)
    return found


def available_targets(names: Sequence[str]) -> tuple[list[Target], dict[str, str]]:
    """The targets among `names` that can run here, and why the others cannot."""
    chosen, skipped = [], {}
    for name in names:
        found = target(name)
        reason = found.available()
        if reason is None:
            chosen.append(found)
        else:
            skipped[name] = reason
    return chosen, skipped
