"""Sync: move changesets (rows of `crsql_changes`) between replicas of any CRR schema.

    from sync import Peer, export_changes, import_changes
    Peer(db_a).sync_with(Peer(db_b))                  # in-process
    Peer(db_a).sync_with("ws://host:8765", token=t)   # WebSocket (sync.websocket)
    server = sync.serve(db, "127.0.0.1", 8765, token=t)

    # keys (sync.identity, sync.trust, sync.handshake) and TLS (sync.tls)
    trust_peer(hub_db, "ed25519:...", name="laptop", can="write")
    server = sync.serve(hub_db, "0.0.0.0", 8765, require_keys=True, ssl=server_context(cert, key))
    Peer(laptop_db).sync_with("wss://hub:8765", server_key="ed25519:...", ssl=client_context(cafile=cert))

    # asyncio (sync.aio): the same session over websockets' asyncio API
    await sync.aio.AsyncPeer(db_a).sync_with("ws://host:8765", token=t)

Stands on the database layer only (engine.database, engine.errors, engine.migrations,
engine.clock); never imports the stores. The WebSocket names (`serve`, ...) load lazily
from sync.websocket so that importing `sync` needs no network code.
"""

from __future__ import annotations

from typing import Any

from .changes import Limits
from .errors import (
    ApplyError,
    AuthError,
    BadSignatureError,
    CorruptFileError,
    DuplicateSiteError,
    ExpiredChallengeError,
    InvalidChangeError,
    MalformedChallengeError,
    MessageTooLargeError,
    NotAuthorizedError,
    PeerRefusedError,
    ProtocolError,
    ReplayError,
    SchemaMismatchError,
    SyncError,
    TLSError,
    TransportError,
    UnknownPeerError,
    UntrustedServerError,
)
from .files import export_changes, import_changes
from .identity import Identity, load_identity
from .peer import Peer, SyncResult
from .progress import SyncProgress
from .session import Role, Session, State
from .tls import client_context, server_context
from .trust import Grant, TrustEntry, trust_peer, trusted_peers, untrust_peer
from .watermarks import PeerWatermark, watermarks

__all__ = [
    "Peer",
    "SyncResult",
    "SyncProgress",
    "Session",
    "Role",
    "State",
    "Limits",
    "PeerWatermark",
    "watermarks",
    "export_changes",
    "import_changes",
    "Identity",
    "load_identity",
    "Grant",
    "TrustEntry",
    "trust_peer",
    "untrust_peer",
    "trusted_peers",
    "server_context",
    "client_context",
    "serve",
    "connect",
    "LiveClient",
    "SyncServer",
    "SyncError",
    "ProtocolError",
    "MessageTooLargeError",
    "InvalidChangeError",
    "MalformedChallengeError",
    "AuthError",
    "UnknownPeerError",
    "UntrustedServerError",
    "BadSignatureError",
    "ReplayError",
    "ExpiredChallengeError",
    "NotAuthorizedError",
    "SchemaMismatchError",
    "DuplicateSiteError",
    "ApplyError",
    "CorruptFileError",
    "TransportError",
    "TLSError",
    "PeerRefusedError",
]

_WEBSOCKET_NAMES = {"serve", "connect", "LiveClient", "SyncServer"}


def __getattr__(name: str) -> Any:
    """`sync.serve` and the other WebSocket names, imported on first use."""
    if name in _WEBSOCKET_NAMES:
        from . import websocket

        return getattr(websocket, name)
    raise AttributeError(f"module 'sync' has no attribute {name!r}")
