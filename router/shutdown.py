"""Graceful shutdown: know which proxied requests are running, wait for them, cut the rest.

aiohttp's own shutdown waits for handlers twice over (`shutdown_timeout` for them to finish,
then as long again after cancelling only their request bodies), so a stream that never ends
holds the process for twice the timeout. The router drains instead with its own bound."""

from __future__ import annotations

import asyncio

__all__ = ["Drain"]


class Drain:
    """The running proxied handler tasks, and whether the router is draining."""

    def __init__(self) -> None:
        self.draining = False
        self._live: set[asyncio.Task[object]] = set()
        self._emptied = asyncio.Event()

    def enter(self, task: asyncio.Task[object]) -> None:
        self._live.add(task)

    def leave(self, task: asyncio.Task[object]) -> None:
        self._live.discard(task)
        if not self._live:
            self._emptied.set()

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
        return f"<Drain draining={self.draining} live={len(self._live)}>"
