"""The server side: a hub that serves many clients, one-shot or live (`serve`)."""

from __future__ import annotations

import logging
import ssl as ssl_module
import threading
from typing import Any

from websockets.sync.server import serve as ws_serve

from engine import Database

from ..peer import Peer
from ..protocol import MAX_MESSAGE_BYTES
from ..session import Role
from ..tls import channel_binding, prepare_server_context
from .channel import CLOSE_TIMEOUT, Channel, TransportStats

__all__ = ["serve", "SyncServer", "server_url", "remote_address"]

log = logging.getLogger("sync.websocket")

HANDSHAKE_TIMEOUT = 10.0
"""Seconds a connection may take to authenticate (hello, proof) before the server drops it."""


def check_server_peer(peer: Peer | None, token: str | None, require_keys: bool) -> None:
    """`serve()` takes either a `peer` or the options to build one, never both in disagreement.

    Raises:
        ValueError: `token` or `require_keys` contradict the given peer.
    """
    if peer is not None and token is not None and peer.token != token:
        raise ValueError("serve(): token= differs from peer.token; give the token to the Peer only")
    if peer is not None and require_keys and not peer.require_keys:
        raise ValueError("serve(): require_keys=True but the peer does not require keys; set it on the Peer")


class SyncServer:
    """A WebSocket sync server in background threads; see `serve`."""

    def __init__(
        self,
        db: Database,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        peer: Peer | None = None,
        require_keys: bool = False,
        ssl: ssl_module.SSLContext | None = None,
        max_size: int = MAX_MESSAGE_BYTES,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ):
        check_server_peer(peer, token, require_keys)
        self.db = db
        self.peer = peer or Peer(db, token=token, require_keys=require_keys)
        self.tls = ssl is not None
        self.handshake_timeout = handshake_timeout
        self.stats = TransportStats()
        self._closed = False
        self._lock = threading.Lock()
        self._server = ws_serve(
            self._handle, host, port, max_size=max_size, compression=None, close_timeout=CLOSE_TIMEOUT,
            ssl=prepare_server_context(ssl) if ssl is not None else None,
        )
        self.host = host
        self.port: int = self._server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name=f"sync-ws-server :{self.port}", daemon=True)
        self._thread.start()
        log.info("sync server for %s listening on %s", db.path, self.url)

    @property
    def url(self) -> str:
        return server_url(self.host, self.port, tls=self.tls)

    def _serve(self) -> None:
        """Thread entry: accept connections until `close()`."""
        try:
            self._server.serve_forever()
        except Exception:
            log.exception("sync server %s stopped accepting", self.url)

    def _handle(self, ws: Any) -> None:
        """Connection entry (one thread each, started by websockets): run one session."""
        self.stats.add(connections=1)
        label = f"server :{self.port} <- {remote_address(ws)}"
        session = self.peer.session(Role.SERVER, binding=channel_binding(ws.socket), streaming=True)
        channel = Channel(ws, session, label=label, stats=self.stats)
        try:
            channel.run(db=self.db, handshake_timeout=self.handshake_timeout)
        except Exception:
            log.exception("%s: connection failed", label)
        finally:
            session.close()
        if session.failed:
            log.info("%s: session ended: %s", label, session.error)
        else:
            log.debug("%s: %s; pulled %d, pushed %d", label, channel.closed_reason(),
                      session.result.pulled, session.result.pushed)

    def close(self) -> None:
        """Stop accepting, close every connection, wait for their threads. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._server.shutdown()
        self._thread.join(timeout=CLOSE_TIMEOUT + 5)
        log.info("sync server %s closed", self.url)

    def __enter__(self) -> "SyncServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SyncServer {self.url} db={self.db.path}>"


def server_url(host: str, port: int, *, tls: bool = False) -> str:
    """The ws:// (wss:// with TLS) URL clients use for a server bound to (host, port)."""
    scheme = "wss" if tls else "ws"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def remote_address(ws: Any) -> str:
    try:
        host, port = ws.remote_address[:2]
        return f"{host}:{port}"
    except Exception:
        return "?"


def serve(
    db: Database,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    token: str | None = None,
    peer: Peer | None = None,
    require_keys: bool = False,
    ssl: ssl_module.SSLContext | None = None,
    max_size: int = MAX_MESSAGE_BYTES,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> SyncServer:
    """Serve `db` over WebSocket from background threads; listening when this returns.

    Many clients at once (a hub): each connection runs its own session, one-shot or live, and
    live connections get new local commits (and merges from the other connections, which makes
    relaying work) pushed as they happen. `port=0` picks a free port (`server.port`,
    `server.url`). Clients must present `token` when one is set (or pass a `peer=Peer(db,
    token=..., limits=...)` to choose page limits). `require_keys=True`: admit only clients
    that prove a key of this replica's trust list, each with its grant (sync.handshake,
    sync.trust). `ssl`: a server TLS context (sync.tls.server_context): the server speaks
    wss:// only (the context is adjusted in place: sync.tls.prepare_server_context). Frames above
    `max_size` bytes close that connection (code 1009); a connection that has not completed
    the handshake after `handshake_timeout` seconds is dropped (a silent peer holds no thread). Close with `server.close()` or use
    `with`.

    Raises:
        OSError: the address cannot be bound (port in use, bad host).
        ValueError: `token` or `require_keys` disagree with the given `peer`.
    """
    return SyncServer(db, host, port, token=token, peer=peer, require_keys=require_keys, ssl=ssl, max_size=max_size,
                      handshake_timeout=handshake_timeout)
