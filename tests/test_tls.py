"""TLS helpers on real sockets with a certificate made in the test (no network beyond loopback)."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading

import pytest

from sync.tls import channel_binding, client_context, server_context, write_self_signed


@pytest.fixture
def cert_files(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_self_signed(cert, key)
    return cert, key


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, host: str = "127.0.0.1"):
    """One TLS connection over loopback; returns (client binding, server binding, server error)."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict = {}

    def accept() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen["binding"] = channel_binding(tls)
                tls.recv(1)
        except (ssl.SSLError, OSError) as error:
            seen["error"] = error

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        raw = socket.create_connection(listener.getsockname(), timeout=10)
        with client_ctx.wrap_socket(raw, server_hostname=host) as tls:
            mine = channel_binding(tls)
            tls.sendall(b"x")
    finally:
        thread.join(10)
        listener.close()
    return mine, seen.get("binding"), seen.get("error")


def test_pinned_self_signed_certificate(cert_files):
    cert, key = cert_files
    mine, theirs, _ = handshake(server_context(cert, key), client_context(cafile=cert))
    assert mine and mine == theirs  # both ends see the same channel binding


def test_the_binding_differs_per_connection(cert_files):
    cert, key = cert_files
    first, _, _ = handshake(server_context(cert, key), client_context(cafile=cert))
    second, _, _ = handshake(server_context(cert, key), client_context(cafile=cert))
    assert first != second


def test_an_unknown_certificate_is_refused(cert_files, tmp_path):
    cert, key = cert_files
    other_cert, other_key = tmp_path / "other.pem", tmp_path / "other-key.pem"
    write_self_signed(other_cert, other_key)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_context(cert, key), client_context(cafile=other_cert))


def test_the_host_name_is_checked(cert_files):
    cert, key = cert_files
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_context(cert, key), client_context(cafile=cert), host="example.invalid")


def test_unverified_client_still_encrypts_and_binds(cert_files):
    cert, key = cert_files
    mine, theirs, _ = handshake(server_context(cert, key), client_context(verify=False), host="anything")
    assert mine and mine == theirs


def test_plain_socket_has_no_binding():
    a, b = socket.socketpair()
    with a, b:
        assert channel_binding(a) == b""


def test_key_file_is_private(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    key.write_text("old")
    os.chmod(key, 0o644)
    write_self_signed(cert, key, hosts=["replica.local"])
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert b"BEGIN CERTIFICATE" in cert.read_bytes()


def test_missing_or_mismatched_files(cert_files, tmp_path):
    cert, key = cert_files
    with pytest.raises(FileNotFoundError):
        server_context(tmp_path / "nope.pem", key)
    with pytest.raises(FileNotFoundError):
        client_context(cafile=tmp_path / "nope.pem")
    other_cert, other_key = tmp_path / "o.pem", tmp_path / "ok.pem"
    write_self_signed(other_cert, other_key)
    with pytest.raises(ssl.SSLError):
        server_context(cert, other_key)
    with pytest.raises(ValueError):
        client_context(cafile=cert, verify=False)


def test_server_contexts_are_prepared_for_the_threaded_server(cert_files, caplog):
    """No TLS 1.3 session tickets (the threaded WebSocket API reads and writes one connection
    from two threads) and failed handshakes are logged."""
    import logging

    from sync.tls import prepare_server_context

    cert, key = cert_files
    context = prepare_server_context(server_context(cert, key))
    assert context.num_tickets == 0
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        client = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
        with client, conn, caplog.at_level(logging.WARNING, logger="sync.tls"):
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with pytest.raises(ssl.SSLError):
                context.wrap_socket(conn, server_side=True)
    assert "plaintext ws:// client" in caplog.text
