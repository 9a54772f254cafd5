"""Backend choice: which backends may serve a request, and the policy's pick among them.

Candidates are the backends serving the model that health says are routable (probes pass,
breakers admit, or the ejection cap keeps them in), minus those already tried by this
request. A `?id=<backend id>` query pins the request to one backend.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Protocol

from router.backends.pool import Backend, BackendPool
from router.errors import BadRequest, NoBackendAvailable, shorten
from router.policies import RoutingPolicy
from router.policies.disaggregated import PREFILL_ENDPOINTS
from router.proxy.inbound import InboundRequest

__all__ = ["Availability", "BackendChooser"]


class Availability(Protocol):
    def routable(
        self, backends: Sequence[Backend], exclude: Collection[str] = ()
    ) -> list[Backend]:
        """The backends of one model that may take a request now, minus `exclude`."""
        ...


class BackendChooser:
    def __init__(self, pool: BackendPool, policy: RoutingPolicy, health: Availability) -> None:
        self.pool = pool
        self.health = health
        self.use_policy(policy)

    def use_policy(self, policy: RoutingPolicy) -> None:
        """Route with `policy` from now on (a config reload)."""
        self.policy = policy
        self._choose_prefill: Callable[[InboundRequest, Sequence[Backend]], Backend] | None = (
            getattr(policy, "choose_prefill", None)
        )
        self._prepare: Callable[
            [InboundRequest, Sequence[Backend], str], Awaitable[None]
        ] | None = getattr(policy, "prepare", None)

    async def prepare(self, request: InboundRequest, endpoint: str) -> None:
        """Let the policy learn what it needs of the request before `choose`, if it does."""
        if self._prepare is not None:
            candidates = self.candidates(request.model)
            if candidates:
                await self._prepare(request, candidates, endpoint)

    def candidates(self, model: str, exclude: Collection[str] = ()) -> list[Backend]:
        return self.health.routable(self.pool.candidates(model), exclude)

    def choose(self, request: InboundRequest, pinned: str | None = None) -> Backend:
        """The backend for a new request; raises the client's error when there is none."""
        if pinned is not None:
            return self._pinned(request.model, pinned)
        candidates = self.candidates(request.model)
        if not candidates:
            raise NoBackendAvailable(f"no healthy backend serves {request.model} right now")
        return self.policy.choose(request, candidates)

    def choose_prefill(self, request: InboundRequest, endpoint: str) -> Backend | None:
        """The prefill backend when the policy splits prefill from decode, else None."""
        if (
            self._choose_prefill is None
            or endpoint not in PREFILL_ENDPOINTS
            or request.json is None
        ):
            return None
        candidates = self.candidates(request.model)
        if not candidates:
            raise NoBackendAvailable(f"no healthy backend serves {request.model} right now")
        return self._choose_prefill(request, candidates)

    def choose_next(self, request: InboundRequest, tried: Collection[str]) -> Backend | None:
        """Another backend for a retry, or None when every candidate was tried."""
        candidates = self.candidates(request.model, exclude=tried)
        return self.policy.choose(request, candidates) if candidates else None

    def _pinned(self, model: str, backend_id: str) -> Backend:
        backends = self.pool.candidates(model)
        backend = next((b for b in backends if b.id == backend_id), None)
        if backend is None:
            raise BadRequest(f"no backend with id {shorten(backend_id)!r} serves {model}")
        if backend not in self.health.routable(backends):
            raise NoBackendAvailable(f"backend {backend_id} is not available right now")
        return backend

    def __repr__(self) -> str:
        return f"<BackendChooser {self.policy!r} {self.pool!r}>"
