"""Where a replica stands on a NATS stream, stored in its own database.

    __sync_nats_positions(stream, published, resume, updated_at)     plain table, not a CRR
        published  our db_version up to which our own changes are in the stream (publish acked)
        resume     the stream sequence to (re)start reading from: every message before it is
                   merged here or needed nothing (stored after those merges: it may lag, never lead)

What we hold of each *origin* is an Inbox watermark in `__sync_peers` under the key
`nats:<site id>` (`sync.watermarks.stream_key`): the origin's db_version up to which its own
changes are merged here, and the origin's incarnation whose page moved it (from the page's
`Crdt-Incarnation` header; empty when adopted from a checkpoint). It is kept apart from the WebSocket watermark of the same site (key `<site id>`) because
the two claims differ: a WebSocket watermark covers everything that peer held (relayed changes
too), a stream watermark only the origin's own changes. The stronger claim implies the weaker,
never the reverse, so WebSocket watermarks are promoted into stream watermarks (`promote_peers`)
and never the other way.
"""

from __future__ import annotations

from engine.database import Database, Session as Tx

from ..watermarks import received_watermark, store_received, stream_key, stream_origin, watermarks

__all__ = [
    "ensure_table",
    "read_positions",
    "store_published",
    "store_resume",
    "origin_key",
    "origin_watermark",
    "origin_marks",
    "adopt_marks",
    "promote_peers",
]

_TABLE = """CREATE TABLE IF NOT EXISTS __sync_nats_positions (
    stream     TEXT    NOT NULL PRIMARY KEY,
    published  INTEGER NOT NULL DEFAULT 0,
    resume     INTEGER NOT NULL DEFAULT 1,
    updated_at INTEGER NOT NULL DEFAULT 0
)"""


def ensure_table(db: Database) -> None:
    with db.transaction() as tx:
        tx.execute(_TABLE)


def read_positions(db: Database, stream: str) -> tuple[int, int]:
    """(published, resume) for `stream`; (0, 1) the first time."""
    with db.reading() as s:
        row = s.one("SELECT published, resume FROM __sync_nats_positions WHERE stream = ?", (stream,))
    return (row[0], row[1]) if row else (0, 1)


def store_published(db: Database, stream: str, upto: int) -> None:
    with db.transaction() as tx:
        tx.execute(
            "INSERT INTO __sync_nats_positions (stream, published, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (stream) DO UPDATE SET published = max(published, excluded.published), "
            "updated_at = excluded.updated_at",
            (stream, upto, tx.now_ms()),
        )


def store_resume(tx: Tx, stream: str, seq: int) -> None:
    """Set where reading restarts (may move back: a bootstrap re-reads the whole stream)."""
    tx.execute(
        "INSERT INTO __sync_nats_positions (stream, resume, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT (stream) DO UPDATE SET resume = excluded.resume, updated_at = excluded.updated_at",
        (stream, seq, tx.now_ms()),
    )


def origin_key(site_id: str) -> str:
    """The `__sync_peers` key of what we hold of `site_id`'s own changes from a stream."""
    return stream_key(site_id)


def origin_watermark(db: Database, site_id: str) -> int:
    return received_watermark(db, origin_key(site_id))


def origin_marks(db: Database) -> dict[str, int]:
    """For every origin we know of: its db_version up to which its own changes are here, from
    the stream watermarks and (stronger claims) the WebSocket watermarks alike."""
    marks: dict[str, int] = {}
    for mark in watermarks(db):
        site = stream_origin(mark.site_id) or mark.site_id
        marks[site] = max(marks.get(site, 0), mark.received)
    return marks


def adopt_marks(db: Database, marks: dict[str, int], incarnations: dict[str, str] | None = None) -> None:
    """Raise our stream watermarks to `marks` (never lowers one), in one transaction, each with
    the origin's incarnation from `incarnations` when known ("" otherwise)."""
    known = incarnations or {}
    with db.transaction() as tx:
        for site, held in marks.items():
            if site != db.site_id and held > 0:
                store_received(tx, origin_key(site), held, known.get(site, ""))


def promote_peers(db: Database) -> None:
    """Raise each stream watermark to the WebSocket watermark of the same site: changes synced
    directly from a peer need not be read from the stream again, and their absence from the
    stream is no gap."""
    direct = [m for m in watermarks(db) if stream_origin(m.site_id) is None]
    adopt_marks(db, {m.site_id: m.received for m in direct}, {m.site_id: m.incarnation for m in direct})
