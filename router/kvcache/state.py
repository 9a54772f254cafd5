"""The KV cache view the `kvaware` policy reads, owned by the application."""

from __future__ import annotations

from dataclasses import dataclass, field

from router.kvcache.feeds import KvEventFeeds
from router.kvcache.index import KvIndex
from router.kvcache.prompt_tokens import PromptTokens

__all__ = ["KvCache", "Predicted"]


@dataclass
class Predicted:
    """What the router expected of the requests it sent one engine, to set beside the
    engine's own `vllm:prefix_cache_hits_total / queries_total`."""

    cached_tokens: int = 0
    prompt_tokens: int = 0
    requests: int = 0


@dataclass(eq=False)
class KvCache:
    index: KvIndex
    tokens: PromptTokens | None = None
    """Set while the application runs (it needs the client session)."""
    feeds: KvEventFeeds | None = None
    predicted: dict[str, Predicted] = field(default_factory=dict)

    def predict(self, backend_id: str, cached: int, prompt: int) -> None:
        entry = self.predicted.get(backend_id)
        if entry is None:
            entry = self.predicted[backend_id] = Predicted()
        entry.cached_tokens += cached
        entry.prompt_tokens += prompt
        entry.requests += 1

    def forget(self, backend_id: str) -> None:
        self.index.forget(backend_id)
        self.predicted.pop(backend_id, None)
