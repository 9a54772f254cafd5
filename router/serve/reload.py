"""Config reload (SIGHUP, a change of `--config` with `--config-watch`, or a change of
production-stack's `--dynamic-config-yaml/json` file), without dropping anything in flight.

What a reload changes: the static backends and their models and labels, the aliases, the
routing policy and its settings, the API keys (`--api-keys-file` is read again), the log
level. Requests in flight keep the backend object
they were routed to, so their streams run on. A new configuration that does not parse or
validate is refused with a log line, and the running one keeps serving. Settings that only
take effect at start (listening address, timeouts, limits, the discovery type, Kubernetes
settings, `--callbacks`...) are reported as needing a restart.

The watched file is polled with `os.stat` in a thread (no event-loop blocking, no inotify
dependency): a change of its modification time, size or inode (a Kubernetes ConfigMap
update swaps a symlink) triggers a reload. production-stack re-reads its dynamic config every
10 seconds; here the poll runs every `--dynamic-config-interval` seconds (default 1).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from router.config.settings import Config, ConfigError
from router.discovery.static import static_backends
from router.keys import (
    API_KEYS, CHOOSER, CONFIG, ENGINE_STATS, EVENTS, KV_CACHE, POOL, STATS,
)
from router.policies import PolicyContext, make_policy

__all__ = ["Reloader"]

log = logging.getLogger("router.reload")

RELOADABLE = frozenset({
    "static_backends", "aliases", "routing_logic", "session_key", "prefix_match_threshold",
    "prefix_min_match_length",
    "balance_abs_threshold", "balance_rel_threshold", "prefix_cache_max_chars",
    "prefill_model_labels", "decode_model_labels", "log_level", "api_keys",
})
ROUTING = RELOADABLE - {"static_backends", "aliases", "log_level", "api_keys"}


class Reloader:
    def __init__(self, app: web.Application, load: Callable[[], Config]) -> None:
        self._app = app
        self._load = load
        self.current = app[CONFIG]

    async def reload(self, reason: str) -> bool:
        """Load the configuration again and apply what changed; False when refused."""
        try:
            new = await asyncio.to_thread(self._load)
            if self.current.api_keys and not new.api_keys:
                raise ConfigError(
                    "it has no API keys left, which would open the router to everyone "
                    "(restart without keys to run open on purpose)"
                )
        except ConfigError as error:
            log.error("config reload (%s) refused, the running configuration stays: %s",
                      reason, error)
            return False
        self.apply(new)
        log.info("config reloaded (%s)", reason)
        return True

    def apply(self, new: Config) -> None:
        app, old = self._app, self.current
        changed = {f.name for f in dataclasses.fields(Config)
                   if getattr(old, f.name) != getattr(new, f.name)}
        if restart := sorted(changed - RELOADABLE):
            log.warning("changed settings that take effect at restart only: %s",
                        ", ".join(restart))
        pool = app[POOL]
        static = app[CONFIG].service_discovery == "static" and not app[CONFIG].demo
        if "static_backends" in changed and static:
            # Ids come from URLs: a kept backend keeps its stats and health.
            pool.replace(static_backends(new))
            log.info("backends now: %s", ", ".join(b.url for b in pool.backends) or "none")
        if "aliases" in changed:
            pool.aliases = dict(new.aliases)
        if changed & ROUTING:
            chooser = app[CHOOSER]
            policy = make_policy(
                new.routing_logic,
                PolicyContext(new, app[STATS], app[ENGINE_STATS], app[KV_CACHE]),
            )
            app[EVENTS].replace(chooser.policy, policy)
            chooser.use_policy(policy)
            log.info("routing policy now: %r", policy)
        if "api_keys" in changed:
            app[API_KEYS].replace(new.api_keys)
            log.info("API keys reloaded: %d", len(new.api_keys))
        if "log_level" in changed:
            logging.getLogger().setLevel(new.log_level.upper())
        # Compared against next time: a restart-only change is reported once.
        self.current = new

    def watching(
        self, path: str, interval: float
    ) -> Callable[[web.Application], AsyncIterator[None]]:
        """A cleanup_ctx entry: poll `path` while the app runs, reload when it changes."""

        async def watch_file(app: web.Application) -> AsyncIterator[None]:
            task = asyncio.create_task(self.watch(path, interval))
            yield
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        return watch_file

    async def watch(self, path: str, interval: float = 1.0) -> None:
        """Poll the file's identity (see the module's docstring); reload when it changes."""
        last = await asyncio.to_thread(file_identity, path)
        while True:
            await asyncio.sleep(interval)
            now = await asyncio.to_thread(file_identity, path)
            if now != last:
                last = now
                await self.reload(f"{path} changed")


def file_identity(path: str) -> tuple[int, int, int] | None:
    """Modification time, size and inode (following symlinks); None while it is missing."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino
