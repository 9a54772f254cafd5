"""The router's own CPU, memory and disk use: production-stack's `router_*_usage_percent`.

`sample()` reads `/proc` and the file system, which may block (a disk that hangs, a network
mount), so it runs in a thread (`asyncio.to_thread`); the gauges show the last sample. The
figures are the router process's, not the host's: in a container the host's would say
nothing about the router.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

__all__ = ["ProcessUsage"]

Clock = Callable[[], float]


def _memory_limit() -> int | None:
    """Bytes of memory the process may use: the cgroup's limit when it has one, else the
    machine's."""
    limits: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    limits.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as limit:
                text = limit.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
        break
    return min(limits) if limits else None


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class ProcessUsage:
    """The last sample of the process's CPU (percent of one core since the previous sample,
    as `top` shows it), resident memory (percent of its limit) and the use of the disk
    holding `disk_path` (percent)."""

    def __init__(self, disk_path: str = "/", clock: Clock = time.monotonic,
                 cpu_clock: Clock = time.process_time) -> None:
        self.disk_path = disk_path
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._last = (clock(), cpu_clock())
        self.cpu_percent: float | None = None
        self.memory_percent: float | None = None
        self.disk_percent: float | None = None

    def sample(self) -> None:
        """Read the figures now (blocking: call it in a thread)."""
        wall, cpu = self._clock(), self._cpu_clock()
        last_wall, last_cpu = self._last
        if wall > last_wall:
            self.cpu_percent = max(0.0, 100.0 * (cpu - last_cpu) / (wall - last_wall))
            self._last = (wall, cpu)
        resident, limit = _resident_bytes(), _memory_limit()
        if resident is not None and limit:
            self.memory_percent = 100.0 * resident / limit
        try:
            disk = shutil.disk_usage(self.disk_path)
        except OSError:
            self.disk_percent = None
        else:
            self.disk_percent = 100.0 * disk.used / disk.total if disk.total else None

    def collect(self) -> Iterator[Metric]:
        figures = (
            ("router_cpu_usage_percent",
             "CPU time of the router process over the time since the previous sample, in "
             "percent of one core.", self.cpu_percent),
            ("router_memory_usage_percent",
             "Resident memory of the router process, in percent of its memory limit (the "
             "cgroup's, else the machine's).", self.memory_percent),
            ("router_disk_usage_percent",
             f"Used space of the file system holding {self.disk_path}, in percent.",
             self.disk_percent),
        )
        for name, documentation, value in figures:
            family = GaugeMetricFamily(name, documentation)
            if value is not None and math.isfinite(value):
                family.add_metric([], value)
            yield family
