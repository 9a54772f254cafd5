"""The Batch and Files APIs (`--enable-batch-api`): offline jobs through the same front door.

`api` holds the endpoints; `files` what is on disk under `--file-storage-path` (uploaded
files, batch results); `records` the batch objects, input lines and results; `batches` the
batch jobs' runners, whose lines run through the router's own routing like any client
request. `run_batches` is the cleanup_ctx that owns it all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from router.batch.api import add_routes
from router.batch.batches import Batches
from router.keys import BATCHES

__all__ = ["Batches", "add_routes", "run_batches"]


async def run_batches(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: take the storage and resume the unfinished batches at start; stop their
    runners at shutdown (lines in flight then run again at the next start). Append it after
    the ClientSession's, which the lines use until they stop."""
    batches = app[BATCHES]
    await batches.start()
    try:
        yield
    finally:
        await batches.stop()
