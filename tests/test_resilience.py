"""A process with very few file descriptors keeps running, refuses what they cannot
carry, logs in JSON at a bounded rate, and serves again once load ends. (Running
out of descriptors altogether, past the connection cap: tests/test_faults.py.)"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

from conftest import connect, free_port, recv_exactly, tcp_rule, wait_for


def test_a_tiny_fd_limit_is_survived_and_logged_as_json(tmp_path: Path, echo_target) -> None:
    port = free_port()
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([tcp_rule(port, echo_target.port, name="tight")]))
    log = tmp_path / "log"

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gportmap", str(rules), "--log-format", "json"],
            stderr=out,
            stdin=subprocess.DEVNULL,
            preexec_fn=low_fd_limit,
        )
    clients: list[socket.socket] = []
    try:

        def events(name: str) -> list[dict]:
            return [r for r in map(json.loads, log.read_text().splitlines()) if r["event"] == name]

        wait_for(lambda: events("started"), what="start")
        capped = events("connections_capped")
        assert capped and capped[0]["open_files"] == 48 and capped[0]["limit"] == 1
        for _ in range(120):
            sock = socket.socket()
            sock.settimeout(5)
            sock.connect(("127.0.0.1", port))
            clients.append(sock)
        rejected = wait_for(
            lambda: len(events("connection_rejected")) and events("connection_rejected"),
            what="connections past the cap refused",
        )
        assert all(r["reason"] == "limit" for r in rejected)
        assert len(rejected) <= 10, "rejections are logged at a bounded rate"
        assert proc.poll() is None
        for sock in clients:
            sock.close()
        clients.clear()

        def serves() -> bool:
            try:
                with connect(port, timeout=2) as sock:
                    sock.sendall(b"back")
                    return recv_exactly(sock, 4) == b"back"
            except OSError:
                return False

        wait_for(serves, timeout=20, interval=0.2, what="service to resume")
        assert len(events("internal_error")) <= 10  # rate-limited, not one per retry
        for line in log.read_text().splitlines():
            json.loads(line)  # every line on stderr is JSON, hub errors included
    finally:
        for sock in clients:
            sock.close()
        proc.kill()
        proc.wait()
    assert os.path.exists(log)


def test_a_cap_that_takes_little_is_info_and_one_that_takes_much_a_warning(tmp_path: Path, echo_target) -> None:
    """issue 24: a 20,000 open-file limit holds the default 10,000 connections to
    9,967; that is no reason for a WARNING at every start. A limit that takes a real
    share away still is one."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limits = [256] + ([20_000] if hard == resource.RLIM_INFINITY or hard >= 20_000 else [])
    levels = {}
    for limit in limits:
        rules = tmp_path / f"rules-{limit}.json"
        rules.write_text(json.dumps([tcp_rule(free_port(), echo_target.port, name="r")]))
        log = tmp_path / f"log-{limit}"

        def set_limit(limit: int = limit) -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gportmap", str(rules), "--log-format", "json"],
                stderr=out, stdin=subprocess.DEVNULL, preexec_fn=set_limit,
            )
        try:
            def capped(log: Path = log) -> list[dict]:
                records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
                return [r for r in records if r["event"] == "connections_capped"]

            levels[limit] = wait_for(capped, what=f"connections_capped at {limit}")[0]["level"]
        finally:
            proc.kill()
            proc.wait()
    assert levels.pop(256) == "WARNING"  # 96 of 10,000
    assert all(level == "INFO" for level in levels.values()), levels  # 9,967 of 10,000
