"""What the chaos suite did (`Tally`, for its summary), and this process's figures for
its leak checks (`open_fds`, `rss_kib`)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from router.testing.chaos.clients import CLEAR, ClientResult

__all__ = ["Tally", "open_fds", "rss_kib"]


def open_fds() -> int:
    """File descriptors this process holds now (blocking: call it through a thread)."""
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    """This process's resident memory now, in KiB (blocking: call it through a thread)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise LookupError("VmRSS")


@dataclass
class Tally:
    """What the chaos suite did, for its summary line."""

    scenarios: int = 0
    requests: int = 0
    """HTTP requests sent to a router."""
    scanner_inputs: int = 0
    """Bodies fed to the multipart scanner directly (property tests)."""
    faults: Counter[str] = field(default_factory=Counter)
    results: Counter[str] = field(default_factory=Counter)
    flows: int = 0
    lost: int = 0
    """Requests without a clear end: hung, unclear, or a flow without exactly one
    `on_complete`. Must stay 0."""
    recoveries: list[float | None] = field(default_factory=list)
    """Seconds from the end of a fleet-wide fault burst to the first complete answer (None:
    none came)."""

    def add_results(self, results: Iterable[ClientResult]) -> None:
        for result in results:
            self.requests += 1
            self.results[result.kind.value] += 1
            if result.kind not in CLEAR:
                self.lost += 1

    def add_faults(self, faults: Mapping[str, int]) -> None:
        for name, count in faults.items():
            if count:
                self.faults[name] += count

    def lines(self) -> list[str]:
        faults = ", ".join(f"{name} {count}" for name, count in sorted(self.faults.items()))
        results = ", ".join(f"{name} {count}" for name, count in sorted(self.results.items()))
        return [
            f"scenarios run: {self.scenarios}; requests sent: {self.requests}; "
            f"router flows checked: {self.flows}; "
            f"multipart bodies scanned: {self.scanner_inputs}",
            f"faults injected: {sum(self.faults.values())} ({faults or 'none'})",
            f"client results: {results or 'none'}",
            f"lost (hung, unclear or unbalanced): {self.lost}",
        ] + ([self.recovery_line()] if self.recoveries else [])

    def recovery_line(self) -> str:
        seen = [r for r in self.recoveries if r is not None]
        worst = f"{max(seen):.3f} s" if seen else "-"
        return (f"time to recover after fleet-wide fault bursts: {len(self.recoveries)} bursts, "
                f"{len(self.recoveries) - len(seen)} never recovered, worst {worst}")

    def as_dict(self) -> dict[str, Any]:
        return {"scenarios": self.scenarios, "requests": self.requests, "flows": self.flows,
                "scanner_inputs": self.scanner_inputs,
                "faults": dict(self.faults), "faults_total": sum(self.faults.values()),
                "results": dict(self.results), "lost": self.lost,
                "recoveries": self.recoveries}
