"""Batches: OpenAI batch jobs, run through the router's own routing, surviving restarts.

A batch goes `validating` (its input file is checked line by line) -> `in_progress` (its lines
run, at most `--batch-concurrency` at a time over all batches) -> `finalizing` (its results
become files) -> `completed`; or it ends `failed` (invalid input), `cancelled` or `expired`.

State on disk, under `<storage>/batches/`:

- `<id>.json`: the batch object, rewritten atomically at every change of status;
- `<id>.output.jsonl` and `<id>.errors.jsonl`: the results, appended as lines finish (each
  group flushed and fsynced before it counts). They are the progress log: a line is done
  exactly when its record is in one of them. After a restart the runner counts what they
  hold (cutting a record torn by a crash), skips those `custom_id`s and runs the others, so
  a finished line never runs twice and no line is ever in the results twice.

One router process owns the storage (a lock file says so), so the state in memory is the
truth and the disk is its journal.

A batch goes through the same doors as a request: it belongs to the key that created it
(others do not see it), its lines spend that key's `--rate-limit` (a line that finds no token
waits for one: it has no client to answer a 429 to), and a line whose body is over
`--max-json-body-size` fails with the 413 a client would get, without reaching an engine.
Its input is bounded (`--max-batch-requests`, `--max-batch-input-size`) and validated in
memory bounded by them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import IO, Any

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from router.batch.files import (
    Conflict, FileStore, NotFound, ResultLog, input_lines, lock_storage, recorded_ids,
    write_atomically,
)
from router.batch.records import Batch, LineResult, check_input, parse_line, result_record
from router.errors import BadRequest, TooManyRequests, shorten
from router.flow import RequestFlow
from router.keys import ADMISSION, CONFIG, POOL, RATE_LIMITER, REWRITER
from router.proxy.admission import Admission
from router.proxy.dispatch import dispatch
from router.proxy.inbound import JSON_ENDPOINTS, InboundRequest, json_request, rewriting
from router.proxy.sinks import Collector
from router.proxy.upstream_read import loads_stepwise

__all__ = ["Batches", "ENDPOINTS"]

log = logging.getLogger("router.batch")

ENDPOINTS = tuple(endpoint for endpoint in JSON_ENDPOINTS if endpoint.startswith("/v1/"))
"""What a batch may call: the router's JSON endpoints under `/v1`."""
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
WINDOW = re.compile(r"([1-9][0-9]{0,3})h")
BATCH_ID = re.compile(r"batch_[0-9a-f]{24}")


# One line through the router: `router.proxy.dispatch`, with a `Collector` for a client.

JSON_HEADERS = CIMultiDictProxy(CIMultiDict({hdrs.CONTENT_TYPE: "application/json"}))


async def run_line(app: web.Application, endpoint: str, body: dict[str, Any]) -> LineResult:
    """Send `body` to `endpoint` as if a client had: admission, the rewriter, plugins, the
    routing policy with failover and the request events all apply; the answer is read whole."""
    flow = RequestFlow(id=os.urandom(16).hex(), endpoint=endpoint)
    admission = app[ADMISSION]
    if admission is not None:
        await admit(admission)
    try:
        collected = Collector(app[CONFIG].batch_max_answer_size)

        async def receive() -> InboundRequest:
            return line_request(app, flow, body)

        error = await dispatch(app, flow, collected, receive, endpoint)
        if error is not None:
            return LineResult.failure(flow.id, error)
        assert collected.status is not None
        return LineResult(flow.id, collected.status, await parse_answer(collected.body))
    finally:
        if admission is not None:
            admission.release()


async def admit(admission: Admission) -> None:
    """A slot under `--max-concurrent-requests`. A full queue is waited out, not failed: a
    line has no client to retry it."""
    while True:
        try:
            await admission.acquire()
            return
        except TooManyRequests as refused:
            await asyncio.sleep(float(refused.headers.get(hdrs.RETRY_AFTER, 1)))


