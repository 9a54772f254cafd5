"""The side-by-side table, the cost of the extensions and the issue-5 targets, judged on the
figures of one run."""

from __future__ import annotations

import statistics
from typing import Any

from bench.targets import BASELINE_PREFIX, EXTENSIONS

__all__ = ["evaluate_targets", "extension_costs", "print_report"]

THROUGHPUT_C = 64
"""The concurrency at which CPU per request is judged (many requests, steady state)."""


def _rows(report: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {(r["target"], r["workload"], r["concurrency"]): r for r in report.get("rows", [])}


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "NOT MET")


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = _rows(report)
    concurrencies = sorted({c for (_, _, c) in rows})
    high = THROUGHPUT_C if THROUGHPUT_C in concurrencies else (
        concurrencies[-1] if concurrencies else THROUGHPUT_C)
    out: list[dict[str, Any]] = []

    def add(key: str, goal: str, ok: bool | None, measured: str) -> None:
        out.append({"id": key, "target": goal, "status": _verdict(ok), "measured": measured})

    for workload, label in (("chat", "non-streaming"), ("sse", "64-chunk SSE")):
        router, bare = rows.get(("router", workload, high)), rows.get(("bare", workload, high))
        if router and bare and bare["cpu_us_per_request"] > 0:
            ratio = router["cpu_us_per_request"] / bare["cpu_us_per_request"]
            low = [rows.get((t, workload, 1)) for t in ("router", "bare")]
            extra = ""
            if all(low) and low[1]["cpu_us_per_request"] > 0:  # type: ignore[index]
                extra = (f"; at c=1: {low[0]['cpu_us_per_request']:.0f} vs "  # type: ignore
                         f"{low[1]['cpu_us_per_request']:.0f} us "  # type: ignore[index]
                         f"({low[0]['cpu_us_per_request'] / low[1]['cpu_us_per_request']:.2f}x)")
            if router.get("rounds", 1) > 1 and bare.get("cpu_us_min"):
                best = router["cpu_us_min"] / bare["cpu_us_min"]
                extra += (f"; best rounds: {router['cpu_us_min']:.0f} vs "
                          f"{bare['cpu_us_min']:.0f} us ({best:.2f}x)")
            add(f"cpu_{workload}", f"CPU per {label} request <= 1.3x the bare floor (c={high})",
                ratio <= 1.3, f"{router['cpu_us_per_request']:.0f} vs "
                f"{bare['cpu_us_per_request']:.0f} us = {ratio:.2f}x{extra}")
        else:
            add(f"cpu_{workload}", f"CPU per {label} request <= 1.3x the bare floor", None, "")
    router, vllm = rows.get(("router", "sse", high)), rows.get(("vllm-router", "sse", high))
    if router and vllm:
        add("sse_vs_vllm", "CPU per SSE request below vllm-router's",
            router["cpu_us_per_request"] < vllm["cpu_us_per_request"],
            f"{router['cpu_us_per_request']:.0f} vs {vllm['cpu_us_per_request']:.0f} us")
    else:
        add("sse_vs_vllm", "CPU per SSE request below vllm-router's", None,
            "vllm-router not installed or not measured")
    sglang = rows.get(("sglang-router", "sse", high))
    if router and sglang:
        add("sse_vs_sglang", "stretch: CPU per SSE request toward sglang-router's",
            router["cpu_us_per_request"] <= sglang["cpu_us_per_request"],
            f"{router['cpu_us_per_request']:.0f} vs {sglang['cpu_us_per_request']:.0f} us "
            f"({router['cpu_us_per_request'] / sglang['cpu_us_per_request']:.2f}x)")
    for workload in ("chat", "sse"):
        router, direct = rows.get(("router", workload, 1)), rows.get(("direct", workload, 1))
        for stat, limit in (("p50", 1.0), ("p99", 3.0)):
            key = f"latency_{workload}_{stat}"
            goal = f"added latency at c=1, {workload}, {stat} <= {limit:g} ms"
            if router and direct:
                added = router[f"{stat}_ms"] - direct[f"{stat}_ms"]
                add(key, goal, added <= limit, f"{added:+.2f} ms ({router[f'{stat}_ms']:.2f} "
                    f"vs direct {direct[f'{stat}_ms']:.2f} ms)")
            else:
                add(key, goal, None, "")
    kv = report.get("kv")
    for concurrency, added in sorted((kv or {}).get("added", {}).items()):
        prompt = kv["prompt_tokens"]  # type: ignore[index]
        add(f"kv_cpu_c{concurrency}",
            f"kvaware over roundrobin, {prompt}-token chat, c={concurrency}: router CPU "
            f"<= +1 ms per request", added["cpu_us"] <= 1000, f"{added['cpu_us']:+.0f} us")
        add(f"kv_p50_c{concurrency}",
            f"kvaware over roundrobin, {prompt}-token chat, c={concurrency}: p50 <= +2 ms",
            added["p50_ms"] <= 2.0, f"{added['p50_ms']:+.2f} ms")
    if not kv:
        add("kv", "kvaware over roundrobin: router CPU <= +1 ms, p50 <= +2 ms", None, "")
    upload = report.get("upload", {}).get("router")
    if upload and "mb_per_s" in upload:
        size = f"{upload['size_mib']} MiB"
        add("upload_rss", f"upload ({size}): router RSS grows <= 32 MB",
            upload["intact"] and upload["rss_growth_mb"] <= 32,
            f"+{upload['rss_growth_mb']:.1f} MB (intact: {upload['intact']})")
        direct = report.get("upload", {}).get("direct", {})
        ceiling = (f"; the engine alone takes {direct['mb_per_s']:.0f} MB/s"
                   if "mb_per_s" in direct else "")
        tries = upload.get("mb_per_s_all", [upload["mb_per_s"]])
        per_cpu = (f"; {upload['mb_per_cpu_s']:.0f} MB per CPU second of the router"
                   if "mb_per_cpu_s" in upload else "")
        add("upload_speed", f"upload ({size}) >= 250 MB/s", upload["mb_per_s"] >= 250,
            f"{upload['mb_per_s']:.0f} MB/s (best of {len(tries)}: "
            f"{', '.join(f'{t:.0f}' for t in tries)}){ceiling}{per_cpu}")
    else:
        add("upload_rss", "1 GiB upload: router RSS grows <= 32 MB", None, "")
        add("upload_speed", "1 GiB upload >= 250 MB/s", None, "")
    streams = report.get("streams", {}).get("router")
    if streams:
        count = streams["streams"]
        ok = (streams["failed"] == 0 and streams["completed"] == count
              and streams["peak_open"] == count and streams["rss_peak_mb"] <= 1024)
        add("streams", f"{count} concurrent streams: none fails, RSS <= 1 GiB", ok,
            f"{streams['completed']} completed, {streams['failed']} failed, peak open "
            f"{streams['peak_open']} (all open at once: {streams['peak_open'] == count}), "
            f"RSS peak {streams['rss_peak_mb']:.0f} MB, CPU {streams['cpu_ms_per_stream']:.1f} "
            f"ms per stream of {streams['events_per_stream']} events")
    else:
        add("streams", "5,000 concurrent streams: none fails, RSS <= 1 GiB", None, "")
    workers = report.get("workers", {})
    if workers.get("measured"):
        ratio = workers["scaling"]
        add("workers", "--workers 2 scales >= 1.6x", ratio >= 1.6, f"{ratio:.2f}x")
    else:
        add("workers", "--workers 2 scales >= 1.6x", None, workers.get("reason", ""))
    soak = report.get("soak")
    if soak:
        minutes = soak["minutes"]
        add("soak_rss", f"soak ({minutes:g} min): RSS drift <= 5 %",
            abs(soak["rss_drift_pct"]) <= 5,
            f"{soak['rss_drift_pct']:+.2f} % ({soak['rss_after_warm_up_mb']:.1f} -> "
            f"{soak['rss_end_mb']:.1f} MB, slope {soak['rss_slope_mb_per_min']:+.3f} MB/min)")
        add("soak_in_flight", "soak: in-flight back to zero", soak["in_flight_end"] == 0,
            f"in_flight at end {soak['in_flight_end']} (max {soak['in_flight_max']})")
        add("soak_fds", "soak: open fds back to their start value",
            soak["fds_end"] <= soak["fds_start"],
            f"{soak['fds_start']} -> {soak['fds_end']} (max {soak['fds_max']})")
        add("soak_errors", "soak: no unexpected answer or error", not soak["unexpected"],
            f"{soak['total_requests']} requests, unexpected: {soak['unexpected'] or 'none'}")
    else:
        add("soak", "10-minute soak: RSS drift <= 5 %, in-flight and fds back", None, "")
    return out


