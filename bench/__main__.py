"""`make bench` / `python -m bench`: the router side by side with a direct call, the bare
aiohttp floor and, when installed, sglang-router, vllm-router and nginx, on the same load.

Everything runs as separate processes on 127.0.0.1: two fake engines (`router.testing`, via
`bench.engine`), every target in front of them, and `wrk` as the load generator (a Lua
script POSTs the chat body). For each target and workload (non-streamed chat and a 64-chunk
SSE chat, at concurrency 1 and 64): requests/s, p50/p99 latency, the CPU seconds of the
target's process tree per request (from /proc: robust on a noisy machine) and its peak RSS.
Then: a 1 GiB multipart upload (RSS growth, MB/s), 5,000 concurrent slow streams (none may
fail; RSS), `--workers` scaling when the router has that flag, and a soak with mixed traffic
and clients that leave mid-answer (RSS drift, in-flight and open fds back to start).
Prints a table and the issue-5 targets (met / not met), writes `bench/results/latest.json`.

Examples: `python -m bench --quick`, `python -m bench --only chat,sse --duration 5`,
`python -m bench --soak-minutes 1`, `python -m bench --experiments uvloop`,
`python -m bench --only chat,sse --extensions plugin,otel` (the cost of an idle plugin and of
tracing, in µs per request over the router).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from bench import clients
from bench.load import chat_body, run_load, wrk_path
from bench.procs import Proc, free_port, machine_busy, python_module, raise_fd_limit
from bench.report import evaluate_targets, extension_costs, print_report
from bench.targets import (
    BASELINE_PREFIX, CHAT, DEFAULT_TARGETS, ENGINE_MODELS, EXPERIMENTS, EXTENSIONS, SLOW,
    TARGETS, Target, available_targets, executable, router_argv, start_canned_engines,
    start_otlp_sink, start_router,
)
from bench.targets import target as find_target

RESULTS = Path(__file__).parent / "results"
WORKLOADS = {"chat": False, "sse": True}
SECTIONS = ("chat", "sse", "upload", "streams", "workers", "soak", "kv")
KV_PROMPT_TOKENS = 4000
"""The kv section's chat: the fake engine's tokenizer takes one token per byte."""
SSE_EVENTS = 64 + 3  # role chunk, 64 tokens, finish chunk, [DONE]
NPROC = len(os.sched_getaffinity(0))


@dataclass
class Row:
    workload: str
    concurrency: int
    target: str
    loadgen: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    cpu_us_per_request: float
    engine_cpu_us_per_request: float
    target_busy: float
    """CPU seconds of the target's tree per wall second (1.0 = one core)."""
    engines_busy: float
    loadgen_busy: float
    machine_busy: float
    """Share of all cores busy during the run (1.0 = all)."""
    other_busy: float
    """Cores busy outside the benchmark's processes (other work on the machine: noise)."""
    peak_rss_mb: float
    rounds: int = 1
    cpu_us_min: float = 0.0
    cpu_us_max: float = 0.0
    cpu_us_rounds: list[float] = field(default_factory=list)
    """CPU µs per request of each round, in order (to compare targets round by round)."""
    warmup_requests: int = 0


# ----------------------------------------------------------------------------- setup


