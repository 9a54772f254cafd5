"""What the router polls on the fake engine, outside the proxied path: `/v1/models`,
`/health` and vLLM-style `/metrics` (load gauges the routing policies read)."""

from __future__ import annotations

import time

from aiohttp import web

from router.testing.engine.replies import json_reply
from router.testing.engine.state import ENGINE_BEHAVIOUR, ENGINE_CONFIG, ENGINE_STATE, MAX_MODEL_LEN

__all__ = ["health", "list_models", "metrics"]


_KV_CACHE_SLOTS = 64  # requests that would fill the fake KV cache
_PROMPT_BLOCK_TOKENS = 32  # tokens of prefix-cache lookup per request


def _permission(created: int, model: str) -> dict[str, object]:
    return {
        "id": f"modelperm-{model}", "object": "model_permission", "created": created,
        "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
        "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
        "organization": "*", "group": None, "is_blocking": False,
    }


async def list_models(request: web.Request) -> web.Response:
    """vLLM's cards: a base model's `root` is where its weights came from (here: its name)
    and it has a `max_model_len`; a LoRA adapter's `root` is the adapter's path, its
    `parent` the base model, and it has no `max_model_len`."""
    created = int(time.time())
    config = request.app[ENGINE_CONFIG]
    data = []
    for model in config.models:
        parent = config.lora_parents.get(model)
        data.append({
            "id": model,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": f"/adapters/{model}" if parent else model,
            "parent": parent,
            "max_model_len": None if parent else MAX_MODEL_LEN,
            "permission": [_permission(created, model)],
        })
    return json_reply({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    return web.Response(status=request.app[ENGINE_BEHAVIOUR].health_status)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def metrics(request: web.Request) -> web.Response:
    state = request.app[ENGINE_STATE]
    behaviour = request.app[ENGINE_BEHAVIOUR]
    label = f'model_name="{_label(request.app[ENGINE_CONFIG].models[0])}"'
    kv = behaviour.kv_cache_usage
    if kv is None:
        kv = state.open / _KV_CACHE_SLOTS
    kv = min(1.0, max(0.0, kv))
    text = (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f"vllm:num_requests_running{{{label}}} {float(state.open)}\n"
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        f"vllm:num_requests_waiting{{{label}}} {float(behaviour.num_requests_waiting)}\n"
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        f"vllm:kv_cache_usage_perc{{{label}}} {kv}\n"
        "# HELP vllm:request_success_total Count of successfully processed requests.\n"
        "# TYPE vllm:request_success_total counter\n"
        f'vllm:request_success_total{{finished_reason="stop",{label}}} '
        f"{float(state.completed)}\n"
    )
    if behaviour.prefix_cache:
        # Each request queries the cache for its prompt; all but the first find half of it.
        queried = _PROMPT_BLOCK_TOKENS * state.started
        hits = _PROMPT_BLOCK_TOKENS // 2 * max(0, state.started - 1)
        text += (
            "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in queried tokens.\n"
            "# TYPE vllm:prefix_cache_queries_total counter\n"
            f"vllm:prefix_cache_queries_total{{{label}}} {float(queried)}\n"
            "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in cached tokens.\n"
            "# TYPE vllm:prefix_cache_hits_total counter\n"
            f"vllm:prefix_cache_hits_total{{{label}}} {float(hits)}\n"
        )
    return web.Response(
        body=text.encode(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )
