"""The sans-IO TLS stage (gportmap/engine/tls.py) on its own: two peers joined by
moving bytes between memory BIOs in the test, no socket, no event loop."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from certs import CA

from gportmap.engine.tls import NEED_DATA, TlsError, TlsStage


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    folder: Path = tmp_path_factory.mktemp("pki")
    ca = CA(folder, "ca")
    server = ca.issue("server", "127.0.0.1", ips=("127.0.0.1",))
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(str(server.cert), str(server.key))
    client_side = ssl.create_default_context(cafile=str(ca.path))
    return server_side, client_side


class Peer:
    """The other end, an SSLObject of the test's own."""

    def __init__(self, context: ssl.SSLContext, server_side: bool) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side, None if server_side else "127.0.0.1")


def handshake(stage: TlsStage, peer: Peer) -> None:
    for _ in range(10):
        done = stage.handshake()
        peer.incoming.write(stage.data_to_send())
        try:
            peer.tls.do_handshake()
            peer_done = True
        except ssl.SSLWantReadError:
            peer_done = False
        stage.feed(peer.outgoing.read())
        if done and peer_done:
            return
    raise AssertionError("no handshake")


def read_all(stage: TlsStage) -> tuple[bytes, bool]:
    """Plaintext the stage has, and whether the peer's end came behind it."""
    buf, got = memoryview(bytearray(65536)), b""
    while True:
        n = stage.read_into(buf)
        if n == NEED_DATA:
            return got, False
        if n == 0:
            return got, True
        got += bytes(buf[:n])


@pytest.fixture
def joined(contexts):
    server_side, client_side = contexts
    stage, peer = TlsStage.server(server_side), Peer(client_side, server_side=False)
    handshake(stage, peer)
    return stage, peer


def test_a_round_trip_both_ways(joined):
    stage, peer = joined
    peer.incoming.write(stage.encrypt(b"to the client"))
    assert peer.tls.read(100) == b"to the client"
    peer.tls.write(b"to the server")
    stage.feed(peer.outgoing.read())
    assert read_all(stage) == (b"to the server", False)


def test_close_sends_close_notify_once_and_loses_nothing_the_peer_sent(joined):
    """The peer's record is in the stage when close_notify goes out: it is still
    read, then the peer's own close_notify ends the stream."""
    stage, peer = joined
    peer.tls.write(b"right behind")
    stage.feed(peer.outgoing.read())  # not read yet
    goodbye = stage.close()
    assert goodbye and stage.close() == b""  # once
    peer.incoming.write(goodbye)
    assert peer.tls.read(100) == b""  # the peer sees our end...
    peer.tls.write(b" and after")  # ...and may still send
    stage.feed(peer.outgoing.read())
    assert read_all(stage) == (b"right behind and after", False)
    try:
        peer.tls.unwrap()
    except ssl.SSLWantReadError:
        pass
    stage.feed(peer.outgoing.read())
    assert read_all(stage) == (b"", True)


def test_unwrap_alone_drops_what_the_peer_sent(joined):
    """The control for the test above: Python's unwrap (SSL_shutdown twice) on the
    same state drops the peer's record. If this ever stops failing, the backlog in
    TlsStage.close is no longer needed."""
    stage, peer = joined
    peer.tls.write(b"right behind")
    stage.feed(peer.outgoing.read())
    with pytest.raises(ssl.SSLError, match="APPLICATION_DATA_AFTER_CLOSE_NOTIFY"):
        stage._tls.unwrap()


def test_a_transport_end_without_close_notify_is_an_end(joined):
    stage, peer = joined
    peer.tls.write(b"last words")
    stage.feed(peer.outgoing.read())
    stage.feed_eof()
    assert read_all(stage) == (b"last words", True)


def test_a_broken_record_is_a_tls_error(joined):
    stage, _ = joined
    stage.feed(b"\x17\x03\x03\x00\x20" + bytes(32))  # application data that does not decrypt
    with pytest.raises(TlsError) as failed:
        read_all(stage)
    assert failed.value.reason and isinstance(failed.value, OSError)


def test_a_failed_handshake_names_the_reason(contexts):
    server_side, _ = contexts
    stranger = ssl.create_default_context()  # the system store: the test CA is not in it
    stage, peer = TlsStage.client(stranger, "127.0.0.1"), Peer(server_side, server_side=True)
    with pytest.raises(TlsError) as failed:
        handshake(stage, peer)
    assert failed.value.reason == "CERTIFICATE_VERIFY_FAILED (unable to get local issuer certificate)"


def test_an_unknown_ca_and_a_name_mismatch_say_which(contexts):
    """Both are CERTIFICATE_VERIFY_FAILED to OpenSSL; an operator needs to know which."""
    server_side, client_side = contexts
    reasons = []
    for context, name in ((ssl.create_default_context(), "127.0.0.1"), (client_side, "other.test")):
        stage, peer = TlsStage.client(context, name), Peer(server_side, server_side=True)
        with pytest.raises(TlsError) as failed:
            handshake(stage, peer)
        reasons.append(failed.value.reason)
    unknown_ca, mismatch = reasons
    assert unknown_ca.startswith("CERTIFICATE_VERIFY_FAILED (") and "issuer" in unknown_ca
    assert mismatch.startswith("CERTIFICATE_VERIFY_FAILED (") and "other.test" in mismatch
