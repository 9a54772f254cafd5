"""WebSocket sessions (vLLM's `/v1/realtime`): the backend's socket opened, then every message
relayed both ways until one side closes.

A session does not go through `router.proxy.forward`: there is no HTTP answer to stream to a
`Sink`, no body to replay on another backend once the upgrade is done, and plugins'
`pre_request`/`post_request` work on bodies. What it shares with every proxied request is the
handler's part (`router.api.realtime`): the live requests, the rate limit and admission, the
chooser, and one `Lifecycle` from arrival to close, so stats, metrics and the access log see
it. `WebSocketSink` is what that lifecycle asks about the client.

Control frames pass end to end: a ping is relayed as a ping and its pong comes back the same
way; the router's own heartbeat pings (`--websocket-heartbeat`) keep each hop alive, and their
pongs, relayed on, are unsolicited pongs, which a peer ignores. A close code and reason pass
as sent; a backend that goes away without one closes the client with 1014 (bad gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.http import WebSocketError
from multidict import CIMultiDict

from router.backends.pool import Backend
from router.errors import RouterError, UpstreamError, failure_detail
from router.events import RequestEvents
from router.flow import Outcome, RequestFlow
from router.proxy.failover import upstream_error
from router.proxy.headers import backend_headers
from router.proxy.sinks import Write, cut_client

__all__ = [
    "UpgradeRefused", "WebSocketLimits", "WebSocketSink", "connect", "relay", "websocket_headers",
]

log = logging.getLogger("router.proxy")

CLOSE_TIMEOUT = 5.0
"""Seconds a peer has to answer our close frame before its connection is dropped."""
UNSENDABLE = frozenset({1005, 1006, 1015})
"""Close codes that report a close and may not be sent in a close frame (RFC 6455 7.4.1)."""


@dataclass(frozen=True, slots=True)
class WebSocketLimits:
    max_message_size: int
    heartbeat: float | None
    """Seconds between pings on each side; None: no pings."""
    idle_timeout: float
    """Seconds with no message either way before the session is closed."""
    handshake_timeout: float
    """Seconds to connect to the backend and complete its upgrade."""


class WebSocketSink:
    """The client's side of a session, for its `Lifecycle`: whether the client left, and how
    to cut it. A session has no HTTP answer, so the streaming half of `Sink` is never called
    (`router.proxy.forward` is not on its path)."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.socket: web.WebSocketResponse | None = None
        """The client's socket once the upgrade was answered."""

    async def start(self, flow: RequestFlow, upstream: aiohttp.ClientResponse) -> Write:
        raise TypeError("a WebSocket session has no HTTP answer")

    async def end(self, last: bytes) -> None:
        raise TypeError("a WebSocket session has no HTTP answer")

    def broken(self, flow: RequestFlow, error: BaseException) -> None:
        raise TypeError("a WebSocket session has no HTTP answer")

    def answered(self, response: web.StreamResponse) -> None:
        raise TypeError("plugins do not answer WebSocket sessions")

    @property
    def upgraded(self) -> bool:
        return self.socket is not None and self.socket.prepared

    def client_gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    def abort(self) -> bool:
        if self.upgraded:
            cut_client(self.request)
            return True
        return False


class UpgradeRefused(RouterError):
    """The backend answered the upgrade with a 4xx (an engine without the Realtime API
    answers 404; a bad key 401/403): the client gets that status. Not the backend's fault,
    so its health is not touched."""

    error_type = "invalid_request_error"
    code = "upgrade_refused"
    outcome = Outcome.REJECTED

    def __init__(self, status: int, backend_id: str) -> None:
        super().__init__(f"backend {backend_id} refused the WebSocket upgrade ({status})")
        self.status = status


