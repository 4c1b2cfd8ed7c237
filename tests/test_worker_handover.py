"""A worker the master restarts on purpose hands its connections over (issue 21):
it re-executes itself in place (same PID) carrying its listeners, plain TCP
connections and UDP sessions, as in an upgrade. And an upgrade of the master that
meets a worker mid-restart leaves no orphan and no slot with two workers.

gportmap runs as a subprocess with ``--workers 2``; every peer is real. The
generation mismatch is real too: a plugin (written here, loaded by dotted path
from gportmap's working directory) that turns one worker process sick, for its
whole life, when it finds a poison file naming that worker: every later apply of
that process fails, and only a fresh program recovers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import LOOPBACK, connect, echoes, free_port, recv_exactly, tcp_rule, wait_for
from test_upgrade import (
    ShortConnections,
    Stream,
    StreamPeer,
    UdpEchoLoop,
    UdpEchoTarget,
    abandon_traffic,
    end_traffic,
    open_fds,
    rule,
    settings,
    upgrade,
)

#: Plugins of these tests, by dotted path (``worker_samples:Sickly``): gportmap runs
#: with the test's directory as its working directory, which ``python -m`` puts on
#: its path (and its workers', and the pre-flight's).
SAMPLES = '''
import os
import sys
import time

from gportmap.plugins import Plugin


def worker_index():
    """This process's worker index, or None (the master, the pre-flight)."""
    if "--worker-index" not in sys.argv:
        return None
    return sys.argv[sys.argv.index("--worker-index") + 1]


def take(path):
    """The file at ``path`` if it names this worker, taken (renamed: one taker)."""
    try:
        with open(path) as file:
            named = file.read().strip()
        if named != worker_index():
            return False
        os.rename(path, path + ".taken")
        return True
    except OSError:
        return False


class Sickly(Plugin):
    """Built in a worker named by the poison file: that process turns sick, and
    every later build in it fails (a process-wide state gone bad, as a leaked
    module state or a spent resource would leave it). A fresh program is well."""

    sick = False

    def __init__(self, options):
        super().__init__(options)
        if not Sickly.sick and take(options["poison"]):
            Sickly.sick = True
        if Sickly.sick:
            raise RuntimeError(f"worker {worker_index()} (pid {os.getpid()}) is sick")


def slow_check():
    """In the installed code's pre-flight (``--check``) only: take as many seconds
    as the file ``slow_check`` beside this module says, once (the file is taken)."""
    if "--check" not in sys.argv:
        return
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow_check")
    try:
        with open(path) as file:
            seconds = float(file.read())
        os.rename(path, path + ".taken")
    except (OSError, ValueError):
        return
    time.sleep(seconds)


slow_check()


class SlowStart(Plugin):
    """Built in a worker named by the marker file: that one start takes
    ``seconds`` (the marker is taken: later starts are quick)."""

    def __init__(self, options):
        super().__init__(options)
        if take(options["marker"]):
            time.sleep(options["seconds"])
