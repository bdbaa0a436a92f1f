"""Logging: the process's format and level, and the audit line written for every mint attempt.

Records are formatted where they are logged (the mint endpoint logs its audit line once its answer is handed
over) and written by a thread of their own (`QueuedStreamHandler`), in batches of up to 50 ms. The queue between
them is bounded and never drops a line: a request that finds it full waits, and logging.shutdown (at exit)
drains it.
"""

from __future__ import annotations

import collections
import logging
import re
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, TextIO

from ._json import dumps_ascii
from .exchange import Attempt

audit_log = logging.getLogger("gateway.audit")

# Lines waiting for the writer thread; at ~300 bytes each, a few MB at most.
QUEUE_LINES = 10_000
# How long the writer lets lines gather before it writes them: how late a log line may appear.
LINGER_SECONDS = 0.05


class _Line:
    """An audit record's message: its fields as JSON, encoded when a formatter first asks (on the writer thread)."""

    __slots__ = ("_fields", "_text")

    def __init__(self, fields: dict[str, Any]) -> None:
        self._fields = fields
        self._text: str | None = None

    def __str__(self) -> str:
        if self._text is None:
            self._text = dumps_ascii(self._fields)
        return self._text


def audit(attempt: Attempt, outcome: str) -> None:
    """One structured line per mint attempt; it never holds the token, only the jti's hash."""
    if not audit_log.isEnabledFor(logging.INFO):
        return
    identity = attempt.identity
    fields: dict[str, Any] = {
        "event": "mint",
        "outcome": outcome,
        "client": attempt.client,
        "issuer": attempt.issuer,
        "repository": identity.repository if identity else None,
        "workflow": identity.workflow if identity else None,
        "ref": identity.ref if identity else None,
        "sha": identity.sha if identity else None,
        "environment": identity.environment if identity else None,
        "publisher": [
            {"repository": p.repository, "workflow": p.workflow, "environment": p.environment}
            for p in attempt.publishers
        ],
        "projects": list(attempt.projects),
        "jti_hash": attempt.jti,
        # For `gateway check --replay` (replay.py): when it was judged, the whole identity, and the verified
        # claims every rule reads (max_token_age's iat, deny lists, the kind's own), present only once the
        # signature held.
        "at": attempt.at,
        "identity": identity.as_dict() if identity else None,
        "claims": audit_claims(attempt.claims) if attempt.claims is not None else None,
    }
    # Only when they happened, so the common line stays as it was.
    if attempt.revocation is not None:
        fields["revocation"] = attempt.revocation
    if attempt.pin is not None:
        fields["pin"] = attempt.pin
    writer = _sole_writer()
    if writer is not None:
        writer.emit_audit(fields, time.time())
        return
    # A record + handle is Logger.info without findCaller's walk up the stack (the audit line names no source
    # line), and without makeRecord's loop over `extra`: it is one call per mint.
    record = logging.getLogRecordFactory()(audit_log.name, logging.INFO, "", 0, _Line(fields), (), None)
    record.audit = fields
    audit_log.handle(record)


def _sole_writer() -> QueuedStreamHandler | None:
    """The handler an audit record would reach, when nothing but it would see the record on its way.

    `gateway serve` logs through one QueuedStreamHandler on the root logger, and then an audit line needs no
    LogRecord, nor logging's walk through loggers and handlers: the handler formats the line from its fields, as
    its formatter would format the record (a test holds them equal), a fifth of the line's cost. A filter,
    another handler (pytest's caplog is one), a handler above INFO, a formatter of someone else's or a record
    factory of someone's own: each gets the record, as before.
    """
    if audit_log.filters or audit_log.disabled or logging.getLogRecordFactory() is not logging.LogRecord:
        return None
    found = None
    logger: logging.Logger | None = audit_log
    while logger is not None:
        for handler in logger.handlers:
            if (
                found is not None
                or type(handler) is not QueuedStreamHandler
                or handler.filters
                or handler.level > logging.INFO
                or not _formats_audit_lines(handler.formatter)
            ):
                return None
            found = handler
        logger = logger.parent if logger.propagate else None
    return found


