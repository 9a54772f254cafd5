"""What each engine that Kubernetes discovery finds serves: its models, from `GET /v1/models`.

A routable pod or service is not routed until its engine has answered (an engine whose model is
still loading, or whose models are unknown, takes no request): the engine is asked until it
does, quickly at first, then every `K8sSettings.models_refresh` seconds. Every routed engine is
asked again at that interval, as LoRA adapters are loaded at run time; one that does not answer
keeps the models it had and is left to the health checks. The target set
(`router.discovery.k8s_target_set`) says which engines are wanted and publishes the backends
whenever the models change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

import aiohttp

from router.backends.pool import model_cards
from router.config.settings import K8sSettings
from router.discovery.k8s_targets import Target
from router.errors import AnswerTooLarge
from router.proxy.upstream_read import loads_stepwise, read_bounded

__all__ = ["EngineModels", "short_error"]

log = logging.getLogger("router.k8s")

MAX_CONCURRENT_FETCHES = 16

Wanted = Mapping[str, Target]
"""Routable objects by engine URL (`TargetSet._wanted`)."""


class _ModelsError(Exception):
    """An engine's `/v1/models` did not give a model list."""


def short_error(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class EngineModels:
    """The models per engine URL of the wanted objects whose engine answered.

    `wanted` gives the target set's current routable objects; `publish` hands them back to it
    when the models of one changed. `kind` (`pod` or `service`) names the objects in log lines.
    `session` is the discovery's, owned by its caller. Run `refresh_forever` as a task and
    call `stop` when the discovery ends."""

    def __init__(self, settings: K8sSettings, session: aiohttp.ClientSession, kind: str,
                 wanted: Callable[[], Wanted], publish: Callable[[Wanted], None]) -> None:
        self.settings = settings
        self.session = session
        self.kind = kind
        self._wanted = wanted
        self._publish = publish
        self._models: dict[str, tuple[str, ...]] = {}
        """Models per engine URL, for routable objects whose engine answered."""
        self._owners: dict[str, str] = {}
        """The object whose engine gave `_models[url]`: a new pod on a reused IP asks again."""
        self._learning: dict[str, asyncio.Task[None]] = {}
        """Per engine URL whose models are unknown: the task asking until it answers."""
        self._fetch_slots = asyncio.Semaphore(MAX_CONCURRENT_FETCHES)
        self._models_timeout = aiohttp.ClientTimeout(total=settings.model_fetch_timeout)

    def get(self, url: str) -> tuple[str, ...] | None:
        """The models of the engine at `url`; None while unknown."""
        return self._models.get(url)

    @property
    def learning(self) -> int:
        """Engines being asked for their models for the first time."""
        return len(self._learning)

    def follow(self, wanted: Wanted) -> None:
        """Forget the engines of objects that left (or whose URL another object took now), and
        start asking the new ones."""
        for url in [url for url in self._learning if url not in wanted]:
            self._learning.pop(url).cancel()
        for url in [url for url in self._models
                    if url not in wanted or self._owners.get(url) != wanted[url].name]:
            del self._models[url]
            self._owners.pop(url, None)
        for url, target in wanted.items():
            if url not in self._models and url not in self._learning:
                self._learning[url] = asyncio.create_task(
                    self._learn(url, target.name), name=f"k8s-models {target.name}")

    async def stop(self) -> None:
        """Cancel the first askings still running and wait for them to end."""
        tasks = list(self._learning.values())
        self._learning.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _learn(self, url: str, name: str) -> None:
        """Ask a new engine for its models until it answers; then it is routed."""
        delay = min(1.0, self.settings.models_refresh)
        failures = 0
        try:
            while True:
                try:
                    models = await self._fetch_models(url)
                    break
                except _ModelsError as error:
                    failures += 1
                    if failures == 1:
                        log.info("%s %s is routable but %s/v1/models failed (%s): not routed "
                                 "until it answers", self.kind, name, url, error)
                    else:
                        log.debug("%s %s: %s/v1/models failed again: %s", self.kind, name, url,
                                  error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.models_refresh)
        finally:
            if self._learning.get(url) is asyncio.current_task():
                del self._learning[url]
        wanted = self._wanted()
        if url in wanted:
            self._models[url] = models
            self._owners[url] = wanted[url].name
            self._publish(wanted)

    async def _fetch_models(self, url: str) -> tuple[str, ...]:
        headers = {"Accept": "application/json"}
        if self.settings.engine_api_key:
            headers["Authorization"] = f"Bearer {self.settings.engine_api_key}"
        try:
            async with self._fetch_slots:
                async with self.session.get(url + "/v1/models", headers=headers,
                                            timeout=self._models_timeout,
                                            allow_redirects=False) as response:
                    if response.status != 200:
                        raise _ModelsError(f"HTTP {response.status}")
                    raw = await read_bounded(response, self.settings.max_answer_size,
                                             "/v1/models")
            body = await loads_stepwise(raw)
        except TimeoutError:
            raise _ModelsError(f"no answer within {self.settings.model_fetch_timeout:g}s") \
                from None
        except (aiohttp.ClientError, OSError, ValueError, RecursionError,
                AnswerTooLarge) as error:
            raise _ModelsError(short_error(error)) from None
        models = tuple(model_cards(body))
        if not models:
            raise _ModelsError("the answer lists no model")
        return models

    async def refresh_forever(self) -> None:
        """`refresh` every `models_refresh` seconds, until cancelled."""
        while True:
            await asyncio.sleep(self.settings.models_refresh)
            try:
                await self.refresh()
            except Exception:  # a dead refresher would freeze every model list
                log.exception("refreshing the engines' models failed")

    async def refresh(self) -> None:
        """Ask every routed engine for its models again (LoRA adapters are loaded at run time).
        An engine that does not answer keeps the models it had; health checks judge it."""
        urls = [url for url in self._wanted() if url in self._models]
        results = await asyncio.gather(*(self._fetch_models(url) for url in urls),
                                       return_exceptions=True)
        wanted = self._wanted()
        changed = False
        for url, result in zip(urls, results):
            if isinstance(result, BaseException):
                log.debug("refreshing the models of %s failed: %s", url, result)
            elif url in wanted and url in self._models and self._models[url] != result:
                self._models[url] = result
                changed = True
        if changed:
            self._publish(wanted)
