"""SPEC §6: logs that never block forwarding.

A record is formatted where it is logged and queued; one native thread writes the
queue to stderr. A stderr that nobody reads costs log lines (counted, and reported
as ``log_records_dropped`` once the writer catches up), never the forwarding.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import connect, free_port, recv_until_eof, tcp_rule, wait_for

from gportmap.log import (
    DROP_EVENT,
    EventJsonFormatter,
    StderrQueue,
    StderrQueueHandler,
    TextFormatter,
    _WorkerField,
)

CONNECTIONS = 3000
AT_A_TIME = 4
#: gportmap's entry point with a smaller log queue (a class attribute, as documented).
SMALL_QUEUE = (
    "import sys\n"
    "import gportmap.__main__ as entry\n"
    "from gportmap.log import StderrQueue\n"
    "StderrQueue.max_lines = int(sys.argv.pop(1))\n"
    "entry.run()\n"
)


class PipeReader:
    """Reads a pipe in a thread once started; ``records()`` parses the complete lines
    so far, each of which must be one JSON object."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.data = bytearray()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _read(self) -> None:
        while chunk := os.read(self.pipe.fileno(), 65536):
            with self._lock:
                self.data += chunk

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "stderr was not closed"

    def records(self) -> list[dict]:
        with self._lock:
            complete = bytes(self.data[: self.data.rfind(b"\n") + 1])
        return [json.loads(line) for line in complete.splitlines()]  # a line that is not JSON fails