def _formats_audit_lines(formatter: logging.Formatter | None) -> bool:
    if type(formatter) is JSONFormatter:
        return True
    return type(formatter) is TextFormatter and formatter._fmt == TEXT_FORMAT and formatter.datefmt is None


def _msecs(created: float) -> float:
    """A LogRecord's `msecs` for a record made at `created` (time.time()), as logging computes it."""
    return int((created - int(created)) * 1000) + 0.0


# Never written to the audit log: the jti (only its hash, so a log line cannot be turned back into a spend key
# check), and claims that are a person's contact data rather than facts about the job.
UNLOGGED_CLAIMS = frozenset({"jti", "user_email", "user_identities"})


def audit_claims(claims: Mapping[str, Any]) -> dict[str, Any]:
    # A copy (dict's own C loop) and three pops: a seventh of a comprehension's cost over ~35 claims, same order.
    logged = dict(claims)
    for name in UNLOGGED_CLAIMS:
        logged.pop(name, None)
    return logged


class JSONFormatter(logging.Formatter):
    """One JSON object per line; audit records put their fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _json_time(record.created, record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "audit", None)
        if isinstance(fields, dict):
            line.update(fields)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return dumps_ascii(line, default=str)

    def audit_line(self, fields: dict[str, Any], created: float) -> str:
        """`format` of the audit record of these fields, made at `created`, without making it."""
        line: dict[str, Any] = {"time": _json_time(created, _msecs(created)), "level": "info", "logger": audit_log.name}
        line.update(fields)
        return dumps_ascii(line, default=str)


def _json_time(created: float, msecs: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(msecs):03d}Z"


class QueuedStreamHandler(logging.StreamHandler[TextIO]):
    """A StreamHandler that writes on a thread of its own, many lines to a write.

    `emit` formats the record (on the thread that logs: formatting on the writer made the two threads contend
    for the GIL, 5% of a mint's CPU in interleaved runs) and appends the line; the writer wakes at most once per
    `linger` seconds and writes everything that gathered in one write, so a busy process pays neither a thread
    wake-up nor a system call per line. The queue is bounded: `emit` waits when it holds `maxsize` lines, so no
    line is ever dropped. `flush` waits until every queued line is written; `close` (logging.shutdown calls both
    at exit) writes what is left and stops the thread.
    """

    def __init__(self, stream: TextIO, maxsize: int = QUEUE_LINES, linger: float = LINGER_SECONDS) -> None:
        super().__init__(stream)
        self._maxsize = maxsize
        self._linger = linger
        self._pending: collections.deque[str] = collections.deque()
        # Set when records wait for a writer that may be asleep; emit sets it only when it is clear.
        self._wake = threading.Event()
        # Set to write at once instead of lingering: a full queue, a flush, a close.
        self._hurry = threading.Event()
        # Emitters wait on it for room, flushers for an empty queue; the writer notifies after each write.
        self._state = threading.Condition()
        self._writing = False
        self._closing = False
        self._writer = threading.Thread(target=self._write, name="gateway-log-writer", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._queue(line)

    def emit_audit(self, fields: dict[str, Any], created: float) -> None:
        """Write the audit line of these fields, made at `created`, as `handle` would write its record (under the
        handler's lock, formatted by its formatter, which `_sole_writer` checked can)."""
        formatter = self.formatter
        assert isinstance(formatter, (TextFormatter, JSONFormatter))
        with self.lock:  # type: ignore[union-attr]
            self._queue(formatter.audit_line(fields, created) + self.terminator)

    def _queue(self, line: str) -> None:
        if not self._writer.is_alive():
            # Closed (or the thread is gone): write here rather than queue a line nobody would write.
            self._write_out([line])
            return
        if len(self._pending) >= self._maxsize:
            with self._state:
                while len(self._pending) >= self._maxsize and self._writer.is_alive():
                    self._hurry.set()
                    self._wake.set()
                    self._state.wait(0.1)
        self._pending.append(line)
        if not self._wake.is_set():
            self._wake.set()

    def _write(self) -> None:
        while True:
            self._wake.wait()
            if not self._closing:
                # Let lines gather: one write per linger, however many requests it covers.
                self._hurry.wait(self._linger)
            # Cleared before taking the records, so a record appended from here on wakes the next round.
            self._hurry.clear()
            self._wake.clear()
            with self._state:
                self._writing = True
            lines = []
            while self._pending:
                lines.append(self._pending.popleft())
            self._write_out(lines)
            with self._state:
                self._writing = False
                self._state.notify_all()
            if self._closing and not self._pending:
                return

    def _write_out(self, lines: list[str]) -> None:
        if lines:
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except Exception:
                self.handleError(logging.LogRecord("gateway", logging.ERROR, "", 0, "log write failed", (), None))

    def flush(self) -> None:
        if threading.current_thread() is not self._writer:
            with self._state:
                while (self._pending or self._writing) and self._writer.is_alive():
                    self._hurry.set()
                    self._wake.set()
                    self._state.wait(0.1)
        super().flush()

    def close(self) -> None:
        if self._writer.is_alive() and threading.current_thread() is not self._writer:
            self._closing = True
            self._hurry.set()
            self._wake.set()
            self._writer.join()
        super().close()


# Characters that would let a value forge or hide log lines: C0 and C1 controls (newlines, escape sequences),
# Unicode line and paragraph separators, bidirectional overrides, and lone surrogates (which no encoder takes).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _unsafe(record: logging.LogRecord) -> bool:
    """Whether the message may hold a character _UNSAFE matches; cheaper than the regex when it holds none."""
    # Every character _UNSAFE matches is one isprintable refuses (control, format, separator, surrogate), and
    # isprintable is twice as fast as the regex on a message that holds none.
    return not record.message.isprintable()


def _escaped_audit(message: str) -> str:
    # An audit line is JSON as dumps_ascii writes it: ASCII, with every C0 control escaped; DEL is the one
    # character _UNSAFE matches that JSON leaves as it is. `in` is a memchr, isprintable a loop in Python's
    # Unicode tables (a fifth of a line's formatting).
    return _UNSAFE.sub(_escape, message) if "\x7f" in message else message


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """One line per record: whatever a message interpolates (a claim value, a description) has its control
    characters escaped, as `!r` would, so a token's contents can never start a line of their own in the log."""

    def format(self, record: logging.LogRecord) -> str:
        if type(record.msg) is not _Line or self._fmt != TEXT_FORMAT or record.exc_info or record.stack_info:
            return super().format(record)
        # An audit line in the default format: what logging.Formatter.format writes (a test compares them), without
        # its generic steps (the format string's % over the record's dict, the traceback and stack checks).
        record.message = message = _escaped_audit(str(record.msg))
        record.asctime = self.formatTime(record)
        return f"{record.asctime} {record.levelname} {record.name}: {message}"

    def audit_line(self, fields: dict[str, Any], created: float) -> str:
        """`format` of the audit record of these fields, made at `created`, without making it (TEXT_FORMAT, the
        default date format: `_sole_writer` checks)."""
        message = _escaped_audit(dumps_ascii(fields))
        return f"{self._stamp(created, _msecs(created))} INFO {audit_log.name}: {message}"

    def formatMessage(self, record: logging.LogRecord) -> str:
        if _unsafe(record):
            record.message = _UNSAFE.sub(_escape, record.message)
        return super().formatMessage(record)

    # The date and time are formatted once per second rather than per record (they are a third of a line's cost).
    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self._stamp(record.created, record.msecs)

    def _stamp(self, created: float, msecs: float) -> str:
        second, stamp = self._second
        if int(created) != second:
            stamp = time.strftime(self.default_time_format, self.converter(created))
            self._second = (int(created), stamp)
        return f"{stamp},{int(msecs):03d}"  # logging.Formatter.default_msec_format


def flush() -> None:
    """Wait until every queued log line is written (the app's shutdown; logging.shutdown does it again at exit)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def configure(level: str, format: str) -> None:
    # Neither format shows a thread or process, and LogRecord looks up their names for every record otherwise (the
    # logging HOWTO's "Optimization").
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = QueuedStreamHandler(sys.stderr)
    if format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, QueuedStreamHandler):
            old.close()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
