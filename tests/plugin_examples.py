"""Plugins used by tests/test_plugins.py (and a model for docs/extending.md)."""

from __future__ import annotations

import threading
import time
from typing import Any

from aiohttp import web

from router.flow import RequestFlow


class Gatekeeper:
    """Sync pre_request: refuses requests from a banned user before any backend is chosen."""

    def __init__(self) -> None:
        self.threads: set[str] = set()

    def pre_request(self, flow: RequestFlow) -> web.StreamResponse | None:
        self.threads.add(threading.current_thread().name)
        if (flow.request_json or {}).get("user") == "banned":
            return web.json_response(
                {"error": {"message": "banned", "type": "permission_error", "code": 403}},
                status=403,
            )
        return None


class Sluggish:
    """A sync event method slower than the inline budget (a blocking call, say)."""

    delay = 0.3

    def __init__(self) -> None:
        self.threads: list[str] = []

    def on_complete(self, flow: RequestFlow) -> None:
        self.threads.append(threading.current_thread().name)
        time.sleep(0.01 if len(self.threads) == 1 else self.delay)


class Blocking:
    """Declares itself blocking: its sync methods never run on the event loop."""

    blocking = True

    def __init__(self) -> None:
        self.threads: list[str] = []

    def on_new(self, flow: RequestFlow) -> None:
        self.threads.append(threading.current_thread().name)


class BodyWatcher:
    """Async post_request: receives the whole response body."""

    wants_body = True

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def post_request(self, flow: RequestFlow, body: bytes) -> None:
        self.bodies.append(body)


class EventCounter:
    """Sync event methods (fast: they run on the event loop)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_new(self, flow: RequestFlow) -> None:
        self.seen.append("new")

    def on_complete(self, flow: RequestFlow) -> None:
        self.seen.append(f"complete:{flow.outcome.value if flow.outcome else None}")


class Broken:
    """Fails everywhere: the requests must not notice."""

    wants_body = True

    def on_new(self, flow: RequestFlow) -> None:
        raise RuntimeError("broken on_new")

    async def on_complete(self, flow: RequestFlow) -> None:
        raise RuntimeError("broken on_complete")

    async def pre_request(self, flow: RequestFlow) -> None:
        raise RuntimeError("broken pre_request")

    def post_request(self, flow: RequestFlow, body: bytes) -> None:
        raise RuntimeError("broken post_request")


class ProductionStackStyle:
    """A plugin written for production-stack's CustomCallbackHandler."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, Any]] = []
        self.responses: list[bytes] = []

    def pre_request(self, request: web.Request, request_body: bytes,
                    request_json: Any) -> web.Response | None:
        self.requests.append((request_body, request_json))
        if request_json.get("user") == "wants-canned":
            return web.json_response({"canned": True})
        return None

    def post_request(self, request: web.Request, response_content: bytes) -> None:
        self.responses.append(response_content)


class Defaults:
    """A request rewriter: default max_tokens, a model name mapped, a field stripped."""

    def rewrite(self, flow: RequestFlow, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("model") == "small":
            body["model"] = "chat-model"
        body.setdefault("max_tokens", 3)
        body.pop("secret_field", None)
        return body


class Identity:
    def rewrite(self, flow: RequestFlow, body: dict[str, Any]) -> dict[str, Any]:
        return body
