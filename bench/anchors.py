"""The proxies the comparison runs, each started the same way: on a free loopback port,
in front of one target, in its own process group with its config in a temp dir.

gportmap, socat, HAProxy (with and without ``option splice-auto``), nginx's stream
module and websockify are configured for forwarding only (no logs, no stats, limits
high enough for the connection-count workloads), so what is measured is the relay.
The ``tls`` transport terminates TLS on the listener and forwards plain TCP to the
target: a gportmap ``tcp`` rule with ``tls``, HAProxy ``bind ... ssl crt`` in mode
tcp, nginx stream ``listen ... ssl``, all with the same certificate.
Each is stopped with its whole process group (socat's per-connection children, nginx's
workers), and ``Processes.stop_all`` runs on every path out of the driver.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import LOOPBACK, TlsFiles, free_port, tls_client_context

NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
#: Connection and fd limits written into every proxy's config: past any workload here.
MAX_CONNECTIONS = 30000


def fd_hard_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def raise_fd_soft_limit() -> int:
    """Soft limit up to the hard one, inherited by every process started after this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the driver dies, even by SIGKILL, so a
    killed bench leaves no proxy behind (PR_SET_PDEATHSIG, Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class Processes:
    """Every process the bench starts, each the leader of its own session, so that
    stopping it stops what it forked too."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.running: list[subprocess.Popen] = []

    def start(self, name: str, cmd: list[str], **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        if "stderr" not in kwargs:
            kwargs["stderr"] = open(self.log_path(name), "ab")  # noqa: SIM115 - closed below
        try:
            proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent, **kwargs)
        finally:
            if hasattr(kwargs["stderr"], "close"):
                kwargs["stderr"].close()
        proc.bench_name = name  # type: ignore[attr-defined]
        self.running.append(proc)
        return proc

    def log_path(self, name: str) -> Path:
        return self.logdir / f"{name}.log"

    def log_tail(self, name: str, chars: int = 400) -> str:
        try:
            return self.log_path(name).read_text(errors="replace")[-chars:].strip()
        except OSError:
            return ""

    def stop(self, proc: subprocess.Popen) -> None:
        """SIGTERM to the group, SIGKILL after 5 s, and SIGKILL to whatever of the group
        outlived its leader (socat children, nginx workers)."""
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGTERM:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            break
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            self.stop(proc)


# --- commands --------------------------------------------------------------------------


def _venv_script(name: str) -> str | None:
    """A console script next to this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def gportmap_command() -> list[str]:
    script = _venv_script("gportmap")
    return [script] if script else [sys.executable, "-m", "gportmap"]


def gportmap_has_workers() -> bool:
    """Whether this gportmap's CLI takes ``--workers`` (issue 8 adds it)."""
    try:
        out = subprocess.run(
            [*gportmap_command(), "--help"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--workers" in out


@functools.cache
def _build_options(tool: str, flag: str) -> str:
    """What ``tool flag`` prints about its build (nginx -V, haproxy -vv), or ""."""
    path = _venv_script(tool)
    if path is None:
        return ""
    try:
        done = subprocess.run([path, flag], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout + done.stderr


def missing_tls(kind: str) -> str | None:
    """Why ``kind`` cannot terminate TLS here, or None: HAProxy built without OpenSSL,
    nginx without its stream SSL module, websockify (not a TLS terminator here)."""
    haproxy_build = _build_options("haproxy", "-vv") if kind == "haproxy" else ""
    if kind == "haproxy" and "USE_OPENSSL=1" not in haproxy_build and "+OPENSSL" not in haproxy_build:
        return "skipped: this HAProxy is built without OpenSSL (no bind ... ssl)"
    if kind == "nginx" and "--with-stream_ssl_module" not in _build_options("nginx", "-V"):
        return "skipped: this nginx has no stream SSL module (--with-stream_ssl_module)"
    if kind not in ("gportmap", "haproxy", "nginx"):
        return f"skipped: {kind} is not compared on TLS termination"
    return None


def missing_tool(kind: str, transport: str = "tcp") -> str | None:
    """Why the proxy ``kind`` cannot run here over ``transport``, or None."""
    need = {
        "socat": ["socat"],
        "haproxy": ["haproxy"],
        "haproxy-splice": ["haproxy"],
        "nginx": ["nginx"],
        "websockify": ["websockify"],
    }.get(kind, [])
    for tool in need:
        if not _venv_script(tool):
            return f"skipped: {tool} is not installed (bench/run installs it)"
    if kind == "nginx" and not Path(NGINX_STREAM_MODULE).exists():
        return "skipped: nginx has no stream module (apt-get install libnginx-mod-stream)"
    if transport == "tls":
        return missing_tls(kind)
    return None


#: gportmap as users run it, beside the stripped-down ``gportmap`` column (WARNING, no
#: admin endpoint, no watcher, no stats log): kind -> what the table calls it.
GPORTMAP_VARIANTS = {
    "gportmap-info": "gportmap at INFO",
    "gportmap-user": "gportmap at INFO, admin+watcher",
}


def gportmap_settings(kind: str) -> tuple[dict[str, object], list[str]]:
    """The ``settings`` and command-line flags of a gportmap ``kind``: ``gportmap``
    forwards only (WARNING, admin off, watcher off, no stats log); ``gportmap-info``
    the same at the default INFO level, which writes a record per connection to its
    stderr (a log file the bench keeps); ``gportmap-user`` is the default settings
    (INFO, admin endpoint on a free loopback port, rules-file watcher, stats log)."""
    if kind == "gportmap-user":
        return {"admin": {"listen": f"{LOOPBACK}:{free_port()}"}, "maxConnections": MAX_CONNECTIONS}, []
    level = "INFO" if kind == "gportmap-info" else "WARNING"
    settings: dict[str, object] = {
        "admin": False,
        "watch": False,
        "statsInterval": 0,
        "logLevel": level,
        "maxConnections": MAX_CONNECTIONS,
    }
    return settings, ["--admin", "off", "--log-level", level]


def reachable_connections() -> int:
    """Connections a proxy can hold here: two descriptors each, under the hard limit,
    with room for its listeners, logs and (HAProxy with splice) a few pipes."""
    return max(100, (fd_hard_limit() - 200) // 2)


def haproxy_config(port: int, target: int, splice: bool, threads: int, tls: TlsFiles | None = None) -> str:
    # maxpipes bounds the pipes splice uses (2 fds each), which HAProxy otherwise
    # reserves descriptors for (maxconn / 4 pipes) past the hard limit. With ``tls``,
    # the listener terminates TLS (HAProxy's defaults: TLS 1.2+, its session cache and
    # tickets) and the backend stays plain.
    bind = f"{LOOPBACK}:{port}" + (f" ssl crt {tls.combined}" if tls else "")
    return f"""global
    maxconn {reachable_connections()}
    nbthread {threads}
{"    maxpipes 64" if splice else ""}
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
{"    option splice-auto" if splice else ""}
frontend bench
    bind {bind}
    default_backend target
backend target
    server target {LOOPBACK}:{target}
"""


def nginx_stream_config(
    workdir: Path, port: int, target: int, udp: bool, workers: int, tls: TlsFiles | None = None
) -> str:
    """nginx stream in front of ``target``; with ``tls``, ``listen ... ssl``, TLS 1.2
    and 1.3 as gportmap and HAProxy offer (nginx before 1.23.4 leaves 1.3 out of its
    default and would be measured on TLS 1.2), its defaults otherwise (tickets on, no
    shared session cache)."""
    hard = fd_hard_limit()
    listen = (
        f"{LOOPBACK}:{port}"
        + (" udp" if udp else "")
        + (" ssl" if tls else "")
        + (" reuseport" if workers > 1 else "")
    )
    certificate = (
        f"\n        ssl_certificate {tls.cert};\n        ssl_certificate_key {tls.key};"
        "\n        ssl_protocols TLSv1.2 TLSv1.3;"
        if tls
        else ""
    )
    return f"""load_module {NGINX_STREAM_MODULE};
daemon off;
worker_processes {workers};
worker_rlimit_nofile {hard};
pid {workdir}/nginx.pid;
error_log {workdir}/error.log error;
events {{ worker_connections {max(1024, hard - 100)}; }}
stream {{
    server {{
        listen {listen};{certificate}
        proxy_pass {LOOPBACK}:{target};
        proxy_timeout 300s;
    }}
}}
"""


def nginx_http_config(workdir: Path, port: int) -> str:
    """The HTTP backend of the wrk workloads: one worker, a fixed 64-byte body, no logs,
    keep-alive connections that last the whole run."""
    body = "x" * 63
    temp = "\n".join(
        f"    {kind}_temp_path {workdir}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
{temp}
    server {{
        listen {LOOPBACK}:{port} backlog=4096;
        location / {{ return 200 "{body}\\n"; }}
    }}
}}
"""


@dataclass
class Proxy:
    """One way to reach a target; ``proc`` is None for the direct path. ``session`` is
    what a TLS listener negotiated with the readiness probe ("TLSv1.3
    TLS_AES_256_GCM_SHA384 (resumes sessions)"), so a run can show that every proxy
    served the same."""

    kind: str
    port: int
    proc: subprocess.Popen | None
    session: str = ""


def start_proxy(
    procs: Processes,
    workdir: Path,
    kind: str,
    target: int,
    transport: str = "tcp",
    workers: int = 1,
    tls: TlsFiles | None = None,
    udp_probe: bytes = b"?",
) -> Proxy:
    """Start ``kind`` forwarding a free loopback port to ``target`` over ``transport``
    (tcp, udp, websocket, or tls: TLS terminated on the listener with the certificate
    ``tls``, plain TCP to the target) and wait until it answers (a TLS handshake for
    tls, ``udp_probe`` answered for udp); raises RuntimeError with the tail of its log
    when it does not. ``kind`` is a proxy, or one of ``GPORTMAP_VARIANTS``."""
    if kind == "direct":
        return Proxy(kind, target, None)
    if (transport == "tls") != (tls is not None):
        raise ValueError("the tls transport, and only it, takes a certificate")
    port = free_port(socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM)
    name = f"{kind}-{transport}-w{workers}-{port}"
    confdir = workdir / name
    confdir.mkdir()
    if kind == "gportmap" or kind in GPORTMAP_VARIANTS:
        rule: dict[str, object] = {
            "protocol": "tcp" if transport == "tls" else transport,
            "listenHost": LOOPBACK,
            "listenPort": port,
            "targetHost": LOOPBACK,
            "targetPort": target,
        }
        if transport != "udp":
            rule["maxConnections"] = MAX_CONNECTIONS
        if transport == "websocket":
            rule["maxMessageSize"] = 1 << 20
        if tls is not None:
            rule["tls"] = {"certFile": str(tls.cert), "keyFile": str(tls.key)}
        settings, flags = gportmap_settings(kind)
        path = confdir / "rules.json"
        path.write_text(json.dumps({"settings": settings, "rules": [rule]}, indent=2))
        cmd = [*gportmap_command(), str(path), *flags]
        if workers > 1:
            cmd += ["--workers", str(workers)]
    elif kind == "socat":
        if transport == "udp":
            cmd = [
                "socat",
                "-T",
                "30",
                f"UDP-LISTEN:{port},bind={LOOPBACK},fork,reuseaddr",
                f"UDP:{LOOPBACK}:{target}",
            ]
        else:
            cmd = [
                "socat",
                f"TCP-LISTEN:{port},bind={LOOPBACK},fork,reuseaddr,backlog=4096,nodelay",
                f"TCP:{LOOPBACK}:{target},nodelay",
            ]
    elif kind in ("haproxy", "haproxy-splice"):
        path = confdir / "haproxy.cfg"
        path.write_text(haproxy_config(port, target, kind == "haproxy-splice", workers, tls))
        cmd = ["haproxy", "-db", "-f", str(path)]
    elif kind == "nginx":
        path = confdir / "nginx.conf"
        path.write_text(nginx_stream_config(confdir, port, target, transport == "udp", workers, tls))
        cmd = ["nginx", "-p", str(confdir), "-c", str(path), "-e", str(confdir / "error.log")]
    elif kind == "websockify":
        cmd = [_venv_script("websockify") or "websockify", f"{LOOPBACK}:{port}", f"{LOOPBACK}:{target}"]
    else:
        raise ValueError(f"unknown proxy {kind!r}")
    proc = procs.start(name, cmd)
    session = ""
    try:
        if transport == "udp":
            wait_udp_answering(port, proc, probe=udp_probe)
        elif transport == "tls":
            session = wait_tls_answering(port, proc)
        else:
            wait_tcp_listening(port, proc)
    except RuntimeError as exc:
        log = procs.log_tail(name, 2000)
        errlog = confdir / "error.log"
        if errlog.exists():
            log += "\n" + errlog.read_text(errors="replace")[-2000:]
        procs.stop(proc)
        raise RuntimeError(f"{kind} did not start: {exc}; {log_reason(log)}") from None
    return Proxy(kind, port, proc, session)


def log_reason(log: str) -> str:
    """The line of a proxy's log that says why it stopped: its last alert or error."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if any(word in line for word in ("ALERT", "emerg", "rror", "Traceback")):
            return line[:300]
    return lines[-1][:300] if lines else "(no log)"


def wait_tcp_listening(port: int, proc: subprocess.Popen | None, deadline: float = 20.0) -> None:
    """Wait until ``port`` accepts a connection, failing early if ``proc`` exited."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode}")
        try:
            socket.create_connection((LOOPBACK, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {deadline:g} s")


def wait_tls_answering(port: int, proc: subprocess.Popen | None, deadline: float = 20.0) -> str:
    """Wait until a TLS handshake on ``port`` completes; return the protocol version
    and cipher it negotiated with the bench clients' OpenSSL defaults, and whether the
    listener resumes a session (wrk does resume: the new-connection rows are resumed
    handshakes wherever the listener allows it)."""
    context = tls_client_context()
    end = time.monotonic() + deadline
    last = "no answer"
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode}")
        try:
            version, session = _tls_handshake(context, port, None)
            _, again = _tls_handshake(context, port, session)
            return f"{version} ({'resumes sessions' if again is session else 'no resumption'})"
        except (OSError, ssl.SSLError) as exc:
            last = repr(exc)
            time.sleep(0.05)
    raise RuntimeError(f"no TLS handshake on {port} after {deadline:g} s ({last})")


#: How long a probe waits for the session tickets a TLS 1.3 server sends after its
#: handshake (the targets behind the proxies send nothing unasked).
TICKET_WAIT = 0.3


def _tls_handshake(
    context: ssl.SSLContext, port: int, session: ssl.SSLSession | None
) -> tuple[str, ssl.SSLSession | None]:
    """One handshake offering ``session``: ("TLSv1.3 CIPHER", the session to offer
    next), the second being ``session`` itself when the server resumed it."""
    with socket.create_connection((LOOPBACK, port), timeout=2) as raw:
        with context.wrap_socket(raw, session=session) as sock:
            if session is not None and sock.session_reused:
                return "", session
            sock.settimeout(TICKET_WAIT)
            try:
                sock.recv(1)  # reads the tickets, then times out: nothing else comes
            except (TimeoutError, ssl.SSLError, OSError):
                pass
            cipher = sock.cipher()
            return f"{sock.version()} {cipher[0] if cipher else '?'}", sock.session


def wait_udp_answering(
    port: int, proc: subprocess.Popen | None, deadline: float = 20.0, probe: bytes = b"?"
) -> None:
    """Wait until ``probe`` sent to ``port`` is answered (the target is an echo, or a
    DNS server given a query)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"exited with status {proc.returncode}")
            sock.sendto(probe, (LOOPBACK, port))
            try:
                sock.recvfrom(512)
                return
            except (TimeoutError, ConnectionRefusedError):
                continue
    raise RuntimeError(f"no echo through {port} after {deadline:g} s")
