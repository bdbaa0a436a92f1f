"""The log writer: records formatted and written off the request path, in order, none dropped, all flushed."""

from __future__ import annotations

import io
import logging
import threading
import time

import pytest

from gateway import logs
from gateway.exchange import Attempt
from gateway.jose import VerifiedClaims


def record(n: int, *args: object) -> logging.LogRecord:
    return logging.LogRecord("gateway.test", logging.INFO, __file__, 1, "line %d" if args else f"line {n}", args, None)


def test_queued_handler_writes_every_record_in_order_through_a_full_queue() -> None:
    """With a queue of 4, 2,000 records from two threads all reach the stream, each thread's in its order."""
    stream = io.StringIO()
    handler = logs.QueuedStreamHandler(stream, maxsize=4)
    handler.setFormatter(logging.Formatter("%(threadName)s %(message)s"))

    def emit(name: str) -> None:
        for n in range(1000):
            handler.handle(record(n, n))

    threads = [threading.Thread(target=emit, args=(name,), name=name) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    handler.flush()
    lines = stream.getvalue().splitlines()
    for name in ("a", "b"):
        assert [line for line in lines if line.startswith(f"{name} ")] == [f"{name} line {n}" for n in range(1000)]
    handler.close()


def test_queued_handler_close_writes_what_is_queued() -> None:
    """close() (what logging.shutdown calls at exit) returns only once every queued record is written."""
    stream = io.StringIO()
    handler = logs.QueuedStreamHandler(stream)
    for n in range(500):
        handler.handle(record(n))
    handler.close()
    assert stream.getvalue().splitlines() == [f"line {n}" for n in range(500)]


def test_queued_handler_formats_arguments_when_emitted() -> None:
    """A record's arguments are formatted when it is logged, so changing them afterwards changes nothing."""
    stream = io.StringIO()
    handler = logs.QueuedStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    value = [1]
    handler.handle(logging.LogRecord("gateway.test", logging.INFO, __file__, 1, "value %s", (value,), None))
    value.append(2)
    handler.close()
    assert stream.getvalue() == "value [1]\n"


def test_text_formatter_matches_logging_formatter() -> None:
    """TextFormatter writes exactly what logging.Formatter writes, for records within one second and across."""
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    ours, stdlib = logs.TextFormatter(fmt), logging.Formatter(fmt)
    for created in (1_700_000_000.001, 1_700_000_000.999, 1_700_000_001.5, 1_700_000_000.25):
        rec = record(1)
        rec.created, rec.msecs = created, (created - int(created)) * 1000
        assert ours.format(rec) == stdlib.format(rec)


@pytest.mark.parametrize("value", ["plain", "with DEL \x7f and a newline \n", "\u00fc \u2028"])
def test_text_formatter_writes_an_audit_line_as_logging_formatter_would(value: str) -> None:
    """An audit record takes TextFormatter's shortcut; the line is logging.Formatter's, its message escaped."""
    fmt = logs.TEXT_FORMAT
    ours, stdlib = logs.TextFormatter(fmt), logging.Formatter(fmt)
    for created in (1_700_000_000.001, 1_700_000_001.5):
        rec = logging.LogRecord("gateway.audit", logging.INFO, "", 0, logs._Line({"v": value, "n": 1}), (), None)
        rec.created, rec.msecs = created, (created - int(created)) * 1000
        expected = stdlib.format(rec)
        escaped = logs._UNSAFE.sub(logs._escape, expected)
        assert ours.format(rec) == escaped
        assert rec.message == logs._UNSAFE.sub(logs._escape, str(rec.msg))


def test_queued_handler_writes_a_lone_line_within_its_linger() -> None:
    """A single record on an idle handler is written without a flush, once the linger has passed."""
    stream = io.StringIO()
    handler = logs.QueuedStreamHandler(stream, linger=0.01)
    handler.handle(record(1))
    deadline = time.monotonic() + 5
    while not stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.getvalue() == "line 1\n"
    handler.close()


def test_queued_handler_after_close_writes_at_once() -> None:
    """A record logged after close (late at exit) is written on the spot, not queued for a thread that is gone."""
    stream = io.StringIO()
    handler = logs.QueuedStreamHandler(stream)
    handler.close()
    handler.handle(record(2))
    assert stream.getvalue() == "line 2\n"


@pytest.mark.parametrize(
    "value",
    ["".join(map(chr, range(0x80))), "".join(map(chr, range(0xA0))) + "\u2028\u2029\u202a\u202e\u2066\u2069"],
    ids=["ascii", "unicode"],
)
def test_an_audit_line_in_the_text_log_holds_no_unsafe_character(value: str) -> None:
    """An audit line's fields may hold any character a claim can, and the text log shows none of them raw: it is
    what escaping the whole JSON text would give. ASCII values take orjson, which leaves DEL to the formatter;
    others the stdlib, which escapes DEL itself."""
    formatter = logs.TextFormatter("%(message)s")
    record = logging.LogRecord("gateway.audit", logging.INFO, "", 0, logs._Line({"v": value}), (), None)
    line = formatter.format(record)
    assert logs._UNSAFE.search(line) is None
    assert line == logs._UNSAFE.sub(logs._escape, logs.dumps_ascii({"v": value}))
    assert ("\\x7f" in line) == value.isascii()


class _Keep(logging.Filter):
    """Lets every record through; its presence alone makes an audit line take the record path."""

    def filter(self, record: logging.LogRecord) -> bool:
        return True


def _audit_lines(monkeypatch: pytest.MonkeyPatch, formatter: logging.Formatter, *, record_path: bool) -> list[str]:
    """Audit lines of a few attempts, written through a QueuedStreamHandler on the root logger, as `serve` logs."""
    stream = io.StringIO()
    handler = logs.QueuedStreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.INFO)
    monkeypatch.setattr(logs.audit_log, "level", logging.NOTSET)
    # Whatever earlier tests (or a dictConfig) left: a disabled logger, logging.disable, cached level answers.
    monkeypatch.setattr(logs.audit_log, "disabled", False)
    monkeypatch.setattr(root.manager, "disable", 0)
    root.manager._clear_cache()
    if record_path:
        monkeypatch.setattr(logs.audit_log, "filters", [_Keep()])
    assert (logs._sole_writer() is None) is record_path
    for created in (1_700_000_000.0009, 1_700_000_000.9996, 1_700_000_001.5, 1_700_000_061.25):
        monkeypatch.setattr(time, "time", lambda created=created: created)
        attempt = Attempt(client="192.0.2.1", issuer="gitlab-com", jti="jti:ab", at=created)
        attempt.claims = VerifiedClaims({"ref": "main\x7f\u2028", "n": 1, "iat": 1_700_000_000})
        logs.audit(attempt, "success")
    monkeypatch.undo()
    root.manager._clear_cache()
    handler.close()
    return stream.getvalue().splitlines()


