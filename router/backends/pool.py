"""Backends (engine replicas) and the pool that maps models to the backends serving them."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from yarl import URL

__all__ = [
    "Backend", "BackendKind", "BackendPool", "ModelCard", "Overlay", "model_cards", "parse_url",
]

BackendKind = Literal["engine", "external"]
Overlay = Callable[[tuple["Backend", ...]], Sequence["Backend"]]
"""Turns the set discovery gave into the set routed."""
ModelCard = dict[str, Any]
"""One entry of an engine's `/v1/models` `data`, every field as the engine gave it (`id`,
`created`, `owned_by`, `root`, `parent`, `max_model_len`, `permission`...)."""


def model_cards(answer: Any) -> dict[str, ModelCard]:
    """The cards of a `/v1/models` answer by model id, in the engine's order; an entry
    without a non-empty string `id` is skipped, and a repeated id keeps its first card."""
    data = answer.get("data") if isinstance(answer, dict) else None
    cards: dict[str, ModelCard] = {}
    for item in data if isinstance(data, list) else ():
        if isinstance(item, dict):
            model = item.get("id")
            if isinstance(model, str) and model and model not in cards:
                cards[model] = item
    return cards


def backend_id(url: str) -> str:
    """A short id that is the same for the same URL on every router replica and restart."""
    return hashlib.sha256(url.encode()).hexdigest()[:10]


@dataclass(eq=False)
class Backend:
    """One engine replica: where it is and which models it serves."""

    url: str
    """Base URL without a trailing slash, e.g. `http://10.0.0.7:8000`."""
    models: tuple[str, ...]
    id: str = ""
    labels: tuple[str, ...] = ()
    """Roles or tags from discovery, e.g. `prefill` / `decode` for disaggregated serving."""
    kind: BackendKind = "engine"
    """`engine`: a replica of our fleet (probed at the health path, scraped at `/metrics`).
    `external`: a hosted OpenAI-compatible provider (`router.discovery.external`): probed at
    `/v1/models` with its own key, never scraped, and never sent the client's credentials."""
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    """Sent on every request to this backend over what the client sent: an external
    provider's `Authorization` (always set for one) and custom headers. Secrets: kept out of
    `repr` and `/engines`."""
    read_timeout: float | None = None
    """Seconds to the first byte and between chunks for this backend; None:
    --response-timeout and --read-timeout."""
    max_retries: int = 0
    """Retries on this same backend of an attempt that could not reach it. An external
    provider is one backend: failover to another has nowhere to go."""
    model_type: str | None = None
    """With `--static-backend-health-checks`: probe with a minimal request of this type."""

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if not self.id:
            self.id = backend_id(self.url)

    def serves(self, model: str) -> bool:
        return model in self.models

    def __repr__(self) -> str:
        kind = "" if self.kind == "engine" else f" {self.kind}"
        return f"<Backend {self.id}{kind} {self.url} models={list(self.models)}>"


