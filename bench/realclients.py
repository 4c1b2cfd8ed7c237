"""Real clients through the proxies (issue 23): pgbench against a throwaway PostgreSQL
and dnsperf against dnsmasq, both on loopback, for the comparison's "pgbench" and
"dns" workloads. Small request/reply round trips are where users feel a proxy, and
these are the clients they would measure it with.

PostgreSQL: ``initdb`` in a temp dir of its own (as the ``postgres`` user, else
``nobody``, when the bench runs as root: the server refuses root), then ``postgres``
listening on 127.0.0.1 at a free port only (no unix socket, fsync off: nothing here is
worth keeping), ``pgbench -i -s 1``; stopped with its process group and its directory
removed after. dnsmasq: answers every name under ``bench.test`` from its ``address=``
entry (no upstream, no hosts file, no cache to warm), on 127.0.0.1 at a free UDP
port; dnsperf reads a bounded query file of ``QUERY_NAMES`` names in a loop.

Each measurement is bounded in time and raises RuntimeError with the tool's words when
it did not measure.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from anchors import Processes, log_reason, wait_udp_answering
from common import LOOPBACK, free_port

#: Where Debian's PostgreSQL packages put the server's programs (one folder a version).
POSTGRES_GLOB = "/usr/lib/postgresql/*/bin"
#: The role ``initdb`` creates and every client logs in as (trust authentication:
#: loopback only, thrown away after).
PG_USER = "bench"
PG_DATABASE = "postgres"
#: pgbench's concurrent clients: a handful of sessions, each a backend process of
#: the server, on two cores shared with the proxy and pgbench.
PGBENCH_CLIENTS = 8
#: dnsmasq answers every name under this domain with 127.0.0.1.
DNS_DOMAIN = "bench.test"
#: Distinct names in dnsperf's query file, which it reads over and over.
QUERY_NAMES = 1000
#: Queries dnsperf keeps in flight (its default).
DNSPERF_OUTSTANDING = 100


def postgres_bindir() -> Path | None:
    """The folder of ``postgres``, ``initdb`` and ``pgbench`` (the newest version
    installed), or None."""
    found = shutil.which("postgres")
    candidates = [Path(found).parent] if found else []

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    candidates += sorted((Path(p) for p in glob.glob(POSTGRES_GLOB)), key=version, reverse=True)
    for folder in candidates:
        if all((folder / tool).exists() for tool in ("postgres", "initdb", "pgbench")):
            return folder
    return None


def missing_postgres() -> str | None:
    """Why the pgbench rows cannot run here, or None."""
    if postgres_bindir() is None:
        return "skipped: PostgreSQL (postgres, initdb, pgbench) is not installed (bench/run installs it)"
    if os.geteuid() == 0 and _server_user() is None:
        return "skipped: running as root, and neither a postgres nor a nobody user to run the server as"
    return None


def missing_dns() -> str | None:
    """Why the dnsperf rows cannot run here, or None."""
    for tool in ("dnsperf", "dnsmasq"):
        if not (shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")):
            return f"skipped: {tool} is not installed (bench/run installs it)"
    return None


def _server_user() -> pwd.struct_passwd | None:
    """Who runs the server when the bench is root (PostgreSQL refuses root)."""
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


@dataclass(frozen=True)
class Postgres:
    """A running throwaway server: its port, its process (group leader) and the
    folder to remove after it stopped."""

    port: int
    proc: subprocess.Popen
    root: Path


def start_postgres(procs: Processes, init_timeout: float = 120.0) -> Postgres:
    """initdb, start, wait until ``pgbench -i`` has made its tables; RuntimeError
    saying why when it does not (the folder is removed then)."""
    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed")
    root = Path(tempfile.mkdtemp(prefix="gportmap-bench-pg-"))
    as_user: dict[str, object] = {}
    if os.geteuid() == 0:
        user = _server_user()
        if user is None:
            raise RuntimeError("no postgres or nobody user to run the server as")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    data = root / "data"
    try:
        done = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", PG_USER, "--no-sync",
             "--no-instructions"],
            capture_output=True, text=True, timeout=init_timeout, cwd=root, **as_user,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {log_reason(done.stdout + done.stderr)}")
        port = free_port()
        proc = procs.start(
            "postgres",
            [str(bindir / "postgres"), "-D", str(data), "-p", str(port),
             "-c", f"listen_addresses={LOOPBACK}", "-c", "unix_socket_directories=",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=200"],
            cwd=root, **as_user,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {exc}") from None
    server = Postgres(port, proc, root)
    try:
        _initialise(bindir, server, time.monotonic() + init_timeout, procs)
    except RuntimeError:
        stop_postgres(procs, server)
        raise
    return server


def _initialise(bindir: Path, server: Postgres, deadline: float, procs: Processes) -> None:
    """``pgbench -i -s 1`` once the server takes connections (retried while it starts)."""
    cmd = [str(bindir / "pgbench"), "-i", "-s", "1", "-q", "-h", LOOPBACK, "-p", str(server.port),
           "-U", PG_USER, PG_DATABASE]  # fmt: skip
    last = ""
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"postgres exited ({server.proc.returncode}): {procs.log_tail('postgres')}")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=_pg_env())
        if done.returncode == 0:
            return
        last = log_reason(done.stdout + done.stderr)
        time.sleep(0.2)
    raise RuntimeError(f"pgbench -i did not succeed: {last}")


def stop_postgres(procs: Processes, server: Postgres) -> None:
    procs.stop(server.proc)
    shutil.rmtree(server.root, ignore_errors=True)


def _pg_env() -> dict[str, str]:
    """No password prompt, no ~/.pgpass or service file of the user's, a bounded
    connection wait."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    return env


