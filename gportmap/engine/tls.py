"""TLS as a sans-IO stage: bytes in, bytes out, no sockets (h11 and wsproto's manner).

``TlsStage`` is an ``ssl.SSLObject`` between two ``ssl.MemoryBIO``s: the relay feeds
it the ciphertext it read from the network (``feed``), takes plaintext out
(``read_into``), puts plaintext in for the peer (``encrypt``) and sends whatever
ciphertext the stage has for the network (``data_to_send``: handshake records,
alerts, close_notify). It never waits and never touches a descriptor, so a TLS
connection needs no greenlet: the hub relay drives it from readiness callbacks,
and the handshake runs there too, under a timer.

Why memory BIOs rather than ``SSLSocket``: the relay decides when ciphertext
enters OpenSSL. That is what makes the close exchange safe. Python's
``SSL_shutdown`` wrapper (``unwrap``) calls ``SSL_shutdown`` twice, and the second
call reads the peer's records and *discards* application data it finds there
(OpenSSL 3 raises APPLICATION_DATA_AFTER_CLOSE_NOTIFY): on an ``SSLSocket`` the
bytes a client sends right after the target's end were lost. Here ``close`` first
decrypts every complete record already fed into a small backlog, so the second
call finds none, and ``read_into`` hands the backlog out before anything else.
close_notify is sent once; the peer may keep sending, and is read, until its own
close_notify (a TLS half-close).

Errors are ``TlsError`` (an ``OSError``, so that a relay's per-side error handling
takes it as it is); a transport end without close_notify is an end like any other
(``suppress_ragged_eofs``, as ``SSLSocket`` did), not an error.

Memory: an idle stage holds the ``SSLObject`` (OpenSSL keeps no record buffers for
an idle connection: Python sets ``SSL_MODE_RELEASE_BUFFERS``) and two empty BIOs;
measured here about 16 KB per server-side stage after a TLS 1.3 handshake (the
BIOs about 0.7 KB of it), more on the client side (the peer's verified chain).
"""

from __future__ import annotations

import ssl

from gportmap.engine.stage import NEED_DATA, StageError

__all__ = ["NEED_DATA", "TlsError", "TlsStage"]


class TlsError(StageError):
    """The peer failed the TLS handshake or broke the protocol (a bad record, an
    alert, a certificate that does not verify). ``reason`` is OpenSSL's short name
    of the failure (``CERTIFICATE_VERIFY_FAILED``...), the text the records show."""

    @classmethod
    def of(cls, exc: ssl.SSLError) -> TlsError:
        """The short name, and for a certificate that does not verify OpenSSL's why:
        an unknown CA (``unable to get local issuer certificate``) and a name
        mismatch (``Hostname mismatch, certificate is not valid for 'x'``) share the
        name ``CERTIFICATE_VERIFY_FAILED`` and need different fixes."""
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc) or type(exc).__name__
        why = getattr(exc, "verify_message", None)  # ssl.SSLCertVerificationError only
        if why:
            reason = f"{reason} ({why[: cls.VERIFY_MESSAGE_LIMIT]})"
        return cls(reason)

    #: The longest verification detail kept (it may quote the peer's certificate names).
    VERIFY_MESSAGE_LIMIT = 200


