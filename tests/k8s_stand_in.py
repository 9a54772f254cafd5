"""A Kubernetes API server stand-in for the pods of one namespace, on loopback.

It speaks the wire format the real one does for `GET /api/v1/namespaces/{ns}/pods`:

- LIST: a `PodList` (`metadata.resourceVersion`, `items`), paged with `limit`/`continue`.
- WATCH (`?watch=1&resourceVersion=N`): a chunked `200` with one JSON event a line
  (`{"type": "ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK"|"ERROR", "object": ...}`), replaying the
  history after N, ended cleanly after `timeoutSeconds`. A resourceVersion older than the
  compacted history gets an `ERROR` event with a `410` Status (what the real server sends), or
  with `gone_as_http_status` an HTTP 410.
- Label selectors (equality: `a=b`, `a==b`, `a!=b`, `a`); a pod that stops matching the selector
  is sent as DELETED, one that starts matching as ADDED, as the real watch cache does.
- A bearer token check (401 with a Status), or TLS with client certificates.

Tests steer it: change pods, send bookmarks, compact the history, end or break the open watches,
hold new watches at a gate, inject raw lines.
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

PORT_ANNOTATION = "router.vllm.ai/port"


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


@dataclass
class _Event:
    version: int
    type: str
    new: Pod | None
    old: Pod | None


_END = object()
_BREAK = object()


class _Watcher:
    def __init__(self, selector: str, bookmarks: bool) -> None:
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
    """The pods of `namespace`, served over the real list/watch protocol."""

    def __init__(self, namespace: str = "llm", token: str | None = "good-token",
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.namespace = namespace
        self.token = token
        """The bearer token required; None: no token check (e.g. client certificates)."""
        self.ssl_context = ssl_context
        self.pods: dict[str, Pod] = {}
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
        app.router.add_get("/api/v1/namespaces/{namespace}/pods", self._pods_handler)
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

    def _record(self, kind: str, new: Pod | None, old: Pod | None, deliver: bool = True) -> None:
        self.version += 1
        if new is not None:
            new["metadata"]["resourceVersion"] = str(self.version)
        event = _Event(self.version, kind, copy.deepcopy(new), copy.deepcopy(old))
        self.history.append(event)
        for watcher in self._watchers if deliver else ():
            line = self._event_line(event, watcher.selector)
            if line is not None:
                watcher.queue.put_nowait(line)

    def add(self, pod: Pod) -> None:
        name = pod["metadata"]["name"]
        assert name not in self.pods, name
        pod["metadata"]["namespace"] = self.namespace
        self.pods[name] = pod
        self._record("ADDED", pod, None)

    def change(self, name: str, mutate: Callable[[Pod], None], deliver: bool = True) -> None:
        """Change a pod; `deliver=False` loses the event on its way to the open watches."""
        old = copy.deepcopy(self.pods[name])
        mutate(self.pods[name])
        self._record("MODIFIED", self.pods[name], old, deliver)

    def delete(self, name: str, deliver: bool = True) -> None:
        old = self.pods.pop(name)
        self._record("DELETED", old, old, deliver)

    def bump(self) -> None:
        """A change elsewhere (a pod the selector does not match): only the version moves."""
        self.version += 1

    def bookmark(self) -> None:
        for watcher in self._watchers:
            if watcher.bookmarks:
                watcher.queue.put_nowait(_line({
                    "type": "BOOKMARK",
                    "object": {"kind": "Pod", "apiVersion": "v1",
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

    def seen(self, kind: str) -> list[Seen]:
        return [request for request in self.requests if request.kind == kind]

    # ------------------------------------------------------------------ protocol

    def _event_line(self, event: _Event, selector: str) -> bytes | None:
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

    async def _pods_handler(self, request: web.Request) -> web.StreamResponse:
        params = dict(request.query)
        watch = params.get("watch") in ("1", "true")
        kind = "watch" if watch else "list"
        authorization = request.headers.get("Authorization")
        if self.token is not None and authorization != f"Bearer {self.token}":
            self.requests.append(Seen(kind, params, 401, authorization=authorization))
            return web.json_response(_status(401, "Unauthorized", "Unauthorized"), status=401)
        if request.match_info["namespace"] != self.namespace:
            self.requests.append(Seen(kind, params, 404, authorization=authorization))
            return web.json_response(_status(404, "NotFound", "namespace not found"),
                                     status=404)
        if watch:
            return await self._watch(request, params, authorization)
        if self.list_status is not None:
            self.requests.append(Seen(kind, params, self.list_status,
                                      authorization=authorization))
            return web.json_response(
                _status(self.list_status, "InternalError", "etcd is unhappy"),
                status=self.list_status)
        self.requests.append(Seen(kind, params, 200, authorization=authorization))
        return self._list(params)

    def _list(self, params: dict[str, str]) -> web.Response:
        selector = params.get("labelSelector", "")
        selected = [pod for name, pod in sorted(self.pods.items()) if matches(pod, selector)]
        start = int(params.get("continue") or 0)
        limit = int(params.get("limit") or 0) or len(selected) or 1
        page = selected[start:start + limit]
        metadata: dict[str, Any] = {"resourceVersion": str(self.version)}
        if start + limit < len(selected):
            metadata["continue"] = str(start + limit)
        body = {"kind": "PodList", "apiVersion": "v1", "metadata": metadata,
                "items": copy.deepcopy(page)}
        return web.json_response(body)

    async def _watch(self, request: web.Request, params: dict[str, str],
                     authorization: str | None) -> web.StreamResponse:
        await self.watch_gate.wait()
        version = int(params.get("resourceVersion") or self.version)
        gone = self.always_gone or version < self.oldest
        if gone and self.gone_as_http_status:
            self.requests.append(Seen("watch", params, 410, authorization=authorization))
            return web.json_response(_status(410, "Gone", "too old resource version"),
                                     status=410)
        self.requests.append(Seen("watch", params, 200, authorization=authorization))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        if gone:
            await response.write(self._gone_line())
            await response.write_eof()
            return response
        selector = params.get("labelSelector", "")
        watcher = _Watcher(selector, params.get("allowWatchBookmarks") == "true")
        # Replay and register with no await between: no event falls in the gap.
        for event in self.history:
            if event.version > version:
                line = self._event_line(event, selector)
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