def pgbench(port: int, seconds: int, connect_each: bool, clients: int = PGBENCH_CLIENTS) -> dict[str, float]:
    """``pgbench -S`` (select-only: one small query, one small answer) for ``seconds``
    through ``port``, on one thread; ``connect_each`` adds ``-C`` (a new connection per
    transaction). Transactions per second and the count done."""
    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError("pgbench is not installed")
    cmd = [str(bindir / "pgbench"), "-n", "-S", "-c", str(clients), "-j", "1", "-T", str(seconds),
           "-h", LOOPBACK, "-p", str(port), "-U", PG_USER, PG_DATABASE]  # fmt: skip
    if connect_each:
        cmd.insert(2, "-C")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, env=_pg_env())
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"pgbench ran past {seconds + 60} s") from None
    out = done.stdout + done.stderr
    tps = re.search(r"^tps = ([\d.]+)", out, re.MULTILINE)
    count = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if done.returncode != 0 or not tps or not count or int(count.group(1)) <= 0:
        raise RuntimeError(f"pgbench failed ({done.returncode}): {log_reason(out)}")
    return {
        "rate": float(tps.group(1)),
        "transactions": int(count.group(1)),
        "failed": int(failed.group(1)) if failed else 0,
    }


# --- DNS ------------------------------------------------------------------------------


def dns_query(name: str = f"probe.{DNS_DOMAIN}", ident: int = 0x4242) -> bytes:
    """One DNS query for ``name`` type A class IN, recursion desired: the readiness
    probe of the proxies in front of dnsmasq (an echo's ``?`` gets no answer there)."""
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
    return (
        ident.to_bytes(2, "big")
        + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        + labels
        + b"\x00\x00\x01\x00\x01"
    )


def write_query_file(folder: Path) -> Path:
    """dnsperf's input: ``QUERY_NAMES`` distinct A queries, read in a loop."""
    path = folder / "dnsperf-queries.txt"
    path.write_text("".join(f"q{i}.{DNS_DOMAIN} A\n" for i in range(QUERY_NAMES)))
    return path


def start_dnsmasq(procs: Processes) -> tuple[subprocess.Popen, int]:
    """dnsmasq in the foreground on 127.0.0.1 at a free UDP port, answering
    ``*.bench.test`` itself (no upstream, no hosts file, no pid file, no query log);
    the process and its port once it answers a query."""
    dnsmasq = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin") or "dnsmasq"
    why = ""
    for _ in range(START_ATTEMPTS):
        port = free_dns_port()
        proc = procs.start(
            "dnsmasq",
            [dnsmasq, "--keep-in-foreground", f"--port={port}", f"--listen-address={LOOPBACK}",
             "--bind-interfaces", "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--pid-file=",
             f"--address=/{DNS_DOMAIN}/127.0.0.1"],
        )  # fmt: skip
        try:
            wait_udp_answering(port, proc, probe=dns_query())
            return proc, port
        except RuntimeError as exc:
            procs.stop(proc)
            why = f"{exc}; {log_reason(procs.log_tail('dnsmasq'))}"
    raise RuntimeError(f"dnsmasq did not answer after {START_ATTEMPTS} attempts: {why}")


#: dnsmasq binds its port for TCP too: a port free for UDP may be one of the TCP
#: ports a busy loopback has in use; another is tried this many times.
START_ATTEMPTS = 5


def free_dns_port() -> int:
    """A loopback port free for UDP and for TCP at this moment (dnsmasq binds both)."""
    for _ in range(50):
        port = free_port(socket.SOCK_DGRAM)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((LOOPBACK, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no loopback port free for both UDP and TCP in 50 tries")


def dnsperf(port: int, seconds: int, queries: Path) -> dict[str, float]:
    """dnsperf from one client port (``-c 1``), ``DNSPERF_OUTSTANDING`` queries in flight,
    for ``seconds`` through ``port``: queries per second, completed and lost."""
    cmd = ["dnsperf", "-s", LOOPBACK, "-p", str(port), "-d", str(queries), "-l", str(seconds),
           "-c", "1", "-q", str(DNSPERF_OUTSTANDING), "-t", "1"]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"dnsperf ran past {seconds + 30} s") from None
    out = done.stdout + done.stderr
    qps = re.search(r"Queries per second:\s+([\d.]+)", out)
    completed = re.search(r"Queries completed:\s+(\d+)", out)
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    if done.returncode != 0 or not qps or not completed or int(completed.group(1)) <= 0:
        raise RuntimeError(f"dnsperf failed ({done.returncode}): {log_reason(out)}")
    return {
        "rate": float(qps.group(1)),
        "queries": int(completed.group(1)),
        "lost": int(lost.group(1)) if lost else 0,
    }
