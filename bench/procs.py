"""Processes of the benchmark: start, wait for health, read their figures from /proc, stop.

Every process is started by us (`Proc.start`) and stopped by its own id, with its
descendants (nginx's workers), never by name. Figures cover the whole process tree: CPU
seconds (user + system, of live processes), RSS now and at its peak, open file descriptors.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from router.testing.processes import free_port

__all__ = ["Proc", "free_port", "raise_fd_limit", "tree_pids", "machine_busy"]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PYTHON = sys.executable


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return hard


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def tree_pids(pid: int) -> list[int]:
    """`pid` and all its live descendants."""
    children = _children_map()
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo.extend(children.get(current, ()))
    return pids


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _start_time(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _status_kib(pid: int, name: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total


@dataclass
class Proc:
    """A process we started, with the figures of its process tree."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    @classmethod
    def start(cls, name: str, argv: list[str], log_dir: Path, url: str = "",
              env: dict[str, str] | None = None, cwd: str | None = None) -> Proc:
        log_path = log_dir / f"{name}.log"
        log = open(log_path, "ab")
        try:
            popen = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=cwd, start_new_session=True,
            )
        finally:
            log.close()
        return cls(name, argv, popen, log_path, url)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def pids(self) -> list[int]:
        return tree_pids(self.pid) if self.alive() else []

    def cpu_seconds(self) -> float:
        return sum(_cpu(pid) for pid in self.pids())

    def rss_kib(self) -> int:
        return sum(_status_kib(pid, "VmRSS") for pid in self.pids())

    def peak_rss_kib(self) -> int:
        """Sum of the tree's peak RSS (since start or since `reset_peak`)."""
        return sum(_status_kib(pid, "VmHWM") for pid in self.pids())

    def reset_peak(self) -> bool:
        """Reset the peak RSS of the tree (`echo 5 > /proc/PID/clear_refs`); False if refused."""
        ok = True
        for pid in self.pids():
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                ok = False
        return ok

    def open_fds(self) -> int:
        total = 0
        for pid in self.pids():
            try:
                total += len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                pass
        return total

    def fd_kinds(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for pid in self.pids():
            try:
                names = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for name in names:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{name}")
                except OSError:
                    continue
                kind = target.split(":", 1)[0] if ":" in target else "file"
                kinds[kind] = kinds.get(kind, 0) + 1
        return kinds

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_http(self, path: str = "/health", timeout: float = 30.0,
                  url: str | None = None) -> None:
        """Poll `url + path` until it answers below 500; fail early if the process exits."""
        base = url or self.url
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with code {self.popen.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(base + path, timeout=2) as response:
                    if response.status < 500:
                        return
            except urllib.error.HTTPError as error:
                if error.code < 500:
                    return
                last = error
            except (OSError, ValueError) as error:
                last = error
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer on {base + path} in {timeout:.0f} s "
                           f"({last!r}):\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; then any descendant left, by its pid."""
        if not self.alive():
            return
        descendants = [(pid, _start_time(pid)) for pid in tree_pids(self.pid) if pid != self.pid]
        try:
            self.popen.send_signal(signal.SIGTERM)
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
        for pid, started in descendants:
            if started is not None and _start_time(pid) == started:  # the same process
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


def python_module(module: str, *args: str) -> list[str]:
    return [PYTHON, "-m", module, *args]
