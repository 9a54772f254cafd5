"""The records of the Batch API: the `Batch` object, an input line and its check, a line's
result and the record it leaves in the output or error file (`router.batch.batches` runs
them).
"""

from __future__ import annotations

import json
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from router.batch.files import OPEN
from router.errors import RouterError

__all__ = [
    "Batch", "HashSet", "InvalidLine", "LineResult", "TIMESTAMPS", "check_input", "parse_line",
    "result_record",
]

MAX_ERRORS = 100
"""Invalid input lines reported in a failed batch's `errors` (the first ones)."""
EXPIRED = {"code": "batch_expired",
           "message": "This request could not be executed before the completion window expired."}


@dataclass(eq=False, slots=True)
class Batch:
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    expires_at: int
    metadata: dict[str, str] | None = None
    status: str = "validating"
    total: int = 0
    completed: int = 0
    failed: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    times: dict[str, int] = field(default_factory=dict)
    """When it entered each later status: `in_progress_at`, `cancelled_at`..."""
    owner: str = OPEN
    """Who sees it (`router.batch.files`): the creator's key, or `OPEN`."""
    client: str = ""
    """Whose rate limit its lines spend: the creator's `client_key` (its key, else its
    address)."""

    def count(self, failed: bool) -> None:
        if failed:
            self.failed += 1
        else:
            self.completed += 1

    def to_json(self) -> dict[str, Any]:
        """OpenAI's `Batch` object (what clients see)."""
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id, "created_at": self.created_at,
            "expires_at": self.expires_at,
            **{name: self.times.get(name) for name in TIMESTAMPS},
            "request_counts": {"total": self.total, "completed": self.completed,
                               "failed": self.failed},
            "metadata": self.metadata,
        }

    def to_state(self) -> dict[str, Any]:
        """What is saved: the `Batch` object, its owner and its client."""
        return {**self.to_json(), "owner": self.owner, "client": self.client}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Batch:
        counts = data["request_counts"]
        return cls(
            id=data["id"], endpoint=data["endpoint"], input_file_id=data["input_file_id"],
            completion_window=data["completion_window"], created_at=data["created_at"],
            expires_at=data["expires_at"], metadata=data.get("metadata"),
            status=data["status"], total=counts["total"], completed=counts["completed"],
            failed=counts["failed"], errors=(data.get("errors") or {}).get("data") or [],
            output_file_id=data.get("output_file_id"), error_file_id=data.get("error_file_id"),
            times={name: data[name] for name in TIMESTAMPS if data.get(name) is not None},
            owner=str(data.get("owner", OPEN)),
            # Saved before clients were: a bucket of its own, still paced.
            client=str(data.get("client") or f"batch:{data['id']}"),
        )

    def __repr__(self) -> str:
        return (f"<Batch {self.id} {self.status} {self.completed + self.failed}/{self.total} "
                f"failed={self.failed}>")


TIMESTAMPS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
              "cancelling_at", "cancelled_at")


class InvalidLine(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def parse_line(raw: bytes, endpoint: str) -> tuple[str, dict[str, Any]]:
    """An input line's `custom_id` and request body; `InvalidLine` says what is wrong."""
    try:
        line = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidLine("the line is not valid JSON") from None
    if not isinstance(line, dict):
        raise InvalidLine("the line is not a JSON object")
    custom_id, body = line.get("custom_id"), line.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        raise InvalidLine("'custom_id' must be a non-empty string", "custom_id")
    if line.get("method") != "POST":
        raise InvalidLine("'method' must be POST", "method")
    if line.get("url") != endpoint:
        raise InvalidLine(f"'url' must be the batch's endpoint {endpoint}", "url")
    if not isinstance(body, dict):
        raise InvalidLine("'body' must be a JSON object", "body")
    if body.get("stream") is True:
        raise InvalidLine("a batch request cannot stream ('stream': true)", "body.stream")
    return custom_id, body


def check_input(
    path: Path, endpoint: str, max_requests: int, max_bytes: int
) -> tuple[int, list[dict[str, Any]]]:
    """The number of requests in an input file, and its first invalid lines (blocking).

    Memory is bounded by the caps: a file over `max_bytes` is not read at all, reading stops
    at the first request past `max_requests`, and a `custom_id` is remembered as its 64-bit
    hash (Python's `hash`, salted per process: a collision cannot be crafted from outside and
    is about as likely as 1 in 10^10 at 50,000 lines) in a `HashSet`, not as its string."""
    size = path.stat().st_size
    if size > max_bytes:
        return 0, [cap_error("input_too_large",
                             f"the input file has {size} bytes, over the limit of {max_bytes}")]
    total, seen = 0, HashSet()
    errors: list[dict[str, Any]] = []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            total += 1
            if total > max_requests:
                errors.append(cap_error(
                    "input_too_many_requests",
                    f"the input file has more than the limit of {max_requests} requests"))
                break
            try:
                custom_id, _ = parse_line(raw, endpoint)
                if not seen.add(hash(custom_id)):
                    raise InvalidLine(f"'custom_id' {custom_id[:64]!r} is used twice",
                                      "custom_id")
            except InvalidLine as invalid:
                if len(errors) < MAX_ERRORS:
                    errors.append({"code": "invalid_request", "message": invalid.message,
                                   "param": invalid.param, "line": number})
    if not total:
        errors.append(cap_error("empty_file", "the input file has no requests"))
    return total, errors


class HashSet:
    """64-bit hashes in one flat array (open addressing, linear probing, at most half full):
    8 to 24 bytes an entry, where a `set` of ints takes about 90 (130 MB at 1.5 M)."""

    def __init__(self) -> None:
        self._table = array("q", bytes(8 * 1024))
        self._mask = len(self._table) - 1
        self._room = len(self._table) // 2

    def add(self, value: int) -> bool:
        """Add `value`; False when it was there already."""
        table, mask = self._table, self._mask
        value = value or 1  # 0 marks a free slot
        slot = value & mask
        while held := table[slot]:
            if held == value:
                return False
            slot = (slot + 1) & mask
        table[slot] = value
        self._room -= 1
        if not self._room:
            self._grow()
        return True

    def _grow(self) -> None:
        old = self._table
        table = self._table = array("q", bytes(16 * len(old)))
        mask = self._mask = len(table) - 1
        self._room = len(table) // 2 - len(old) // 2
        for value in old:
            if value:
                slot = value & mask
                while table[slot]:
                    slot = (slot + 1) & mask
                table[slot] = value


def cap_error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": None}


def result_record(custom_id: str, result: LineResult) -> bytes:
    """A line of the output or error file, in OpenAI's format."""
    response = None if result.status is None else {
        "status_code": result.status, "request_id": result.request_id, "body": result.body,
    }
    record = {"id": f"batch_req_{result.request_id}", "custom_id": custom_id,
              "response": response, "error": result.error}
    return json.dumps(record).encode() + b"\n"


@dataclass(frozen=True, slots=True)
class LineResult:
    """What one line got: the answer (`status`, `body`), or an `error` when none came."""

    request_id: str
    status: int | None = None
    body: object = None
    error: dict[str, str | None] | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @classmethod
    def failure(cls, request_id: str, error: RouterError) -> LineResult:
        return cls(request_id, error={"code": error.code, "message": error.message})

    @classmethod
    def expired(cls) -> LineResult:
        return cls(os.urandom(16).hex(), error=dict(EXPIRED))

    @classmethod
    def internal_error(cls) -> LineResult:
        # The exception goes to the log, never into the output file a client downloads: its
        # text may hold anything.
        return cls(os.urandom(16).hex(),
                   error={"code": "internal_error", "message": "the router failed on this line"})