@pytest.fixture
def unread_gportmap(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Factory: gportmap (JSON logs, INFO) with its stderr a pipe the test does not read
    until it chooses to; killed at the end whatever happened."""
    started: list[subprocess.Popen] = []

    def start(rules: list[dict], max_lines: int | None = None) -> subprocess.Popen:
        path = tmp_path / "rules.json"
        path.write_text(json.dumps(rules))
        entry = ["-m", "gportmap"] if max_lines is None else ["-c", SMALL_QUEUE, str(max_lines)]
        proc = subprocess.Popen(
            [sys.executable, *entry, str(path), "--log-format", "json", "--admin", "off"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=tmp_path,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()


def round_trips(port: int, count: int, payload: bytes = b"ping") -> None:
    """``count`` echo round trips through ``port``, opened and closed together."""
    socks = [connect(port, timeout=10) for _ in range(count)]
    try:
        for sock in socks:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        for sock in socks:
            assert recv_until_eof(sock) == payload
    finally:
        for sock in socks:
            sock.close()


def serves(port: int) -> bool:
    try:
        round_trips(port, 1)
    except OSError:
        return False
    return True


@pytest.mark.parametrize("max_lines", [None, 500], ids=["default_queue", "small_queue"])
@pytest.mark.slow
def test_a_stderr_nobody_reads_does_not_stop_forwarding(unread_gportmap, echo_target, max_lines) -> None:
    port = free_port()
    proc = unread_gportmap([tcp_rule(port, echo_target.port, name="echo")], max_lines)
    wait_for(lambda: serves(port), timeout=15, what="gportmap serving")
    served = 1
    try:
        while served < CONNECTIONS:
            batch = min(AT_A_TIME, CONNECTIONS - served)
            round_trips(port, batch)
            served += batch
    except (OSError, AssertionError) as exc:
        pytest.fail(f"served {served} of {CONNECTIONS} connections with stderr unread, then: {exc!r}")

    reader = PipeReader(proc.stderr)
    reader.start()

    def closed_and_dropped() -> tuple[int, int]:
        records = reader.records()
        closed = sum(r["event"] == "connection_closed" for r in records)
        return closed, sum(r["dropped"] for r in records if r["event"] == DROP_EVENT)

    if max_lines is None:  # the default queue holds every record of this run
        wait_for(lambda: closed_and_dropped()[0] >= CONNECTIONS, timeout=30, what="every connection_closed")
        assert closed_and_dropped()[1] == 0
    else:  # every record either written or counted in a drop record
        wait_for(lambda: sum(closed_and_dropped()) >= CONNECTIONS, timeout=30, what="the drop record")
        (first, *_) = [r for r in reader.records() if r["event"] == DROP_EVENT]
        assert first["level"] == "WARNING" and first["dropped"] > 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    reader.join(10)
    assert reader.records()[-1]["event"] == "stopped"


def test_every_record_of_a_short_run_is_one_json_line_in_order(start_gportmap, echo_target) -> None:
    port = free_port()
    gp = start_gportmap([tcp_rule(port, echo_target.port, name="echo")])
    clients = []
    for count in range(1, 21):  # one at a time: the order of their records is known
        with connect(port) as sock:
            host, client_port = sock.getsockname()
            clients.append(f"{host}:{client_port}")
            sock.sendall(b"x")
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b"x"
        gp.wait_event("connection_closed", count=count)
    for _ in range(25):  # then a burst of 200: none lost
        round_trips(port, 8)
    gp.wait_event("connection_closed", count=220)
    gp.signal(signal.SIGTERM)
    assert gp.wait_exit() == 0

    records = gp.events()  # parses every line as one JSON object
    assert len(records) == len(gp.lines())
    closed = [r["client"] for r in records if r["event"] == "connection_closed"]
    assert closed[:20] == clients and len(set(closed)) == len(closed) == 220
    events = [r["event"] for r in records]
    assert events.index("started") < events.index("connection_closed")
    assert events[-1] == "stopped" and "stopping" in events  # written before the process ended
    assert DROP_EVENT not in events


@pytest.mark.parametrize(
    "log_format,args,env,expected",
    [
        ("json", (), {}, "config_invalid"),
        ("text", (), {}, "config_invalid"),
        ("json", ("--workers", "2"), {"GPORTMAP_PORTABLE": "1"}, "usage_error"),
    ],
    ids=["invalid_rules_json", "invalid_rules_text", "workers_without_reuseport"],
)
def test_a_fatal_start_up_error_is_printed_before_exit(tmp_path: Path, log_format, args, env, expected) -> None:
    rules = [tcp_rule(free_port(), 9, name="r")]
    if expected == "config_invalid":
        rules.append({**tcp_rule(70000, 9), "listenPrt": 1})
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(rules))
    result = subprocess.run(
        [sys.executable, "-m", "gportmap", str(path), "--log-format", log_format, "--admin", "off", *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    assert result.returncode == 2, result.stderr
    if log_format == "text":
        assert f"ERROR {expected}: " in result.stderr
        assert f"  {path}: rules[1].listenPrt: unknown key (did you mean 'listenPort'?)" in result.stderr
        return
    (record,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert record["event"] == expected and record["level"] == "ERROR"


def test_records_logged_just_before_exit_are_all_written_before_it() -> None:
    """The writer is a native thread that exit does not wait for: the exit flush
    (atexit) is what writes the records a process logs right before it ends.

    The program logs far more than its stderr pipe holds while the test reads
    nothing, then exits; its atexit hooks run last registered, first run: ``exiting``
    (on stdout) says it has reached exit with the writer still held up, and ``end``,
    written straight to stderr, comes after the flush. The test reads stderr only
    once ``exiting`` is out: every record must be there, before ``end``."""
    count = 5000
    program = (
        "import atexit, logging, os, sys\n"
        "from gevent import monkey\n"
        "monkey.patch_all()\n"
        "atexit.register(os.write, 2, b'{\"event\": \"end\"}\\n')\n"
        "from gportmap.log import StderrQueue, get_logger, setup_logging\n"
        "StderrQueue.max_lines = StderrQueue.max_bytes = sys.maxsize\n"
        "StderrQueue.exit_flush_timeout = 60.0\n"
        "setup_logging('json', 'INFO')\n"
        "atexit.register(print, 'exiting', flush=True)\n"
        "for i in range(int(sys.argv[1])):\n"
        "    get_logger().error('tick', extra={'event': 'tick', 'i': i, 'pad': 'x' * 2000})\n"
        "sys.exit(2)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", program, str(count)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert select.select([proc.stdout], [], [], 60)[0], "the program did not reach exit"
        assert proc.stdout.readline() == b"exiting\n"
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == 2
    records = [json.loads(line) for line in stderr.splitlines()]
    assert [r.get("i") for r in records] == [*range(count), None]
    assert records[-1] == {"event": "end"}


# -- the queue itself, in this process, on a pipe the test controls --------------------


@pytest.fixture
def blocked_pipe() -> Iterator[tuple[int, int]]:
    """(read end, write end) of a pipe already full: the next blocking write waits."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        while True:
            os.write(write_end, b"." * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(write_end, True)
    yield read_end, write_end
    for fd in (read_end, write_end):
        os.close(fd)


def queue_logger(queue: StderrQueue, formatter: logging.Formatter, worker: int | None = None) -> logging.Logger:
    handler = StderrQueueHandler(queue)
    handler.setFormatter(formatter)
    if worker is not None:
        handler.addFilter(_WorkerField(worker))
    queue.report_with(handler)
    logger = logging.Logger(f"test_logging.{id(queue)}", logging.INFO)
    logger.addHandler(handler)
    return logger


def emit_all(logger: logging.Logger, count: int) -> None:
    """Log ``count`` records from another thread; fail if that thread is held up
    (a handler that waited for the writer would be)."""
    thread = threading.Thread(
        target=lambda: [logger.info("record %d", i, extra={"event": "tick", "i": i}) for i in range(count)],
        daemon=True,
    )
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "logging blocked on a stderr nobody reads"


def read_until_last_line_has(read_end: int, word: bytes) -> str:
    """Read the pipe until its last complete line holds ``word``."""
    data = bytearray()

    def done() -> bool:
        if select.select([read_end], [], [], 0.1)[0]:
            data.extend(os.read(read_end, 1 << 20))
        return data.endswith(b"\n") and word in data[data.rfind(b"\n", 0, -1) :]

    wait_for(done, timeout=30, what=word)
    return data.decode()


@pytest.mark.parametrize("bound", ["max_lines", "max_bytes"])
def test_a_full_queue_drops_counts_and_reports_in_the_current_format(blocked_pipe, monkeypatch, bound) -> None:
    read_end, write_end = blocked_pipe
    monkeypatch.setattr(StderrQueue, bound, 10 if bound == "max_lines" else 1000)
    queue = StderrQueue(write_end)
    try:
        logger = queue_logger(queue, TextFormatter(), worker=3)
        emit_all(logger, 200)
        assert queue.dropped() > 0
        text = read_until_last_line_has(read_end, DROP_EVENT.encode())
    finally:
        queue.close()
    lines = text.lstrip(".").splitlines()
    (report,) = [line for line in lines if f" {DROP_EVENT}: " in line]
    assert " WARNING " in report and "worker=3" in report
    assert f"dropped={queue.dropped()}" in report
    written = [line for line in lines if " tick: " in line]
    assert len(written) + queue.dropped() == 200  # every record written or counted
    assert [int(line.split(" i=")[1].split()[0]) for line in written] == sorted(
        int(line.split(" i=")[1].split()[0]) for line in written
    )


def test_lines_come_out_whole_and_in_order_as_json(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    with open(path, "wb") as out:
        queue = StderrQueue(out.fileno())
        logger = queue_logger(queue, EventJsonFormatter(), worker=1)
        for i in range(5000):
            logger.info("record %d", i, extra={"event": "tick", "i": i, "pad": "x" * (i % 700)})
        assert queue.flush(30)
        queue.close()
    records = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert [r["i"] for r in records] == list(range(5000))
    assert {r["worker"] for r in records} == {1} and queue.dropped() == 0
