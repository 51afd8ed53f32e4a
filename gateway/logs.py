"""Log lines: JSON or text, each with the request id it belongs to, written off the event loop.

`log.format` picks JSON lines (one object a line, for a log pipeline) or text; `auto` (the default) is
JSON unless stderr is a terminal. Every line carries `request_id`: the one of the request being handled
(`REQUEST_ID`, a context variable set as a request begins), or `-` for lines of no request (start-up,
background flushes). A request's id is the trusted proxy's `X-Request-Id` when it sent a plain one, so
the proxy's log and ours meet, else a new one; it is echoed back in the answer's `X-Request-Id`.

Lines go through a queue to a thread that formats and writes them: a slow or full stderr pipe (a log
shipper that stalls) then never stalls a decision. Fields given as `extra=` are fields of the JSON object;
the text format appends them as `name=value`.
"""

from __future__ import annotations

import itertools
import logging
import logging.handlers
import os
import queue
import random
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final

from pythonjsonlogger.json import JsonFormatter

if TYPE_CHECKING:
    from gateway.config import Config, DecisionLogConfig

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
NO_REQUEST: Final = "-"

_SENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class RequestIds:
    """Gives each request its id: a trusted proxy's plain `X-Request-Id`, else this process's next one
    (a random prefix per process and a counter: unique across replicas, and far cheaper than a UUID)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._next = itertools.count(1).__next__

    def begin(self, sent: str | None, from_trusted: bool) -> str:
        """The request's id, also made the current one for the lines it logs."""
        if sent is not None and from_trusted and _SENT_ID.fullmatch(sent):
            rid = sent
        else:
            rid = f"{self._prefix}{self._next():x}"
        REQUEST_ID.set(rid)
        return rid


class DecisionLog:
    """The one line each forward-auth decision is logged with, at `log.decisions.level`, for the sampled
    share of allowed decisions and of denials. Its fields name the key by id and the route by its
    canonical, key-free path: never key material."""

    def __init__(self, cfg: DecisionLogConfig, logger: logging.Logger) -> None:
        self.logger = logger
        self.level = logging.getLevelName(cfg.level.upper()) if cfg.level.upper() != "OFF" else None
        self.sample_allowed = cfg.sample_allowed
        self.sample_denied = cfg.sample_denied
        self._random = random.Random()  # noqa: S311 (sampling log lines, not a secret)

    def wanted(self, allowed: bool) -> bool:
        share = self.sample_allowed if allowed else self.sample_denied
        if self.level is None or share <= 0 or not self.logger.isEnabledFor(self.level):
            return False
        return share >= 1 or self._random.random() < share

    def write(self, code: str, fields: dict[str, Any]) -> None:
        assert self.level is not None  # only called when `wanted`
        outcome = "allow" if code == "ok" else "deny"
        extra = {"outcome": outcome, "code": code, **fields, "request_id": REQUEST_ID.get()}
        self.logger.log(self.level, "decision", extra=extra)


class _WithRequestId(logging.Filter):
    """Runs in the logging caller's context (before the queue), where the request's id is current."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class _OneLine(logging.Filter):
    """During a Postgres outage asyncpg's pool logs a full traceback each time it fails to reopen its
    minimum of connections (with backoff): one line naming the error says as much."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is not None and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()} ({type(record.exc_info[1]).__name__})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


_STANDARD: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "taskName",
}


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [request id] message name=value ...` (the `extra=` fields last)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{k}={_text(v)}" for k, v in record.__dict__.items() if k not in _STANDARD)
        if not extra:
            return line
        head, newline, trace = line.partition("\n")  # fields before a traceback, on the message's line
        return f"{head} {extra}{newline}{trace}"


def _text(value: Any) -> str:
    text = "-" if value is None else str(value)
    return text if text and not any(c.isspace() or c in '"=' for c in text) else repr(text)


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        ["levelname", "name", "request_id", "message"],
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
        exc_info_as_array=False,
    )


QUEUE_MAX: Final = 10_000  # lines waiting for stderr; past it lines are dropped, and counted


class _Queued(logging.handlers.QueueHandler):
    """Puts the record itself on the queue: formatting (and `extra=` fields) happen on the writer thread.
    The message's arguments are merged first, as a record may hold objects that change later. When
    stderr stalls long enough to fill the queue, lines are dropped (never waited for) and the next line
    that fits is preceded by one saying how many were lost."""

    def __init__(self, records: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(records)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            if self.dropped:
                self.queue.put_nowait(self._lost())
                self.dropped = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def _lost(self) -> logging.LogRecord:
        record = logging.LogRecord(
            "gateway.logs", logging.WARNING, __file__, 0, "%d log lines dropped: stderr was not keeping up",
            (self.dropped,), None,
        )  # fmt: skip
        record.request_id = NO_REQUEST
        return record

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:  # a traceback's frames are formatted now, while they are what they were
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record


def formatter_for(fmt: str, stream: Any) -> logging.Formatter:
    use_json = fmt == "json" or (fmt == "auto" and not _isatty(stream))
    return json_formatter() if use_json else TextFormatter()


def _isatty(stream: Any) -> bool:
    isatty: Callable[[], bool] | None = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@contextmanager
def logging_to_stderr(cfg: Config) -> Iterator[None]:
    """The process's logging while serving: its root logger writes through a queue to stderr."""
    root = logging.getLogger()
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(formatter_for(cfg.log.format, sys.stderr))
    records: queue.Queue[logging.LogRecord] = queue.Queue(QUEUE_MAX)
    queued = _Queued(records)
    queued.addFilter(_WithRequestId())
    listener = logging.handlers.QueueListener(records, writer)
    saved = root.handlers[:], root.level
    root.handlers[:] = [queued]
    root.setLevel(cfg.log_level.upper())
    asyncpg_pool = logging.getLogger("asyncpg.pool")
    one_line = _OneLine()
    asyncpg_pool.addFilter(one_line)
    listener.start()
    try:
        yield
    finally:
        listener.stop()  # writes what is queued
        asyncpg_pool.removeFilter(one_line)
        root.handlers[:], level = saved
        root.setLevel(level)