def machine() -> dict[str, object]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info: dict[str, object] = {
        "nproc": NPROC, "cpu_model": model,
        "python": platform.python_version(), "kernel": platform.release(),
    }
    for package in ("aiohttp", "uvloop", "sglang-router", "vllm-router"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[package] = metadata.version(package)
    root = Path(__file__).resolve().parent.parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "router"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit:
            info["router_code"] = commit + (" + uncommitted changes in router/" if dirty else "")
    if wrk_path():
        done = subprocess.run([str(wrk_path()), "-v"], capture_output=True, text=True)
        info["wrk"] = (done.stdout + done.stderr).split("\n", 1)[0].strip()
    if executable("nginx"):
        done = subprocess.run([str(executable("nginx")), "-v"], capture_output=True, text=True)
        info["nginx"] = done.stderr.strip()
    return info


def start_engines(log_dir: Path, count: int, procs_each: int, uvloop: bool,
                  models: str = ENGINE_MODELS, name: str = "engine",
                  extra: Sequence[str] = (), prefix: Sequence[str] = (),
                  ) -> tuple[list[str], list[list[Proc]]]:
    """`count` engine URLs, each served by `procs_each` processes sharing its port."""
    urls, groups = [], []
    for number in range(count):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        group = []
        for index in range(procs_each):
            args = ["--port", str(port), "--models", models, "--name", f"{name}{number}",
                    *extra]
            if procs_each > 1:
                args.append("--reuse-port")
            if uvloop:
                args.append("--uvloop")
            group.append(Proc.start(f"{name}{number}.{index}",
                                    [*prefix, *python_module("bench.engine", *args)], log_dir,
                                    url=url))
        urls.append(url)
        groups.append(group)
    for group in groups:
        for proc in group:
            proc.wait_http()
    return urls, groups


def check_target(url: str, stream: bool, timeout: float = 60.0) -> str | None:
    """One request answered in full and right, retried until `timeout`; None when it is."""
    body = chat_body(CHAT, stream).encode()
    deadline = time.monotonic() + timeout
    problem = "no answer"
    while time.monotonic() < deadline:
        request = urllib.request.Request(
            url + "/v1/chat/completions", data=body,
            headers={"Content-Type": "application/json", "Connection": "close"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as error:
            problem = f"status {error.code}: {error.read()[:200]!r}"
        except OSError as error:
            problem = repr(error)
        else:
            if not stream:
                try:
                    answer = json.loads(text)
                    content = answer["choices"][0]["message"]["content"]
                except (ValueError, KeyError, IndexError, TypeError):
                    problem = f"not a chat completion: {text[:200]!r}"
                else:
                    if len(content.split()) == 64:
                        return None
                    problem = f"{len(content.split())} tokens instead of 64"
            else:
                events = text.count("data: ")
                if events == SSE_EVENTS and text.rstrip().endswith("data: [DONE]"):
                    return None
                problem = f"{events} SSE events instead of {SSE_EVENTS}"
        time.sleep(0.1)
    return problem


@contextlib.contextmanager
def running(procs: list[Proc]) -> Iterator[list[Proc]]:
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.stop()


def group_cpu(groups: Sequence[Sequence[Proc]]) -> float:
    return sum(proc.cpu_seconds() for group in groups for proc in group)


def loadgen_cpu() -> float:
    """CPU of the finished children (wrk, curl) and of this process (the Python client)."""
    total = 0.0
    for who in (resource.RUSAGE_CHILDREN, resource.RUSAGE_SELF):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


# ----------------------------------------------------------------------------- workloads


def measure(target: Target, proc: Proc, url: str, engines: Sequence[Sequence[Proc]],
            workload: str, concurrency: int, args: argparse.Namespace,
            loadgen_pin: str | None = None, body: str | None = None) -> Row:
    if body is None:
        body = chat_body(CHAT, WORKLOADS[workload])
    endpoint = url + "/v1/chat/completions"
    warmup_requests = 0
    if args.warmup > 0:
        warmup_requests = run_load(endpoint, body, concurrency, args.warmup, args.loadgen,
                                   loadgen_pin).requests
    proc.reset_peak()
    cpu0, eng0, gen0 = proc.cpu_seconds(), group_cpu(engines), loadgen_cpu()
    busy0, total0 = machine_busy()
    started = time.perf_counter()
    result = run_load(endpoint, body, concurrency, args.duration, args.loadgen, loadgen_pin)
    wall = time.perf_counter() - started
    cpu, eng, gen = (proc.cpu_seconds() - cpu0, group_cpu(engines) - eng0,
                     loadgen_cpu() - gen0)
    busy1, total1 = machine_busy()
    share = (busy1 - busy0) / max(1, total1 - total0)
    ours = eng + gen + (0.0 if target.name == "direct" else cpu)
    requests = max(1, result.requests)
    return Row(
        workload=workload, concurrency=concurrency, target=target.name,
        loadgen=result.loadgen, requests=result.requests, seconds=round(result.duration_s, 2),
        rps=round(result.rps, 1), p50_ms=round(result.p50_ms, 3),
        p90_ms=round(result.p90_ms, 3), p99_ms=round(result.p99_ms, 3), errors=result.errors,
        cpu_us_per_request=round(cpu / requests * 1e6, 1),
        engine_cpu_us_per_request=round(eng / requests * 1e6, 1),
        target_busy=round(cpu / wall, 3), engines_busy=round(eng / wall, 3),
        loadgen_busy=round(gen / wall, 3),
        machine_busy=round(share, 3),
        other_busy=round(max(0.0, share * NPROC - ours / wall), 3),
        peak_rss_mb=round(proc.peak_rss_kib() / 1024, 1),
        cpu_us_min=round(cpu / requests * 1e6, 1), cpu_us_max=round(cpu / requests * 1e6, 1),
        cpu_us_rounds=[round(cpu / requests * 1e6, 1)], warmup_requests=warmup_requests,
    )


def kv_routing(args: argparse.Namespace, log_dir: Path, report: dict[str, object]) -> None:
    """What kvaware adds over roundrobin per request: a 4,000-token chat through both, side
    by side in interleaved rounds, in front of two fake engines publishing KV events (so
    every kvaware request asks an engine's /tokenize and scores the engines' blocks)."""
    urls, engines = start_engines(log_dir, 2, 1, args.engine_uvloop, extra=["--kv-events"])
    started: list[Proc] = [proc for group in engines for proc in group]
    with running(started):
        routers = {
            "roundrobin": start_router(urls, log_dir, "router-roundrobin"),
            "kvaware": start_router(urls, log_dir, "router-kvaware",
                                    extra=["--routing-logic", "kvaware"]),
        }
        started.extend(routers.values())
        for proc in routers.values():
            proc.wait_http("/ready", timeout=60)
        content = ("The quick brown fox jumps over the lazy dog. " * 100)[:KV_PROMPT_TOKENS - 40]
        body = json.dumps({"model": CHAT, "messages": [{"role": "user", "content": content}],
                           "max_tokens": 16, "stream": False}, separators=(",", ":"))
        kvaware = routers["kvaware"]
        # Until the engines' first blocks reach the index, kvaware routes without tokens.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            request = urllib.request.Request(kvaware.url + "/v1/chat/completions",
                                             data=body.encode(),
                                             headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=10).read()
            with urllib.request.urlopen(kvaware.url + "/engines", timeout=10) as answer:
                listing = json.loads(answer.read())
            if any((entry.get("kv_events") or {}).get("index_blocks") for entry in listing):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"kvaware never indexed the engines' blocks:\n"
                               f"{kvaware.log_tail()}")
        runs: dict[tuple[int, str], list[Row]] = {}
        for round_number in range(args.rounds):
            if args.rounds > 1:
                print(f"-- kv round {round_number + 1} of {args.rounds}", flush=True)
            for concurrency in args.kv_concurrency:
                for name, proc in routers.items():
                    target = Target(f"router-{name}", "ours", lambda: None, None)
                    row = measure(target, proc, proc.url, engines, "kv-chat", concurrency,
                                  args, body=body)
                    runs.setdefault((concurrency, name), []).append(row)
                    print_row(row)
        with urllib.request.urlopen(kvaware.url + "/metrics", timeout=10) as answer:
            metrics = answer.read().decode()
    rows = {key: median_row(group) for key, group in runs.items()}
    report.setdefault("rows", []).extend(rows.values())  # type: ignore[union-attr]
    added = {}
    for concurrency in args.kv_concurrency:
        base, kv = rows[(concurrency, "roundrobin")], rows[(concurrency, "kvaware")]
        added[concurrency] = {
            "cpu_us": round(kv.cpu_us_per_request - base.cpu_us_per_request, 1),
            "p50_ms": round(kv.p50_ms - base.p50_ms, 3),
        }
    predicted = [line for line in metrics.splitlines()
                 if line.startswith("router_kv_predicted_")]
    report["kv"] = {"prompt_tokens": KV_PROMPT_TOKENS, "added": added,
                    "predicted": predicted}


def median_row(rows: list[Row]) -> Row:
    """One row from several rounds: the median of every figure, and the CPU spread."""
    if len(rows) == 1:
        return rows[0]
    first = asdict(rows[0])
    merged = {}
    for key, value in first.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in (
                "concurrency",):
            values = sorted(asdict(row)[key] for row in rows)
            middle = statistics.median(values)
            merged[key] = round(middle, 3) if isinstance(value, float) else int(middle)
        else:
            merged[key] = value
    cpus = [row.cpu_us_per_request for row in rows]
    merged.update(rounds=len(rows), cpu_us_min=min(cpus), cpu_us_max=max(cpus),
                  cpu_us_rounds=cpus, warmup_requests=sum(r.warmup_requests for r in rows))
    return Row(**merged)


def side_by_side(args: argparse.Namespace, log_dir: Path, report: dict[str, object]) -> None:
    """Chat and SSE through every target; then the 1 GiB upload through those that take it."""
    targets, skipped = available_targets(args.targets)
    report["skipped_targets"] = dict(skipped)
    for name, reason in skipped.items():
        print(f"skipping {name}: {reason}", flush=True)
    urls, engines = start_engines(log_dir, 2, args.engine_procs, args.engine_uvloop,
                                  extra=["--upload-sink", args.upload_sink])
    procs: dict[str, Proc] = {}
    started: list[Proc] = [proc for group in engines for proc in group]
    with running(started):
        sink = None
        if any(target.otlp for target in targets):
            sink = start_otlp_sink(log_dir)
            started.append(sink)
            sink.wait_http()
        launched: list[tuple[Target, Proc]] = []
        for target in targets:  # start them all, then check each: their startups overlap
            if target.start is None:
                continue
            try:
                if target.otlp:
                    assert sink is not None
                    proc = target.start(urls, log_dir, sink.url)
                else:
                    proc = target.start(urls, log_dir)
            except OSError as error:
                if target.kind in ("ours", "floor", "extension"):
                    raise
                skipped[target.name] = f"did not start: {error}"
                continue
            started.append(proc)
            launched.append((target, proc))
        for target, proc in launched:
            problem = check_target(proc.url, False, timeout=60)
            if problem is None:
                problem = check_target(proc.url, True, timeout=5)
            if problem is not None:
                message = f"did not answer right: {problem}\n{proc.log_tail()}"
                if target.kind in ("ours", "floor", "extension"):
                    raise RuntimeError(f"{target.name} {message}")
                skipped[target.name] = message
                print(f"skipping {target.name}: {message}", flush=True)
                proc.stop()
                continue
            procs[target.name] = proc
        procs["direct"] = engines[0][0]
        if len(engines[0]) > 1:  # a direct call reaches any process of engine 0
            print("note: direct CPU counts engine 0's first process only", flush=True)
        rows: list[Row] = []
        report["rows"] = rows
        present = [t for t in targets if t.name in procs]
        runs: dict[tuple[str, int, str], list[Row]] = {}
        for round_number in range(args.rounds):  # rounds interleave: noise hits all alike
            if args.rounds > 1:
                print(f"-- round {round_number + 1} of {args.rounds}", flush=True)
            for workload in ("chat", "sse"):
                if workload not in args.only:
                    continue
                for concurrency in args.concurrency:
                    for target in present:
                        if (args.smoke and target.kind == "extension"
                                and concurrency != args.concurrency[0]):
                            continue  # a smoke run only checks that they work
                        proc = procs[target.name]
                        url = urls[0] if target.name == "direct" else proc.url
                        row = measure(target, proc, url, engines, workload, concurrency, args)
                        runs.setdefault((workload, concurrency, target.name), []).append(row)
                        print_row(row)
        rows.extend(median_row(group) for group in runs.values())
        if "upload" in args.only:
            upload_all(args, procs, urls, report)
        if sink is not None:
            report["otlp_sink"] = exported_spans(sink, procs, runs)


def exported_spans(sink: Proc, procs: dict[str, Proc],
                   runs: dict[tuple[str, int, str], list[Row]]) -> dict[str, object]:
    """What the traced routers exported: they are stopped first (a router exports the spans
    still queued when it stops), then the sink is asked. No span at all is a failure: the
    figures of `router+otel` would then not include the cost of exporting."""
    traced = [name for name in procs if TARGETS.get(name) and TARGETS[name].otlp]
    for name in traced:
        procs[name].stop(timeout=40)  # the SDK gives up on an export after 30 s
    requests = sum(row.requests + row.warmup_requests
                   for (_, _, name), group in runs.items() if name in traced for row in group)
    requests += 2 * len(traced)  # the start-up checks
    try:
        with urllib.request.urlopen(sink.url + "/stats", timeout=10) as response:
            received = json.loads(response.read())
    except (OSError, ValueError) as error:
        received = {"spans": 0, "error": repr(error)}
    spans = int(received.get("spans", 0))
    result: dict[str, object] = {
        **received, "targets": traced, "requests": requests, "expected_spans": 2 * requests,
        "sink_cpu_s": round(sink.cpu_seconds(), 2),
        "ok": spans > 0,
    }
    if spans == 0:
        result["problem"] = ("FAILED: the OTLP sink received no span: router+otel did not "
                             "export, its figures do not include tracing's full cost")
    elif spans < 2 * requests:
        result["problem"] = (f"{2 * requests - spans} fewer spans than 2 per request "
                             "(SERVER + CLIENT): the SDK dropped some (queue full) or the run "
                             "was cut")
    print(f"otlp sink: {spans} spans in {received.get('exports', 0)} exports for {requests} "
          f"requests through {', '.join(traced) or '-'} (2 spans per request expected)"
          + (f" -- {result['problem']}" if "problem" in result else ""), flush=True)
    return result


def upload_all(args: argparse.Namespace, procs: dict[str, Proc], urls: list[str],
               report: dict[str, object]) -> None:
    data = clients.Upload(args.upload_mib)
    uploads: dict[str, object] = {}
    report["upload"] = uploads
    file = None
    if shutil.which("curl"):  # from memory (tmpfs) when there is one: the disk is not measured
        shm = Path("/dev/shm")
        where = shm if shm.is_dir() and shutil.disk_usage(shm).free > 2 * data.size_mib * 2**20 \
            else None
        file = Path(tempfile.mkstemp(prefix="router-bench-upload-", dir=where)[1])
    try:
        if file is not None:
            data.write_to(file)
        for name in ("direct", "router", "router+uvloop", "nginx"):
            if name not in procs:
                continue
            url = urls[0] if name == "direct" else procs[name].url
            tries = [clients.upload(url, procs[name], data, file) for _ in range(args.rounds)]
            result = max(tries, key=lambda r: (r["intact"], r["mb_per_s"]))  # least disturbed
            result["mb_per_s_all"] = [r["mb_per_s"] for r in tries]
            result["rss_growth_mb"] = max(r["rss_growth_mb"] for r in tries)
            result["mb_per_cpu_s"] = round(data.size_mib * clients.MIB / 1e6
                                           / max(0.01, result["cpu_s"]), 1)
            uploads[name] = result
            print(f"upload {args.upload_mib} MiB via {name:14} {result['mb_per_s']:7.0f} MB/s  "
                  f"RSS {result['rss_before_mb']:.0f} -> peak {result['rss_peak_mb']:.0f} MB "
                  f"(+{result['rss_growth_mb']:.1f} MB)  CPU {result['cpu_s']:.2f} s "
                  f"({result['mb_per_cpu_s']:.0f} MB per CPU second)  "
                  f"intact={result['intact']}", flush=True)
    finally:
        if file is not None:
            file.unlink(missing_ok=True)
    for name in procs:
        if name not in uploads:
            uploads[name] = {"skipped": "as bare" if name == "bare+uvloop" else
                             "as router" if name.startswith("router+") else
                             "the bare floor reads whole bodies; the Rust routers have no "
                             "streamed multipart route"}


def streams(args: argparse.Namespace, log_dir: Path, report: dict[str, object]) -> None:
    """Concurrent slow streams through a fresh router (and `--streams-targets`)."""
    delay = args.stream_seconds / max(1, args.stream_tokens)
    urls, engines = start_engines(
        log_dir, 1, 1, args.engine_uvloop, models=SLOW, name="slow-engine",
        extra=["--token-delay", f"{delay:.4f}"])
    results: dict[str, object] = {}
    report["streams"] = results
    with running([proc for group in engines for proc in group]):
        for name in args.streams_targets:
            chosen = find_target(name)
            if chosen.start is None or chosen.available() is not None:
                continue
            if name.startswith("router"):
                patches = name.split("+")[1:]
                proc = start_router(urls, log_dir, f"{name}-streams", patches, models=[SLOW])
            else:
                proc = chosen.start(urls, log_dir)
            with running([proc]):
                proc.wait_http(timeout=60)
                time.sleep(0.5)
                result = clients.slow_streams(proc.url, proc, args.streams, args.stream_tokens,
                                              timeout=args.stream_seconds * 4 + 120)
            results[name] = result
            print(f"{args.streams} slow streams via {name}: {result['completed']} completed, "
                  f"{result['failed']} failed {result['failures'] or ''}, peak open "
                  f"{result['peak_open']}, RSS {result['rss_before_mb']:.0f} -> peak "
                  f"{result['rss_peak_mb']:.0f} MB (HWM {result['rss_hwm_mb']:.0f} MB)",
                  flush=True)


def workers(args: argparse.Namespace, log_dir: Path, report: dict[str, object]) -> None:
    """`--workers 1` against `--workers 2`, at the highest concurrency, with the router as the
    bottleneck (the issue's condition), pinned with taskset to 1 and then 2 cores.

    With 4 cores or more the engines and wrk get the other cores, and both chat and SSE are
    measured. On 2 or 3 cores nothing can be set apart, so the engines are made cheap instead:
    one nginx worker answering every request with the same canned chat completion (tens of µs
    a request, against the router's hundreds), wrk unpinned; non-streamed chat only, since a
    canned stream would come in one piece. Without nginx or taskset there: both run unpinned
    in front of the fake engines, which shows throughput and CPU but cannot show scaling."""
    done = subprocess.run(python_module("router", "--help"), capture_output=True, text=True)
    if "--workers" not in done.stdout:
        report["workers"] = {"measured": False,
                             "reason": "the router has no --workers flag (yet)"}
        print("workers: not measurable, the router has no --workers flag", flush=True)
        return
    if args.smoke:
        report["workers"] = {"measured": False, "reason": "--workers exists; not measured in "
                             "a smoke run"}
        return
    taskset = shutil.which("taskset") is not None
    workloads: tuple[str, ...]
    if NPROC >= 4 and taskset:
        mode, workloads = "pinned", ("chat", "sse")
    elif NPROC >= 2 and taskset and executable("nginx"):
        mode, workloads = "canned", ("chat",)
    else:
        mode, workloads = "unpinned", ("chat", "sse")
    concurrency = max(args.concurrency)
    rest = f"2-{NPROC - 1}" if mode == "pinned" else None
    if mode == "canned":
        urls, canned = start_canned_engines(2, log_dir)
        engines = [[canned]]
    else:
        urls, engines = start_engines(log_dir, 2, max(1, args.engine_procs), args.engine_uvloop,
                                      prefix=["taskset", "-c", rest] if rest else [])
    routers: dict[int, Proc] = {}
    for count in (1, 2):
        port = free_port()
        argv = python_module("router", *router_argv(port, urls, models=[CHAT] * len(urls)),
                             "--workers", str(count))
        if mode != "unpinned":
            argv = ["taskset", "-c", "0" if count == 1 else "0,1", *argv]
        routers[count] = Proc.start(f"router-workers{count}", argv, log_dir,
                                    url=f"http://127.0.0.1:{port}")
    rows: dict[int, list[Row]] = {1: [], 2: []}
    # Both run side by side (the idle one costs nothing) and are measured in turn, round by
    # round: the machine's speed drifts by 20 % and more over minutes here, and a ratio of
    # two figures taken seconds apart is far steadier than one of figures minutes apart.
    with running([proc for group in engines for proc in group] + list(routers.values())):
        for count, proc in routers.items():
            problem = check_target(proc.url, False, timeout=60)
            if problem is not None:
                raise RuntimeError(f"router --workers {count}: {problem}\n{proc.log_tail()}")
        for _ in range(args.rounds):
            for workload in workloads:
                for count, proc in routers.items():
                    target = Target(f"router-w{count}", "ours", lambda: None, None)
                    row = measure(target, proc, proc.url, engines, workload, concurrency, args,
                                  loadgen_pin=rest)
                    print_row(row)
                    rows[count].append(row)
    results = {f"workers{count}": {
        workload: asdict(median_row([r for r in rows[count] if r.workload == workload]))
        for workload in workloads} for count in (1, 2)}
    by_round = {workload: [round(two.rps / max(1e-9, one.rps), 3)
                           for one, two in zip(rows[1], rows[2]) if one.workload == workload]
                for workload in workloads}
    scaling = {workload: statistics.median(ratios) for workload, ratios in by_round.items()}
    how = {
        "pinned": "router pinned to 1 then 2 cores, engines and wrk on the others",
        "canned": ("router pinned to core 0, then 0-1; in front of a canned nginx engine "
                   "(non-streamed chat), wrk unpinned"),
        "unpinned": (f"{NPROC} cores and no nginx or taskset: unpinned in front of the fake "
                     "engines, which are then the limit; these figures cannot show scaling"),
    }[mode]
    report["workers"] = {
        "measured": mode != "unpinned", "mode": mode, "how": how, "scaling": scaling["chat"],
        "scaling_by_workload": scaling,
        "scaling_rounds": by_round, "concurrency": concurrency, **results,
        "reason": "" if mode != "unpinned" else how,
    }
    figures = ", ".join(f"x{value:.2f} ({workload})" for workload, value in scaling.items())
    print(f"workers: 2 vs 1 worker, throughput {figures}; {how}", flush=True)


def soak(args: argparse.Namespace, log_dir: Path, report: dict[str, object]) -> None:
    fast_urls, fast = start_engines(log_dir, 2, 1, args.engine_uvloop, name="soak-engine")
    slow_urls, slow = start_engines(
        log_dir, 1, 1, args.engine_uvloop, models=SLOW, name="soak-slow",
        extra=["--token-delay", "0.05", "--first-token-delay", "0.1"])
    procs = [proc for group in fast + slow for proc in group]
    with running(procs):
        router = start_router(fast_urls + slow_urls, log_dir, "router-soak",
                              models=[f"{CHAT};bench-whisper"] * 2 + [SLOW])
        with running([router]):
            router.wait_http(timeout=60)
            print(f"soak: {args.soak_minutes:g} min of mixed traffic through a fresh router...",
                  flush=True)
            result = clients.soak(router.url, router, args.soak_minutes,
                                  concurrency=args.soak_concurrency,
                                  settle_timeout=2.0 if args.smoke else 30.0)
    report["soak"] = result
    print(f"soak: {result['total_requests']} requests {result['requests']}, unexpected "
          f"{result['unexpected'] or 'none'}; RSS {result['rss_after_warm_up_mb']:.1f} -> "
          f"{result['rss_end_mb']:.1f} MB ({result['rss_drift_pct']:+.2f} %, "
          f"{result['rss_slope_mb_per_min']:+.3f} MB/min), in-flight at end "
          f"{result['in_flight_end']}, fds {result['fds_start']} -> {result['fds_end']}",
          flush=True)


def print_row(row: Row) -> None:
    print(f"{row.workload:5} c={row.concurrency:<3} {row.target:19} {row.rps:8.0f} req/s  "
          f"p50 {row.p50_ms:7.2f}  p99 {row.p99_ms:7.2f} ms  cpu {row.cpu_us_per_request:6.0f}"
          f" us/req  rss {row.peak_rss_mb:5.0f} MB  busy tgt {row.target_busy:4.2f} eng "
          f"{row.engines_busy:4.2f} other {row.other_busy:4.2f}"
          + (f"  ERRORS {row.errors}" if row.errors else ""), flush=True)


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--quick", action="store_true",
        help="shorter runs: 3 s per measurement, 256 MiB upload, 1,000 streams, 1 min soak")
    add("--smoke", action="store_true",
        help="a few seconds in all, to check that the benchmark works (CI); not for figures")
    add("--only", default=",".join(SECTIONS),
        help=f"comma-separated sections among {','.join(SECTIONS)} (default all)")
    add("--targets", default=",".join(DEFAULT_TARGETS),
        help="comma-separated targets (default: all that are installed)")
    add("--experiments", default="",
        help="extra targets: 'uvloop' (router and bare on uvloop), 'lean' (the router with "
             "in-memory patches modelling proposed changes, see bench/experiments.py), or "
             "router+PATCH[+PATCH...]")
    add("--extensions", default="",
        help=f"the router with a feature on, priced in us per request over the router: "
             f"{','.join(EXTENSIONS)} or all (targets "
             f"{', '.join(EXTENSIONS.values())}; 'plugin' loads one idle plugin, 'otel' "
             "traces every request to a loopback OTLP sink)")
    add("--baseline", default="",
        help="comma-separated git revisions: the router of each (router@REV) is measured "
             "right after router in every round and priced against it (an A/B of a change; "
             "a negative cost means the revision is cheaper than the working tree)")
    add("--duration", type=float, default=8.0, help="seconds per measurement (default 8)")
    add("--rounds", type=int, default=2,
        help="rounds of all measurements, interleaved; the table shows medians (default 2)")
    add("--warmup", type=float, default=2.0, help="seconds of warm-up before each (default 2)")
    add("--concurrency", default="1,64", help="client connections (default 1,64)")
    add("--kv-concurrency", default="1,8",
        help="kv section: client connections (default 1,8)")
    add("--loadgen", choices=("auto", "wrk", "python"), default="auto",
        help="wrk, or a Python client (no wrk: figures not comparable); default auto")
    add("--engine-procs", type=int, default=1,
        help="processes per fake engine, sharing its port (default 1)")
    add("--no-engine-uvloop", dest="engine_uvloop", action="store_false",
        help="run the fake engines on asyncio's loop instead of uvloop")
    add("--upload-mib", type=int, default=1024, help="upload size in MiB (default 1024)")
    add("--upload-sink", choices=("raw", "multipart"), default="raw",
        help="how the engines read uploads: hash the raw body (default: fast enough not to "
             "be the limit) or the fake engine's own multipart parser")
    add("--streams", type=int, default=5000, help="concurrent slow streams (default 5000)")
    add("--stream-tokens", type=int, default=30, help="tokens per slow stream (default 30)")
    add("--stream-seconds", type=float, default=60.0,
        help="seconds each slow stream lasts (default 60; all must be open at once)")
    add("--streams-targets", default="router",
        help="targets for the slow streams (default router; e.g. router,nginx,sglang-router)")
    add("--soak-minutes", type=float, default=10.0, help="soak length (default 10)")
    add("--soak-concurrency", type=int, default=32, help="soak clients (default 32)")
    add("--output", type=Path, default=RESULTS / "latest.json", help="where the JSON goes")
    add("--keep-logs", action="store_true", help="keep the processes' logs (printed path)")
    args = parser.parse_args(argv)
    given = set(argv if argv is not None else sys.argv[1:])
    if args.quick:
        for flag, value in (("--duration", 3.0), ("--warmup", 1.0), ("--upload-mib", 256),
                            ("--rounds", 1),
                            ("--streams", 1000), ("--stream-seconds", 20.0),
                            ("--stream-tokens", 15), ("--soak-minutes", 1.0)):
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), value)
    if args.smoke:
        for flag, value in (("--duration", 0.5), ("--warmup", 0.0), ("--upload-mib", 8),
                            ("--streams", 20), ("--stream-seconds", 0.6),
                            ("--stream-tokens", 3), ("--soak-minutes", 0.05),
                            ("--concurrency", "1,4"), ("--targets", "direct,bare,router"),
                            ("--extensions", "plugin,otel"),
                            ("--soak-concurrency", 8), ("--rounds", 1)):
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), value)
    args.only = [s for s in args.only.split(",") if s]
    for section in args.only:
        if section not in SECTIONS:
            parser.error(f"--only: unknown section {section!r} (choose among {SECTIONS})")
    names = [t for t in args.targets.split(",") if t]
    for experiment in filter(None, args.experiments.split(",")):
        extra = EXPERIMENTS.get(experiment, (experiment,))
        names += [n for n in extra if n not in names]
    extensions = [e for e in args.extensions.split(",") if e]
    if extensions == ["all"]:
        extensions = list(EXTENSIONS)
    for extension in extensions:
        if extension not in EXTENSIONS:
            parser.error(f"--extensions: unknown extension {extension!r} (choose among "
                         f"{','.join(EXTENSIONS)} or all)")
        if EXTENSIONS[extension] not in names:
            names.append(EXTENSIONS[extension])
    for revision in filter(None, args.baseline.split(",")):
        names.append(BASELINE_PREFIX + revision)
    for name in names:
        try:
            find_target(name)
        except KeyError:
            parser.error(f"--targets: unknown target {name!r} (choose among {list(TARGETS)}, "
                         f"experiments {list(EXPERIMENTS)} or router+PATCH)")
    for required in ("direct", "bare", "router"):
        if required not in names:
            names.insert(0, required)
    order = list(TARGETS)

    def place(name: str) -> float:  # a baseline right after router: the same noise
        if name.startswith(BASELINE_PREFIX):
            return order.index("router") + 0.5
        return order.index(name) if name in order else len(order)

    args.targets = sorted(names, key=place)
    args.streams_targets = [t for t in args.streams_targets.split(",") if t]
    for name in args.streams_targets:
        try:
            find_target(name)
        except KeyError:
            parser.error(f"--streams-targets: unknown target {name!r}")
        if name == "direct":
            parser.error("--streams-targets: direct is not a proxy")
        if name in EXTENSIONS.values():
            parser.error(f"--streams-targets: {name} is measured on chat and SSE only")
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c]
    args.kv_concurrency = [int(c) for c in str(args.kv_concurrency).split(",") if c]
    if args.loadgen == "auto":
        args.loadgen = "wrk" if wrk_path() else "python"
    elif args.loadgen == "wrk" and not wrk_path():
        parser.error("--loadgen wrk: wrk is not installed (apt-get install wrk)")
    return args


