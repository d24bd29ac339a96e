"""Logging for the daemon and the scheduler: one line per event, as text or JSON.

``--log-format json`` (config key ``log_format``, ``$P2PDIST_LOG_FORMAT``) writes one
JSON object per line to stderr::

    {"time": "2026-11-27T15:04:05.123Z", "level": "WARNING", "logger": "p2pdist.swarm",
     "message": "piece 3 of sha256:... failed its sha256", "host": "n1",
     "task": "sha256:...", "peer": "n0"}

``host`` (this daemon's id), ``task`` (the blob's digest) and ``peer`` (the other node)
are there when known: they come from the context the line is logged in
(:func:`log_context`, set where a daemon, a download or a piece fetch starts — trio tasks
inherit it from the task that started them), or from ``extra={"task": ..., "peer": ...}``.
The text format appends the same fields as ``key=value``.

Nothing logs credentials: configuration objects keep secrets out of their ``repr``, and
the registry client never logs headers.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import TextIO

from .errors import UsageError

__all__ = [
    "LOG_FORMATS",
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "log_context",
]

LOG_FORMATS = ("text", "json")
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_FIELDS = ("host", "task", "peer")

_context: dict[str, contextvars.ContextVar[str | None]] = {
    name: contextvars.ContextVar(f"p2pdist_log_{name}", default=None) for name in _FIELDS
}


@contextlib.contextmanager
def log_context(
    *, host: str | None = None, task: str | None = None, peer: str | None = None
) -> Iterator[None]:
    """Within the block (and in trio tasks started from it), log lines carry these
    fields."""
    tokens = [
        (_context[name], _context[name].set(value))
        for name, value in (("host", host), ("task", task), ("peer", peer))
        if value is not None
    ]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def _fields(record: logging.LogRecord) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in _FIELDS:
        value = getattr(record, name, None)
        if value is None:
            value = _context[name].get()
        if value is not None:
            out[name] = str(value)
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the
    context fields, and ``exc`` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        secs = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        obj: dict[str, str] = {
            "time": f"{secs}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        obj.update(_fields(record))
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE key=value ...``, on one line (a traceback's lines are
    joined with `` | ``)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return " | ".join(line.splitlines())


def configure_logging(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send the root logger's records to ``stream`` (stderr) at ``level`` in ``fmt``."""
    if level.upper() not in _LEVELS:
        raise UsageError(f"invalid log level {level!r}: expected debug, info, warning or error")
    if fmt not in LOG_FORMATS:
        raise UsageError(f"invalid log format {fmt!r}: expected text or json")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_quiet_http_clients)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def _quiet_http_clients(record: logging.LogRecord) -> bool:
    """httpx logs every request at INFO (each heartbeat, each scheduler event): those lines
    pass only while the root logger is at DEBUG (``log_level`` may change on SIGHUP)."""
    if record.levelno >= logging.WARNING or not record.name.startswith(("httpx", "httpcore")):
        return True
    return logging.getLogger().level <= logging.DEBUG
