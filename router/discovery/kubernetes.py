"""Kubernetes discovery (`--service-discovery k8s`): the engines of one namespace that match a
label selector, found by listing and watching pods (`--k8s-service-discovery-type pod-ip`, the
default) or services (`service-name`) through the API server's REST API. One watcher serves both
kinds; what an object means for routing (its URL, labels, or why it is not routable) is in
`router.discovery.k8s_targets`.

A pod is a backend while it is `Running`, `Ready`, has `status.podIP` and is not Terminating; a
service while it exists and has a port (a Service has no readiness of its own: the router's
health probes and circuit breaker judge what answers behind it). Either way its engine must have
answered `GET /v1/models` (`router.discovery.engine_models`: an engine whose model is still
loading, or whose models are unknown, is not routed), and it leaves the pool at once when the
object stops being routable or is DELETED: every change calls `BackendPool.replace` with the
full current set.

Per pod or service, two annotations refine what the flags say:

- `router.vllm.ai/port: "8000"`: the engine port, instead of `--k8s-port`.
- `router.vllm.ai/labels: "prefill"`: the backend's labels (comma-separated), for the
  disaggregated-prefill policy. Without it, the label `model` is the one label, as in
  production-stack's router (label values cannot hold a list, hence an annotation).

How the set stays right (traffic must never reach a Terminating or still-loading pod, nor
a dead pod whose DELETED event was lost): LIST gives the full set and a `resourceVersion`;
WATCH from there streams ADDED / MODIFIED / DELETED / BOOKMARK / ERROR events, one JSON object
a line. A watch that the API server ends cleanly (`timeoutSeconds`) is resumed from the last
resourceVersion, which bookmarks keep fresh. Everything else lists again, because events may
have been lost: 410 Gone (the resourceVersion was compacted away, as an HTTP status or an ERROR
event), a broken connection, an undecodable line, any other ERROR. A re-list replaces the set,
so an object whose DELETED event was missed goes too. Failures back off exponentially with
jitter; the first 410 re-lists at once. While the API server cannot be reached the last known
set keeps serving (the health prober still ejects dead engines).

The modules of Kubernetes discovery, in the order a change travels:
`router.discovery.k8s_access` (the credentials: a service account or a kubeconfig),
`router.discovery.k8s_api` (the API server's error answers, the watch stream's lines),
this one (list and watch, back off, log failures), `router.discovery.k8s_target_set` (keep the
set of objects, publish its backends to the pool), `router.discovery.k8s_targets` (what one
object means for routing) and `router.discovery.engine_models` (what each engine serves).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from router import __version__
from router.backends.pool import BackendPool
from router.config.settings import K8sSettings
from router.discovery.engine_models import short_error
from router.discovery.k8s_access import K8sAccess, Token, load_access
from router.discovery.k8s_api import ApiError, Gone, WatchBroken, WatchLines, api_error
from router.discovery.k8s_target_set import TargetSet
from router.discovery.k8s_targets import as_mapping
from router.errors import AnswerTooLarge
from router.proxy.upstream_read import loads_stepwise, read_bounded

__all__ = ["KubernetesDiscovery", "kubernetes_discovery"]

log = logging.getLogger("router.k8s")

LIST_PAGE_SIZE = 500
QUICK_END = 1.0
"""A watch that ends cleanly within this many seconds with no event counts as a failure (backoff),
so an API server or proxy that closes every watch at once cannot cause a hot loop."""


class KubernetesDiscovery:
    """Keeps `pool` equal to the routable engine pods or services (`settings.discovery_type`).
    Run `run()` as a task; cancel it to stop.

    `session` is owned by the caller (see `kubernetes_discovery`) and serves both the API server
    calls and the engines' `/v1/models`."""

    def __init__(self, pool: BackendPool, settings: K8sSettings, access: K8sAccess,
                 session: aiohttp.ClientSession) -> None:
        self.pool = pool
        self.settings = settings
        self.access = access
        self.session = session
        self.namespace = access.namespace
        self.resource_version: str | None = None
        """The last resourceVersion seen (list, event or bookmark)."""
        self.synced = asyncio.Event()
        """Set once the first LIST has been applied."""
        self.kind = "service" if settings.discovery_type == "service-name" else "pod"
        """What is watched, as the API and the log lines name it (plural: `kind + "s"`)."""
        self._url = (f"{access.server}/api/v1/namespaces/{quote(self.namespace, safe='')}/"
                     f"{self.kind}s")
        self._token = Token(access, settings.token_reload)
        # Short service names resolve in the router's own namespace only.
        service_namespace = None if access.namespace == access.home_namespace \
            else access.namespace
        self.targets = TargetSet(pool, settings, self.kind, service_namespace, session)
        """The objects seen, their engines' models, and the backends published to `pool`."""
        self._failures = 0
        self._last_failure = -math.inf
        self._failing = False
        self._watching = False
        self._list_timeout = aiohttp.ClientTimeout(total=settings.request_timeout)
        # No total limit: a watch lasts `watch_timeout`. A silent connection is dead once it
        # has said nothing for longer than that.
        self._watch_client_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.request_timeout,
            sock_read=settings.watch_timeout + settings.request_timeout,
        )

    # ----------------------------------------------------------------- the loop

    async def run(self) -> None:
        """List, watch, and list again when needed, until cancelled; never raises otherwise."""
        models = self.targets.models
        refresher = asyncio.create_task(models.refresh_forever(), name="k8s-models-refresh")
        try:
            await self._list_and_watch_forever()
        finally:
            refresher.cancel()
            await asyncio.gather(refresher, models.stop(), return_exceptions=True)

    async def _list_and_watch_forever(self) -> None:
        version: str | None = None
        while True:
            try:
                if version is None:
                    version = await self._list()
                opened = time.monotonic()
                version, events = await self._watch(version)
            except Gone as gone:
                delay = self._next_delay(first_free=True)
                log.info("resourceVersion %s is too old (%s): listing %ss again%s",
                         self.resource_version, gone, self.kind, _after(delay))
                version = None
            except Exception as error:  # whatever it was, the loop goes on: list again
                delay = self._next_delay()
                self._log_failure(error, delay)
                version = None
            else:
                if events or time.monotonic() - opened >= QUICK_END:
                    log.debug("the %s watch ended; resuming at resourceVersion %s", self.kind,
                              version)
                    continue
                delay = self._next_delay()
                log.warning("the %s watch ended at once; resuming%s", self.kind, _after(delay))
            if delay:
                await asyncio.sleep(delay)

    def _next_delay(self, *, first_free: bool = False) -> float:
        """Exponential backoff with jitter; failures far apart start again from the bottom."""
        now = time.monotonic()
        if now - self._last_failure > 2 * self.settings.retry_max:
            self._failures = 0
        self._last_failure = now
        self._failures += 1
        steps = self._failures - 1
        if first_free:
            if steps == 0:
                return 0.0
            steps -= 1
        base = min(self.settings.retry_max, self.settings.retry_min * 2.0 ** min(steps, 30))
        return base * random.uniform(0.5, 1.0)

    def _log_failure(self, error: Exception, delay: float) -> None:
        # "Answers again" is worth a line after the API failed us, not after a broken stream.
        self._failing = not isinstance(error, (WatchBroken, aiohttp.ClientPayloadError))
        self._watching = False
        where = f"{self.kind}s in namespace {self.namespace}"
        then = f"; listing again{_after(delay)}"
        if isinstance(error, ApiError) and error.status == 401:
            self._token.expire()
            log.error("the kubernetes API rejected the credentials from %s (HTTP 401: %s) for "
                      "%s: check the token%s", self.access.source, error.message, where, then)
        elif isinstance(error, ApiError) and error.status == 403:
            log.error("the kubernetes API forbids reading %s (HTTP 403: %s): grant get, list "
                      "and watch on %ss to the router's service account (see "
                      "docs/deploy/kubernetes/rbac.yaml)%s", where, error.message, self.kind,
                      then)
        elif isinstance(error, ApiError):
            log.warning("the kubernetes API answered HTTP %d (%s) when asked for %s%s",
                        error.status, error.message, where, then)
        elif isinstance(error, aiohttp.ClientConnectorCertificateError):
            log.error("cannot verify the kubernetes API server %s: %s%s", self.access.server,
                      short_error(error), then)
        elif isinstance(error, AnswerTooLarge):
            log.warning("%s (--k8s-max-answer-size) when asked for %s: cut%s", error.message,
                        where, then)
        elif isinstance(error, WatchBroken):
            log.warning("the %s watch broke: %s%s", self.kind, error, then)
        elif isinstance(error, aiohttp.ClientPayloadError):
            log.warning("the %s watch broke off: %s%s", self.kind, short_error(error), then)
        elif isinstance(error, TimeoutError):
            log.warning("the kubernetes API at %s did not answer in time%s",
                        self.access.server, then)
        elif isinstance(error, (aiohttp.ClientError, OSError)):
            log.warning("cannot reach the kubernetes API at %s: %s%s", self.access.server,
                        short_error(error), then)
        else:
            log.error("kubernetes discovery failed unexpectedly%s", then, exc_info=error)

    async def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": f"router/{__version__}"}
        token = await self._token.value()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _query(self, **params: str) -> dict[str, str]:
        if self.settings.label_selector:
            params["labelSelector"] = self.settings.label_selector
        return params

    async def _list(self) -> str:
        """LIST the objects (in pages) and make them the set; returns the resourceVersion."""
        items: list[Any] = []
        params = self._query(limit=str(LIST_PAGE_SIZE))
        while True:
            async with self.session.get(
                self._url, params=params, headers=await self._headers(),
                ssl=self.access.ssl, server_hostname=self.access.server_hostname,
                timeout=self._list_timeout, allow_redirects=False,
            ) as response:
                if response.status != 200:
                    raise await api_error(response)
                raw = await read_bounded(response, self.settings.max_answer_size,
                                         "the kubernetes API")
            try:
                # Item by item, yielding: a page of big objects takes ~50 ms a MiB to
                # decode, which in one go (or in a thread: the GIL) would stall requests.
                body = await loads_stepwise(raw)
            except (ValueError, RecursionError):
                raise ApiError(200, f"the {self.kind} list is not JSON") from None
            if not isinstance(body, dict) or not isinstance(body.get("items"), list):
                raise ApiError(200, f"the answer is not a {self.kind} list")
            items.extend(body["items"])
            metadata = as_mapping(body.get("metadata"))
            more = metadata.get("continue")
            if not more:
                break
            params = {**params, "continue": str(more)}
        version = metadata.get("resourceVersion")
        if not isinstance(version, str) or not version:
            raise ApiError(200, f"the {self.kind} list has no metadata.resourceVersion")
        if self._failing:
            log.info("the kubernetes API answers again")
            self._failing = False
        self.targets.replace_all(items)
        self.resource_version = version
        log.info("listed %d %ss in namespace %s (%d routable) at resourceVersion %s",
                 len(self.targets), self.kind, self.namespace, self.targets.routable, version)
        self.synced.set()
        return version

    async def _watch(self, version: str) -> tuple[str, int]:
        """WATCH from `version` until the server ends the stream; returns the last
        resourceVersion and the number of events. Raises when the stream cannot be trusted."""
        params = self._query(watch="1", resourceVersion=version, allowWatchBookmarks="true",
                             timeoutSeconds=str(self.settings.watch_timeout))
        events = 0
        async with self.session.get(
            self._url, params=params, headers=await self._headers(),
            ssl=self.access.ssl, server_hostname=self.access.server_hostname,
            timeout=self._watch_client_timeout, allow_redirects=False,
        ) as response:
            if response.status != 200:
                raise await api_error(response)
            if not self._watching:
                log.info("watching %ss in namespace %s from resourceVersion %s",
                         self.kind, self.namespace, version)
                self._watching = True
            lines = WatchLines(self.settings.max_answer_size)
            async for chunk in response.content.iter_any():
                for line in lines.feed(chunk):
                    if line.strip():
                        version = self._on_event(line, version)
                        events += 1
            tail = lines.rest()
            if tail.strip():
                version = self._on_event(tail, version)
                events += 1
        return version, events

    def _on_event(self, line: bytes, version: str) -> str:
        """Apply one watch event; returns the resourceVersion it carries (or `version`)."""
        try:
            event = json.loads(line)
        except (ValueError, RecursionError) as error:
            raise WatchBroken(f"an undecodable event ({short_error(error)})") from None
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            log.warning("skipped a watch event without an object: %.200r", line)
            return version
        kind = event.get("type")
        obj: dict[str, Any] = event["object"]
        if kind == "ERROR":
            code = obj.get("code")
            message = obj.get("message") or obj.get("reason") or "no message"
            if code == 410:
                raise Gone(message)
            raise WatchBroken(f"an ERROR event (code {code}: {message})")
        try:
            if kind in ("ADDED", "MODIFIED"):
                self.targets.upsert(obj)
            elif kind == "DELETED":
                self.targets.delete(obj)
            elif kind != "BOOKMARK":
                log.warning("skipped a watch event of unknown type %r", kind)
        except Exception:  # one bad event must not end the watch
            log.exception("skipped a %s event that could not be applied", kind)
        new_version = as_mapping(obj.get("metadata")).get("resourceVersion")
        if isinstance(new_version, str) and new_version:
            version = self.resource_version = new_version
        return version

    @property
    def engine_urls(self) -> str:
        """The shape of the engine URLs, for the start-up log line."""
        if self.kind == "pod":
            return f"{self.settings.scheme}://POD_IP:{self.settings.port}"
        namespace = self.targets.service_namespace
        host = "NAME" if namespace is None else f"NAME.{namespace}.svc"
        return f"{self.settings.scheme}://{host}:PORT"

    def __repr__(self) -> str:
        state = "watching" if self._watching else "listing"
        return (f"<KubernetesDiscovery {self.namespace}/{self.settings.label_selector or '*'} "
                f"{self.kind}s={len(self.targets)} routable={self.targets.routable} "
                f"backends={self.targets.published} "
                f"rv={self.resource_version} {state}>")


def _after(delay: float) -> str:
    return f" in {delay:.2g}s" if delay else " now"


def kubernetes_discovery(
    pool: BackendPool, settings: K8sSettings,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup_ctx: load the credentials at startup (a bad kubeconfig or missing service
    account stops the start with `K8sConfigError`), then run the discovery as a task with a
    session of its own until cleanup."""

    async def discovery(app: web.Application) -> AsyncIterator[None]:
        access = await load_access(settings)
        if access.ssl is False or (isinstance(access.ssl, ssl.SSLContext)
                                   and access.ssl.verify_mode == ssl.CERT_NONE):
            log.warning("the kubernetes API server's certificate is not verified "
                        "(insecure-skip-tls-verify)")
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            watcher = KubernetesDiscovery(pool, settings, access, session)
            log.info("kubernetes discovery: %ss in namespace %s%s, engines at %s, via %s (%s)",
                     watcher.kind, access.namespace,
                     f" matching {settings.label_selector!r}" if settings.label_selector else "",
                     watcher.engine_urls, access.server, access.source)
            task = asyncio.create_task(watcher.run(), name="kubernetes-discovery")
            try:
                yield
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    return discovery
