"""How a node logs: through ``logging``, to stderr, one line per event.

Two formats (``[node] log_format`` or ``idis-node --log-format``):

* ``text`` for people: ``2025-01-02T03:04:05.678Z WARNING idis.node: message method=... peer=...``;
* ``json`` for log collectors: one JSON object a line with ``time``, ``level``, ``logger`` and
  ``message``, and ``exception`` when there is one.

Every event carries the node's name (``node``) and, in a worker process, its number
(``worker``). A log call about a request passes its context as ``extra={"method": ...,
"peer": ..., "status": ...}`` (the request pipeline does on errors); both formats carry those. A
traceback stays on its event's line (escaped newlines in text, a string field in JSON), so a
collector never splits one event into several.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from collections.abc import Mapping
from typing import Any, TextIO

FORMATS = ("text", "json")

REQUEST_FIELDS = ("method", "peer", "status")
"""The request context a log call may pass in ``extra``."""

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _timestamp(record: logging.LogRecord) -> str:
    when = dt.datetime.fromtimestamp(record.created, dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def request_context(record: logging.LogRecord) -> dict[str, Any]:
    """The request fields a log call passed in ``extra``, in REQUEST_FIELDS order."""
    return {key: getattr(record, key) for key in REQUEST_FIELDS if getattr(record, key, None) is not None}


class _EventFormatter(logging.Formatter):
    """Carries ``fields`` that every event of this process gets (the node's name, the worker's
    number) besides the request context of each log call."""

    def __init__(self, fields: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.fields = dict(fields or {})

    def context(self, record: logging.LogRecord) -> dict[str, Any]:
        return {**self.fields, **request_context(record)}


class TextFormatter(_EventFormatter):
    """``TIME LEVEL LOGGER: MESSAGE key=value...``, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        context = self.context(record)
        if context:
            line += " " + " ".join(f"{key}={value}" for key, value in context.items())
        if record.exc_info:
            line += " | " + self.formatException(record.exc_info)
        if record.stack_info:
            line += " | " + self.formatStack(record.stack_info)
        return line.replace("\r", "\\r").replace("\n", "\\n")


class JsonFormatter(_EventFormatter):
    """One JSON object per event: time, level, logger, message, the fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self.context(record),
        }
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            event["stack"] = self.formatStack(record.stack_info)
        return json.dumps(event, ensure_ascii=False, default=str)


def formatter(log_format: str, fields: Mapping[str, Any] | None = None) -> logging.Formatter:
    """The formatter of ``log_format``; ``fields`` go into every event."""
    if log_format == "json":
        return JsonFormatter(fields)
    if log_format == "text":
        return TextFormatter(fields)
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {log_format!r}")


def configure(
    level: str, log_format: str, fields: Mapping[str, Any] | None = None, stream: TextIO | None = None
) -> None:
    """Sends every logger's events at ``level`` and above to ``stream`` (stderr) in ``log_format``,
    with ``fields`` in each, replacing any handler configured before."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(log_format, fields))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
