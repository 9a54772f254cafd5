"""`make bench` works: a smoke run of every section, a few seconds, no timing asserted.

The figures come from `make bench` (docs/benchmarks.md); this only checks that the benchmark
starts its processes, drives every workload through the router without errors (also with an
idle plugin and with tracing, whose spans must reach the benchmark's OTLP sink), writes its
JSON and stops everything it started. Without wrk (CI) it uses its Python client.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import check_target, running
from bench.targets import CHAT, executable, start_canned_engines, start_router
from bench.targets import target as bench_target
from router.observe import tracing

TIMEOUT = 120


def test_bench_smoke_run(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--output", str(output)],
        capture_output=True, text=True, timeout=TIMEOUT,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "issue 5 targets" in done.stdout
    report = json.loads(output.read_text())

    rows = {(r["target"], r["workload"], r["concurrency"]): r for r in report["rows"]}
    for target in ("direct", "bare", "router"):
        for workload in ("chat", "sse"):
            for concurrency in (1, 4):
                row = rows[target, workload, concurrency]
                assert row["requests"] > 0, row
                assert row["errors"] == 0, row
                assert row["cpu_us_per_request"] > 0 or target == "direct", row

    costs = {(c["target"], c["workload"]): c for c in report["extension_costs"]}
    for extension in ("router+plugin", "router+otel"):
        if extension in report["skipped_targets"]:
            assert extension == "router+otel", report["skipped_targets"]
            continue
        for workload in ("chat", "sse"):
            row = rows[extension, workload, 1]
            assert row["requests"] > 0 and row["errors"] == 0, row
            assert costs[extension, workload]["router_cpu_us"] > 0
    assert "µs/request over router" in done.stdout
    if "router+otel" not in report["skipped_targets"]:
        sink = report["otlp_sink"]
        assert sink["ok"] and sink["spans"] >= sink["requests"], sink

    upload = report["upload"]["router"]
    assert upload["status"] == 200 and upload["intact"], upload

    streams = report["streams"]["router"]
    assert streams["failed"] == 0 and streams["completed"] == streams["streams"], streams

    soak = report["soak"]
    assert soak["total_requests"] > 0 and not soak["unexpected"], soak
    assert soak["in_flight_end"] == 0, soak

    assert report["workers"]["reason"] or report["workers"]["measured"]
    assert {t["id"] for t in report["targets"]} >= {
        "cpu_chat", "cpu_sse", "latency_chat_p50", "upload_rss", "streams", "workers",
    }


@pytest.mark.parametrize("argv", [["--only", "nothing"], ["--targets", "no-such-router"]])
def test_bench_rejects_unknown_sections_and_targets(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "bench", *argv], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 2
    assert "unknown" in done.stderr


def test_bench_skips_tracing_without_opentelemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "sdk_missing", lambda protocol: "opentelemetry.sdk")
    reason = bench_target("router+otel").available()
    assert reason is not None and "opentelemetry.sdk" in reason
    assert bench_target("router+plugin").available() is None


def test_bench_rejects_unknown_extensions() -> None:
    done = subprocess.run([sys.executable, "-m", "bench", "--extensions", "plugin,nope"],
                          capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 2
    assert "unknown extension 'nope'" in done.stderr


@pytest.mark.skipif(executable("nginx") is None, reason="nginx is not installed")
def test_canned_engine_serves_chat_through_the_router(tmp_path: Path) -> None:
    """The `workers` section's cheap engine on small machines: one nginx answering the same
    chat completion on several ports, which the router must take as a real engine's."""
    urls, canned = start_canned_engines(2, tmp_path)
    with running([canned]):
        for url in urls:
            assert check_target(url, False, timeout=30) is None
        router = start_router(urls, tmp_path, models=[CHAT] * len(urls))
        with running([router]):
            assert check_target(router.url, False, timeout=60) is None
