"""`AsyncPeer`: a replica as a sync endpoint for asyncio code, and the asyncio one-shot round.

    peer = AsyncPeer(adb)                                   # an AsyncDatabase or a Database
    result = await peer.sync_with("ws://hub:8765", token="s3cret", progress=show)
    result = await peer.sync_with(AsyncPeer(other))          # in-process

Over WebSocket the round is `websockets`' asyncio client driving the same `sync.session.Session`
as every other transport; the session's database work runs in worker threads (`Lane`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from engine import Database
from engine.aio import AsyncDatabase, in_transaction

from ..changes import Limits
from ..errors import SyncError
from ..identity import Identity, public_key_bytes
from ..peer import Peer
from ..progress import ProgressCallback, ProgressMeter, SyncProgress
from ..protocol import MAX_MESSAGE_BYTES
from ..session import Role, Session, SyncResult
from ..tls import channel_binding
from ..watermarks import PeerWatermark
from ..websocket.channel import CLOSE_TIMEOUT
from ..websocket.client import (
    CONNECT_ERRORS,
    OPEN_TIMEOUT,
    check_tls_args,
    check_url,
    connect_failed,
    round_result,
)
from .channel import AsyncChannel, Lane

__all__ = ["AsyncPeer", "sync_with_url", "database_of"]

log = logging.getLogger("sync.aio")


def database_of(db: Database | AsyncDatabase) -> Database:
    """The synchronous Database behind `db`."""
    return db.db if isinstance(db, AsyncDatabase) else db


class AsyncPeer:
    """One replica as a sync endpoint, for asyncio code (the twin of `sync.Peer`).

    The arguments are `sync.Peer`'s: `token` is what this peer demands from clients when it
    serves (see `sync.aio.serve`), `require_keys` and `identity` are the key authentication
    (sync.handshake). The underlying `Peer` is made in a worker thread on first use (making
    it creates the `__sync_` bookkeeping tables, a write).
    """

    def __init__(self, db: Database | AsyncDatabase, token: str | None = None, *, limits: Limits | None = None,
                 require_keys: bool = False, identity: Identity | None = None):
        self.db = database_of(db)
        self.token = token
        self._options: dict[str, Any] = {"limits": limits, "require_keys": require_keys, "identity": identity}
        self._peer: Peer | None = None

    async def peer(self) -> Peer:
        """The synchronous `Peer` of this replica (for sessions, facts, `sync.serve`)."""
        if self._peer is None:
            peer = await asyncio.to_thread(Peer, self.db, self.token, **self._options)
            self._peer = self._peer or peer
        return self._peer

    async def sync_with(
        self,
        target: "str | Peer | AsyncPeer",
        *,
        token: str | None = None,
        progress: ProgressCallback | None = None,
        server_key: str | bytes | None = None,
        ssl: ssl_module.SSLContext | None = None,
        idle_timeout: float = 60.0,
    ) -> SyncResult:
        """One round with `target` (a ws:// or wss:// URL, or a `Peer`/`AsyncPeer` in this
        process): pull what it has that we lack, then push what it lacks, exactly as
        `sync.Peer.sync_with` (same `token`, `server_key`, `ssl`). `progress(SyncProgress)`
        is called on the event loop after every page.

        Cancelling a round over WebSocket stops it between two messages: every page merged
        so far is whole and recorded with its watermark, so the next round resumes. An
        in-process round runs in one worker thread and finishes there even if cancelled.

        Raises:
            AuthError, SchemaMismatchError: the target refused us (as `PeerRefusedError`), e.g.
                `UnknownPeerError` (our key is not trusted there), `NotAuthorizedError`.
            UntrustedServerError, BadSignatureError: the server did not prove the expected key.
            ProtocolError, InvalidChangeError: the target sent something we refused.
            TLSError: TLS could not be set up (ws:// to a wss:// server, a refused certificate).
            TransportError: unreachable, connection lost, or silent for `idle_timeout` seconds.
            SyncError: any other failure of the round, or a call inside a transaction block
                of this database (the round's merges would wait for that very transaction).
            ValueError: `server_key` is not a public key, `ssl` without a wss:// URL, or
                `target` is not a Peer or URL.
        """
        if in_transaction(self.db):
            raise SyncError("sync_with() inside an AsyncDatabase.transaction() block of the same database: "
                            "its merges would wait for that transaction to end; sync outside the block")
        peer = await self.peer()
        if isinstance(target, str):
            if not target.startswith(("ws://", "wss://")):
                raise ValueError(f"sync target {target!r} is neither a Peer nor a ws:// URL")
            return await sync_with_url(peer, target, token=token, progress=progress, server_key=server_key,
                                       ssl=ssl, idle_timeout=idle_timeout)
        other = await target.peer() if isinstance(target, AsyncPeer) else target
        relay = _on_loop(progress) if progress is not None else None
        return await asyncio.to_thread(peer.sync_with, other, token=token, progress=relay, server_key=server_key,
                                       ssl=ssl)

    async def watermarks(self) -> list[PeerWatermark]:
        """What this replica knows of each peer it has synced with."""
        peer = await self.peer()
        return await asyncio.to_thread(peer.watermarks)

    def __repr__(self) -> str:
        return f"<AsyncPeer db={self.db.path} auth={'yes' if self.token else 'no'}>"


def _on_loop(progress: ProgressCallback) -> ProgressCallback:
    """A progress callback for a worker thread that calls `progress` on the running loop
    (in order, and all of them before the awaited round returns)."""
    loop = asyncio.get_running_loop()

    def relay(report: SyncProgress) -> None:
        loop.call_soon_threadsafe(progress, report)

    return relay


class _Reports:
    """Progress of one round reported on the loop: the session (in a worker) only notes that
    a report is due; the channel's task makes it after the step."""

    def __init__(self, callback: ProgressCallback | None):
        self.meter = ProgressMeter.wrap(callback)
        self.due = False

    def mark(self, result: SyncResult) -> None:
        self.due = True

    def flush(self, session: Session) -> None:
        if self.due and self.meter is not None:
            self.due = False
            self.meter(session.result)


async def sync_with_url(
    peer: Peer,
    url: str,
    *,
    token: str | None = None,
    progress: ProgressCallback | None = None,
    server_key: str | bytes | None = None,
    ssl: ssl_module.SSLContext | None = None,
    idle_timeout: float = 60.0,
    open_timeout: float = OPEN_TIMEOUT,
    max_size: int = MAX_MESSAGE_BYTES,
) -> SyncResult:
    """One bidirectional round with the server at `url` on the running event loop; what
    `AsyncPeer.sync_with` does for a ws:// or wss:// target (the asyncio twin of
    `sync.websocket.sync_with_url`, with the same arguments and errors).

    Raises:
        TLSError: TLS failed (a refused certificate, ws:// against a TLS server or the reverse).
        TransportError: bad URL, server unreachable, connection lost mid-round or silent for
            `idle_timeout` seconds (nothing is lost: the next round resumes from watermarks).
        ValueError: `ssl` for a ws:// URL, or `server_key` is not a public key.
        SyncError: a refusal, as the subclass that says why.
    """
    check_url(url)
    check_tls_args(url, ssl)
    expected_key = public_key_bytes(server_key)  # a bad key is refused before connecting
    reports = _Reports(progress)
    ws = await _open(url, max_size=max_size, open_timeout=open_timeout, ssl=ssl)
    session = peer.session(Role.CLIENT, token=token, live=False,
                           progress=reports.mark if progress is not None else None, server_key=expected_key,
                           binding=channel_binding(ws.transport.get_extra_info("ssl_object")))
    lane = Lane()
    try:
        channel = AsyncChannel(ws, session, lane, label=f"sync {url}")
        try:
            await channel.run(idle_timeout=idle_timeout, on_progress=reports.flush)
        finally:
            await ws.close()
        return round_result(session, url, channel.closed_reason())
    finally:
        await lane.finish(session.close)


async def _open(url: str, *, max_size: int, open_timeout: float,
                ssl: ssl_module.SSLContext | None) -> ClientConnection:
    """Open a WebSocket client connection on the running loop (TLS for wss://: `ssl`, or the
    system's CAs).

    Raises:
        TLSError: TLS failed: a refused certificate, or one side does not speak TLS.
        TransportError: the server is unreachable or the WebSocket handshake failed.
    """
    try:
        return await ws_connect(url, open_timeout=open_timeout, close_timeout=CLOSE_TIMEOUT,
                                max_size=max_size, compression=None, proxy=None, ssl=ssl)
    except CONNECT_ERRORS as exc:
        raise connect_failed(url, exc) from exc
