"""``gportmap.log.emit_fields``: a per-connection record queued as a tuple and
formatted by the log writer thread writes the line ``emit`` writes, byte for byte,
in either format, with and without the ``worker`` field; and it falls back to
``logging`` whenever another handler or a filter would see the record."""

from __future__ import annotations

import logging
import os
import time

import pytest

from gportmap import log
from gportmap.events import ConnectionClosed
from gportmap.reasons import CloseReason

FIXED_TIME = 1_700_000_000.25

VALUES = [
    ("web", "127.0.0.1:5000", "127.0.0.1:80", 120, 3400, 0.012, CloseReason.CLOSED, None),
    ("db", "[::1]:41000", "10.0.0.2:5432", 0, 0, 1.5, CloseReason.CONNECT_FAILED, "connection refused"),
    ("x y", "", "t", 7, 8, 2.0, "plugin reason", "an error with spaces"),
    # what a client chose may hold control characters: still one line, no escape sequence
    ("web", "127.0.0.1:5001", "t\nconnection_closed: forged\x1b[2J", 1, 1, 0.5, "tls\rcut", "bad\nline"),
    # beyond ASCII, a large count, a tiny duration, an empty error, a reason of a
    # plugin's own str type (JSON: the formatter's own path)
    ("wéb", "client-é", "[::1]:443", 10**20, 0, 1e-9, "", ""),
    ("web", "c", "t", 1, 2, 3.0, "plugin", None),
]


class _PluginReason(str):
    """A reason of a plugin package's own ``str`` type."""


VALUES.append(("web", "c", "t", 1, 2, 3.25, _PluginReason("own_reason"), "e"))


def _lines(fmt: str, worker: int | None, emitter, extra_handler: logging.Handler | None = None) -> bytes:
    """What ``emitter(logger, level, values)`` writes for every row of VALUES, read
    from the queue's descriptor once the writer has drained."""
    read_end, write_end = os.pipe()
    queue = log.StderrQueue(write_end)
    handler = log.StderrQueueHandler(queue)
    handler.setFormatter(log.EventJsonFormatter() if fmt == "json" else log.TextFormatter())
    if worker is not None:
        handler.addFilter(log._WorkerField(worker))
    # A logger of its own, outside logging's tree: nothing else (pytest's capture)
    # attaches a handler to it.
    logger = logging.Logger(f"gportmap.test_fields.{fmt}.{worker}", logging.INFO)
    logger.addHandler(handler)
    if extra_handler is not None:
        logger.addHandler(extra_handler)
    try:
        for values in VALUES:
            level = ConnectionClosed.level_for(values[6])
            emitter(logger, level, values)
        assert queue.flush(10)
    finally:
        for attached in list(logger.handlers):
            logger.removeHandler(attached)
        queue.close()
    os.close(write_end)  # everything is written (flushed): read to the end
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    return b"".join(chunks)


def _by_emit(logger: logging.Logger, level: int, values: tuple) -> None:
    names = ("rule", "client", "target", "bytes_received", "bytes_sent", "duration", "reason", "error")
    log.emit(logger, ConnectionClosed(**dict(zip(names, values, strict=True))))


@pytest.fixture
def fixed_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: FIXED_TIME)


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("worker", [None, 2])
def test_emit_fields_writes_what_emit_writes(fixed_time: None, fmt: str, worker: int | None) -> None:
    expected = _lines(fmt, worker, _by_emit)
    assert expected.count(b"\n") == len(VALUES)  # one line per record, whatever its values hold
    assert b"\x1b" not in expected and b"\r" not in expected
    assert b"connection_closed" in expected and b"cannot reach target: connection refused" in expected
    # the values as the formats write them: a float to the millisecond in text
    if fmt == "text":
        assert b" duration=0.012 reason=closed" in expected and b" duration=0.000 " in expected
        assert b" bytes_received=100000000000000000000 " in expected and b" reason=own_reason error=e" in expected
    else:
        assert b'"duration": 0.012, "reason": "closed", "event": "connection_closed"' in expected
    if worker is not None:
        assert expected.count(b"worker") == len(VALUES)
    got = _lines(fmt, worker, lambda logger, level, values: log.emit_fields(logger, level, ConnectionClosed, values))
    assert got == expected


def test_emit_fields_queues_a_tuple_for_the_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub's side makes no LogRecord: the queue gets the fields as they are."""
    queued: list[tuple] = []
    monkeypatch.setattr(log.StderrQueue, "put_later", lambda self, item: queued.append(item) or True)
    made: list[object] = []
    monkeypatch.setattr(logging.Logger, "makeRecord", lambda *args, **kwargs: made.append(args))
    _lines("text", None, lambda logger, level, values: log.emit_fields(logger, level, ConnectionClosed, values))
    assert [item[4] for item in queued] == VALUES
    assert made == []


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_another_handler_gets_the_record_through_logging(fixed_time: None) -> None:
    capture = _Capture()
    expected = _lines("text", None, _by_emit)
    got = _lines("text", None, lambda logger, level, values: log.emit_fields(logger, level, ConnectionClosed, values),
                 capture)
    assert got == expected
    assert [record.rule for record in capture.records] == [values[0] for values in VALUES]
    assert [record.event for record in capture.records] == ["connection_closed"] * len(VALUES)
