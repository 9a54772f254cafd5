"""What the engines report about themselves: the last figures scraped from each `/metrics`.

`EngineStats` is the store policies read (`get(backend_id)`); the scraper fills it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EngineSnapshot", "EngineStats"]


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """One scrape of one engine; a figure the engine does not export is None."""

    scraped_at: float
    """`time.monotonic()` of the scrape."""
    running: float | None = None
    """`vllm:num_requests_running`, summed over the engine's models."""
    waiting: float | None = None
    """`vllm:num_requests_waiting`, summed over the engine's models."""
    kv_cache_usage: float | None = None
    """`vllm:kv_cache_usage_perc` (older vLLM: `vllm:gpu_cache_usage_perc`), 0..1."""
    prefix_cache_hits: float | None = None
    prefix_cache_queries: float | None = None


class EngineStats:
    """The latest snapshot per backend id."""

    def __init__(self) -> None:
        self._latest: dict[str, EngineSnapshot] = {}

    def get(self, backend_id: str) -> EngineSnapshot | None:
        return self._latest.get(backend_id)

    def update(self, backend_id: str, snapshot: EngineSnapshot) -> None:
        self._latest[backend_id] = snapshot

    def forget(self, backend_id: str) -> None:
        self._latest.pop(backend_id, None)

    def __repr__(self) -> str:
        return f"<EngineStats backends={len(self._latest)}>"
