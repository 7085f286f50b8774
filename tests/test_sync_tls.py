"""wss:// and key authentication over real sockets (loopback, certificates made in the test).

Each refusal is a typed SyncError on the client, a log line on the server, nothing applied,
and the server keeps serving the next client.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

import sync
from engine import Database
from sync import Peer
from sync.errors import (
    BadSignatureError,
    NotAuthorizedError,
    PeerRefusedError,
    TLSError,
    TransportError,
    UnknownPeerError,
    UntrustedServerError,
)
from sync.identity import Identity, load_identity
from sync.tls import client_context, prepare_server_context, server_context, write_self_signed
from sync.trust import trust_peer


def topics(db: Database) -> set[str]:
    with db.reading() as s:
        return {row[0] for row in s.execute("SELECT id FROM topics")}


def add_topic(db: Database, topic: str) -> None:
    with db.transaction() as tx:
        tx.execute("INSERT INTO topics (id, workflow_id, name) VALUES (?, 'wf', ?)", (topic, topic))


@pytest.fixture
def certs(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_self_signed(cert, key)
    return cert, key


@pytest.fixture
def hub(open_db):
    db = open_db("hub")
    add_topic(db, "hub-topic")
    return db


@pytest.fixture
def laptop(open_db):
    db = open_db("laptop")
    add_topic(db, "laptop-topic")
    return db


def admit(hub: Database, client: Database, can: str = "write") -> None:
    trust_peer(hub, load_identity(client).public_text, name="laptop", can=can)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)  # sleep-ok: bounded poll of another thread's progress


# -- admitted ------------------------------------------------------------------------------


def test_keys_over_tls_with_a_pinned_certificate(hub, laptop, certs):
    admit(hub, laptop)
    cert, key = certs
    with sync.serve(hub, require_keys=True, ssl=server_context(cert, key)) as server:
        assert server.url.startswith("wss://")
        result = Peer(laptop).sync_with(server.url, server_key=load_identity(hub).public_text,
                                        ssl=client_context(cafile=cert))
    assert result.pulled == 3 and result.pushed == 3 and result.remote_key == load_identity(hub).public_text
    assert topics(hub) == topics(laptop) == {"hub-topic", "laptop-topic"}


def test_keys_make_an_unverified_certificate_safe(hub, laptop, certs):
    admit(hub, laptop)
    cert, key = certs
    with sync.serve(hub, require_keys=True, ssl=server_context(cert, key)) as server:
        Peer(laptop).sync_with(server.url, server_key=load_identity(hub).public_text, ssl=client_context(verify=False))
    assert topics(hub) == topics(laptop)


class TlsRelay:
    """A man in the middle: terminates TLS from the client with its own certificate and opens
    its own TLS connection to the server, relaying the bytes unchanged."""

    def __init__(self, target: tuple[str, int], cert, key):
        self._server_ctx = prepare_server_context(server_context(cert, key))  # no tickets: see its docstring
        self._client_ctx = client_context(verify=False)
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._start(self._accept)

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        try:
            raw, _ = self._listener.accept()
        except OSError:
            return
        inner = self._server_ctx.wrap_socket(raw, server_side=True)
        outer = self._client_ctx.wrap_socket(socket.create_connection(self._target), server_hostname="localhost")
        self._sockets += [inner, outer]
        self._start(self._pump, inner, outer)
        self._start(self._pump, outer, inner)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()
        for s in self._sockets:
            s.close()
        for thread in self._threads:
            thread.join(5)


def test_a_tls_relay_in_the_middle_is_detected_by_the_channel_binding(hub, laptop, certs, tmp_path):
    admit(hub, laptop)
    cert, key = certs
    relay_cert, relay_key = tmp_path / "relay.pem", tmp_path / "relay-key.pem"
    write_self_signed(relay_cert, relay_key)
    with sync.serve(hub, require_keys=True, ssl=server_context(cert, key)) as server:
        relay = TlsRelay(("127.0.0.1", server.port), relay_cert, relay_key)
        try:
            with pytest.raises(BadSignatureError):
                Peer(laptop).sync_with(f"wss://127.0.0.1:{relay.port}", server_key=load_identity(hub).public_text,
                                       ssl=client_context(verify=False))
        finally:
            relay.close()
        assert topics(hub) == {"hub-topic"} and topics(laptop) == {"laptop-topic"}
        Peer(laptop).sync_with(server.url, server_key=load_identity(hub).public_text, ssl=client_context(verify=False))
    assert topics(hub) == topics(laptop)


# -- refused, and the server keeps serving -------------------------------------------------


def test_a_plaintext_client_at_a_tls_server(hub, laptop, certs, caplog):
    admit(hub, laptop)
    cert, key = certs
    with sync.serve(hub, require_keys=True, ssl=server_context(cert, key)) as server:
        plain = server.url.replace("wss://", "ws://")
        with caplog.at_level(logging.WARNING, logger="sync.tls"):
            with pytest.raises(TLSError, match="the server speaks TLS; use wss://") as refused:
                Peer(laptop).sync_with(plain, server_key=load_identity(hub).public_text)
            wait_for(lambda: "plaintext ws:// client" in caplog.text)
        assert refused.value.permanent and isinstance(refused.value, TransportError)
        assert topics(hub) == {"hub-topic"}
        Peer(laptop).sync_with(server.url, server_key=load_identity(hub).public_text, ssl=client_context(cafile=cert))
    assert topics(hub) == topics(laptop)


def test_a_tls_client_at_a_plaintext_server(hub, laptop):
    with sync.serve(hub) as server:
        with pytest.raises(TLSError, match="during the TLS handshake"):
            Peer(laptop).sync_with(server.url.replace("ws://", "wss://"), ssl=client_context(verify=False))
        Peer(laptop).sync_with(server.url)
    assert topics(hub) == topics(laptop)


def test_an_unpinned_self_signed_certificate_is_refused(hub, laptop, certs):
    cert, key = certs
    with sync.serve(hub, ssl=server_context(cert, key)) as server:
        with pytest.raises(TLSError, match="certificate was refused"):
            Peer(laptop).sync_with(server.url)  # the system's CAs do not know it
    assert topics(hub) == {"hub-topic"}


def test_an_unknown_key_then_a_known_one(hub, laptop, open_db, caplog):
    stranger = open_db("stranger")
    admit(hub, laptop)
    with sync.serve(hub, require_keys=True) as server:
        with caplog.at_level(logging.WARNING, logger="sync"):
            with pytest.raises(UnknownPeerError) as refused:
                Peer(stranger).sync_with(server.url, server_key=load_identity(hub).public_text)
            wait_for(lambda: "not trusted here" in caplog.text)
        assert isinstance(refused.value, PeerRefusedError) and refused.value.permanent
        assert topics(stranger) == set()
        result = Peer(laptop).sync_with(server.url, server_key=load_identity(hub).public_text)
        assert result.pulled == 3 and result.pushed == 3


def test_the_wrong_server_key_over_the_network(hub, laptop):
    admit(hub, laptop)
    with sync.serve(hub, require_keys=True) as server:
        with pytest.raises(UntrustedServerError, match="expected"):
            Peer(laptop).sync_with(server.url, server_key=Identity.generate().public_text)
    assert topics(laptop) == {"laptop-topic"} and topics(hub) == {"hub-topic"}


def test_a_live_client_with_an_untrusted_key_gives_up(hub, laptop):
    with sync.serve(hub, require_keys=True) as server:
        with sync.connect(laptop, server.url, server_key=load_identity(hub).public_text, backoff=(0.01, 0.05)) as client:
            with pytest.raises(UnknownPeerError):
                client.wait_connected(10)
            assert client.attempts == 1  # permanent: no retries


def test_a_live_reader_receives_and_never_pushes(hub, laptop, certs):
    admit(hub, laptop, can="read")
    cert, key = certs
    with sync.serve(hub, require_keys=True, ssl=server_context(cert, key)) as server:
        with sync.connect(laptop, server.url, server_key=load_identity(hub).public_text,
                          ssl=client_context(cafile=cert)) as client:
            client.wait_connected(10)
            add_topic(hub, "later")
            wait_for(lambda: "later" in topics(laptop))
            add_topic(laptop, "local-only")
            client_error = client.error
        assert client_error is None
    assert topics(hub) == {"hub-topic", "later"}


def test_a_writer_outside_its_tables_over_the_network(hub, laptop):
    trust_peer(hub, load_identity(laptop).public_text, name="laptop", can="write", tables=["events"])
    with sync.serve(hub, require_keys=True) as server:
        with pytest.raises(NotAuthorizedError, match="may not write table 'topics'"):
            Peer(laptop).sync_with(server.url, server_key=load_identity(hub).public_text)
    assert topics(laptop) == {"hub-topic", "laptop-topic"} and topics(hub) == {"hub-topic"}


def test_tls_arguments_are_checked(hub, laptop, certs):
    with pytest.raises(ValueError, match="not a wss:// URL"):
        Peer(laptop).sync_with("ws://127.0.0.1:1", ssl=client_context(verify=False))
    with pytest.raises(ValueError, match="not a public key"):
        Peer(laptop).sync_with("ws://127.0.0.1:1", server_key="ed25519:nope")
    with pytest.raises(ValueError, match="in-process"):
        Peer(laptop).sync_with(Peer(hub), ssl=client_context(verify=False))
    with pytest.raises(ValueError, match="require_keys"):
        sync.serve(hub, peer=Peer(hub), require_keys=True)
