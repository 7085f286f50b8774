"""Joining after the stream's retention: pull from a peer over WebSocket, then resume the stream.

A stream keeps what its limits allow (age, count, bytes). A replica that joins later, or comes
back after the pages it lacks were dropped, finds a gap: the first page it can read of some
origin starts after what it holds of that origin (`StreamGapError`). It closes the gap by a
bootstrap from any peer P that serves the WebSocket protocol (`crdt-sync serve`, `sync.serve`):

1. One sync round with P (`Peer(db).sync_with(url)`, with the token, keys and TLS context of
   the `BootstrapSource`). Afterwards we hold everything P held at
   its db_version `v` (our WebSocket watermark for P): merges are idempotent and cr-sqlite
   state only grows, so "holding P's state at v" includes P's state at any earlier version.
2. P's checkpoint from the bucket: at its db_version `c`, P held each origin O's own changes up
   to `w(O)` (P writes it from one snapshot: the watermarks, then its db_version). If `c <= v`
   we now hold all of that, so our stream watermark for O may become `w(O)`. If P moved on
   after our round (`c > v`), a second round makes `v >= c`: the checkpoint was written before it.
3. Our watermark for P itself becomes `v` (P's own changes up to v came with the round).
4. The replica reads the stream again from its start: pages at or below the new watermarks are
   duplicates, the rest follow without a gap. An origin no checkpoint covers still gaps, and
   the replica stops with `StreamGapError` naming it.

Watermarks are never lowered and only ever claim what a merge or a pull provably brought, so a
bootstrap can be repeated or interrupted at any point: the worst case is reading again.

Each replica on the stream writes its checkpoint (`Checkpoint`) to the bucket after it merged
something, at most once per checkpoint interval, and when it closes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import msgspec
import nats.js.errors

from engine.database import Database

from ..identity import public_key_bytes
from ..peer import Peer
from ..watermarks import PeerRecord, peer_record
from .layout import RunDb
from .positions import adopt_marks, origin_marks

if TYPE_CHECKING:
    from ssl import SSLContext

__all__ = ["BootstrapSource", "Checkpoint", "Checkpoints", "read_checkpoint", "bootstrap"]

log = logging.getLogger("sync.nats")


class BootstrapSource:
    """Where to close a gap: a WebSocket peer (`ws://` or `wss://host:port`) and how to meet it,
    as `Peer.sync_with` takes it: its token, the key it must prove (`server_key`), the TLS
    context (`ssl`), and whether it must prove a key of our trust list (`require_keys`).
    Checked here, so that a mistake shows when the replica starts, not at its first gap."""

    def __init__(self, url: str, token: str | None = None, attempts: int = 3, *,
                 server_key: str | bytes | None = None, ssl: "SSLContext | None" = None,
                 require_keys: bool = False):
        """Raises:
            ValueError: `url` is not ws:// or wss://, `ssl` for a ws:// URL, `server_key` is
                not a public key."""
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"bootstrap peer {url!r} is not a ws:// or wss:// URL")
        if ssl is not None and not url.startswith("wss://"):
            raise ValueError(f"ssl= applies to a wss:// bootstrap peer, not {url}")
        public_key_bytes(server_key)
        self.url, self.token, self.attempts = url, token, attempts
        self.server_key, self.ssl, self.require_keys = server_key, ssl, require_keys


class Checkpoint(msgspec.Struct, frozen=True):
    """At its db_version `db_version`, replica `site_id` held each origin's own changes up to
    `origins[origin]` (that origin's db_version)."""

    site_id: str
    db_version: int
    origins: dict[str, int]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Checkpoint)


def read_checkpoint(db: Database) -> Checkpoint:
    """This replica's checkpoint, from one read snapshot: the watermarks first, then the
    db_version (the state at that version includes what the watermarks claim)."""
    with db.reading():
        origins = origin_marks(db)
        version = db.db_version
    return Checkpoint(db.site_id, version, origins)


class Checkpoints:
    """The checkpoint bucket of a stream: each replica's latest checkpoint under its site id."""

    def __init__(self, kv: Any):
        self.kv = kv

    async def put(self, checkpoint: Checkpoint) -> None:
        await self.kv.put(checkpoint.site_id, _encoder.encode(checkpoint))

    async def get(self, site_id: str) -> Checkpoint | None:
        """The latest checkpoint of `site_id`; None if it never wrote one or it is unreadable."""
        try:
            entry = await self.kv.get(site_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        try:
            checkpoint = _decoder.decode(entry.value or b"")
        except (msgspec.DecodeError, ValueError) as error:
            log.warning("checkpoint of %s is unreadable (%s); ignored", site_id, error)
            return None
        return checkpoint if checkpoint.site_id == site_id else None


async def bootstrap(db: Database, source: BootstrapSource, checkpoints: Checkpoints, run_db: RunDb) -> dict[str, int]:
    """Pull from the peer `source` names, then raise our stream watermarks to what the pull
    provably brought (see the module docstring). Returns the watermarks adopted, by origin.

    Raises:
        SyncError: the round failed (`TransportError`, `TLSError`, a refusal such as
            `AuthError`, `UntrustedServerError`, `SchemaMismatchError` or `DuplicateSiteError`);
            what it applied stays applied, no watermark moved.
    """
    peer, held = await _round(db, source, run_db)
    checkpoint = await checkpoints.get(peer)
    if checkpoint is not None and checkpoint.db_version > held.received:
        peer, held = await _round(db, source, run_db)  # written before this round started
    marks: dict[str, int] = {}
    if checkpoint is not None and checkpoint.db_version <= held.received:
        marks.update(checkpoint.origins)
    marks[peer] = max(marks.get(peer, 0), held.received)
    marks.pop(db.site_id, None)
    await run_db(adopt_marks, db, marks, {peer: held.incarnation})
    log.info("bootstrap of %s from %s (site %s at its db_version %d): adopted %d origin watermarks",
             db.path, source.url, peer, held.received, len(marks))
    return marks


async def _round(db: Database, source: BootstrapSource, run_db: RunDb) -> tuple[str, PeerRecord]:
    """One sync round with the source; (the peer's site id, our record of it afterwards)."""

    def sync_once() -> tuple[str, PeerRecord]:
        result = Peer(db, require_keys=source.require_keys).sync_with(
            source.url, token=source.token, server_key=source.server_key, ssl=source.ssl)
        return result.remote_site, peer_record(db, result.remote_site)

    pulled: tuple[str, PeerRecord] = await run_db(sync_once)
    return pulled