@pytest.mark.parametrize("json_lines", [False, True], ids=["text", "json"])
def test_an_audit_line_written_without_a_record_is_the_records_line(
    monkeypatch: pytest.MonkeyPatch, json_lines: bool
) -> None:
    """With one QueuedStreamHandler in the way, an audit line skips the LogRecord; it is byte for byte the line the
    record would have given, time stamps and escaping included, in both formats."""

    def formatter() -> logging.Formatter:
        return logs.JSONFormatter() if json_lines else logs.TextFormatter(logs.TEXT_FORMAT)

    direct = _audit_lines(monkeypatch, formatter(), record_path=False)
    assert direct == _audit_lines(monkeypatch, formatter(), record_path=True)
    assert len(direct) == 4 and "\\u2028" in direct[0] and "\x7f" not in direct[0]


def test_an_audit_line_takes_the_record_path_when_anything_else_would_see_the_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A second handler (caplog), a handler filter, a handler above INFO, a formatter of another format, a record
    factory of someone's own: each gets the record, so the direct path is never taken."""
    handler = logs.QueuedStreamHandler(io.StringIO())
    handler.setFormatter(logs.TextFormatter(logs.TEXT_FORMAT))
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    assert logs._sole_writer() is handler
    changes = [
        lambda: monkeypatch.setattr(root, "handlers", [handler, logging.NullHandler()]),
        lambda: monkeypatch.setattr(handler, "filters", [_Keep()]),
        lambda: monkeypatch.setattr(handler, "level", logging.WARNING),
        lambda: monkeypatch.setattr(handler, "formatter", logs.TextFormatter("%(levelname)s %(message)s")),
        lambda: monkeypatch.setattr(handler, "formatter", logging.Formatter(logs.TEXT_FORMAT)),
        lambda: logging.setLogRecordFactory(lambda *a, **k: logging.LogRecord(*a, **k)),
        lambda: monkeypatch.setattr(logs.audit_log, "propagate", False),
    ]
    for change in changes:
        change()
        try:
            assert logs._sole_writer() is None
        finally:
            logging.setLogRecordFactory(logging.LogRecord)
            monkeypatch.undo()
            monkeypatch.setattr(root, "handlers", [handler])
    handler.close()
