"""Per-peer bookkeeping: what this replica holds of each peer and what each peer acknowledged.

One row per peer in `__sync_peers` (a plain local table, never a CRR, created on first use):

    site_id      the peer's site id
    received     the peer's db_version up to which its changes are applied here; moves in the
                 same transaction as the merge of the page that carries it
    incarnation  the peer's incarnation whose page last moved `received` (engine.lineage): the
                 peer checks it continues that history before anything is exchanged
    acked        our db_version the peer last acknowledged (for status displays)
    updated_at   when the row last changed (milliseconds)

A watermark is per *peer*, not per origin (DESIGN.md §8): merged changes are re-stamped with
the receiver's db_version, so a relay's versions are its own.
"""

from __future__ import annotations

import msgspec

from engine.database import Database, Session as Tx

__all__ = [
    "PeerWatermark",
    "PeerRecord",
    "ensure_tables",
    "received_watermark",
    "peer_record",
    "store_received",
    "record_ack",
    "watermarks",
]

_CREATE = """CREATE TABLE IF NOT EXISTS __sync_peers (
    site_id     TEXT    NOT NULL PRIMARY KEY,
    received    INTEGER NOT NULL DEFAULT 0,
    acked       INTEGER NOT NULL DEFAULT 0,
    updated_at  INTEGER NOT NULL DEFAULT 0,
    incarnation TEXT    NOT NULL DEFAULT ''
)"""


class PeerWatermark(msgspec.Struct, frozen=True):
    """What this replica knows of one peer: `received` = the peer's db_version up to which its
    changes are applied here; `acked` = our db_version the peer last acknowledged."""

    site_id: str
    received: int
    acked: int
    updated_at: int
    incarnation: str = ""


class PeerRecord(msgspec.Struct, frozen=True):
    """What we tell a peer we hold of it: its changes up to `received`, the last ones from its
    `incarnation`. The peer checks that it continues that history (engine.lineage)."""

    received: int = 0
    incarnation: str = ""


def ensure_tables(db: Database) -> None:
    """Create `__sync_peers` if it is missing (and add columns a first-round file lacks)."""
    with db.transaction() as tx:
        tx.execute(_CREATE)
        columns = {row[1] for row in tx.execute("PRAGMA table_info(__sync_peers)")}
        if "incarnation" not in columns:
            tx.execute("ALTER TABLE __sync_peers ADD COLUMN incarnation TEXT NOT NULL DEFAULT ''")


def peer_record(db: Database, peer: str, tx: Tx | None = None) -> PeerRecord:
    """Our record of `peer` (zeros if never synced)."""
    with db.reading(tx) as s:
        row = s.one("SELECT received, incarnation FROM __sync_peers WHERE site_id = ?", (peer,))
    return PeerRecord(*row) if row else PeerRecord()


def received_watermark(db: Database, peer: str, tx: Tx | None = None) -> int:
    """The peer's db_version up to which its changes are applied here (0 if never synced)."""
    return peer_record(db, peer, tx).received


def store_received(tx: Tx, peer: str, watermark: int, incarnation: str) -> None:
    """Inside the merging transaction: we now hold `peer`'s changes up to `watermark`, the
    last ones from its `incarnation`."""
    tx.execute(
        "INSERT INTO __sync_peers (site_id, received, incarnation, updated_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (site_id) DO UPDATE SET received = max(received, excluded.received), "
        "incarnation = CASE WHEN excluded.received >= received THEN excluded.incarnation ELSE incarnation END, "
        "updated_at = excluded.updated_at",
        (peer, watermark, incarnation, tx.now_ms()),
    )


def record_ack(db: Database, peer: str, acked: int, covered: int = 0, incarnation: str = "") -> None:
    """Remember that `peer` acknowledged our changes up to our db_version `acked` (for status);
    with `covered`, also that we hold everything of the peer's (of its `incarnation`) up to
    its db_version `covered` (one transaction for both)."""
    with db.transaction() as tx:
        tx.execute(
            "INSERT INTO __sync_peers (site_id, acked, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (site_id) DO UPDATE SET acked = max(acked, excluded.acked), "
            "updated_at = excluded.updated_at",
            (peer, acked, tx.now_ms()),
        )
        if covered:
            store_received(tx, peer, covered, incarnation)


def watermarks(db: Database) -> list[PeerWatermark]:
    """Every peer this replica has exchanged changes with, by site id."""
    with db.reading() as s:
        rows = s.execute(
            "SELECT site_id, received, acked, updated_at, incarnation FROM __sync_peers ORDER BY site_id"
        )
    return [PeerWatermark(*row) for row in rows]
