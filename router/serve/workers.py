"""`--workers N`: N processes serve one port (SO_REUSEPORT); this process supervises them.

The supervisor forwards SIGTERM/SIGINT (drain) and SIGHUP (reload) to every worker,
restarts a worker that dies on its own, and speaks to systemd for all of them: READY=1 once
every worker listens, STOPPING=1 when the drain starts, watchdog pings while it runs.
Prometheus metrics run in multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`), so whichever
worker answers `/metrics` shows the figures of all.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from router.config.flags import load_config
from router.config.settings import Config
from router.serve.systemd import Notifier

__all__ = ["supervise", "worker_main"]

log = logging.getLogger("router.workers")

RESTART_DELAY = 1.0
"""Seconds before a worker that died on its own is started again."""
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class PipeNotifier(Notifier):
    """A worker's notifier: its states go to the supervisor, not to systemd."""

    def __init__(self, connection: Connection) -> None:
        super().__init__({})
        self._connection = connection

    @property
    def enabled(self) -> bool:
        return True

    def notify(self, state: str) -> None:
        try:
            self._connection.send(state)
        except OSError:
            pass  # the supervisor is gone; the worker is being stopped anyway


def worker_main(argv: Sequence[str], connection: Connection) -> None:
    """The body of one worker process (started with the `spawn` method)."""
    from router.observe.logging_setup import configure_logging
    from router.serve.server import serve

    config = load_config(argv)
    configure_logging(config.log_level, config.log_format, access_log=config.access_log)
    try:
        asyncio.run(serve(config, load=lambda: load_config(argv),
                          notifier=PipeNotifier(connection)))
    except KeyboardInterrupt:
        pass


def supervise(config: Config, argv: Sequence[str]) -> int:
    """Run `config.workers` workers until a signal stops them; the exit code."""
    metrics_dir = None
    if MULTIPROC_ENV not in os.environ:
        metrics_dir = os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="router-metrics-")
    try:
        return asyncio.run(Supervisor(config, argv).run())
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


class Supervisor:
    def __init__(self, config: Config, argv: Sequence[str]) -> None:
        self.config = config
        self.argv = list(argv)
        self.notifier = Notifier()
        # Workers speak to the supervisor, never to systemd (NotifyAccess=main).
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(name, None)
        self.context = multiprocessing.get_context("spawn")
        self.workers: dict[int, tuple[BaseProcess, Connection]] = {}
        self.ready: set[int] = set()
        self.stopping = False
        self.exit_code = 0

    def start_worker(self, slot: int) -> None:
        receiver, sender = self.context.Pipe(duplex=False)
        process = self.context.Process(target=worker_main, args=(self.argv, sender),
                                       name=f"router-worker-{slot}")
        process.start()
        sender.close()
        self.workers[slot] = (process, receiver)
        asyncio.get_running_loop().add_reader(receiver.fileno(), self.on_message, slot)

    def on_message(self, slot: int) -> None:
        _, receiver = self.workers[slot]
        try:
            state = receiver.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(receiver.fileno())
            return
        if state == "READY=1" and slot not in self.ready:
            self.ready.add(slot)
            if len(self.ready) == self.config.workers:
                log.info("all %d workers are listening", self.config.workers)
                self.notifier.notify("READY=1")

    def signal_workers(self, signum: int) -> None:
        for process, _ in self.workers.values():
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signum)

    def stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.notifier.notify("STOPPING=1")
        self.signal_workers(signal.SIGTERM)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.signal_workers, signal.SIGHUP)
        watchdog = asyncio.create_task(self.notifier.watchdog())
        try:
            for slot in range(self.config.workers):
                self.start_worker(slot)
            while self.workers:
                await asyncio.sleep(0.2)
                await self.reap()
        finally:
            watchdog.cancel()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            self.notifier.close()
        return self.exit_code

    async def reap(self) -> None:
        """Collect workers that exited; restart those that died while not stopping."""
        for slot, (process, receiver) in list(self.workers.items()):
            if process.is_alive():
                continue
            asyncio.get_running_loop().remove_reader(receiver.fileno())
            receiver.close()
            del self.workers[slot]
            was_ready = slot in self.ready
            self.ready.discard(slot)
            mark_dead(process.pid)
            if self.stopping and process.exitcode:
                self.exit_code = 1
            elif not was_ready:
                # It never listened (a taken port, a bad setting): restarting cannot help.
                log.critical("worker %d failed to start (code %s); stopping",
                             slot, process.exitcode)
                self.exit_code = 1
                self.stop()
            if not self.stopping:
                log.error("worker %d (pid %s) died with code %s; restarting it",
                          slot, process.pid, process.exitcode)
                await asyncio.sleep(RESTART_DELAY)
                if not self.stopping:
                    self.start_worker(slot)


def mark_dead(pid: int | None) -> None:
    """Drop a dead worker's live gauges from the multiprocess metrics."""
    if pid is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
