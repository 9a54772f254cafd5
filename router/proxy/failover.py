"""Failover: which failures move a request to another backend, and the prefill hop that goes
before a disaggregated request's decode.

`upstream_error` turns a failed backend call into the router's own error; `RETRIED_ERRORS`
are those no engine can have started work on, which `router.proxy.forward.forward` sends to
another backend as `Failover` allows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict

from router.backends.pool import Backend
from router.errors import (
    AnswerTooLarge, BackendStatus, BackendUnreachable, ClientGone, PrefillFailed,
    ResponseHeadTimeout, RouterError, UpstreamError, UpstreamTimeout, failure_detail,
)
from router.flow import RequestFlow
from router.proxy.inbound import InboundRequest, UploadBody
from router.proxy.retries import RetryBudget
from router.proxy.timeouts import HeadTimeout
from router.proxy.upstream_read import read_bounded

__all__ = [
    "RETRIED_STATUSES", "RETRIED_ERRORS", "Failover", "PrefillHop", "upstream_error",
    "same_again", "prefill", "prefill_body", "PREFILL_DROPPED",
]

log = logging.getLogger("router.proxy")


def upstream_error(error: BaseException, backend: str, upload: UploadBody | None) -> Exception:
    """Translate a failure of the backend's answer into our own exception: a message in our
    words naming the backend by its id, and aiohttp's account of it for the log only."""
    if upload is not None and upload.error is not None:
        # The body stream failed on the client's side, not the backend's.
        return upload.error if isinstance(upload.error, RouterError) else ClientGone()
    detail = failure_detail(error)
    if isinstance(error, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return BackendUnreachable(f"backend {backend} is unreachable", detail)
    if isinstance(error, HeadTimeout):
        return ResponseHeadTimeout(f"backend {backend} did not finish its response head in "
                                   "time", detail)
    if isinstance(error, TimeoutError):
        return UpstreamTimeout(f"backend {backend} did not answer in time", detail)
    if isinstance(error, aiohttp.ClientResponseError):
        return UpstreamError(f"backend {backend} sent an invalid response", detail)
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return UpstreamError(f"backend {backend} closed the connection before answering",
                             detail)
    return UpstreamError(f"backend {backend} failed", detail)


@dataclass(frozen=True)
class Failover:
    """How a request that failed before its answer started moves to another backend."""

    reroute: Callable[[Collection[str]], Backend | None]
    """Another backend, given the ids already tried; None when there is none."""
    alternatives: Callable[[Collection[str]], bool]
    """Whether another backend could take the request (asks no policy: no side effect)."""
    max_retries: int
    backoff: float
    """Seconds before the first retry, doubled for each next one."""
    budget: RetryBudget
    """The application's: retries at most a share of the requests in flight."""


@dataclass(frozen=True)
class PrefillHop:
    """The prefill hop of disaggregated prefill: its bounds (its answer is read whole) and
    what the decode request takes from it."""

    timeout: float
    """Seconds for the whole hop: connect, the prefill itself and the answer's last byte."""
    max_answer: int
    """Bytes of answer read; past them the hop fails (the answer is one token)."""
    kv_handoff: bool = False
    """Whether the prefill answer's `kv_transfer_params` go into the decode request (the
    policy's `kv_handoff`: `disaggregated_prefill_orchestrated`)."""


RETRIED_STATUSES = frozenset({502, 503, 504})
"""Backend answers worth another backend: a gateway in front of it failed, or it is
overloaded or shutting down (vLLM answers 503 while draining)."""


RETRIED_ERRORS = (BackendUnreachable, BackendStatus)
"""Failures no engine can have started work on: no connection was made, or the engine
answered "not me". Anything else happened after the request was sent (a timeout, a reset,
a broken answer): the engine may be generating it, so it is never sent to another one.
Only a status retry is subject to the retry budget."""


def same_again(flow: RequestFlow) -> Backend | None:
    """The backend that just failed, when it has retries of its own (an external provider)
    not used up yet; else None."""
    backend = flow.backend
    assert backend is not None
    used = sum(1 for attempt in flow.attempts if attempt.backend is backend)
    return backend if used < backend.max_retries else None


PREFILL_DROPPED = frozenset({"min_tokens", "max_completion_tokens", "stream_options"})
"""Client fields the prefill hop leaves out: they bound or shape a longer answer than its one
token (vLLM rejects `min_tokens` above `max_tokens`, and `max_completion_tokens` would win
over `max_tokens`)."""

KV_HANDOFF_REQUEST = {
    "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
    "remote_block_ids": None, "remote_host": None, "remote_port": None,
}
"""With `kv_handoff`: what asks vLLM's KV connector to keep the cache for a remote decode."""


def prefill_body(client: dict[str, Any], kv_handoff: bool) -> dict[str, Any]:
    """The prefill hop's body: the client's, for one token without a stream; with
    `kv_handoff`, asking for the parameters the decode hop will need."""
    body = {key: value for key, value in client.items() if key not in PREFILL_DROPPED}
    body.update(max_tokens=1, stream=False)
    if kv_handoff:
        body["kv_transfer_params"] = dict(KV_HANDOFF_REQUEST)
    return body


async def prefill(
    flow: RequestFlow,
    inbound: InboundRequest,
    session: aiohttp.ClientSession,
    path: str,
    headers: CIMultiDict[str],
    hop: PrefillHop,
) -> None:
    """Disaggregated prefill, first hop: `flow.prefill_backend` computes the prompt's KV cache
    (one token, no stream), then the decode request goes out as the caller sends it. With
    `hop.kv_handoff` the decode request carries the `kv_transfer_params` the prefill
    returned, so the decode backend fetches the cache instead of recomputing it; without,
    the engines share the cache themselves (LMCache) and the decode request is the client's
    body untouched.

    The answer is read whole, so the hop is bounded in time (`hop.timeout`, all of it) and
    size (`hop.max_answer`): a prefill backend that answers without end is cut there."""
    assert flow.prefill_backend is not None and inbound.json is not None
    backend = flow.prefill_backend
    body = prefill_body(inbound.json, hop.kv_handoff)
    if flow.trace_headers:
        headers.update(flow.trace_headers)
    timeout = session.timeout
    timeout = aiohttp.ClientTimeout(
        total=hop.timeout, connect=timeout.connect, sock_connect=timeout.sock_connect,
        sock_read=timeout.sock_read, ceil_threshold=timeout.ceil_threshold,
    )
    try:
        async with session.post(backend.url + path, json=body, headers=headers,
                                timeout=timeout, allow_redirects=False) as response:
            answer = await read_bounded(response, hop.max_answer,
                                        f"prefill backend {backend.id}")
    except AnswerTooLarge as error:
        log.warning("request %s: %s; cut, the connection closed", flow.id, error.message)
        raise
    except (aiohttp.ClientError, TimeoutError) as error:
        raise upstream_error(error, backend.id, inbound.upload) from error
    if response.status != 200:
        raise PrefillFailed(response.status, answer, backend.id)
    if hop.kv_handoff:
        params = kv_params(answer, backend)
        inbound.body = json.dumps({**inbound.json, "kv_transfer_params": params}).encode()


def kv_params(answer: bytes, backend: Backend) -> dict[str, Any]:
    """The `kv_transfer_params` of a prefill answer; a 502 when it has none."""
    try:
        params = json.loads(answer).get("kv_transfer_params")
    except (ValueError, AttributeError):
        params = None
    if not isinstance(params, dict):
        raise UpstreamError(f"prefill backend {backend.id} returned no kv_transfer_params")
    return params