def run(args: argparse.Namespace) -> dict[str, object]:
    fd_limit = raise_fd_limit()
    report: dict[str, object] = {
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "fd_limit": fd_limit,
    }
    if args.loadgen == "python":
        print("wrk is not installed: using the Python client; its figures do not compare "
              "with wrk's (apt-get install wrk)", flush=True)
    if args.streams + 200 > fd_limit // 2 and "streams" in args.only:
        print(f"note: open-file limit {fd_limit} is low for {args.streams} streams", flush=True)
    log_dir = Path(tempfile.mkdtemp(prefix="router-bench-"))
    log_dir.chmod(0o755)
    ok = False
    phases: dict[str, float] = {}
    report["phase_seconds"] = phases

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            phases[name] = round(time.monotonic() - started, 1)

    try:
        if {"chat", "sse", "upload"} & set(args.only):
            with phase("side_by_side"):
                side_by_side(args, log_dir, report)
        if "workers" in args.only:
            with phase("workers"):
                workers(args, log_dir, report)
        if "streams" in args.only:
            with phase("streams"):
                streams(args, log_dir, report)
        if "soak" in args.only:
            with phase("soak"):
                soak(args, log_dir, report)
        if "kv" in args.only:
            with phase("kv"):
                kv_routing(args, log_dir, report)
        ok = True
    finally:
        if args.keep_logs or not ok:
            print(f"process logs: {log_dir}", flush=True)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
    rows = report.get("rows", [])
    assert isinstance(rows, list)
    report["rows"] = [asdict(row) for row in rows]
    report["extension_costs"] = extension_costs(report)
    report["targets"] = evaluate_targets(report)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    print_report(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
