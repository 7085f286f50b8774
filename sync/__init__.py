"""Sync: move changesets (rows of `crsql_changes`) between replicas of any CRR schema.

    from sync import Peer, export_changes, import_changes
    Peer(db_a).sync_with(Peer(db_b))                  # in-process
    Peer(db_a).sync_with("ws://host:8765", token=t)   # WebSocket (sync.websocket)
    server = sync.serve(db, "127.0.0.1", 8765, token=t)

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
    CorruptFileError,
    DuplicateSiteError,
    InvalidChangeError,
    MessageTooLargeError,
    PeerRefusedError,
    ProtocolError,
    SchemaMismatchError,
    SyncError,
    TransportError,
)
from .files import export_changes, import_changes
from .peer import Peer, SyncResult
from .progress import SyncProgress
from .session import Role, Session, State
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
    "serve",
    "connect",
    "LiveClient",
    "SyncServer",
    "SyncError",
    "ProtocolError",
    "MessageTooLargeError",
    "InvalidChangeError",
    "AuthError",
    "SchemaMismatchError",
    "DuplicateSiteError",
    "ApplyError",
    "CorruptFileError",
    "TransportError",
    "PeerRefusedError",
]

_WEBSOCKET_NAMES = {"serve", "connect", "LiveClient", "SyncServer"}


def __getattr__(name: str) -> Any:
    """`sync.serve` and the other WebSocket names, imported on first use."""
    if name in _WEBSOCKET_NAMES:
        from . import websocket

        return getattr(websocket, name)
    raise AttributeError(f"module 'sync' has no attribute {name!r}")
