"""Engines added and removed at run time over the worker API (`router.api.workers`).

They are an overlay on what discovery finds (static flags, the config file, Kubernetes, the
demo): the worker API's word wins for every URL it named, until the router restarts, and
discovery decides the rest. So an engine added over the API stays through a config reload
and whatever Kubernetes reports; one removed over the API stays out even if discovery still
lists it, until it is added again. The overlay is applied through `BackendPool.replace`'s
path, as a reload is: a kept URL keeps its backend id (and with it its stats and health),
and requests in flight on a removed engine run to their end.
"""

from __future__ import annotations

from collections.abc import Sequence

import aiohttp

from router.backends.pool import Backend, BackendPool
from router.errors import AnswerTooLarge
from router.proxy.upstream_read import loads_stepwise, read_bounded

__all__ = ["RuntimeWorkers", "WorkerUnreachable", "fetch_models"]

MODELS_TIMEOUT = 10.0
"""Seconds a new engine has to list its models before the worker API gives up on it."""
MODELS_MAX_SIZE = 4 * 1024 * 1024
"""Bytes of `/v1/models` answer read at most (many LoRA adapters make long lists)."""


class WorkerUnreachable(Exception):
    """A new engine's `/v1/models` gave no model list; the message says why."""


class RuntimeWorkers:
    """The worker API's additions (by URL) and removals, applied on top of discovery."""

    def __init__(self, pool: BackendPool, discovery: str) -> None:
        self._pool = pool
        self.discovery = discovery
        """What found the other backends: `static` (flags or config file), `k8s`, `demo`."""
        self._added: dict[str, Backend] = {}
        self._removed: set[str] = set()
        pool.set_overlay(self._apply)

    def _apply(self, discovered: tuple[Backend, ...]) -> Sequence[Backend]:
        kept = [backend for backend in discovered
                if backend.url not in self._added and backend.url not in self._removed]
        return [*kept, *self._added.values()]

    def add(self, backend: Backend) -> None:
        """Route to `backend` from now on (replacing what any source had for its URL)."""
        self._removed.discard(backend.url)
        self._added[backend.url] = backend
        self._pool.republish()

    def remove(self, url: str) -> bool:
        """Stop routing new requests to the engine at `url`; False when none is routed."""
        routed = any(b.url == url and b.kind == "engine" for b in self._pool.backends)
        if routed:
            self._added.pop(url, None)
            self._removed.add(url)
            self._pool.republish()
        return routed

    def source(self, backend: Backend) -> str:
        """Where `backend` came from: `runtime` (the worker API), `external` (a provider),
        or the discovery's name."""
        if backend.kind == "external":
            return "external"
        return "runtime" if self._added.get(backend.url) is backend else self.discovery

    def __repr__(self) -> str:
        return (f"<RuntimeWorkers added={sorted(self._added)} removed={sorted(self._removed)} "
                f"over {self.discovery}>")


async def fetch_models(url: str, api_key: str | None) -> tuple[str, ...]:
    """The models the engine at `url` serves, from its `/v1/models`, read with a bound and a
    timeout; `WorkerUnreachable` when it gives none."""
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    timeout = aiohttp.ClientTimeout(total=MODELS_TIMEOUT)
    try:
        async with aiohttp.ClientSession(timeout=timeout,
                                         cookie_jar=aiohttp.DummyCookieJar()) as session:
            async with session.get(url + "/v1/models", headers=headers,
                                   allow_redirects=False) as response:
                if response.status != 200:
                    raise WorkerUnreachable(f"its /v1/models answered HTTP {response.status}")
                raw = await read_bounded(response, MODELS_MAX_SIZE, "/v1/models")
        body = await loads_stepwise(raw)
    except TimeoutError:
        raise WorkerUnreachable(
            f"its /v1/models did not answer within {MODELS_TIMEOUT:g} s") from None
    except (aiohttp.ClientError, OSError) as error:
        raise WorkerUnreachable(f"it could not be reached ({type(error).__name__})") from None
    except (ValueError, RecursionError, AnswerTooLarge):
        raise WorkerUnreachable("its /v1/models answer is not a model list") from None
    data = body.get("data") if isinstance(body, dict) else None
    models = tuple(dict.fromkeys(
        item["id"] for item in (data if isinstance(data, list) else ())
        if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"]
    ))
    if not models:
        raise WorkerUnreachable("its /v1/models lists no model")
    return models
