"""systemd's notify protocol (`Type=notify`): READY=1, STOPPING=1, WATCHDOG=1 datagrams to
`$NOTIFY_SOCKET`. Without that variable every call is a no-op, so the router runs the same
under systemd, Kubernetes or a shell. The variables come from the environment `router.__main__`
hands over."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger("router.systemd")


class Notifier:
    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading '@' and addressed with a NUL byte.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)
        watchdog_usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        if watchdog_usec.isdigit() and watchdog_pid in ("", str(os.getpid())):
            # Ping at half the deadline, as sd_watchdog_enabled(3) advises.
            self.watchdog_interval = int(watchdog_usec) / 2e6

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, state: str) -> None:
        """Send one state line, e.g. `READY=1`; failures are logged, never raised."""
        if self._socket is None:
            return
        try:
            self._socket.sendto(state.encode(), self._address)
        except OSError as error:
            log.warning("cannot notify systemd (%s): %s", state, error)

    async def watchdog(self) -> None:
        """Ping `WATCHDOG=1` while the event loop runs: a stuck loop stops the pings."""
        if self.watchdog_interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