def extension_costs(report: dict[str, Any]) -> list[dict[str, Any]]:
    """What each `--extensions` target (and each `--baseline` router) costs per request over
    `router`, workload by workload.

    The cost is the median over rounds of the difference between the two in the same round
    (they run one after the other, so the machine's noise hits both alike); with one round,
    the plain difference. The spread of those differences says how far to trust it."""
    rows = _rows(report)
    out = []
    baselines = {target for target, _, _ in rows if target.startswith(BASELINE_PREFIX)}
    for name in [*EXTENSIONS.values(), *sorted(baselines)]:
        for (target, workload, concurrency), row in rows.items():
            router = rows.get(("router", workload, concurrency))
            if target != name or router is None:
                continue
            ours, base = row.get("cpu_us_rounds") or [], router.get("cpu_us_rounds") or []
            paired = [a - b for a, b in zip(ours, base)]
            if not paired:
                paired = [row["cpu_us_per_request"] - router["cpu_us_per_request"]]
            out.append({
                "target": name, "workload": workload, "concurrency": concurrency,
                "cpu_us_added": round(statistics.median(paired), 1),
                "cpu_us_added_min": round(min(paired), 1),
                "cpu_us_added_max": round(max(paired), 1),
                "cpu_us": row["cpu_us_per_request"], "router_cpu_us": router["cpu_us_per_request"],
                "p50_ms_added": round(row["p50_ms"] - router["p50_ms"], 3),
                "p99_ms_added": round(row["p99_ms"] - router["p99_ms"], 3),
                "rps_ratio": round(row["rps"] / router["rps"], 3) if router["rps"] else None,
                "errors": row["errors"], "rounds": len(paired),
            })
    return out