'''


def write_samples(tmp_path: Path) -> None:
    (tmp_path / "worker_samples.py").write_text(SAMPLES)


def running_workers(gp) -> list[dict]:
    return [w for w in gp.admin_json("/stats")["workers"] if w["state"] == "running"]


def worker_tree(gp) -> list[tuple[int, str, str]]:
    """The master's worker processes as the kernel has them: (pid, status, worker
    index); its other children (the pre-flight's ``--check``) left out."""
    found = []
    for child in psutil.Process(gp.pid).children():
        try:
            cmdline, status = child.cmdline(), child.status()
        except psutil.NoSuchProcess:
            continue
        if "--worker-index" in cmdline:
            found.append((child.pid, status, cmdline[cmdline.index("--worker-index") + 1]))
    return sorted(found, key=lambda item: item[2])


def workers_rules(tmp_path: Path, sick_port: int, *rules: dict, generation: int = 1) -> dict:
    """The rules, with an idle rule whose plugin makes the poisoned worker sick (its
    options change with ``generation``: the rules file changes)."""
    sick = tcp_rule(sick_port, 9, name="sick", plugins=[
        {"name": "worker_samples:Sickly", "options": {"poison": str(tmp_path / "poison"), "generation": generation}}])
    return {"rules": [*rules, sick], "settings": settings()}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_worker_stuck_on_an_old_generation_is_restarted_in_place_losing_nothing(
    start_gportmap, echo_target, tmp_path
):
    """Worker 1 fails every apply of generation 2 (sick for its whole life):
    after ``resync_restart_after`` failed resyncs the master restarts it in place.
    Meanwhile checksummed streams, UDP echo loops and a loop of short connections
    run: nothing refused, broken, lost or reordered; the worker keeps its PID,
    comes back on generation 2, and carried its connections and sessions (its
    ``upgraded`` record); the counters in ``/stats`` go on and the descriptors come
    back to their idle count."""
    write_samples(tmp_path)
    peer, udp_target = StreamPeer(), UdpEchoTarget()
    stream_port, short_port, udp_port = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    sick_port = free_port()
    plain = [
        tcp_rule(stream_port, peer.server.port, name="streams"),
        tcp_rule(short_port, echo_target.port, name="shorts"),
        {"protocol": "udp", "listenHost": LOOPBACK, "listenPort": udp_port, "targetHost": LOOPBACK,
         "targetPort": udp_target.port, "name": "dns", "sessionTimeout": 10},
    ]
    first = workers_rules(tmp_path, sick_port, *plain)
    gp = start_gportmap(first, "--workers", "2")
    errors: list[str] = peer.errors
    streams: list[Stream] = []
    loops: list[UdpEchoLoop] = []
    shorts = None
    try:
        wait_for(lambda: len(running_workers(gp)) == 2, 30, what="two workers")
        pids = {w["index"]: w["pid"] for w in running_workers(gp)}
        processes = sorted([gp.pid, *pids.values()])
        idle_fds = {p: open_fds(p) for p in processes}
        streams = [Stream(stream_port, 1000 * (i + 1), errors) for i in range(16)]
        loops = [UdpEchoLoop(client, udp_port, errors) for client in range(6)]
        shorts = ShortConnections(short_port)
        wait_for(lambda: all(s.progress() > 0 for s in streams) and all(loop.answered for loop in loops), 30,
                 what="every stream and echo loop moving")
        on_worker_1 = [c for c in gp.admin_json("/connections") if c.get("worker") == 1]
        assert on_worker_1, "the kernel gave worker 1 none of the streams: nothing to carry"
        # its UDP sessions: its sockets connected to the UDP target (/connections lists TCP only)
        sessions_1 = sum(bool(c.raddr) and c.raddr.port == udp_target.port
                         for c in psutil.Process(pids[1]).net_connections(kind="udp"))
        before = rule(gp, "streams")

        (tmp_path / "poison").write_text("1")
        second = workers_rules(tmp_path, sick_port, *plain, generation=2)
        gp.rules_path.write_text(json.dumps(second))
        status, body, _ = gp.admin("/reload", "POST")
        assert status == 200, body
        invalid = gp.wait_event("worker_config_invalid", 30, worker=1)[0]
        assert "is sick" in json.dumps(invalid["errors"])
        resyncs = gp.wait_event("worker_resync", 60, count=3, worker=1)
        assert all((r["had"], r["wanted"]) == (1, 2) for r in resyncs)
        restarting = gp.wait_event("worker_restarting", 60, worker=1)[0]
        assert (restarting["reason"], restarting["pid"], restarting["generation"]) == ("generation", pids[1], 1)
        gp.wait_event("worker_restarted", 60, worker=1, pid=pids[1])
        carried = [e for e in gp.events("upgraded") if e.get("worker") == 1]
        assert len(carried) == 1 and carried[0]["lost"] == 0, carried
        streams_1 = sum(c["rule"] == "streams" for c in on_worker_1)
        # every stream and UDP session it held (and a short connection or two, maybe)
        assert carried[0]["sessions"] == sessions_1 and carried[0]["carried"] >= streams_1 + sessions_1, carried
        wait_for(lambda: {w["index"]: w["generation"] for w in running_workers(gp)} == {0: 2, 1: 2}, 30,
                 what="both workers on generation 2")
        workers = {w["index"]: w for w in running_workers(gp)}
        assert {index: w["pid"] for index, w in workers.items()} == pids, "the same processes (PIDs kept)"
        assert workers[1]["restarts_in_place"] == 1 and workers[1]["restarts"] == 0
        assert not gp.events("worker_exited")
        after = rule(gp, "streams")
        assert after["connections"]["total"] >= before["connections"]["total"]
        assert after["bytes"]["received"] >= before["bytes"]["received"]

        marks = [s.progress() for s in streams]
        wait_for(lambda: all(s.progress() > m for s, m in zip(streams, marks)), 30, what="every stream moving on")
        end_traffic(shorts, streams, peer)
        for loop in loops:
            loop.finish()
        assert not errors, errors
        assert shorts.refused == 0 and not shorts.broken, (shorts.refused, shorts.broken[:5])
        for stream in streams:  # every byte arrived, in order (checked as it came), none extra
            assert stream.receiver.ended.is_set()
            assert stream.receiver.received == peer.senders[stream.seed].sent
            assert peer.receivers[stream.seed].received == stream.sender.sent
        lost = {loop.client: sorted(loop.outstanding) for loop in loops if loop.outstanding}
        assert not lost, f"datagrams lost: {lost}"
        assert {client: len(ports) for client, ports in udp_target.sources.items()} == dict.fromkeys(range(6), 1)

        uploaded = sum(s.sender.sent + 8 for s in streams)
        downloaded = sum(peer.senders[s.seed].sent for s in streams)
        sent = sum(loop.sent for loop in loops)
        expected = {"total": len(streams), "received": uploaded, "sent": downloaded, "shorts": shorts.done,
                    "sessions": len(loops), "datagrams": sent}

        def figures() -> dict:  # the master's sums follow its workers' pushes
            streams_rule, dns = rule(gp, "streams"), rule(gp, "dns")
            return {"total": streams_rule["connections"]["total"], **streams_rule["bytes"],
                    "shorts": rule(gp, "shorts")["connections"]["total"],
                    "sessions": dns["connections"]["total"], "datagrams": dns["udp"]["packets_received"]}

        try:
            wait_for(lambda: figures() == expected, 15, what="the final figures")
        except AssertionError:
            assert figures() == expected
        wait_for(lambda: rule(gp, "dns")["udp"]["sessions"] == 0, 30, what="the sessions expired")
        wait_for(lambda: {p: open_fds(p) for p in processes} == idle_fds, 30,
                 what=f"the idle descriptor counts {idle_fds}")
        record = carried[0]
        print(f"\nrestart in place of worker 1: carried {record['carried']} ({record['sessions']} UDP sessions), "
              f"pause {record['pause'] * 1000:.0f} ms, {record['per_connection_us']:.0f} us per connection")
    finally:
        abandon_traffic(shorts, streams, peer)
        for loop in loops:
            loop.finish()
        udp_target.close()


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize(("seconds", "stopped"), [(6, []), (25, [1])], ids=["comes-up", "too-slow"])
def test_a_worker_restarting_during_the_masters_upgrade_leaves_one_worker_per_slot(
    start_gportmap, echo_target, tmp_path, seconds, stopped
):
    """Worker 1 is killed right before SIGUSR2 and its next start is slow: the
    master's upgrade waits for it (``WorkerPool.settle_timeout``, 15 s) and, when it
    comes up, hands it over too; when it does not, stops it (reaped) for the new
    master to start. Either way: no process outlives its master's exec, no zombie,
    never two processes on a slot (the process tree, sampled throughout), both
    serving after. Before, the hand-over skipped a starting worker: it outlived the
    exec next to the worker the new master started on its slot."""
    write_samples(tmp_path)
    port = free_port()
    slow = tcp_rule(free_port(), 9, name="slow", plugins=[
        {"name": "worker_samples:SlowStart", "options": {"marker": str(tmp_path / "slow"), "seconds": seconds}}])
    gp = start_gportmap({"rules": [tcp_rule(port, echo_target.port), slow], "settings": settings()},
                        "--workers", "2")
    wait_for(lambda: len(running_workers(gp)) == 2, 30, what="two workers")
    pids = {w["index"]: w["pid"] for w in running_workers(gp)}
    (tmp_path / "slow").write_text("1")
    most: dict[str, int] = {}  # the most processes seen at once on each slot
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            try:
                tree = worker_tree(gp)
            except psutil.NoSuchProcess:
                continue
            for slot in {index for _, _, index in tree}:
                alive = [pid for pid, status, index in tree if index == slot and status != psutil.STATUS_ZOMBIE]
                most[slot] = max(most.get(slot, 0), len(alive))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    psutil.Process(pids[1]).kill()
    try:
        upgrade(gp, 1, timeout=90)
    finally:
        done.set()
        sampler.join(10)
    assert most == {"0": 1, "1": 1}, f"processes on a slot at once: {most}"
    assert not gp.events("master_gone"), "a worker outlived its master's exec"
    assert (tmp_path / "slow.taken").exists(), "the restarted worker's start was slow"

    def one_per_slot() -> bool:
        tree = worker_tree(gp)
        return [index for _, _, index in tree] == ["0", "1"] and psutil.STATUS_ZOMBIE not in [s for _, s, _ in tree]

    assert one_per_slot(), worker_tree(gp)
    workers = running_workers(gp)
    assert sorted(w["pid"] for w in workers) == sorted(pid for pid, _, _ in worker_tree(gp))
    assert next(w for w in workers if w["index"] == 0)["pid"] == pids[0]
    wait_for(lambda: len({w["generation"] for w in running_workers(gp)}) == 1, 10, what="one generation")
    # a while later still: no second worker 1 appears, none exits
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert one_per_slot(), worker_tree(gp)
        time.sleep(0.2)
    # the one the test killed, and the one the upgrade stopped (if any)
    assert len(gp.events("worker_exited")) == 1 + len(stopped)
    assert echoes(port)
    settled = gp.events("workers_settled")
    assert len(settled) == 1 and settled[0]["stopped"] == stopped, settled


def ctl(*args: str) -> subprocess.CompletedProcess:
    """``gportmap ctl`` as a user runs it."""
    environ = {k: v for k, v in os.environ.items() if k not in ("GPORTMAP_TOKEN", "CONFIG_PATH")}
    return subprocess.run([sys.executable, "-m", "gportmap", "ctl", *args], capture_output=True, text=True,
                          timeout=120, env=environ, check=False)


@pytest.mark.slow
def test_an_operator_restarts_a_worker_in_place(start_gportmap, echo_target):
    """``gportmap ctl restart-worker N`` (``POST /workers/restart?worker=N``): the
    worker re-executes in place, its open connection carried and still echoing, its
    PID kept; the master logs why (``operator``). Asking for a worker that does not
    exist, or without saying which, changes nothing."""
    port = free_port()
    gp = start_gportmap({"rules": [tcp_rule(port, echo_target.port)], "settings": settings()}, "--workers", "2")
    wait_for(lambda: len(running_workers(gp)) == 2, 30, what="two workers")
    pids = {w["index"]: w["pid"] for w in running_workers(gp)}
    admin = f"{LOOPBACK}:{gp.admin_port}"
    with connect(port) as held:
        held.sendall(b"1")
        assert recv_exactly(held, 1) == b"1"
        (entry,) = gp.admin_json("/connections")
        index = entry["worker"]
        done = ctl("--admin", admin, "restart-worker", str(index))
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert f"worker {index} restarted in place" in done.stdout
        held.sendall(b"2")
        assert recv_exactly(held, 1) == b"2"
        restarting = gp.wait_event("worker_restarting", 10, worker=index)[0]
        assert (restarting["reason"], restarting["pid"]) == ("operator", pids[index])
        gp.wait_event("worker_restarted", 10, worker=index)
        (record,) = [e for e in gp.events("upgraded") if e.get("worker") == index]
        assert (record["carried"], record["lost"], record["sessions"], record["pid"]) == (1, 0, 0, pids[index])
        assert {w["index"]: w["pid"] for w in running_workers(gp)} == pids
        assert next(w for w in running_workers(gp) if w["index"] == index)["restarts_in_place"] == 1
        missing = ctl("--admin", admin, "restart-worker", "7")
        assert missing.returncode == 1 and "there is no worker 7" in missing.stderr
        status, body, _ = gp.admin("/workers/restart", "POST")
        assert status == 400 and b"say which worker" in body
        assert len(gp.events("worker_restarting")) == 1
        held.sendall(b"3")
        assert recv_exactly(held, 1) == b"3"
    assert not gp.events("worker_exited") and echoes(port)


def test_restarting_a_worker_without_workers_is_refused(start_gportmap, echo_target):
    """A single process has no worker to restart: 409, and nothing happens."""
    port = free_port()
    gp = start_gportmap({"rules": [tcp_rule(port, echo_target.port)], "settings": settings()})
    status, body, _ = gp.admin("/workers/restart?worker=0", "POST")
    assert status == 409 and b"without workers" in body
    assert not gp.events("upgrade_started") and echoes(port)


@pytest.mark.slow
def test_a_restart_the_installed_code_cannot_take_is_not_done(start_gportmap, echo_target):
    """The master checks the installed code against the rules file first (as for an
    upgrade): when that fails (here the file became invalid), the worker is not
    touched (no ``upgrade_started`` of its own) and its connection goes on."""
    port = free_port()
    gp = start_gportmap({"rules": [tcp_rule(port, echo_target.port)], "settings": settings()}, "--workers", "2")
    wait_for(lambda: len(running_workers(gp)) == 2, 30, what="two workers")
    pids = {w["index"]: w["pid"] for w in running_workers(gp)}
    with connect(port) as held:
        held.sendall(b"1")
        assert recv_exactly(held, 1) == b"1"
        gp.rules_path.write_text("{not json")
        status, body, _ = gp.admin("/workers/restart?worker=1", "POST", timeout=60)
        assert status == 409 and b"cannot take over" in body, body
        failed = gp.wait_event("worker_restart_failed", 10, worker=1)[0]
        assert failed["reason"] == "operator" and "exited 2" in failed["error"]
        assert not gp.events("upgrade_started") and not gp.events("worker_restarted")
        assert {w["index"]: w["pid"] for w in running_workers(gp)} == pids
        held.sendall(b"2")
        assert recv_exactly(held, 1) == b"2"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_restart_while_another_is_under_way_is_refused_not_queued(start_gportmap, echo_target, tmp_path):
    """Two operators restart two workers at once: the second asks while the first's
    pre-flight runs (held 3 s here). The second is refused at once (409, "under
    way", ``worker_restart_failed``), the first completes, and the refused one was
    not queued behind it: worker 1 keeps its count of restarts in place until it is
    asked again, and then restarts once."""
    write_samples(tmp_path)
    port = free_port()
    gp = start_gportmap(workers_rules(tmp_path, free_port(), tcp_rule(port, echo_target.port)), "--workers", "2")
    wait_for(lambda: len(running_workers(gp)) == 2, 30, what="two workers")
    pids = {w["index"]: w["pid"] for w in running_workers(gp)}
    (tmp_path / "slow_check").write_text("3")
    first: dict[str, object] = {}

    def restart_first() -> None:
        status, body, _ = gp.admin("/workers/restart?worker=0", "POST", timeout=60)
        first.update(status=status, body=body)

    thread = threading.Thread(target=restart_first, daemon=True)
    thread.start()
    gp.wait_event("worker_restarting", 10, worker=0)
    wait_for(lambda: (tmp_path / "slow_check.taken").exists(), 10, what="the first restart's pre-flight under way")
    status, body, _ = gp.admin("/workers/restart?worker=1", "POST", timeout=10)
    assert status == 409 and b"under way" in body, (status, body)
    assert not gp.events("worker_restarted"), "the first restart ended before the second asked: no overlap"
    refused = gp.wait_event("worker_restart_failed", 10, worker=1)[0]
    assert refused["reason"] == "operator" and "under way" in refused["error"]
    thread.join(60)
    assert first.get("status") == 200, first
    gp.wait_event("worker_restarted", 10, worker=0)
    assert [e["worker"] for e in gp.events("worker_restarting")] == [0]
    workers = {w["index"]: w for w in running_workers(gp)}
    assert (workers[0]["restarts_in_place"], workers[1]["restarts_in_place"]) == (1, 0)
    assert {i: w["pid"] for i, w in workers.items()} == pids  # in place: the same processes
    # asked again, worker 1 restarts, once
    status, body, _ = gp.admin("/workers/restart?worker=1", "POST", timeout=60)
    assert status == 200, (status, body)
    assert [e["worker"] for e in gp.events("worker_restarting")] == [0, 1]
    assert next(w for w in running_workers(gp) if w["index"] == 1)["restarts_in_place"] == 1
    assert echoes(port)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_restart_asked_during_an_upgrade_is_refused(start_gportmap, echo_target, tmp_path):
    """An operator restarts worker 0 while the master's upgrade is handing the
    workers on (worker 1's upgraded program is starting, held 4 s here): refused
    at once (409, "under way", ``worker_restart_failed``), never queued; the
    upgrade completes (both workers and the master, same PIDs) and a restart asked
    after it goes ahead."""
    write_samples(tmp_path)
    port = free_port()
    slow = tcp_rule(free_port(), 9, name="slow", plugins=[
        {"name": "worker_samples:SlowStart", "options": {"marker": str(tmp_path / "slow"), "seconds": 4}}])
    gp = start_gportmap({"rules": [tcp_rule(port, echo_target.port), slow], "settings": settings()},
                        "--workers", "2")
    wait_for(lambda: len(running_workers(gp)) == 2, 30, what="two workers")
    pids = {w["index"]: w["pid"] for w in running_workers(gp)}
    (tmp_path / "slow").write_text("1")
    gp.signal(signal.SIGUSR2)
    wait_for(lambda: (tmp_path / "slow.taken").exists(), 60, what="worker 1's upgraded program starting")
    status, body, _ = gp.admin("/workers/restart?worker=0", "POST", timeout=10)
    assert status == 409 and b"under way" in body, (status, body)
    assert not [e for e in gp.events("upgraded") if e.get("worker") is None], "the upgrade ended first: no overlap"
    refused = gp.wait_event("worker_restart_failed", 10, worker=0)[0]
    assert refused["reason"] == "operator" and "under way" in refused["error"]
    gp.wait_event("upgraded", 60, worker=None)
    gp.wait_event("admin_started", 60, count=2)
    assert sorted(e["worker"] for e in gp.events("upgraded") if e.get("worker") is not None) == [0, 1]
    assert not gp.events("worker_restarting"), "the refused restart was queued"
    workers = {w["index"]: w for w in running_workers(gp)}
    assert {i: w["pid"] for i, w in workers.items()} == pids
    assert workers[0]["restarts_in_place"] == 0
    status, body, _ = gp.admin("/workers/restart?worker=0", "POST", timeout=60)
    assert status == 200, (status, body)
    assert [e["worker"] for e in gp.events("worker_restarting")] == [0]
    assert echoes(port)
