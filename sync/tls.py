"""TLS for the WebSocket transport (wss://): contexts, a self-signed certificate, the channel binding.

    server_ctx = server_context("cert.pem", "key.pem")
    sync.serve(db, "0.0.0.0", 8765, ssl=server_ctx)                       # wss://
    sync.Peer(other).sync_with("wss://host:8765", ssl=client_context(cafile="cert.pem"))

Two ways for a client to trust a server's certificate:
- `client_context(cafile=...)`: the usual verification against a CA file; a self-signed
  server certificate given as its own CA file pins exactly that certificate;
- `client_context(verify=False)` *together with* key authentication (`server_key=` or the
  trust list): the traffic is encrypted, the certificate is not checked, and the server is
  authenticated by its Ed25519 key over a handshake bound to this TLS connection (its
  `tls-unique` channel binding, see sync.challenge), which a man in the middle cannot relay.
  Without key authentication `verify=False` protects against eavesdroppers only.

Only the standard `ssl` module and `cryptography` (for the certificate) are used.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["server_context", "client_context", "channel_binding", "prepare_server_context", "write_self_signed"]

log = logging.getLogger("sync.tls")


def server_context(certfile: str | os.PathLike[str], keyfile: str | os.PathLike[str], *, password: str | None = None) -> ssl.SSLContext:
    """A server-side context (TLS 1.2 or newer) with the certificate chain and its private key.

    Raises:
        FileNotFoundError: a file is missing.
        ssl.SSLError: the files are not a matching PEM certificate and key.
    """
    for path in (certfile, keyfile):
        if not Path(path).is_file():
            raise FileNotFoundError(2, "no such certificate or key file", str(path))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile, password=password)
    return context


def client_context(cafile: str | os.PathLike[str] | None = None, *, verify: bool = True) -> ssl.SSLContext:
    """A client-side context (TLS 1.2 or newer).

    `cafile`: trust the certificates in this PEM file (a self-signed server certificate pins
    that server); None: the system's CAs. `verify=False`: no certificate or host name check —
    only with key authentication, see the module docstring.

    Raises:
        FileNotFoundError: `cafile` is missing.
        ValueError: both `cafile` and `verify=False`.
    """
    if not verify:
        if cafile is not None:
            raise ValueError("client_context: a cafile is pointless with verify=False")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        if cafile is not None and not Path(cafile).is_file():
            raise FileNotFoundError(2, "no such CA file", str(cafile))
        context = ssl.create_default_context(cafile=None if cafile is None else str(cafile))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def channel_binding(sock: Any) -> bytes:
    """The connection's `tls-unique` channel binding, or b"" without TLS. `sock`: the socket
    of a threaded connection, or the `ssl_object` of an asyncio transport (None without TLS)."""
    if isinstance(sock, (ssl.SSLSocket, ssl.SSLObject)):
        return sock.get_channel_binding("tls-unique") or b""
    return b""


class _HandshakeLoggingSocket(ssl.SSLSocket):
    """An SSLSocket that logs why a server-side TLS handshake failed (the WebSocket library
    closes such connections silently)."""

    def do_handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().do_handshake(*args, **kwargs)
        except (ssl.SSLError, OSError) as error:
            try:
                address = "%s:%s" % self.getpeername()[:2]
            except OSError:
                address = "?"
            plain = "HTTP_REQUEST" in str(error)
            log.warning("TLS handshake with %s failed%s: %s", address,
                        " (a plaintext ws:// client at this wss:// server)" if plain else "", error)
            raise


def prepare_server_context(context: ssl.SSLContext) -> ssl.SSLContext:
    """Adjust a server context for the threaded WebSocket server; returns the same context
    (changed in place).

    1. No TLS 1.3 session tickets (`num_tickets = 0`). The threaded `websockets` API reads a
       connection in a background thread while another thread writes to it, and an OpenSSL
       connection must not be used by two threads at once. Tickets are the one message a TLS
       1.3 server sends after the handshake, so the client's reader processes them exactly
       while the client writes its upgrade request: measured here, about 1 connection in 100
       then hung for the 10 s open timeout or failed with "[SSL] internal error"; none in
       3,000 once the server sent no tickets. (Ours never resumes sessions anyway: one
       connection per round or a long-lived live connection.)
    2. Every failed TLS handshake (a ws:// client, a scan) is logged on the `sync.tls` logger;
       the WebSocket library closes such connections silently. Uses the documented
       `SSLContext.sslsocket_class` hook.
    """
    context.num_tickets = 0
    if context.sslsocket_class is ssl.SSLSocket:
        context.sslsocket_class = _HandshakeLoggingSocket
    return context


def write_self_signed(
    certfile: str | os.PathLike[str],
    keyfile: str | os.PathLike[str],
    *,
    hosts: Iterable[str] = ("localhost", "127.0.0.1", "::1"),
    days: int = 365,
) -> None:
    """Write a self-signed certificate for `hosts` (names or IP addresses) and its private key
    (PEM; the key file gets 0600 permissions). For tests, demos and pinning by `cafile`.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    hosts = list(hosts)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "crdt-sync")])
    now = datetime.datetime.now(datetime.timezone.utc)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    Path(certfile).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    os.chmod(keyfile, 0o600)  # an existing file keeps its mode through O_TRUNC
