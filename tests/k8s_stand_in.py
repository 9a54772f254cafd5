"""A Kubernetes API server stand-in for the pods and services of one namespace, on loopback.

It speaks the wire format the real one does for `GET /api/v1/namespaces/{ns}/pods` and
`.../services`, the same for both:

- LIST: a `PodList` or `ServiceList` (`metadata.resourceVersion`, `items`), paged with
  `limit`/`continue`.
- WATCH (`?watch=1&resourceVersion=N`): a chunked `200` with one JSON event a line
  (`{"type": "ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK"|"ERROR", "object": ...}`), replaying the
  history after N, ended cleanly after `timeoutSeconds`. A resourceVersion older than the
  compacted history gets an `ERROR` event with a `410` Status (what the real server sends), or
  with `gone_as_http_status` an HTTP 410.
- Label selectors (equality: `a=b`, `a==b`, `a!=b`, `a`); an object that stops matching the
  selector is sent as DELETED, one that starts matching as ADDED, as the real watch cache does.
- One resourceVersion sequence for every resource (etcd's revision), as on the real server.
- A bearer token check (401 with a Status), or TLS with client certificates.

Tests steer it: change pods or services (`resource="services"`), send bookmarks, compact the
history, end or break the open watches, hold new watches at a gate, inject raw lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Pod = dict[str, Any]
Service = dict[str, Any]

PORT_ANNOTATION = "router.vllm.ai/port"
RESOURCES = {"pods": "Pod", "services": "Service"}
"""The resources served, with the kind of their objects."""


def make_pod(
    name: str,
    *,
    port: int | None = None,
    ip: str | None = "127.0.0.1",
    ready: bool = True,
    phase: str = "Running",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> Pod:
    """A pod object as the API server returns it (the fields discovery reads, and some more)."""
    all_annotations = dict(annotations or {})
    if port is not None:
        all_annotations[PORT_ANNOTATION] = str(port)
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [
            {"type": "Initialized", "status": "True"},
            {"type": "Ready", "status": "True" if ready else "False"},
            {"type": "ContainersReady", "status": "True" if ready else "False"},
            {"type": "PodScheduled", "status": "True"},
        ],
        "hostIP": "10.0.0.1",
        "containerStatuses": [{"name": "vllm", "ready": ready, "restartCount": 0}],
    }
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {
        "metadata": {
            "name": name,
            "namespace": "",
            "uid": str(uuid.uuid4()),
            "labels": {"app": "vllm", **(labels or {})},
            "annotations": all_annotations,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
        "status": status,
    }


def make_service(
    name: str,
    *,
    port: int = 8000,
    ports: list[dict[str, Any]] | None = None,
    cluster_ip: str = "10.96.0.10",
    labels: dict[str, str] | None = None,
    selector: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> Service:
    """A Service object as the API server returns it: one TCP port `http` unless `ports`."""
    return {
        "metadata": {
            "name": name,
            "namespace": "",
            "uid": str(uuid.uuid4()),
            "labels": {"app": "vllm", **(labels or {})},
            "annotations": dict(annotations or {}),
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "selector": selector if selector is not None else {"app": "vllm"},
            "ports": ports if ports is not None else [
                {"name": "http", "protocol": "TCP", "port": port, "targetPort": port}],
        },
        "status": {"loadBalancer": {}},
    }


def set_ready(pod: Pod, ready: bool) -> None:
    for condition in pod["status"]["conditions"]:
        if condition["type"] in ("Ready", "ContainersReady"):
            condition["status"] = "True" if ready else "False"


@dataclass
class Seen:
    """One request the stand-in answered."""

    kind: str
    """`list` or `watch`."""
    params: dict[str, str]
    status: int
    at: float = field(default_factory=time.monotonic)
    authorization: str | None = None
    resource: str = "pods"


@dataclass
class _Event:
    version: int
    resource: str
    type: str
    new: Pod | None
    old: Pod | None


_END = object()
_BREAK = object()


class _Watcher:
    def __init__(self, resource: str, selector: str, bookmarks: bool) -> None:
        self.resource = resource
        self.selector = selector
        self.bookmarks = bookmarks
        self.queue: asyncio.Queue[object] = asyncio.Queue()


def _parse_selector(text: str) -> list[tuple[str, str, str | None]]:
    requirements: list[tuple[str, str, str | None]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "!=" in part:
            key, value = part.split("!=", 1)
            requirements.append((key.strip(), "!=", value.strip()))
        elif "=" in part:
            key, value = part.replace("==", "=").split("=", 1)
            requirements.append((key.strip(), "=", value.strip()))
        else:
            requirements.append((part, "exists", None))
    return requirements


def matches(pod: Pod | None, selector: str) -> bool:
    if pod is None:
        return False
    labels = pod["metadata"].get("labels") or {}
    for key, op, value in _parse_selector(selector):
        if op == "=" and labels.get(key) != value:
            return False
        if op == "!=" and labels.get(key) == value:
            return False
        if op == "exists" and key not in labels:
            return False
    return True


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _line(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class ApiServerStandIn:
    """The pods and services of `namespace`, served over the real list/watch protocol."""

    def __init__(self, namespace: str = "llm", token: str | None = "good-token",
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.namespace = namespace
        self.token = token
        """The bearer token required; None: no token check (e.g. client certificates)."""
        self.ssl_context = ssl_context
        self.objects: dict[str, dict[str, Pod]] = {resource: {} for resource in RESOURCES}
        """Per resource (`pods`, `services`), the objects by name."""
        self.version = 1000
        self.history: list[_Event] = []
        self.oldest = self.version
        """Watches from an older resourceVersion get 410 Gone."""
        self.requests: list[Seen] = []
        self.watch_gate = asyncio.Event()
        """Cleared: new watches wait before answering."""
        self.watch_gate.set()
        self.gone_as_http_status = False
        self.always_gone = False
        """Every watch gets 410, as a stuck watch cache would answer."""
        self.end_watches_at_once = False
        self.list_status: int | None = None
        """Answer every LIST with this error status."""
        self._watchers: set[_Watcher] = set()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{namespace}/{resource:pods|services}",
                           self._handler)
        # handler_cancellation: a watch whose client went away ends, as on a real server.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1,
                                     handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        port = self._runner.addresses[0][1]
        scheme = "https" if self.ssl_context else "http"
        self.url = f"{scheme}://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        self.end_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ steering

    @property
    def pods(self) -> dict[str, Pod]:
        return self.objects["pods"]

    @property
    def services(self) -> dict[str, Service]:
        return self.objects["services"]

    def _record(self, resource: str, kind: str, new: Pod | None, old: Pod | None,
                deliver: bool = True) -> None:
        self.version += 1
        if new is not None:
            new["metadata"]["resourceVersion"] = str(self.version)
        event = _Event(self.version, resource, kind, copy.deepcopy(new), copy.deepcopy(old))
        self.history.append(event)
        for watcher in self._watchers if deliver else ():
            line = self._event_line(event, watcher)
            if line is not None:
                watcher.queue.put_nowait(line)

    def add(self, obj: Pod, resource: str = "pods") -> None:
        name = obj["metadata"]["name"]
        assert name not in self.objects[resource], name
        obj["metadata"]["namespace"] = self.namespace
        self.objects[resource][name] = obj
        self._record(resource, "ADDED", obj, None)

    def change(self, name: str, mutate: Callable[[Pod], None], deliver: bool = True,
               resource: str = "pods") -> None:
        """Change an object; `deliver=False` loses the event on its way to the open watches."""
        objects = self.objects[resource]
        old = copy.deepcopy(objects[name])
        mutate(objects[name])
        self._record(resource, "MODIFIED", objects[name], old, deliver)

    def delete(self, name: str, deliver: bool = True, resource: str = "pods") -> None:
        old = self.objects[resource].pop(name)
        self._record(resource, "DELETED", old, old, deliver)

    def bump(self) -> None:
        """A change elsewhere (an object the selector does not match): only the version moves."""
        self.version += 1

    def bookmark(self) -> None:
        for watcher in self._watchers:
            if watcher.bookmarks:
                watcher.queue.put_nowait(_line({
                    "type": "BOOKMARK",
                    "object": {"kind": RESOURCES[watcher.resource], "apiVersion": "v1",
                               "metadata": {"resourceVersion": str(self.version)}},
                }))

    def compact(self) -> None:
        """Forget the history: watches from before now get 410 Gone."""
        self.history.clear()
        self.oldest = self.version

    def end_watches(self) -> None:
        """End every open watch cleanly, as when its timeoutSeconds runs out."""
        for watcher in self._watchers:
            watcher.queue.put_nowait(_END)

    def break_watches(self) -> None:
        """Cut every open watch mid-event: half a line, then the connection closes."""
        for watcher in self._watchers:
            watcher.queue.put_nowait(_BREAK)

    def expire_watches(self) -> None:
        """Send every open watch a 410 ERROR event and end it (etcd compacted under it)."""
        for watcher in self._watchers:
            watcher.queue.put_nowait(self._gone_line())
            watcher.queue.put_nowait(_END)

    def inject(self, raw: bytes) -> None:
        """Send a raw line (newline added) to every open watch."""
        for watcher in self._watchers:
            watcher.queue.put_nowait(raw + b"\n")

    @property
    def open_watches(self) -> int:
        return len(self._watchers)

    def seen(self, kind: str, resource: str | None = None) -> list[Seen]:
        """The `list` or `watch` requests answered, of one resource or of all."""
        return [request for request in self.requests if request.kind == kind
                and resource in (None, request.resource)]

    # ------------------------------------------------------------------ protocol

    def _event_line(self, event: _Event, watcher: _Watcher) -> bytes | None:
        if event.resource != watcher.resource:
            return None
        selector = watcher.selector
        now, before = matches(event.new, selector), matches(event.old, selector)
        if event.type == "DELETED":
            return _line({"type": "DELETED", "object": event.new}) if before else None
        if now and not before:
            return _line({"type": "ADDED", "object": event.new})
        if now:
            return _line({"type": "MODIFIED", "object": event.new})
        if before:  # it left the selection: the watch says DELETED
            return _line({"type": "DELETED", "object": event.new})
        return None

    def _gone_line(self) -> bytes:
        return _line({"type": "ERROR", "object": _status(
            410, "Expired", f"too old resource version: {self.oldest - 1} ({self.oldest})")})

    async def _handler(self, request: web.Request) -> web.StreamResponse:
        params = dict(request.query)
        watch = params.get("watch") in ("1", "true")
        kind = "watch" if watch else "list"
        resource = request.match_info["resource"]
        authorization = request.headers.get("Authorization")

        def seen(status: int) -> None:
            self.requests.append(Seen(kind, params, status, authorization=authorization,
                                      resource=resource))

        if self.token is not None and authorization != f"Bearer {self.token}":
            seen(401)
            return web.json_response(_status(401, "Unauthorized", "Unauthorized"), status=401)
        if request.match_info["namespace"] != self.namespace:
            seen(404)
            return web.json_response(_status(404, "NotFound", "namespace not found"),
                                     status=404)
        if watch:
            return await self._watch(request, params, resource, seen)
        if self.list_status is not None:
            seen(self.list_status)
            return web.json_response(
                _status(self.list_status, "InternalError", "etcd is unhappy"),
                status=self.list_status)
        seen(200)
        return self._list(params, resource)

    def _list(self, params: dict[str, str], resource: str) -> web.Response:
        selector = params.get("labelSelector", "")
        selected = [obj for name, obj in sorted(self.objects[resource].items())
                    if matches(obj, selector)]
        start = int(params.get("continue") or 0)
        limit = int(params.get("limit") or 0) or len(selected) or 1
        page = selected[start:start + limit]
        metadata: dict[str, Any] = {"resourceVersion": str(self.version)}
        if start + limit < len(selected):
            metadata["continue"] = str(start + limit)
        body = {"kind": RESOURCES[resource] + "List", "apiVersion": "v1", "metadata": metadata,
                "items": copy.deepcopy(page)}
        return web.json_response(body)

    async def _watch(self, request: web.Request, params: dict[str, str], resource: str,
                     seen: Callable[[int], None]) -> web.StreamResponse:
        await self.watch_gate.wait()
        version = int(params.get("resourceVersion") or self.version)
        gone = self.always_gone or version < self.oldest
        if gone and self.gone_as_http_status:
            seen(410)
            return web.json_response(_status(410, "Gone", "too old resource version"),
                                     status=410)
        seen(200)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        if gone:
            await response.write(self._gone_line())
            await response.write_eof()
            return response
        watcher = _Watcher(resource, params.get("labelSelector", ""),
                           params.get("allowWatchBookmarks") == "true")
        # Replay and register with no await between: no event falls in the gap.
        for event in self.history:
            if event.version > version:
                line = self._event_line(event, watcher)
                if line is not None:
                    watcher.queue.put_nowait(line)
        if self.end_watches_at_once:
            watcher.queue.put_nowait(_END)
        self._watchers.add(watcher)
        try:
            async with asyncio.timeout(float(params.get("timeoutSeconds") or 1800)):
                while True:
                    item = await watcher.queue.get()
                    if item is _END:
                        break
                    if item is _BREAK:
                        await response.write(b'{"type":"MODIFIED","object":{"metad')
                        assert request.transport is not None
                        request.transport.close()
                        return response
                    assert isinstance(item, bytes)
                    await response.write(item)
        except TimeoutError:
            pass
        finally:
            self._watchers.discard(watcher)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response
