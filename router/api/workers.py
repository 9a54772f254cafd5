"""The worker API of sglang-router and vllm-router: add and remove engines at run time.

REST form (sglang-router): `POST /workers` with `{"url": ..., "model_id"?: ...}`,
`GET /workers`, `GET /workers/{url}`, `DELETE /workers/{url}` (the URL percent-encoded).
Query form (both): `POST /add_worker?url=`, `POST /remove_worker?url=`, `GET /list_workers`
(`{"urls": [...]}`). Successes have their shapes; failures are our JSON errors. Behind the
API keys always, as admin paths are with `--protect-admin`; without keys, changes are
accepted from this host (loopback) only. What an addition or removal does
to routing, and how it meets discovery: `router.discovery.runtime`.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from router.api.auth import require_key_or_this_host
from router.api.limits import openai_errors
from router.api.middleware import expect_handler
from router.backends.pool import Backend, parse_url
from router.discovery.runtime import RuntimeWorkers, WorkerUnreachable, fetch_models
from router.errors import BadRequest, RouterError
from router.keys import CONFIG, HEALTH, POOL, RUNTIME_WORKERS, STATS
from router.proxy.inbound import JSON_BODY, BodySize, read_json_object

__all__ = ["PATHS", "add_routes"]

log = logging.getLogger("router.workers")

PATHS = ("/workers", "/add_worker", "/remove_worker", "/list_workers")
"""Paths (and `/workers/...`) that change or show the backend set: never open."""
WORKER_TYPES = {"regular": (), "prefill": ("prefill",), "decode": ("decode",)}
"""sglang's `worker_type` as our labels (what `--prefill-model-labels` and
`--decode-model-labels` match)."""


class WorkerNotFound(RouterError):
    status = 404
    error_type = "invalid_request_error"
    code = "worker_not_found"


class WorkerUnavailable(RouterError):
    status = 502
    error_type = "upstream_error"
    code = "worker_unreachable"


class WorkersConflict(RouterError):
    status = 409
    error_type = "invalid_request_error"
    code = "conflict"


def _runtime(request: web.Request, changing: bool) -> RuntimeWorkers:
    config = request.app[CONFIG]
    if changing and config.workers > 1:
        # Each process of --workers has its own pool: a change would reach one of them.
        raise WorkersConflict("the worker API cannot change backends with --workers above 1 "
                              "(each process routes on its own); run one process")
    if changing:  # an engine added decides where every prompt goes
        require_key_or_this_host(
            request, "without --api-keys the worker API accepts changes from this host only; "
            "set --api-keys to change workers from elsewhere")
    if changing and config.service_discovery == "external-only":
        raise WorkersConflict("the worker API adds engines; this router routes only to "
                              "external providers")
    return request.app[RUNTIME_WORKERS]


def _entry(request: web.Request, backend: Backend) -> dict[str, Any]:
    app = request.app
    labels = set(backend.labels)
    worker_type = next((name for name in ("prefill", "decode") if name in labels), "regular")
    return {
        "id": backend.id,
        "url": backend.url,
        "model_id": backend.models[0] if backend.models else "",
        "models": list(backend.models),
        "worker_type": worker_type,
        "is_healthy": app[HEALTH].state(backend.id).available,
        "load": app[STATS].for_backend(backend.id).snapshot().in_flight,
        "source": app[RUNTIME_WORKERS].source(backend),
    }


def _engines(request: web.Request) -> list[Backend]:
    return [b for b in request.app[POOL].backends if b.kind == "engine"]


def _url(raw: object) -> str:
    if not isinstance(raw, str) or not raw:
        raise BadRequest("give the engine's base URL as 'url', e.g. http://10.0.0.7:8000")
    try:
        return parse_url(raw)
    except ValueError:
        raise BadRequest("'url' must be an http(s) base URL with a host, without query, "
                         "fragment or credentials") from None


async def _add(request: web.Request, spec: dict[str, Any]) -> Backend:
    """Check `spec`, learn the engine's models unless given, and route to it."""
    runtime = _runtime(request, changing=True)
    url = _url(spec.get("url"))
    config = request.app[CONFIG]
    api_key = spec.get("api_key")
    if api_key is not None and api_key != config.backend_api_key:
        # Engines get --backend-api-key (or the client's key) on every request; a key of
        # their own would be used for the model list only and fail on the first request.
        raise BadRequest("a per-worker 'api_key' is not supported: the router sends "
                         "--backend-api-key to every engine")
    worker_type = spec.get("worker_type") or "regular"
    if worker_type not in WORKER_TYPES:
        raise BadRequest("'worker_type' is one of regular, prefill, decode")
    model_id = spec.get("model_id")
    if model_id is not None and (not isinstance(model_id, str) or not model_id):
        raise BadRequest("'model_id' is a model name")
    if model_id:
        models: tuple[str, ...] = (model_id,)
    else:
        try:
            models = await fetch_models(url, config.backend_api_key)
        except WorkerUnreachable as error:
            raise WorkerUnavailable(
                f"the worker's models could not be learned: {error}; check that the engine "
                "is up, or give its model as 'model_id'") from None
    backend = Backend(url=url, models=models, labels=WORKER_TYPES[worker_type])
    runtime.add(backend)
    log.info("worker API: added %s serving %s", url, ", ".join(models))
    return backend


