"""`serve`: a WebSocket sync hub on the running event loop (the asyncio twin of `sync.serve`).

    async with sync.aio.serve(db, "127.0.0.1", 8765, token="s3cret") as server:
        ...                                   # clients sync, one-shot or live, until the block ends

Each connection is a task driving its own `sync.session.Session` through an `AsyncChannel`;
the session's database work runs in worker threads. Live connections are woken by the
database's change notifier (`db.on_change`, handed over to the loop), so new commits, and
merges from the other connections (relaying), are pushed as they happen.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
from types import TracebackType

from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve

from engine import Database
from engine.aio import AsyncDatabase, Opening

from ..peer import Peer
from ..protocol import MAX_MESSAGE_BYTES
from ..session import Role
from ..tls import channel_binding
from ..websocket.channel import CLOSE_TIMEOUT, TransportStats
from ..websocket.server import HANDSHAKE_TIMEOUT, check_server_peer, remote_address, server_url
from .channel import AsyncChannel, Lane
from .peer import database_of

__all__ = ["serve", "AsyncSyncServer"]

log = logging.getLogger("sync.aio")


class AsyncSyncServer:
    """A WebSocket sync server on the running event loop; see `serve`."""

    def __init__(
        self,
        db: Database | AsyncDatabase,
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
        self.db = database_of(db)
        self.host = host
        self.port = port  # the bound port once started
        self.token = token
        self.require_keys = require_keys
        self.peer = peer
        self.ssl = ssl
        self.max_size = max_size
        self.handshake_timeout = handshake_timeout
        self.stats = TransportStats()
        self._server: Server | None = None
        self._closed = False

    @property
    def url(self) -> str:
        return server_url(self.host, self.port, tls=self.ssl is not None)

    async def start(self) -> "AsyncSyncServer":
        """Make the Peer (in a worker: it may create the `__sync_` tables) and start listening.

        Raises:
            OSError: the address cannot be bound.
        """
        if self._server is not None:
            return self
        if self.peer is None:
            self.peer = await asyncio.to_thread(Peer, self.db, self.token, require_keys=self.require_keys)
        self._server = await ws_serve(self._handle, self.host, self.port, max_size=self.max_size,
                                      compression=None, close_timeout=CLOSE_TIMEOUT, ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("asyncio sync server for %s listening on %s", self.db.path, self.url)
        return self

    async def _handle(self, ws: ServerConnection) -> None:
        """Connection task (started by websockets): run one session."""
        assert self.peer is not None  # set by start()
        self.stats.add(connections=1)
        label = f"server :{self.port} <- {remote_address(ws)}"
        session = self.peer.session(Role.SERVER, binding=channel_binding(ws.transport.get_extra_info("ssl_object")))
        lane = Lane()
        channel = AsyncChannel(ws, session, lane, label=label, stats=self.stats)
        try:
            await channel.run(db=self.db, handshake_timeout=self.handshake_timeout)
        except Exception:
            log.exception("%s: connection failed", label)
        finally:
            await lane.finish(session.close)
        if session.failed:
            log.info("%s: session ended: %s", label, session.error)
        else:
            log.debug("%s: %s; pulled %d, pushed %d", label, channel.closed_reason(),
                      session.result.pulled, session.result.pushed)

    async def close(self) -> None:
        """Stop accepting, close every connection, wait for their tasks. Idempotent."""
        if self._closed or self._server is None:
            self._closed = True
            return
        self._closed = True
        self._server.close()
        await self._server.wait_closed()
        log.info("asyncio sync server %s closed", self.url)

    async def __aenter__(self) -> "AsyncSyncServer":
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncSyncServer {self.url} db={self.db.path}>"


def serve(
    db: Database | AsyncDatabase,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    token: str | None = None,
    peer: Peer | None = None,
    require_keys: bool = False,
    ssl: ssl_module.SSLContext | None = None,
    max_size: int = MAX_MESSAGE_BYTES,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> Opening[AsyncSyncServer]:
    """Serve `db` over WebSocket on the running event loop: `async with serve(...) as server:`
    (closed when the block ends) or `server = await serve(...)` (then `await server.close()`).
    Listening once it is entered or awaited.

    Many clients at once, one-shot or live, exactly as `sync.serve`: same protocol, `token`,
    `require_keys` (admit only trusted keys, each with its grant), `ssl` (a server TLS
    context: wss://), `peer=` for page limits or an identity, `max_size`, `handshake_timeout`
    (a connection still unauthenticated after it is dropped). `port=0` picks a free port (`server.port`, `server.url`). Threaded clients (`sync.Peer.sync_with`,
    `sync.connect`) and asyncio ones (`AsyncPeer.sync_with`) are served alike.

    Raises:
        OSError: the address cannot be bound (when entered or awaited).
        ValueError: both `token` and a `peer` with another token were given, or
            `require_keys` with a peer that does not require keys.
    """
    server = AsyncSyncServer(db, host, port, token=token, peer=peer, require_keys=require_keys, ssl=ssl,
                             max_size=max_size, handshake_timeout=handshake_timeout)
    return Opening(server.start)
