"""The running proxied requests: graceful shutdown waits for them and cuts the rest, and a
watch cuts those whose client stopped reading.

aiohttp's own shutdown waits for handlers twice over (`shutdown_timeout` for them to finish,
then as long again after cancelling only their request bodies), so a stream that never ends
holds the process for twice the timeout. The router drains instead with its own bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

from router.flow import RequestFlow

__all__ = ["LiveRequests"]


class LiveRequests:
    """The running proxied handler tasks (each with its flow, for the stall watch), and
    whether the router is draining."""

    def __init__(self) -> None:
        self.draining = False
        self._live: dict[asyncio.Task[object], RequestFlow | None] = {}
        self._emptied = asyncio.Event()

    def enter(self, task: asyncio.Task[object], flow: RequestFlow | None = None) -> None:
        self._live[task] = flow

    def leave(self, task: asyncio.Task[object]) -> None:
        self._live.pop(task, None)
        if not self._live:
            self._emptied.set()

    def stalled(
        self, write_limit: float, read_limit: float
    ) -> Iterator[tuple[asyncio.Task[object], RequestFlow, str]]:
        """Requests whose write to the client waited more than `write_limit` s (`client`),
        or whose read from the backend more than `read_limit` s (`backend`)."""
        now = time.monotonic()
        for task, flow in list(self._live.items()):
            if flow is None:
                continue
            if flow.writing_since is not None and flow.writing_since < now - write_limit:
                yield task, flow, "client"
            elif flow.reading_since is not None and flow.reading_since < now - read_limit:
                yield task, flow, "backend"

    @property
    def live(self) -> int:
        return len(self._live)

    async def wait(self, timeout: float) -> bool:
        """Wait until no proxied request runs, up to `timeout` seconds; True if none does."""
        self._emptied.clear()
        if not self._live:
            return True
        try:
            await asyncio.wait_for(self._emptied.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def cancel_all(self) -> int:
        """Cancel every running proxied request (their lifecycles record it); how many."""
        for task in self._live:
            task.cancel()
        return len(self._live)

    def __repr__(self) -> str:
        return f"<LiveRequests draining={self.draining} live={len(self._live)}>"