def print_report(report: dict[str, Any]) -> None:
    rows = report.get("rows", [])
    machine = report.get("machine", {})
    print(f"\n=== side by side ({machine.get('nproc')} cores, {machine.get('cpu_model')}, "
          f"Python {machine.get('python')}; load: {rows[0]['loadgen'] if rows else '-'}) ===")
    if rows:
        print(f"{'workload':8} {'c':>3} {'target':19} {'req/s':>8} {'p50 ms':>8} "
              f"{'p99 ms':>8} {'CPU us/req':>10} {'x floor':>7} {'RSS MB':>7} "
              f"{'tgt':>5} {'eng':>5} {'other':>5} {'err':>4}")
        floor = {(r["workload"], r["concurrency"]): r["cpu_us_per_request"]
                 for r in rows if r["target"] == "bare"}
        for r in rows:
            base = floor.get((r["workload"], r["concurrency"])) or 0
            ratio = f"{r['cpu_us_per_request'] / base:.2f}" if base else "-"
            if r["target"] == "direct":
                ratio = "(eng)"
            print(f"{r['workload']:8} {r['concurrency']:>3} {r['target']:19} {r['rps']:8.0f} "
                  f"{r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['cpu_us_per_request']:10.0f} "
                  f"{ratio:>7} {r['peak_rss_mb']:7.0f} {r['target_busy']:5.2f} "
                  f"{r['engines_busy']:5.2f} {r['other_busy']:5.2f} {r['errors']:4d}")
        print("CPU us/req: the target's process tree (for direct: the engine's); tgt, eng, "
              "other: cores busy in the target, the engines, and outside the benchmark (noise)")
    skipped = report.get("skipped_targets") or {}
    for name, reason in skipped.items():
        print(f"not measured: {name}: {reason.splitlines()[0]}")
    costs = report.get("extension_costs") or []
    sink = report.get("otlp_sink")
    if costs or sink:
        print("\n=== cost of extensions (CPU of the router's process tree; median over rounds "
              "of the difference with router in the same round) ===")
    for cost in costs:
        spread = (f" (rounds {cost['cpu_us_added_min']:+.0f}..{cost['cpu_us_added_max']:+.0f})"
                  if cost["rounds"] > 1 else "")
        print(f"{cost['target']:19} {cost['workload']:5} c={cost['concurrency']:<3} "
              f"{cost['cpu_us_added']:+5.0f} µs/request over router{spread}: "
              f"{cost['cpu_us']:.0f} vs {cost['router_cpu_us']:.0f} µs; p50 "
              f"{cost['p50_ms_added']:+.2f} ms, req/s x{cost['rps_ratio'] or 0:.2f}"
              + (f"  ERRORS {cost['errors']}" if cost["errors"] else ""))
    if sink:
        verdict = sink.get("problem") or "ok"
        print(f"tracing: the OTLP sink received {sink['spans']} spans in "
              f"{sink.get('exports', 0)} exports for {sink['requests']} requests "
              f"({sink['expected_spans']} expected): {verdict}")
    print("\n=== issue 5 targets ===")
    for item in report.get("targets", []):
        print(f"[{item['status']:>12}] {item['target']}: {item['measured']}")
