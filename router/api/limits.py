"""Who a caller is for its rate limit, and the limit every endpoint of the API spends.

`openai_errors` wraps a router-local endpoint (`/v1/models`, the Files and Batches API): its
caller's token is spent before anything else, and a refusal is an OpenAI-style JSON answer.
A proxied request spends its token in `router.api.openai.proxy`, inside its lifecycle.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType

from aiohttp import web

from router.api.middleware import request_id
from router.errors import RouterError, error_response, shorten
from router.flow import RequestFlow
from router.keys import ADMISSION, API_KEYS, LIVE_REQUESTS, RATE_LIMITER

__all__ = ["Handler", "WayIn", "client_key", "openai_errors", "spend_rate_limit"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def spend_rate_limit(request: web.Request) -> None:
    """Take a token of the client's bucket under `--rate-limit`, or raise `TooManyRequests`:
    every endpoint of the API spends it, not only the proxied ones."""
    limiter = request.app[RATE_LIMITER]
    if limiter is not None:
        limiter.take(client_key(request))


def client_key(request: web.Request) -> str:
    """Whose rate limit a request spends: its API key when keys are required (the key, not
    the header's spelling), else its address (a header a client can vary is no identity)."""
    keys = request.app[API_KEYS]
    if keys.enabled:
        key = keys.identify(request.headers)
        if key is not None:
            return "key:" + key
    return "addr:" + (request.remote or "unknown")


def openai_errors(handler: Handler, refusals: logging.Logger | None = None) -> Handler:
    """The caller's rate limit is spent first (a 429 reads nothing of the request); a
    `RouterError` from the handler becomes its OpenAI-style JSON answer, and a line on
    `refusals` when given (for endpoints that have no access line)."""

    @functools.wraps(handler)
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            spend_rate_limit(request)
            return await handler(request)
        except RouterError as error:
            rid = request_id(request)
            if refusals is not None:
                refusals.info("request %s: %s %s refused (%d): %s", rid, request.method,
                              shorten(request.path), error.status, error.message)
            return error_response(error, rid)

    return handle


class WayIn:
    """How a client's request gets in, for the proxied endpoints and `/v1/realtime` alike:
    the live requests track it while the `with` runs (shutdown and the stall watch find it);
    `admit()`, called inside its lifecycle so a refusal completes the flow, spends its
    rate-limit token and takes an admission slot, which the end of the `with` gives back."""

    __slots__ = ("request", "flow", "_task", "_holds_slot")

    def __init__(self, request: web.Request, flow: RequestFlow) -> None:
        self.request = request
        self.flow = flow
        self._holds_slot = False

    def __enter__(self) -> WayIn:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self.request.app[LIVE_REQUESTS].enter(task, self.flow)
        return self

    async def admit(self) -> None:
        spend_rate_limit(self.request)
        admission = self.request.app[ADMISSION]
        if admission is not None:
            await admission.acquire()
            self._holds_slot = True

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        app = self.request.app
        if self._holds_slot:
            self._holds_slot = False
            admission = app[ADMISSION]
            assert admission is not None
            admission.release()
        app[LIVE_REQUESTS].leave(self._task)