class BackendPool:
    """The current backend set, indexed by model; aliases map extra names to served models.

    `fixed` backends (external providers, which no discovery finds) stay in the set whatever
    discovery puts in it; an `overlay` (the worker API's additions and removals,
    `router.backends.runtime`) is applied on top of every set discovery gives."""

    def __init__(
        self,
        backends: Iterable[Backend] = (),
        aliases: dict[str, str] | None = None,
        fixed: Iterable[Backend] = (),
    ):
        self.aliases: dict[str, str] = dict(aliases or {})
        self._fixed = tuple(fixed)
        self._backends: tuple[Backend, ...] = ()
        self._by_model: dict[str, tuple[Backend, ...]] = {}
        self._removal_listeners: list[Callable[[frozenset[str]], None]] = []
        self._discovered: tuple[Backend, ...] = ()
        self._overlay: Overlay | None = None
        self._added: dict[str, float] = {}
        """Backend id -> when (Unix time) it came into the pool: `/engines`' `created`."""
        self._cards: dict[str, dict[str, ModelCard]] = {}
        """Backend id -> its engine's model cards by model id, from its `/v1/models`."""
        self.replace(backends)

    def on_removed(self, listener: Callable[[frozenset[str]], None]) -> None:
        """Call `listener` with the ids of backends that leave the pool, so state kept per
        backend (health, prefix trees) goes with them."""
        self._removal_listeners.append(listener)

    def replace(self, backends: Iterable[Backend]) -> None:
        """Swap in a new backend set (discovery calls this), the overlay applied and the fixed
        backends kept; lookups see it at once."""
        self._discovered = tuple(backends)
        self._publish()

    def set_overlay(self, overlay: Overlay | None) -> None:
        """Apply `overlay` to discovery's set, now and on every `replace`; call again (or
        `republish`) when what it adds or hides changed."""
        self._overlay = overlay
        self._publish()

    def republish(self) -> None:
        """The overlay changed: apply it again to the last set discovery gave."""
        self._publish()

    @property
    def discovered(self) -> tuple[Backend, ...]:
        """The last set discovery gave, before the overlay."""
        return self._discovered

    def _publish(self) -> None:
        before = {backend.id for backend in self._backends}
        backends = (self._discovered if self._overlay is None
                    else self._overlay(self._discovered))
        self._backends = (*backends, *self._fixed)
        by_model: dict[str, list[Backend]] = {}
        for backend in self._backends:
            for model in backend.models:
                by_model.setdefault(model, []).append(backend)
        self._by_model = {model: tuple(group) for model, group in by_model.items()}
        current = {backend.id for backend in self._backends}
        now = time.time()
        for backend_id in current:
            self._added.setdefault(backend_id, now)
        removed = frozenset(before - current)
        for backend_id in removed:
            self._added.pop(backend_id, None)
            self._cards.pop(backend_id, None)
        if removed:
            for listener in self._removal_listeners:
                listener(removed)

    @property
    def backends(self) -> tuple[Backend, ...]:
        return self._backends

    def resolve(self, model: str) -> str:
        """The served model name for `model`, following an alias."""
        return self.aliases.get(model, model)

    def candidates(self, model: str) -> Sequence[Backend]:
        """Backends serving the (already resolved) model; empty when none does."""
        return self._by_model.get(model, ())

    def models(self) -> list[str]:
        """Served model names, sorted."""
        return sorted(self._by_model)

    def added_at(self, backend_id: str) -> float:
        """When (Unix time) the backend came into the pool; now for one that is not in it."""
        return self._added.get(backend_id, time.time())

    def set_cards(self, backend_id: str, cards: Mapping[str, ModelCard]) -> None:
        """The model cards a backend's engine listed, by model id (ignored for a backend that
        left the pool meanwhile)."""
        if backend_id in self._added:
            self._cards[backend_id] = dict(cards)

    def card(self, model: str) -> ModelCard | None:
        """The card of a served model from the first of its backends that listed it."""
        for backend in self._by_model.get(model, ()):
            card = self._cards.get(backend.id, {}).get(model)
            if card is not None:
                return card
        return None

    def routable_aliases(self) -> dict[str, str]:
        """Aliases whose model some backend serves, sorted by alias."""
        return {a: m for a, m in sorted(self.aliases.items()) if m in self._by_model}

    def __repr__(self) -> str:
        return f"<BackendPool backends={len(self._backends)} models={self.models()}>"


def parse_url(url: str) -> str:
    """Validate a backend base URL and return it normalised.

    It is http(s) with a host, and may have a path prefix (request paths are appended to
    it), but no query, fragment or credentials, which would end up in the wrong place."""
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"not an http(s) URL with a host: {url!r}")
    if parsed.raw_query_string or parsed.raw_fragment or parsed.user or parsed.password:
        raise ValueError(f"a backend URL has no query, fragment or credentials: {url!r}")
    return str(parsed).rstrip("/")
