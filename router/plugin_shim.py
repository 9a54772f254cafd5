"""The import path production-stack's callback modules start with, for routers without
production-stack installed:

    from vllm_router.services.callbacks_service.custom_callbacks import CustomCallbackHandler

`install()` makes that import resolve to this module, and is called only when `--callbacks`
loads a module and no real `vllm_router` package is importable: nothing named `vllm_router`
ships with the router, so an installed production-stack is never shadowed.
"""

from __future__ import annotations

import importlib.util
import sys
import types

__all__ = ["CustomCallbackHandler", "SHIM_MODULE", "install"]

SHIM_MODULE = "vllm_router.services.callbacks_service.custom_callbacks"


class CustomCallbackHandler:
    """production-stack's callback base class, with the same two methods. `request` is the
    aiohttp request (production-stack passes a FastAPI one: headers, `url` and client
    address read alike); `pre_request` may return an aiohttp response (or a Starlette one,
    converted) to answer the request itself."""

    def pre_request(self, request: object, request_body: bytes, request_json: object) -> object:
        """Before the request is routed; a response ends it, None lets it through."""
        return None

    def post_request(self, request: object, response_content: bytes) -> None:
        """After the whole answer reached the client, with its body."""


def install() -> None:
    """Make `SHIM_MODULE` importable, unless a real `vllm_router` is (idempotent)."""
    if SHIM_MODULE in sys.modules:
        return
    try:
        if importlib.util.find_spec("vllm_router") is not None:
            return
    except (ImportError, ValueError):
        pass
    parent: types.ModuleType | None = None
    parts = SHIM_MODULE.split(".")
    for depth in range(1, len(parts)):
        name = ".".join(parts[:depth])
        package = sys.modules.get(name)
        if package is None:
            package = types.ModuleType(name, "production-stack compatibility (router)")
            package.__path__ = []
            sys.modules[name] = package
        if parent is not None:
            setattr(parent, parts[depth - 1], package)
        parent = package
    leaf = sys.modules[__name__]
    sys.modules[SHIM_MODULE] = leaf
    assert parent is not None
    setattr(parent, parts[-1], leaf)