def _remove(request: web.Request, raw: object) -> str:
    runtime = _runtime(request, changing=True)
    url = _url(raw)
    if not runtime.remove(url):
        raise WorkerNotFound("no engine is routed at that URL (GET /workers lists them)")
    log.info("worker API: removed %s; its requests in flight run to their end", url)
    return url


@openai_errors
async def create_worker(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    size = BodySize(request, config.max_json_body_size, config.max_inflate_ratio, JSON_BODY)
    try:
        _, spec = await read_json_object(request, size, config.client_body_timeout)
    except BadRequest:
        raise BadRequest('the body is a JSON object: {"url": "http://host:port"}') from None
    backend = await _add(request, spec)
    return web.json_response({"success": True, "message": f"Worker {backend.url} added",
                              "worker": _entry(request, backend)})


@openai_errors
async def list_workers_rest(request: web.Request) -> web.Response:
    workers = [_entry(request, backend) for backend in _engines(request)]
    types = [worker["worker_type"] for worker in workers]
    return web.json_response({
        "workers": workers,
        "total": len(workers),
        "stats": {f"{kind}_count": types.count(kind) for kind in WORKER_TYPES},
    })


@openai_errors
async def get_worker(request: web.Request) -> web.Response:
    url = _url(request.match_info["url"])
    for backend in _engines(request):
        if backend.url == url:
            return web.json_response(_entry(request, backend))
    raise WorkerNotFound("no engine is routed at that URL (GET /workers lists them)")


@openai_errors
async def delete_worker(request: web.Request) -> web.Response:
    url = _remove(request, request.match_info["url"])
    return web.json_response({"success": True, "message": f"Worker {url} removed"})


@openai_errors
async def add_worker(request: web.Request) -> web.Response:
    spec = {name: request.query.get(name) for name in ("url", "api_key", "model_id")}
    backend = await _add(request, spec)
    return web.Response(text=f"Successfully added worker: {backend.url}")


@openai_errors
async def remove_worker(request: web.Request) -> web.Response:
    url = _remove(request, request.query.get("url"))
    return web.Response(text=f"Successfully removed worker: {url}")


@openai_errors
async def list_workers(request: web.Request) -> web.Response:
    return web.json_response({"urls": [backend.url for backend in _engines(request)]})


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_post("/workers", create_worker, expect_handler=expect_handler)
    router.add_get("/workers", list_workers_rest, expect_handler=expect_handler)
    router.add_get("/workers/{url:.+}", get_worker, expect_handler=expect_handler)
    router.add_delete("/workers/{url:.+}", delete_worker, expect_handler=expect_handler)
    router.add_post("/add_worker", add_worker, expect_handler=expect_handler)
    router.add_post("/remove_worker", remove_worker, expect_handler=expect_handler)
    router.add_get("/list_workers", list_workers, expect_handler=expect_handler)