def line_request(app: web.Application, flow: RequestFlow, body: dict[str, Any]) -> InboundRequest:
    """A line's body made ready as a client's would be: rewritten, model resolved, and
    refused (413) when what would be sent is over `--max-json-body-size`."""
    return json_request(body, JSON_HEADERS, app[POOL], rewriting(app[REWRITER], flow),
                        app[CONFIG].max_json_body_size)


async def parse_answer(raw: bytes) -> object:
    """An answer's JSON, or its text when it is not JSON. It may be big (up to
    --batch-max-answer-size): parsed in steps, so the event loop is never held for long."""
    try:
        return await loads_stepwise(raw)
    except (ValueError, RecursionError):
        return raw.decode("utf-8", "replace")


class BatchRun:
    """Runs one batch from wherever it stands (just created, or found at a start) to its end."""

    def __init__(self, batches: Batches, batch: Batch) -> None:
        self._batches = batches
        self.batch = batch
        self._lines: set[asyncio.Task[None]] = set()
        self._cancelled = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name=f"batch {batch.id}")

    def cancel(self) -> None:
        """The batch is `cancelling`: start no more lines and cancel the running ones (their
        results are not kept)."""
        self._cancelled.set()
        for line in self._lines:
            line.cancel()

    async def _run(self) -> None:
        batch = self.batch
        try:
            if batch.status == "validating":
                await self._validate()
            if batch.status == "in_progress":
                await self._process()
            if batch.status in ("finalizing", "cancelling"):
                await self._finalize()
        except asyncio.CancelledError:
            raise  # the router stops: the next start goes on from what is on disk
        except Exception:  # the traceback goes to the log, not into what the client reads
            log.exception("batch %s failed", batch.id)
            batch.errors = [{"code": "batch_failed", "message": "the router failed to run it",
                             "param": None, "line": None}]
            await self._batches.transition(batch, "failed")

    async def _validate(self) -> None:
        batch = self.batch
        config = self._batches.app[CONFIG]
        path = self._batches.files.path(batch.input_file_id, None)
        async with self._batches.validating:
            if batch.status != "validating":  # cancelled while it waited
                return
            total, errors = await asyncio.to_thread(check_input, path, batch.endpoint,
                                                    config.max_batch_requests,
                                                    config.max_batch_input_size)
        if batch.status != "validating":  # cancelled meanwhile
            return
        batch.total, batch.errors = total, errors
        await self._batches.transition(batch, "failed" if errors else "in_progress")

    async def _process(self) -> None:
        batch = self.batch
        output, errors = self._batches.result_paths(batch.id)
        done_output = await asyncio.to_thread(recorded_ids, output) or set()
        done_errors = await asyncio.to_thread(recorded_ids, errors) or set()
        batch.completed, batch.failed = len(done_output), len(done_errors)
        done = done_output | done_errors
        results = ResultLog(output, errors, batch.count)
        await results.open()
        slots = self._batches.slots
        try:
            path = self._batches.files.path(batch.input_file_id, None)
            async with contextlib.aclosing(input_lines(path)) as lines:
                async for raw in lines:
                    if batch.status != "in_progress":
                        break
                    custom_id, body = parse_line(raw, batch.endpoint)  # checked at the start
                    if custom_id in done:
                        continue
                    if time.time() >= batch.expires_at:
                        if "expired_at" not in batch.times:  # saved: a restart must know
                            batch.times["expired_at"] = int(time.time())
                            await self._batches.save(batch)
                        results.append(result_record(custom_id, LineResult.expired()), True)
                        continue
                    await self._pace()
                    if batch.status != "in_progress":
                        break
                    await slots.acquire()
                    if batch.status != "in_progress":
                        slots.release()
                        break
                    self._start(custom_id, body, results)
            if self._lines:
                await asyncio.wait(set(self._lines))
        finally:
            for line in self._lines:
                line.cancel()
            await asyncio.gather(*self._lines, return_exceptions=True)
            await results.aclose()
        if batch.status == "in_progress":
            await self._batches.transition(batch, "finalizing")

    async def _pace(self) -> None:
        """Spend a token of the batch's client under `--rate-limit`, waiting for one (and
        holding no slot meanwhile) rather than failing: the batch is no way around the limit,
        and its client's own requests meet the 429s while it spends the bucket."""
        limiter = self._batches.app[RATE_LIMITER]
        if limiter is None:
            return
        while (wait := limiter.try_take(self.batch.client)) and not self._cancelled.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._cancelled.wait()

    def _start(self, custom_id: str, body: dict[str, Any], results: ResultLog) -> None:
        line = asyncio.create_task(self._line(custom_id, body, results))
        self._lines.add(line)
        line.add_done_callback(self._line_done)

    def _line_done(self, line: asyncio.Task[None]) -> None:
        self._lines.discard(line)
        self._batches.slots.release()

    async def _line(self, custom_id: str, body: dict[str, Any], results: ResultLog) -> None:
        try:
            result = await run_line(self._batches.app, self.batch.endpoint, body)
        except Exception:  # a bug: this line fails, the batch goes on
            log.exception("batch %s: line %r failed in the router", self.batch.id, custom_id)
            result = LineResult.internal_error()
        results.append(result_record(custom_id, result), not result.ok)

    async def _finalize(self) -> None:
        batch = self.batch
        output, errors = self._batches.result_paths(batch.id)
        # Counted again from the files: a batch cancelled before a crash saved older counts.
        for path, attribute in ((output, "completed"), (errors, "failed")):
            ids = await asyncio.to_thread(recorded_ids, path)
            if ids is not None:
                setattr(batch, attribute, len(ids))
        key = batch.id.removeprefix("batch_")
        files = self._batches.files
        made = await files.adopt(output, f"file-{key}-output", f"{batch.id}_output.jsonl",
                                 "batch_output", batch.owner)
        failed = await files.adopt(errors, f"file-{key}-errors", f"{batch.id}_error.jsonl",
                                   "batch_output", batch.owner)
        batch.output_file_id = made.id if made else None
        batch.error_file_id = failed.id if failed else None
        if batch.status == "cancelling":
            await self._batches.transition(batch, "cancelled")
        elif "expired_at" in batch.times:
            batch.status = "expired"
            await self._batches.save(batch)
        else:
            await self._batches.transition(batch, "completed")


