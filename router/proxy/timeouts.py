"""The timeouts of one backend exchange, each bounding one phase of it.

aiohttp has one read timeout (`sock_read`) for the wait for the response head and for the
body alike. A proxy needs two: vLLM sends a non-streamed answer's head only when generation
ends (minutes), while a stream that went silent should be cut much sooner. So the exchange
starts with `sock_read` = the response timeout, and the first byte of the head switches the
connection to the body's read timeout; from that byte on, the head as a whole also has a
deadline of its own, so an upstream that trickles header lines cannot hold a request for ever
(every byte would restart a read timeout).

`HeadWatchingConnector.connect` arms a `HeadWatch` on the connection of each request sent
with a `ProxyTimeout`. The watch works by shadowing the protocol's `data_received` (until the
first byte) and `feed_data` (until the head is parsed) with instance attributes: nothing runs
per body chunk, and one timer exists only while a head is incomplete after its first bytes.
This leans on aiohttp 3.14's `ResponseHandler` looking both methods up on the instance
(tests/test_timeouts.py notices a change: the trickled head would no longer be cut). Should
it stop, a silent body is still cut by `router.app.watch_stalls` after the read timeout.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import aiohttp
import attr

from router.proxy.upstream_pool import GuardedConnector

if TYPE_CHECKING:
    from aiohttp.client_proto import ResponseHandler
    from aiohttp.client_reqrep import ClientRequest
    from aiohttp.connector import Connection
    from aiohttp.tracing import Trace

__all__ = ["ProxyTimeout", "HeadTimeout", "HeadWatch", "HeadWatchingConnector"]


@attr.s(auto_attribs=True, frozen=True, slots=True)
class ProxyTimeout(aiohttp.ClientTimeout):
    """A `ClientTimeout` whose `sock_read` is the response timeout (request sent -> first
    byte of the head), plus what applies once the head started."""

    body_read: float | None = None
    """Longest silence of the backend once its head started (between two body chunks)."""
    head: float | None = None
    """Seconds from the head's first byte to its end; None: no deadline."""


class HeadTimeout(aiohttp.ServerTimeoutError):
    """The backend started its response head and did not finish it in time."""


class HeadWatch:
    """One request's watch over its response head on `protocol` (see the module's doc)."""

    __slots__ = ("protocol", "timeout", "timer", "parsed")

    def __init__(self, protocol: ResponseHandler, timeout: ProxyTimeout) -> None:
        self.protocol = protocol
        self.timeout = timeout
        self.timer: asyncio.TimerHandle | None = None
        self.parsed = False

    def arm(self) -> None:
        # An instance attribute shadows the class's method: asyncio's transports look
        # `data_received` up on every call.
        self.protocol.data_received = self.first_bytes  # type: ignore[method-assign]

    def first_bytes(self, data: bytes) -> None:
        protocol = self.protocol
        del protocol.data_received  # back to the class's method for every later chunk
        protocol.read_timeout = self.timeout.body_read
        protocol.feed_data = self.head_parsed  # type: ignore[method-assign, assignment]
        protocol.data_received(data)  # restarts aiohttp's read timer, now with body_read
        if not self.parsed:
            if self.timeout.head is None or protocol.exception() is not None:
                del protocol.feed_data
            else:
                self.timer = asyncio.get_running_loop().call_later(
                    self.timeout.head, self.expire)

    def head_parsed(self, message: Any, size: int = 0) -> None:
        protocol = self.protocol
        del protocol.feed_data
        self.parsed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        protocol.feed_data(message, size)

    def expire(self) -> None:
        protocol = self.protocol
        self.timer = None
        del protocol.feed_data
        if protocol.transport is not None:  # still waited on: fail the wait, which closes
            protocol.set_exception(HeadTimeout(
                f"its response head took more than {self.timeout.head:g} s"))


class HeadWatchingConnector(GuardedConnector):
    """The guarded pool's connector (no stray answer reused), arming a `HeadWatch` for each
    request sent with a `ProxyTimeout` (on a new or a pooled connection alike)."""

    async def connect(
        self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> Connection:
        connection = await super().connect(req, traces, timeout)
        protocol = connection.protocol
        if isinstance(timeout, ProxyTimeout) and protocol is not None:
            HeadWatch(protocol, timeout).arm()
        return connection
