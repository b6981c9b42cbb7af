"""Request ids and log lines: every response carries X-Request-ID, every log line about a request names it."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from typing import Any

from flask import Flask, Response, request

from llmapi.config import Settings

HEADER = "X-Request-ID"
# What we accept from a client or a proxy (nginx's $request_id is 32 hex digits; UUIDs fit too). Anything
# else, such as a long or multi-line value that could forge log lines, is replaced by an id of our own.
SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
TEXT_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s [%(request_id)s]: %(message)s"

# Set when a request starts and cleared when its response is closed, so that lines logged while a
# stream is being sent (after the view has returned) still carry the id.
_current: ContextVar[str | None] = ContextVar("llmapi_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request this thread is serving, if any."""
    return _current.get()


def choose_id(presented: str | None) -> str:
    """Keep the caller's id when it is sane, else make a new one."""
    if presented and SANE_ID.fullmatch(presented):
        return presented
    return uuid.uuid4().hex


def _start() -> None:
    """before_request: adopt or make this request's id."""
    _current.set(choose_id(request.headers.get(HEADER)))


def _finish(response: Response) -> Response:
    """after_request: send the id back; forget it once the response (stream included) is closed."""
    request_id = _current.get()
    if request_id:
        response.headers[HEADER] = request_id
    response.call_on_close(lambda: _current.set(None))
    return response


def init_app(app: Flask) -> None:
    """Install the request-id hooks; register this before any hook that may log."""
    app.before_request(_start)
    app.after_request(_finish)


class RequestIdFilter(logging.Filter):
    """Give every record the id of the request being served ("-" outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = _current.get() or "-"
        return True


def iso_time(seconds: float) -> str:
    """A Unix time as ISO 8601 in UTC, to the millisecond."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, request_id, message (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None) or _current.get()
        entry: dict[str, Any] = {
            "time": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "request_id": None if request_id == "-" else request_id,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of LOG_FORMAT."""
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(settings: Settings) -> None:
    """Send llmapi's logs to stdout in LOG_FORMAT, each line with its request id."""
    logger = logging.getLogger("llmapi")
    logger.setLevel(settings.log_level.upper())
    logger.propagate = False
    handler = next((h for h in logger.handlers if getattr(h, "llmapi", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stdout)
        handler.llmapi = True  # type: ignore[attr-defined]
        handler.addFilter(RequestIdFilter())
        logger.addHandler(handler)
    handler.setFormatter(formatter(settings.log_format))