class TlsStage:
    """One TLS session without I/O: the server side of a listener's ``tls`` (client
    certificates as its context demands), or the client side of ``targetTls`` (SNI
    and verification as its context and ``server_hostname`` say). A
    ``gportmap.engine.stage.Stage``: ``encode`` is ``encrypt``, ``read_into``
    returns ``NEED_DATA`` when no complete record is left."""

    #: close_notify is a TLS half-close: the transport is shut for writing after it.
    half_close = True

    __slots__ = ("_tls", "_incoming", "_outgoing", "_backlog", "_backlog_end", "_backlog_error", "handshaken", "close_sent")

    def __init__(self, context: ssl.SSLContext, server_side: bool, server_hostname: str | None = None) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        #: Plaintext decrypted ahead of its turn by ``close`` (at most what one feed
        #: brought); then whether the peer's end, or an error, came behind it.
        self._backlog: list[bytes] = []
        self._backlog_end = False
        self._backlog_error: TlsError | None = None
        self.handshaken = False
        self.close_sent = False

    @classmethod
    def server(cls, context: ssl.SSLContext) -> TlsStage:
        return cls(context, True)

    @classmethod
    def client(cls, context: ssl.SSLContext, server_hostname: str | None) -> TlsStage:
        return cls(context, False, server_hostname)

    # -- bytes from the network -----------------------------------------------------

    def feed(self, data: bytes | memoryview) -> None:
        """Ciphertext read from the network (copied into the incoming BIO)."""
        self._incoming.write(data)

    def feed_eof(self) -> None:
        """The transport ended: reads will report the end once what was fed is read."""
        self._incoming.write_eof()

    # -- the handshake --------------------------------------------------------------

    def handshake(self) -> bool:
        """Advance the handshake with what was fed: True once it is complete, False
        while it needs more from the peer (send ``data_to_send()`` first either way).
        TlsError when it fails, including a peer that ended in the middle."""
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as exc:
            raise TlsError.of(exc) from None
        self.handshaken = True
        return True

    # -- plaintext ------------------------------------------------------------------

    def read_into(self, buf: memoryview) -> int:
        """Decrypt into ``buf``: the number of bytes (> 0), 0 at the peer's end
        (close_notify, or the transport's end), or NEED_DATA when no complete record
        is left. TlsError on a broken record or an alert."""
        if self._backlog or self._backlog_end or self._backlog_error is not None:
            return self._read_backlog(buf)
        incoming = self._incoming
        if not (incoming.pending or incoming.eof or self._tls.pending()):
            return NEED_DATA  # nothing fed is left: spare OpenSSL the call (and its exception)
        try:
            return self._tls.read(len(buf), buf)
        except ssl.SSLWantReadError:
            return NEED_DATA
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return 0
        except ssl.SSLError as exc:
            raise TlsError.of(exc) from None

    def _read_backlog(self, buf: memoryview) -> int:
        if self._backlog:
            chunk = self._backlog[0]
            n = min(len(chunk), len(buf))
            buf[:n] = chunk[:n]
            if n == len(chunk):
                self._backlog.pop(0)
            else:
                self._backlog[0] = chunk[n:]
            return n
        if self._backlog_error is not None:
            raise self._backlog_error
        return 0  # the peer's end came behind the backlog

    def encrypt(self, data: bytes | memoryview) -> bytes:
        """The records carrying ``data`` (with any ciphertext still waiting to go,
        in order): all of it is to be sent to the peer."""
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:  # WantRead: a renegotiation, which a relay does not do
            raise TlsError.of(exc) from None
        return self._outgoing.read()

    encode = encrypt

    def data_to_send(self) -> bytes:
        """Ciphertext the stage has for the peer (handshake records, alerts,
        close_notify), b"" when none."""
        outgoing = self._outgoing
        return outgoing.read() if outgoing.pending else b""

    @property
    def has_input(self) -> bool:
        """Ciphertext or plaintext is buffered here: ``read_into`` may give bytes
        without anything more from the network (no readiness event will say so)."""
        return bool(self._incoming.pending or self._tls.pending() or self._backlog or self._backlog_end)

    # -- the end --------------------------------------------------------------------

    def close(self) -> bytes:
        """close_notify, once: the bytes to send (b"" if already sent). The peer's
        records already fed are decrypted first into the backlog (see the module
        docstring), so none is dropped; the peer's side stays open for reading."""
        if self.close_sent:
            return b""
        self.close_sent = True
        self._drain_into_backlog()
        try:
            self._tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # the peer's close_notify has not come: a half-close, as intended
        except ssl.SSLError:
            pass  # the session is broken already: the transport's end tells the peer
        return self.data_to_send()

    def goodbye(self, reason: str, error: str | None) -> bytes:
        """Nothing: a cut TLS connection ends with its transport (no close_notify,
        which would claim a clean end)."""
        return b""

    def _drain_into_backlog(self) -> None:
        """Decrypt every complete record fed so far (bounded by what one feed
        brought: the relay feeds again only once the stage is drained)."""
        if self._backlog_end or self._backlog_error is not None:
            return
        tls = self._tls
        while True:
            try:
                chunk = tls.read(1 << 16)
            except ssl.SSLWantReadError:
                return
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._backlog_end = True
                return
            except ssl.SSLError as exc:
                self._backlog_error = TlsError.of(exc)
                return
            if not chunk:
                self._backlog_end = True
                return
            self._backlog.append(chunk)
