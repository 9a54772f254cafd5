"""The upstream connection pool: aiohttp's, made to drop connections with unasked-for bytes.

aiohttp's client keeps an idle keep-alive connection's protocol reading, and parses whatever
arrives into its queue of answers; `TCPConnector` then hands the connection to the next
request without checking that queue. An upstream that writes a whole extra response onto an
idle connection has it delivered as the answer to the next request, another client's
(reproduced with a bare aiohttp pass-through: tests/test_upstream_pool.py). Here:

- a connection that receives any byte while idle in the pool is closed at once;
- a connection taken from the pool that holds anything unread (`should_close`: queued
  answers, a tail, an error) is closed, and another one is taken or opened.

The first needs aiohttp's private hooks (`_factory`, `_release`), kept in this one module;
the tests fail if aiohttp renames them. The cost: nothing per chunk, 1-2 µs per request
(taking and giving back a pooled connection; measured in docs/security.md).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, cast

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.helpers import _EXC_SENTINEL
from aiohttp.http_exceptions import HttpProcessingError

if TYPE_CHECKING:
    from aiohttp.client_reqrep import ClientRequest, ConnectionKey
    from aiohttp.connector import Connection
    from aiohttp.tracing import Trace

__all__ = ["GuardedConnector", "PooledHandler"]

log = logging.getLogger("router.upstream_pool")


class PooledHandler(ResponseHandler):
    """aiohttp's client protocol, able to sit in the pool parked: `park()` makes
    `data_received` an instance attribute that shadows the class's method and closes the
    connection on its first byte. The transport looks the method up on each read, so a
    connection in use pays nothing per chunk. (uvloop binds `data_received` once per
    transport: there only the check on taking a connection holds, which catches whole stray
    answers.)"""

    def park(self) -> None:
        """Idle in the pool from now on: nothing is owed on this connection."""
        self.data_received = self._stray  # type: ignore[method-assign]

    def _stray(self, data: bytes) -> None:
        if not data:
            return
        log.warning("dropped an upstream connection that sent %d bytes while idle", len(data))
        self.force_close()
        self.close()

    def set_exception(self, exc: BaseException, exc_cause: BaseException = _EXC_SENTINEL) -> None:
        """Also fail the body being read. aiohttp fails only its queue of answers when its
        parser rejects a chunk of a body already started, and drops the read timer: the
        reader of that body (a client's stream) would wait for ever."""
        payload = self._payload
        super().set_exception(exc, exc_cause)
        if isinstance(exc, HttpProcessingError) and payload is not None and not payload.is_eof():
            payload.set_exception(
                aiohttp.ClientPayloadError(f"invalid response body: {exc.message}"), exc)


class GuardedConnector(aiohttp.TCPConnector):
    """`TCPConnector` whose pooled connections are `PooledHandler`s: parked on release,
    unparked and checked when taken again (see the module docstring). With `read_size`, a
    connection reads at most that many bytes from its socket at once."""

    def __init__(self, *, read_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.read_size = read_size
        self._factory = cast("functools.partial[ResponseHandler]",
                             functools.partial(PooledHandler, loop=self._loop))

    async def _create_connection(
        self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> ResponseHandler:
        protocol = await super()._create_connection(req, traces, timeout)
        transport = protocol.transport
        if self.read_size is not None and hasattr(transport, "max_size"):
            # asyncio's socket transports read up to `max_size` (256 KiB) at once, all of it
            # into the body's buffer before that buffer can pause reading: with a client
            # that stopped reading, that is what a stream holds. uvloop has no such knob.
            setattr(transport, "max_size", self.read_size)
        return protocol

    async def connect(
        self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> Connection:
        connection = await super().connect(req, traces, timeout)
        protocol = connection.protocol
        # Only a pooled connection was parked; a new one has nothing to check.
        if (protocol is not None and protocol.__dict__.pop("data_received", None) is not None
                and protocol.should_close):
            log.warning("dropped a pooled upstream connection holding unread data")
            connection.close()
            return await self.connect(req, traces, timeout)
        return connection

    def _release(
        self, key: ConnectionKey, protocol: ResponseHandler, *, should_close: bool = False
    ) -> None:
        super()._release(key, protocol, should_close=should_close)
        if protocol.transport is not None:  # kept in the pool
            cast(PooledHandler, protocol).park()
