"""On disk: the Files API's store, and the journals batches write their results to.

Under the store's directory each file is two entries: `<id>` holds the content and
`<id>.json` the `File` object. A file exists when both do: the object is written first, then
the content is renamed into place (atomically), so an upload cut short, or a crash halfway,
never leaves half a file listed, and what it left behind is removed at the next start. The
objects are kept in memory too (one router process owns the directory: `lock_storage`), so
listing never touches the disk.

Every file has an owner: the API key that uploaded it (`client_key`'s `key:<digest>`, never
the key), or `OPEN` when the router has no keys. Only its owner sees it; to anyone else it
does not exist. Stored bytes are counted per owner and in total while an upload arrives, so
an upload over a quota is cut there, not after it was stored.

A batch's results are JSONL files appended by a `ResultLog` in groups, each flushed and
fsynced before its lines count as done; `recorded_ids` reads them back after a restart.

Every disk operation runs in a thread: content goes to disk chunk by chunk as it arrives and
is never held whole in memory.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from router.errors import RouterError, shorten

__all__ = [
    "FileObject", "FileStore", "NotFound", "Conflict", "OPEN", "PURPOSES", "QuotaExceeded",
    "ResultLog", "recorded_ids", "input_lines", "lock_storage", "write_atomically",
]

PURPOSES = frozenset({
    "assistants", "assistants_output", "batch", "batch_output", "fine-tune",
    "fine-tune-results", "vision", "user_data", "evals",
})
"""OpenAI's file purposes (`batch_output` is the router's own, for batch results)."""
FILE_ID = re.compile(r"file-[A-Za-z0-9_-]{1,64}")
PARTIAL = ".part"
OPEN = ""
"""The owner of everything when no API keys are configured, and of what was stored before
owners were recorded (then, with keys, nobody's: no key sees it)."""
READ_HINT = 1024 * 1024
"""Bytes of lines read per thread hop."""


class NotFound(RouterError):
    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class QuotaExceeded(RouterError):
    """A file storage quota is used up. A 413, not a 429: retrying the same upload does not
    help until files are deleted (and the SDKs retry 429s)."""

    status = 413
    error_type = "invalid_request_error"
    code = "storage_quota_exceeded"


class Conflict(RouterError):
    """The object is in a state that does not allow the request (a finished batch cancelled,
    a file deleted while a batch reads it)."""

    status = 409
    error_type = "invalid_request_error"
    code = "conflict"


@dataclass(frozen=True, slots=True)
class FileObject:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    owner: str = OPEN

    def to_json(self) -> dict[str, Any]:
        """OpenAI's `File` object (what clients see)."""
        return {
            "id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
            "filename": self.filename, "purpose": self.purpose, "status": "processed",
            "expires_at": None, "status_details": None,
        }

    def to_state(self) -> dict[str, Any]:
        """What is saved: the `File` object and its owner."""
        return {**self.to_json(), "owner": self.owner}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FileObject:
        return cls(id=str(data["id"]), bytes=int(data["bytes"]),
                   created_at=int(data["created_at"]), filename=str(data["filename"]),
                   purpose=str(data["purpose"]), owner=str(data.get("owner", OPEN)))


@dataclass(frozen=True, slots=True)
class Received:
    """An upload's content on disk, not yet a file (`FileStore.commit` makes it one)."""

    path: Path
    size: int
    owner: str


class FileStore:
    """The files, and the bytes each owner stores (`quota_per_owner`) and all of them do
    (`quota`, 0: no cap); bytes of uploads still arriving count too."""

    def __init__(self, directory: Path, quota_per_owner: int, quota: int) -> None:
        self.directory = directory
        self.quota_per_owner = quota_per_owner
        self.quota = quota
        self._files: dict[str, FileObject] = {}
        self._used: dict[str, int] = {}
        self._total = 0

    async def load(self) -> None:
        """Read the file objects; remove what an interrupted upload or delete left."""
        self._files = await asyncio.to_thread(self._load)
        self._used, self._total = {}, 0
        for item in self._files.values():
            self._charge(item.owner, item.bytes)

    def used(self, owner: str) -> int:
        """Bytes `owner` stores (or is uploading)."""
        return self._used.get(owner, 0)

    def _reserve(self, owner: str, size: int) -> None:
        """Count `size` more bytes for `owner`, or raise `QuotaExceeded`."""
        if self.used(owner) + size > self.quota_per_owner:
            raise QuotaExceeded(
                f"the file storage quota of {self.quota_per_owner} bytes per key is used up: "
                "delete files to make room")
        if self.quota and self._total + size > self.quota:
            raise QuotaExceeded(f"the router's file storage of {self.quota} bytes is full")
        self._charge(owner, size)

    def _charge(self, owner: str, size: int) -> None:
        used = self._used.get(owner, 0) + size
        if used:
            self._used[owner] = used
        else:
            self._used.pop(owner, None)
        self._total += size

    def _load(self) -> dict[str, FileObject]:
        self.directory.mkdir(parents=True, exist_ok=True)
        found: dict[str, FileObject] = {}
        for entry in self.directory.iterdir():
            if entry.suffix == ".json":
                try:
                    item = FileObject.from_json(json.loads(entry.read_bytes()))
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                if entry.name == f"{item.id}.json" and (self.directory / item.id).is_file():
                    found[item.id] = item
        for entry in self.directory.iterdir():
            owner = entry.name.removesuffix(".json").removesuffix(PARTIAL)
            if owner not in found:
                entry.unlink(missing_ok=True)
        return dict(sorted(found.items(), key=lambda pair: (pair[1].created_at, pair[0])))

    def path(self, file_id: str, owner: str | None) -> Path:
        """Where the content of an existing file is."""
        return self.directory / self.get(file_id, owner).id

    def get(self, file_id: str, owner: str | None) -> FileObject:
        """The file `file_id` of `owner` (None: of anyone, for the router's own use); another
        owner's file is not found, as if it did not exist."""
        item = self._files.get(file_id) if FILE_ID.fullmatch(file_id) else None
        if item is None or owner is not None and item.owner != owner:
            raise NotFound(f"No such File object: {shorten(file_id)}")
        return item

    def list(
        self, owner: str, purpose: str | None = None, after: str | None = None,
        limit: int = 10_000, descending: bool = True,
    ) -> tuple[list[FileObject], bool]:
        """A page of `owner`'s files in creation order, and whether more follow it."""
        items = [f for f in self._files.values()
                 if f.owner == owner and (purpose is None or f.purpose == purpose)]
        if descending:
            items.reverse()
        if after is not None:
            position = next((n for n, f in enumerate(items) if f.id == after), None)
            items = items[position + 1:] if position is not None else []
        return items[:limit], len(items) > limit

    async def receive(self, chunks: AsyncIterator[bytes], owner: str) -> Received:
        """Write an upload of `owner` to disk as it arrives, each chunk counted against the
        quotas before it is written; on any failure (`QuotaExceeded` too) nothing is left."""
        path = self.directory / (new_file_id() + PARTIAL)
        stream = await asyncio.to_thread(path.open, "wb")
        size = 0
        try:
            async for chunk in chunks:
                self._reserve(owner, len(chunk))
                size += len(chunk)
                await asyncio.to_thread(stream.write, chunk)
            await asyncio.to_thread(close_synced, stream)
        except BaseException:
            self._charge(owner, -size)
            await asyncio.to_thread(discard, stream, path)
            raise
        return Received(path, size, owner)

    async def discard(self, received: Received) -> None:
        self._charge(received.owner, -received.size)
        await asyncio.to_thread(received.path.unlink, True)

    async def commit(self, received: Received, filename: str, purpose: str) -> FileObject:
        """Make a received upload a file (its bytes were counted as they came)."""
        item = FileObject(id=received.path.name.removesuffix(PARTIAL), bytes=received.size,
                          created_at=int(time.time()), filename=filename, purpose=purpose,
                          owner=received.owner)
        await asyncio.to_thread(self._commit, received.path, item)
        self._files[item.id] = item
        return item

    async def adopt(self, source: Path, file_id: str, filename: str, purpose: str,
                    owner: str) -> FileObject | None:
        """Make `source` (in the same file system) the file `file_id` of `owner`: idempotent,
        so a batch finalized again after a crash finds its result files made already. None
        when there is no such file and `source` is missing or empty. Its bytes count for the
        quotas but are never refused: a batch's results are not thrown away."""
        if file_id in self._files:
            return self._files[file_id]
        size = await asyncio.to_thread(file_size, source)
        if not size:
            await asyncio.to_thread(source.unlink, True)
            return None
        item = FileObject(id=file_id, bytes=size, created_at=int(time.time()),
                          filename=filename, purpose=purpose, owner=owner)
        await asyncio.to_thread(self._commit, source, item)
        self._files[item.id] = item
        self._charge(owner, size)
        return item

    def _commit(self, content: Path, item: FileObject) -> None:
        # The object first: until the content is in place too, a start drops the object and
        # `content` is where it was, so an `adopt` after a crash still finds it.
        write_atomically(self.directory / f"{item.id}.json", json.dumps(item.to_state()))
        content.replace(self.directory / item.id)

    async def delete(self, file_id: str, owner: str) -> None:
        item = self.get(file_id, owner)
        del self._files[item.id]
        self._charge(item.owner, -item.bytes)
        await asyncio.to_thread(self._delete, item.id)

    def _delete(self, file_id: str) -> None:
        # The object first: a crash in between leaves content that the next start removes.
        (self.directory / f"{file_id}.json").unlink(missing_ok=True)
        (self.directory / file_id).unlink(missing_ok=True)

    def __repr__(self) -> str:
        return (f"<FileStore {self.directory} files={len(self._files)} bytes={self._total} "
                f"owners={len(self._used)}>")


def new_file_id() -> str:
    return "file-" + os.urandom(12).hex()


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def close_synced(stream: IO[bytes]) -> None:
    stream.flush()
    os.fsync(stream.fileno())
    stream.close()


def discard(stream: IO[bytes], path: Path) -> None:
    stream.close()
    path.unlink(missing_ok=True)


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text`, so a reader (or a crash) sees the old or the new, whole."""
    partial = path.with_name(path.name + PARTIAL)
    with partial.open("w") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    partial.replace(path)


async def input_lines(path: Path) -> AsyncGenerator[bytes, None]:
    """The non-blank lines of an input file, read in blocks off the event loop."""
    lines = await asyncio.to_thread(path.open, "rb")
    try:
        while block := await asyncio.to_thread(lines.readlines, READ_HINT):
            for raw in block:
                if raw.strip():
                    yield raw
    finally:
        await asyncio.to_thread(lines.close)


def recorded_ids(path: Path) -> set[str] | None:
    """The custom ids in a results file (None: there is none); a record a crash cut short is
    removed, so its line runs again (blocking)."""
    try:
        results = path.open("rb+")
    except FileNotFoundError:
        return None
    ids: set[str] = set()
    with results:
        kept = 0
        for raw in results:
            try:
                if not raw.endswith(b"\n"):
                    break
                ids.add(str(json.loads(raw)["custom_id"]))
            except (ValueError, KeyError, TypeError):
                break
            kept += len(raw)
        results.truncate(kept)
    return ids


class ResultLog:
    """A batch's results: `output` for lines answered with a 2xx, `errors` for the others.

    Lines hand their record over (`append`) and are done with it; one writer task appends
    the records in a thread, flushing and fsyncing each group, and only then counts them
    (`written`). So a line counts exactly when its record is on disk, whatever is cancelled
    around it."""

    def __init__(self, output: Path, errors: Path, written: Callable[[bool], None]) -> None:
        self._paths = (output, errors)
        self._written = written
        self._queue: asyncio.Queue[tuple[bytes, bool] | None] = asyncio.Queue()
        self._files: list[IO[bytes]] = []
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self._files = await asyncio.to_thread(lambda: [p.open("ab") for p in self._paths])
        self._task = asyncio.create_task(self._run())

    def append(self, record: bytes, failed: bool) -> None:
        self._queue.put_nowait((record, failed))

    async def _run(self) -> None:
        while True:
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            records = [item for item in items if item is not None]
            if records:
                await asyncio.to_thread(self._write, records)
                for _, failed in records:
                    self._written(failed)
            if len(records) < len(items):
                return

    def _write(self, records: list[tuple[bytes, bool]]) -> None:
        touched = {}
        for record, failed in records:
            results = self._files[1 if failed else 0]
            results.write(record)
            touched[failed] = results
        for results in touched.values():
            results.flush()
            os.fsync(results.fileno())

    async def aclose(self) -> None:
        """Write what was handed over, then close; raises the writer's error, if it failed."""
        task, self._task = self._task, None
        if task is None:
            return
        self._queue.put_nowait(None)
        try:
            await asyncio.shield(task)
        finally:
            if task.done():
                files, self._files = self._files, []
                await asyncio.to_thread(lambda: [results.close() for results in files])


def lock_storage(root: Path) -> IO[bytes]:
    """Hold the storage directory for this process: two routers over one directory would run
    the same batches twice (blocking)."""
    root.mkdir(parents=True, exist_ok=True)
    lock = (root / ".lock").open("ab")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise OSError(f"--file-storage-path {root} is in use by another router process") from None
    return lock
