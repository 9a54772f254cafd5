"""`--workers N`: N processes serve one port (SO_REUSEPORT); this process supervises them.

The supervisor forwards SIGTERM/SIGINT (drain) and SIGHUP (reload) to every worker,
restarts a worker that dies on its own, and speaks to systemd for all of them: READY=1 once
every worker listens, STOPPING=1 when the drain starts, watchdog pings while it runs.
Prometheus metrics run in multiprocess mode, so whichever worker answers `/metrics` shows
the figures of all: each worker starts with `PROMETHEUS_MULTIPROC_DIR` in its environment
(prometheus_client reads it when imported, before any of the router's code could tell it),
and without systemd's variables (the workers speak to the supervisor, never to systemd).
A worker is `python -m router.serve.workers FD ARGS...`: it parses the router's arguments
itself (and again on a reload) and reports its states on the pipe `FD`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection

from router.config.load import METRICS_DIR_ENV, load_config
from router.config.settings import Config
from router.serve.systemd import Notifier

__all__ = ["supervise", "worker_main"]

log = logging.getLogger("router.workers")

RESTART_DELAY = 1.0
"""Seconds before a worker that died on its own is started again."""
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


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


def worker_main(fd: int, argv: Sequence[str]) -> None:
    """The body of one worker process: serve, reporting to the supervisor on pipe `fd`."""
    from router.observe.logging_setup import configure_logging
    from router.serve.server import serve

    config = load_config(argv)
    configure_logging(config.log_level, config.log_format, access_log=config.access_log)
    connection = Connection(fd, readable=False)
    try:
        asyncio.run(serve(config, load=lambda: load_config(argv),
                          notifier=PipeNotifier(connection)))
    except KeyboardInterrupt:
        pass
    finally:
        connection.close()


def supervise(config: Config, argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """Run `config.workers` workers until a signal stops them; the exit code. `environ` is
    the router's environment, which the workers start with (and systemd's, the supervisor's
    notifier reads)."""
    metrics_dir = config.metrics_dir or tempfile.mkdtemp(prefix="router-metrics-")
    try:
        return asyncio.run(Supervisor(config, argv, environ, metrics_dir).run())
    finally:
        if config.metrics_dir is None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


class Supervisor:
    def __init__(self, config: Config, argv: Sequence[str], environ: Mapping[str, str],
                 metrics_dir: str) -> None:
        self.config = config
        self.argv = list(argv)
        self.notifier = Notifier(environ)
        self.metrics_dir = metrics_dir
        # Workers speak to the supervisor, never to systemd (NotifyAccess=main).
        self.worker_environ = {
            **{name: value for name, value in environ.items() if name not in SYSTEMD_VARIABLES},
            METRICS_DIR_ENV: metrics_dir,
        }
        self.workers: dict[int, tuple[subprocess.Popen[bytes], Connection]] = {}
        self.ready: set[int] = set()
        self.stopping = False
        self.exit_code = 0

    def start_worker(self, slot: int) -> None:
        read_fd, write_fd = os.pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "router.serve.workers", str(write_fd), *self.argv],
                env=self.worker_environ, pass_fds=(write_fd,), stdin=subprocess.DEVNULL,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        receiver = Connection(read_fd, writable=False)
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
            if process.poll() is None:
                process.send_signal(signum)

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
            if process.poll() is None:
                continue
            asyncio.get_running_loop().remove_reader(receiver.fileno())
            receiver.close()
            del self.workers[slot]
            was_ready = slot in self.ready
            self.ready.discard(slot)
            mark_dead(process.pid, self.metrics_dir)
            if self.stopping and process.returncode:
                self.exit_code = 1
            elif not was_ready:
                # It never listened (a taken port, a bad setting): restarting cannot help.
                log.critical("worker %d failed to start (code %s); stopping",
                             slot, process.returncode)
                self.exit_code = 1
                self.stop()
            if not self.stopping:
                log.error("worker %d (pid %s) died with code %s; restarting it",
                          slot, process.pid, process.returncode)
                await asyncio.sleep(RESTART_DELAY)
                if not self.stopping:
                    self.start_worker(slot)


def mark_dead(pid: int, metrics_dir: str) -> None:
    """Drop a dead worker's live gauges from the multiprocess metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    worker_main(int(sys.argv[1]), sys.argv[2:])
