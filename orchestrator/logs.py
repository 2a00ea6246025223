"""The service's logs: the request id of the call being served (a contextvar), attached to
every log record made while serving it, and the JSON-lines format (`icl serve --log-format`).

Only the message a caller formats is logged: the configuration's repr and the error texts
already leave Milvus tokens out, and no request field is logged here.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime

REQUEST_ID_KEY = "x-request-id"  # gRPC metadata key, in and out
# A caller's id is kept when it looks like an id (no spaces or control characters, so it
# cannot forge a log line); anything else is replaced by a fresh one.
_CALLER_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")

_request_id: ContextVar[str | None] = ContextVar("icl_request_id", default=None)

LOG_FORMATS = ("text", "json")


def current_request_id() -> str:
    """The id of the call being served ("" outside a call)."""
    return _request_id.get() or ""


def set_request_id(request_id: str | None) -> object:
    """Make `request_id` current in this task (and the tasks and threads it starts with a
    copied context); returns the token for `reset_request_id`."""
    return _request_id.set(request_id)


def reset_request_id(token: object) -> None:
    _request_id.reset(token)  # type: ignore[arg-type]


def request_id_from(metadata: object) -> str:
    """The caller's `x-request-id` when it is a plausible id, else a new uuid4 hex."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == REQUEST_ID_KEY and isinstance(value, str) and _CALLER_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every record (None outside a call)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, and
    request_id when the record was made while serving a call."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The plain format, with `[request id]` after the logger when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.rid = f" [{request_id}]" if request_id else ""
        return super().format(record)


def configure_logging(level: int, log_format: str = "text") -> None:
    """Root logging to stderr in `log_format` (text | json), with request ids."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format is one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


__all__ = [
    "LOG_FORMATS",
    "REQUEST_ID_KEY",
    "JsonFormatter",
    "RequestIdFilter",
    "TextFormatter",
    "configure_logging",
    "current_request_id",
    "request_id_from",
    "reset_request_id",
    "set_request_id",
]
