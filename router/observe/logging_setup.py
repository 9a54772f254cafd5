"""Logging set-up: `configure_logging(level, fmt)` installs one stderr handler on the root
logger, with a compact text format or `JsonFormatter` (one JSON object per line for every
router log, an access line's fields as keys), and the `RedactSecrets` filter, which rewrites
any record (message, arguments, traceback) so that secrets read `[REDACTED]`, whatever logger
wrote it (`router.observe.redaction`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

from router.observe.access_log import ACCESS_LOGGER, AccessRecord
from router.observe.redaction import redact

__all__ = ["LOG_FORMATS", "JsonFormatter", "RedactSecrets", "configure_logging"]

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
HANDLER_NAME = "router"
"""The name of the handler `configure_logging` installs (and replaces when called again)."""


class RedactSecrets(logging.Filter):
    """Handler filter: secrets in a record's message, arguments, traceback or stack read
    `[REDACTED]`. The message is formatted here (once: the formatter reuses it)."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if isinstance(msg, AccessRecord):
            msg.redact()
        else:
            try:
                text = record.getMessage()
            except Exception:
                return True  # a broken call: the handler reports it as logging does
            record.msg, record.args = redact(text), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `ts` (UTC, ISO 8601), `level`, `logger`, `msg`, then an
    access line's fields as keys, and `exc`/`stack` when the record has them."""

    _second = -1
    _prefix = ""

    def format(self, record: logging.LogRecord) -> str:
        created = record.created
        second = int(created)
        if second != self._second:  # strftime once a second, not once a line
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        entry: dict[str, object] = {
            "ts": f"{self._prefix}.{int((created - second) * 1000):03d}Z",
            "level": record.levelname,
            "logger": record.name,
        }
        msg = record.msg
        if isinstance(msg, AccessRecord):
            entry["msg"] = "request"
            entry.update(msg.fields)
        else:
            entry["msg"] = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(
    level: str, fmt: str = "text", *, access_log: bool = True, stream: TextIO | None = None,
) -> None:
    """Log to stderr (or `stream`) at `level` in `fmt` (`text` or `json`), secrets redacted.

    Replaces the handler a previous call installed, so it can run again (tests, reload).
    `access_log=False` turns the per-request lines off (the `router.access` logger is raised
    to WARNING), which saves their cost."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: choose {' or '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.NOTSET if access_log else logging.WARNING)
