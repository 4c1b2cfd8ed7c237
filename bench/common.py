"""What the benchmarks share: loopback ports, waiting for a listener, the settings a
benchmarked gportmap runs with, stopping a process cleanly, and the certificate of
the TLS workloads."""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"

#: No admin endpoint, watcher or stats log, and quiet logs: only forwarding is measured.
BENCH_SETTINGS = {"admin": False, "watch": False, "statsInterval": 0, "logLevel": "WARNING"}


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_listening(port: int, deadline: float = 15.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection((LOOPBACK, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def bench_rules(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"settings": BENCH_SETTINGS, "rules": list(rules)}


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it does not exit within 10 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- TLS ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """One server certificate for every TLS listener of a run (same key type, same
    chain for every proxy): ``cert`` and ``key`` apart (gportmap, nginx) and
    ``combined`` holding both (HAProxy's ``crt``)."""

    cert: Path
    key: Path
    combined: Path


#: The certificate's curve: ECDSA P-256, what a current public certificate uses most.
TLS_CURVE = "prime256v1"


def make_certificate(folder: Path) -> TlsFiles:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1, made for this run (the
    ``cryptography`` package when importable, else the ``openssl`` command); raises
    RuntimeError saying why when neither can make one."""
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(folder / "server.crt", folder / "server.key", folder / "server.pem")
    try:
        cert_pem, key_pem = _certificate_with_cryptography()
    except ImportError:
        cert_pem, key_pem = _certificate_with_openssl(folder)
    files.cert.write_bytes(cert_pem)
    files.key.write_bytes(key_pem)
    files.combined.write_bytes(cert_pem + key_pem)
    return files


def _certificate_with_cryptography() -> tuple[bytes, bytes]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _certificate_with_openssl(folder: Path) -> tuple[bytes, bytes]:
    cert, key = folder / "openssl.crt", folder / "openssl.key"
    cmd = [
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", f"ec_paramgen_curve:{TLS_CURVE}",
        "-nodes", "-days", "2", "-subj", f"/CN={LOOPBACK}", "-addext", f"subjectAltName=IP:{LOOPBACK}",
        "-keyout", str(key), "-out", str(cert),
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"no certificate: neither cryptography nor openssl ({exc})") from None
    if done.returncode != 0:
        raise RuntimeError(f"openssl req failed: {done.stderr.strip()[-300:]}")
    return cert.read_bytes(), key.read_bytes()


def tls_client_context() -> ssl.SSLContext:
    """What the bench's TLS clients use: OpenSSL's defaults, no verification (the
    certificate is self-signed, and wrk does not verify either)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
