"""A callbacks module written as for production-stack's router: it imports that router's base
class and names an instance (`--callbacks tests.production_stack_callbacks.callbacks_handler`).
Imported only by the router's `--callbacks` loading, which provides the base class's import
path when production-stack is not installed."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from vllm_router.services.callbacks_service.custom_callbacks import CustomCallbackHandler


class Auditor(CustomCallbackHandler):
    def __init__(self) -> None:
        self.models: list[str] = []
        self.responses: list[bytes] = []

    def pre_request(self, request: Any, request_body: bytes, request_json: Any) -> Any:
        self.models.append(request_json["model"])
        if request_json.get("user") == "blocked":
            return web.json_response({"error": {"message": "blocked", "type": "forbidden",
                                                "code": 403}}, status=403)
        return None

    def post_request(self, request: Any, response_content: bytes) -> None:
        self.responses.append(response_content)


callbacks_handler = Auditor()
