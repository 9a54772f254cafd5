"""The set of pods or services that Kubernetes discovery keeps, and the backends it publishes.

The watch (`router.discovery.kubernetes`) feeds it objects: a whole LIST (`replace_all`) or one
ADDED / MODIFIED / DELETED event (`upsert`, `delete`). Each object becomes a `Target`
(`router.discovery.k8s_targets`); the routable ones are the engines wanted, whose models
`router.discovery.engine_models` learns. Whenever the routable objects or their models change,
the pool gets the full current set of backends (`BackendPool.replace`): an object that stops
being routable, or is deleted, or is missing from a new LIST, leaves the pool at once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import aiohttp

from router.backends.pool import Backend, BackendPool
from router.config.settings import K8sSettings
from router.discovery.engine_models import EngineModels
from router.discovery.k8s_targets import Target, as_mapping, pod_target, service_target

__all__ = ["TargetSet"]

log = logging.getLogger("router.k8s")


class TargetSet:
    """Every pod or service the selector matches (`kind`), routable or not, and what `pool` was
    last given for them.

    `service_namespace` is for `service_target`: None where short service names resolve (the
    router's own namespace), else the namespace that qualifies them. `session` is the
    discovery's, for the engines' `/v1/models`; whoever runs the discovery runs
    `models.refresh_forever` and stops `models`."""

    def __init__(self, pool: BackendPool, settings: K8sSettings, kind: str,
                 service_namespace: str | None, session: aiohttp.ClientSession) -> None:
        self.pool = pool
        self.settings = settings
        self.kind = kind
        self.service_namespace = service_namespace
        self._objects: dict[str, Target] = {}
        """Every pod or service the selector matches, by name, routable or not."""
        self.models = EngineModels(settings, session, kind, self._wanted, self._publish)
        """What each wanted engine serves; published once known."""
        self._backends: dict[str, Backend] = {}
        """What the pool was last given, by URL."""
        self._names: dict[str, str] = {}
        """Pod or service name per published URL, for log lines."""

    def __len__(self) -> int:
        return len(self._objects)

    @property
    def routable(self) -> int:
        """How many of the objects are routable (their engines may not have answered yet)."""
        return sum(1 for target in self._objects.values() if target.url)

    @property
    def published(self) -> int:
        """How many backends the pool was last given."""
        return len(self._backends)

    def _target(self, obj: Any) -> Target | None:
        obj = as_mapping(obj)
        try:
            if self.kind == "service":
                return service_target(obj, self.settings, self.service_namespace)
            return pod_target(obj, self.settings)
        except ValueError as error:
            log.warning("skipped a %s: %s", self.kind, error)
            return None

    def replace_all(self, items: list[Any]) -> None:
        """A LIST: the objects are exactly `items`."""
        fresh: dict[str, Target] = {}
        for item in items:
            target = self._target(item)
            if target is not None:
                fresh[target.name] = target
        for name, old in self._objects.items():
            if name not in fresh and old.url:
                # Its DELETED event was lost (a dead pod kept routed for hours): the list tells.
                log.info("%s %s is gone (not in the new %s list)", self.kind, name, self.kind)
        for name, target in fresh.items():
            self._log_transition(self._objects.get(name), target)
        self._objects = fresh
        self._sync()

    def upsert(self, obj: dict[str, Any]) -> None:
        """An ADDED or MODIFIED event."""
        target = self._target(obj)
        if target is None:
            return
        self._log_transition(self._objects.get(target.name), target)
        self._objects[target.name] = target
        self._sync()

    def delete(self, obj: dict[str, Any]) -> None:
        """A DELETED event."""
        name = as_mapping(obj.get("metadata")).get("name")
        if not isinstance(name, str):
            log.warning("skipped a DELETED event without metadata.name")
            return
        old = self._objects.pop(name, None)
        if old is not None and old.url:
            log.info("%s %s was deleted", self.kind, name)
        self._sync()

    def _log_transition(self, old: Target | None, new: Target) -> None:
        was_routable = old is not None and old.url is not None
        if new.url and not was_routable:
            log.info("%s %s is routable at %s", self.kind, new.name, new.url)
        elif was_routable and not new.url:
            log.info("%s %s is no longer routable: %s", self.kind, new.name, new.reason)
        elif was_routable and old is not None and new.url != old.url:
            log.info("%s %s moved from %s to %s", self.kind, new.name, old.url, new.url)
        elif not new.url and (old is None or old.reason != new.reason):
            log.debug("%s %s is not routable: %s", self.kind, new.name, new.reason)

    def _wanted(self) -> dict[str, Target]:
        """Routable objects by engine URL, in name order (the first wins a shared URL)."""
        wanted: dict[str, Target] = {}
        for name in sorted(self._objects):
            target = self._objects[name]
            if target.url is not None and target.url not in wanted:
                wanted[target.url] = target
        return wanted

    def _sync(self) -> None:
        """Drop what belongs to objects that left, ask new ones for their models, publish."""
        wanted = self._wanted()
        self.models.follow(wanted)
        self._publish(wanted)

    def _publish(self, wanted: Mapping[str, Target]) -> None:
        """Give the pool the routable objects whose models are known, if that set changed."""
        backends: dict[str, Backend] = {}
        for url, target in wanted.items():
            models = self.models.get(url)
            if models is None:
                continue
            current = self._backends.get(url)
            if current is not None and current.models == models \
                    and current.labels == target.labels:
                backends[url] = current
            else:
                backends[url] = Backend(url=url, models=models, labels=target.labels)
        if backends.keys() == self._backends.keys() and all(
            backends[url] is self._backends[url] for url in backends
        ):
            return
        names = {url: wanted[url].name for url in backends}
        for url in self._backends.keys() - backends.keys():
            log.info("backend %s removed (%s %s)", url, self.kind, self._names.get(url, "?"))
        for url, backend in backends.items():
            old = self._backends.get(url)
            labels = f", labels {', '.join(backend.labels)}" if backend.labels else ""
            if old is None:
                log.info("backend %s added (%s %s): %s%s", url, self.kind, names[url],
                         ", ".join(backend.models), labels)
            elif old is not backend:
                log.info("backend %s (%s %s) now serves %s%s", url, self.kind, names[url],
                         ", ".join(backend.models), labels)
        self._backends = backends
        self._names = names
        self.pool.replace(backends.values())
