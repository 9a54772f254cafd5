"""Where a target's time goes: `python -m bench.profile [--target router] [--workload chat]`.

Starts two fake engines and the target, puts `wrk` load on it, and samples the target with
py-spy (`pip install py-spy`) for `--seconds`. Prints the functions with the most samples,
by own time and by inclusive time, and keeps the collapsed stacks (`--out`, for flame graphs:
`flamegraph.pl` or speedscope.app).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from bench.load import chat_body, run_load, wrk_path
from bench.targets import CHAT, executable
from bench.targets import target as find_target

__all__ = ["summarise"]


def summarise(collapsed: str, top: int, prefix_filter: str = "",
              us_per_request: float | None = None) -> str:
    """Own and inclusive sample counts per function, from py-spy's collapsed stacks; with
    `us_per_request` (the target's CPU per request), also in microseconds per request."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        own[frames[-1]] += count
        modules[_module(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count

    def fmt(n: int, name: str) -> str:
        share = n / total
        us = f"{share * us_per_request:7.1f} us  " if us_per_request else ""
        return f"  {share * 100:5.1f} %  {us}{name}"

    head = f"{total} samples" + (f"; {us_per_request:.0f} us of CPU per request"
                                 if us_per_request else "")
    lines = [head, "", "own time (the function itself):"]
    lines += [fmt(n, name) for name, n in own.most_common(top)]
    lines += ["", "own time by file:"]
    lines += [fmt(n, name) for name, n in modules.most_common(top)]
    lines += ["", "inclusive time (with callees)"
              + (f", frames matching {prefix_filter!r}" if prefix_filter else "") + ":"]
    chosen = [(name, n) for name, n in inclusive.most_common()
              if prefix_filter in name][:top]
    lines += [fmt(n, name) for name, n in chosen]
    return "\n".join(lines)


def _module(frame: str) -> str:
    """`function (path/to/file.py:123)` -> `path/to/file.py` shortened after site-packages."""
    if "(" not in frame:
        return frame
    location = frame.rsplit("(", 1)[1].rstrip(")")
    path = location.rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--target", default="router",
                        help="a target of python -m bench, e.g. router, bare, router+nometrics")
    parser.add_argument("--workload", choices=("chat", "sse"), default="chat")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--filter", default="", help="substring for the inclusive list")
    parser.add_argument("--out", type=Path, default=Path("bench/results/profile.txt"))
    args = parser.parse_args()
    spy = executable("py-spy")
    if spy is None or wrk_path() is None:
        sys.exit("needs py-spy (pip install py-spy) and wrk (apt-get install wrk)")
    import tempfile

    from bench.__main__ import start_engines

    log_dir = Path(tempfile.mkdtemp(prefix="router-profile-"))
    urls, engines = start_engines(log_dir, 2, 1, True)
    procs = [proc for group in engines for proc in group]
    try:
        start = find_target(args.target).start
        assert start is not None
        target = start(urls, log_dir)
        procs.append(target)
        target.wait_http(timeout=60)
        body = chat_body(CHAT, args.workload == "sse")
        endpoint = target.url + "/v1/chat/completions"
        run_load(endpoint, body, args.concurrency, 2)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        results = []
        load = threading.Thread(target=lambda: results.append(run_load(
            endpoint, body, args.concurrency, args.seconds + 3)))
        cpu_before = target.cpu_seconds()
        load.start()
        time.sleep(1)
        subprocess.run([spy, "record", "--pid", str(target.pid), "--rate", str(args.rate),
                        "--duration", str(int(args.seconds)), "--nonblocking", "--function",
                        "--format", "raw", "--output", str(args.out)],
                       check=True, capture_output=True)
        load.join()
        cpu = target.cpu_seconds() - cpu_before
    finally:
        for proc in reversed(procs):
            proc.stop()
    us = cpu / max(1, results[0].requests) * 1e6 if results else None
    print(summarise(args.out.read_text(), args.top, args.filter, us))
    print(f"\ncollapsed stacks: {args.out}")


if __name__ == "__main__":
    main()