def websocket_headers(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """The upstream headers without the client's handshake (`Sec-WebSocket-*`): aiohttp's
    client makes its own key, version, extensions and protocol offer."""
    for name in [name for name in headers if name.lower().startswith("sec-websocket-")]:
        headers.popall(name, None)
    return headers


async def connect(
    session: aiohttp.ClientSession, backend: Backend, path: str, headers: CIMultiDict[str],
    protocols: tuple[str, ...], limits: WebSocketLimits,
) -> aiohttp.ClientWebSocketResponse:
    """The backend's socket, upgraded; a failure is the client's `RouterError` (502/503/504),
    answered before the client's own upgrade. The caller closes it (`async with`)."""
    try:
        async with asyncio.timeout(limits.handshake_timeout):
            return await session.ws_connect(
                backend.url + path,
                headers=backend_headers(headers, backend),
                protocols=protocols,
                autoclose=False,
                autoping=False,
                heartbeat=limits.heartbeat,
                max_msg_size=limits.max_message_size,
                # No read timeout once upgraded: the relay has its idle timeout.
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
            )
    except aiohttp.WSServerHandshakeError as error:
        if 400 <= error.status < 500:
            raise UpgradeRefused(error.status, backend.id) from None
        raise UpstreamError(f"backend {backend.id} refused the WebSocket upgrade",
                            f"status {error.status}") from None
    except (aiohttp.ClientError, TimeoutError) as error:
        raise upstream_error(error, backend.id, None) from None


Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


@dataclass(slots=True)
class Ending:
    """How one direction of the relay stopped."""

    closed_by: str
    """`client` or `backend`: whose socket ended (or, with `write_failed`, could not take
    a message)."""
    code: int | None = None
    """The close code the peer sent; None when its connection ended without one."""
    reason: str = ""
    error: BaseException | None = None


async def pump(
    source: Socket, target: Socket, side: str, other: str, flow: RequestFlow,
    activity: list[float], first: asyncio.Event | None,
) -> Ending:
    """Relay `source`'s messages to `target` until `source` closes or fails, or `target`
    cannot take one (then the ending is `other`'s)."""
    while True:
        message = await source.receive()
        kind = message.type
        if kind is WSMsgType.CLOSE:
            return Ending(side, message.data, message.extra or "")
        if kind is WSMsgType.ERROR:
            return Ending(side, error=message.data)
        if kind in (WSMsgType.CLOSING, WSMsgType.CLOSED):
            return Ending(side)
        now = activity[0] = time.monotonic()
        if first is not None and not first.is_set():
            first.set()
        if side == "backend":
            flow.writing_since = now  # the stall watch cuts a client that stops reading
        try:
            if kind is WSMsgType.TEXT:
                await target.send_str(message.data)
            elif kind is WSMsgType.BINARY:
                await target.send_bytes(message.data)
            elif kind is WSMsgType.PING:
                await target.ping(message.data)
            elif kind is WSMsgType.PONG:
                await target.pong(message.data)
        except ConnectionError as error:
            return Ending(other, error=error)
        finally:
            flow.writing_since = None
        if side == "backend" and kind in (WSMsgType.TEXT, WSMsgType.BINARY):
            flow.bytes_down += len(message.data)


async def relay(
    client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse,
    flow: RequestFlow, events: RequestEvents, idle_timeout: float,
    client_gone: Callable[[], bool],
) -> None:
    """Relay both ways until one side closes, goes silent past `idle_timeout` with the other,
    or fails; then close both. `flow`'s outcome is settled as soon as the ending is known:
    closing the client's socket lets aiohttp cancel this handler (its connection is gone), so
    what follows may not run. `on_response` comes with the backend's first message."""
    activity = [time.monotonic()]
    first = asyncio.Event()
    up = asyncio.create_task(pump(client, upstream, "client", "backend", flow, activity, None))
    down = asyncio.create_task(
        pump(upstream, client, "backend", "client", flow, activity, first))
    first_seen = asyncio.create_task(first.wait())
    ending: Ending | None = None
    cancelled = False
    try:
        while ending is None:
            wait = activity[0] + idle_timeout - time.monotonic()
            if wait <= 0:
                break
            done, _ = await asyncio.wait({up, down, first_seen}, timeout=wait,
                                         return_when=asyncio.FIRST_COMPLETED)
            if first_seen in done and flow.t_first_byte is None:
                flow.t_first_byte = time.monotonic()
                events.on_response(flow)
            for direction in (up, down):
                if direction in done:
                    ending = direction.result()
        account(flow, ending, idle_timeout)
    except asyncio.CancelledError:
        cancelled = True
        if flow.outcome is None:  # the stall watch sets its own
            flow.outcome = Outcome.CLIENT_DISCONNECTED if client_gone() else Outcome.CANCELLED
        raise
    finally:
        for task in (up, down, first_seen):
            task.cancel()
        await asyncio.gather(up, down, first_seen, return_exceptions=True)
        if cancelled:  # shutdown, the stall watch, the client's connection lost
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await close(upstream, WSCloseCode.GOING_AWAY, "")
                    await close(client, WSCloseCode.GOING_AWAY, "the router ended the session")
    await close_both(client, upstream, ending)


def account(flow: RequestFlow, ending: Ending | None, idle_timeout: float) -> None:
    """Set `flow`'s outcome (and error) from how the session ended (None: it went idle)."""
    flow.outcome = Outcome.OK
    if ending is None:
        flow.error = f"no message either way for {idle_timeout:g} s: closed"
    elif ending.code is not None:  # a close frame, from either side
        return
    elif ending.closed_by == "client":
        error = ending.error
        if isinstance(error, WebSocketError) and error.code == WSCloseCode.MESSAGE_TOO_BIG:
            flow.outcome = Outcome.REJECTED
            flow.error = "the client sent a message over --websocket-max-message-size"
        else:
            flow.outcome = Outcome.CLIENT_DISCONNECTED
            flow.error = f"the client's socket ended ({detail(error)})"
    else:
        flow.outcome = Outcome.BACKEND_ERROR
        flow.error = f"the backend's socket ended mid-session ({detail(ending.error)})"
        log.warning("request %s: %s", flow.id, flow.error)


def detail(error: BaseException | None) -> str:
    return "connection lost" if error is None else failure_detail(error)


async def close_both(
    client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse,
    ending: Ending | None,
) -> None:
    """Close both sockets as `ending` calls for (None: the session went idle): a close frame
    is passed on with its code and reason, then echoed; the backend's socket first where
    the client's may already be gone (closing it ends this handler)."""
    if ending is None:
        await close(upstream, WSCloseCode.GOING_AWAY, "idle timeout")
        await close(client, WSCloseCode.GOING_AWAY, "idle timeout")
    elif ending.code is not None:
        code = ending.code if ending.code not in UNSENDABLE else WSCloseCode.OK
        first, second = (upstream, client) if ending.closed_by == "client" else (client, upstream)
        await close(first, code, ending.reason)
        await close(second, code, ending.reason)
    elif ending.closed_by == "client":
        await close(upstream, WSCloseCode.GOING_AWAY, "client gone")
        await close(client, WSCloseCode.GOING_AWAY, "")
    else:
        await close(client, WSCloseCode.BAD_GATEWAY, "backend connection lost")
        await close(upstream, WSCloseCode.GOING_AWAY, "")


async def close(socket: Socket, code: int, reason: str) -> None:
    """Send our close frame and wait (up to `CLOSE_TIMEOUT`) for the peer's; a socket already
    closed is left alone."""
    if socket.closed:
        return
    try:
        await socket.close(code=code, message=reason.encode()[:123])
    except ConnectionError:
        pass