class Batches:
    """The batches of one router and the Files API store they read and write; one runner
    task per unfinished batch. `start()` and `stop()` belong to the app's cleanup_ctx."""

    def __init__(self, app: web.Application, storage: str, concurrency: int) -> None:
        self.app = app
        self.root = Path(storage)
        config = app[CONFIG]
        self.files = FileStore(self.root / "files", config.file_storage_quota_per_key,
                               config.file_storage_quota)
        self.slots = asyncio.Semaphore(concurrency)
        """Batch lines in flight, over all batches."""
        self.validating = asyncio.Lock()
        """One input file is validated at a time: the memory it takes is bounded by the caps
        once, not once per batch, and parsing in threads side by side would not go faster
        (`json.loads` holds the GIL)."""
        self._directory = self.root / "batches"
        self._batches: dict[str, Batch] = {}
        self._runs: dict[str, BatchRun] = {}
        self._saving = asyncio.Lock()
        self._lock: IO[bytes] | None = None

    async def start(self) -> None:
        """Take the storage, read what is in it and resume the unfinished batches."""
        self._lock = await asyncio.to_thread(lock_storage, self.root)
        await self.files.load()
        self._batches = await asyncio.to_thread(self._load)
        for batch in self._batches.values():
            if batch.status in UNFINISHED:
                log.info("resuming %r", batch)
                self._run(batch)

    async def stop(self) -> None:
        """Stop the runners (lines in flight run again at the next start); free the storage."""
        runs = [run.task for run in self._runs.values()]
        for task in runs:
            task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        lock, self._lock = self._lock, None
        if lock is not None:
            await asyncio.to_thread(lock.close)

    def _load(self) -> dict[str, Batch]:
        self._directory.mkdir(parents=True, exist_ok=True)
        found = []
        for entry in self._directory.glob("batch_*.json"):
            try:
                found.append(Batch.from_json(json.loads(entry.read_bytes())))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                log.warning("unreadable batch state %s: ignored", entry)
        found.sort(key=lambda batch: (batch.created_at, batch.id))
        return {batch.id: batch for batch in found}

    def _run(self, batch: Batch) -> None:
        run = BatchRun(self, batch)
        self._runs[batch.id] = run
        run.task.add_done_callback(lambda _: self._runs.pop(batch.id, None))

    def result_paths(self, batch_id: str) -> tuple[Path, Path]:
        return (self._directory / f"{batch_id}.output.jsonl",
                self._directory / f"{batch_id}.errors.jsonl")

    async def create(self, owner: str, client: str, input_file_id: str, endpoint: str,
                     completion_window: str, metadata: dict[str, str] | None) -> Batch:
        """Check the request (not yet the input's lines: that is `validating`) and start a
        batch of `owner`, whose lines spend `client`'s rate limit."""
        if endpoint not in ENDPOINTS:
            raise BadRequest(f"'endpoint' must be one of {', '.join(ENDPOINTS)}")
        window = WINDOW.fullmatch(completion_window)
        if window is None:
            raise BadRequest("'completion_window' must be a number of hours, like 24h")
        if self.files.get(input_file_id, owner).purpose != "batch":
            raise BadRequest(f"file {input_file_id} was not uploaded with purpose 'batch'")
        now = int(time.time())
        batch = Batch(id="batch_" + os.urandom(12).hex(), endpoint=endpoint,
                      input_file_id=input_file_id, completion_window=completion_window,
                      created_at=now, expires_at=now + 3600 * int(window.group(1)),
                      metadata=metadata, owner=owner, client=client)
        self._batches[batch.id] = batch
        await self.save(batch)
        self._run(batch)
        log.info("created %r", batch)
        return batch

    def get(self, batch_id: str, owner: str | None) -> Batch:
        """The batch `batch_id` of `owner` (None: of anyone, for the router's own use);
        another owner's batch is not found, as if it did not exist."""
        batch = self._batches.get(batch_id) if BATCH_ID.fullmatch(batch_id) else None
        if batch is None or owner is not None and batch.owner != owner:
            raise NotFound(f"No such Batch object: {shorten(batch_id)}")
        return batch

    def list(self, owner: str, after: str | None = None,
             limit: int = 20) -> tuple[list[Batch], bool]:
        """A page of `owner`'s batches, newest first, and whether more follow it."""
        batches = [b for b in reversed(self._batches.values()) if b.owner == owner]
        if after is not None:
            position = next((n for n, b in enumerate(batches) if b.id == after), None)
            batches = batches[position + 1:] if position is not None else []
        return batches[:limit], len(batches) > limit

    async def cancel(self, batch_id: str, owner: str) -> Batch:
        batch = self.get(batch_id, owner)
        if batch.status in ("cancelling", "cancelled"):
            return batch
        if batch.status not in ("validating", "in_progress"):
            raise Conflict(f"Cannot cancel a batch with status '{batch.status}'.")
        await self.transition(batch, "cancelling")
        run = self._runs.get(batch.id)
        if run is not None:
            run.cancel()
        return batch

    async def delete_file(self, file_id: str, owner: str) -> None:
        """Delete a file of `owner`, unless an unfinished batch still reads it."""
        self.files.get(file_id, owner)
        if any(b.input_file_id == file_id and b.status in UNFINISHED
               for b in self._batches.values()):
            raise Conflict(f"file {file_id} is the input of a batch still running")
        await self.files.delete(file_id, owner)

    async def transition(self, batch: Batch, status: str) -> None:
        batch.status = status
        batch.times[f"{status}_at"] = int(time.time())
        await self.save(batch)
        log.info("%r", batch)

    async def save(self, batch: Batch) -> None:
        async with self._saving:  # one writer at a time, each with the latest state
            await asyncio.to_thread(write_atomically, self._directory / f"{batch.id}.json",
                                    json.dumps(batch.to_state()))

    def __repr__(self) -> str:
        return f"<Batches {self.root} batches={len(self._batches)} running={len(self._runs)}>"
