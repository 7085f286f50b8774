"""The trust list: which peers' keys this replica admits, and what each may do here.

    trust_peer(db, "ed25519:...", name="laptop", can="write", tables=["events"])
    find_trusted(db, key)          # -> TrustEntry | None
    untrust_peer(db, "ed25519:...")
    authorize_write(entry, {"events", "topics"})   # NotAuthorizedError naming `topics`

Kept in `__sync_trust`, a local table (never replicated: each replica decides whom it trusts).

What a grant means: `can` is what the peer may do to *this* replica when it connects as a
client. `read`: it pulls everything this replica has; any page it pushes is refused whole.
`write`: it pulls everything and may push changes, to every table or only to the tables of
its allow-list. The allow-list limits writes only: a peer that may read reads every table,
because a partial copy would break the per-peer watermarks that make convergence exact (a
table added to its list later would miss its older rows). A client's own trust list only
recognises servers: what a server sends back in a pull is not limited by it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from enum import Enum

import msgspec

from engine.database import Database, Row

from .errors import NotAuthorizedError
from .identity import format_public_key, parse_public_key

__all__ = [
    "Grant",
    "TrustEntry",
    "trust_peer",
    "untrust_peer",
    "trusted_peers",
    "find_trusted",
    "authorize_write",
]

_TABLE = """
CREATE TABLE IF NOT EXISTS __sync_trust (
    public_key TEXT    PRIMARY KEY NOT NULL,
    name       TEXT    NOT NULL DEFAULT '',
    can        TEXT    NOT NULL DEFAULT 'read' CHECK (can IN ('read', 'write')),
    tables     TEXT    NOT NULL DEFAULT '',
    added_at   INTEGER NOT NULL DEFAULT 0
)
"""


class Grant(str, Enum):
    READ = "read"
    WRITE = "write"


class TrustEntry(msgspec.Struct, frozen=True):
    """One trusted peer. `tables` empty: every table (for a writer)."""

    public_key: str
    name: str
    can: Grant
    tables: tuple[str, ...] = ()
    added_at: int = 0

    @property
    def raw_key(self) -> bytes:
        return parse_public_key(self.public_key)

    def describe(self) -> str:
        """One line for status output: `laptop  write (events, topics)  ed25519:...`."""
        scope = f" ({', '.join(self.tables)})" if self.tables else " (all tables)" if self.can is Grant.WRITE else ""
        return f"{self.name}  {self.can.value}{scope}  {self.public_key}"


def _ensure_table(db: Database) -> None:
    with db.transaction() as tx:
        tx.execute(_TABLE)


def _has_table(db: Database) -> bool:
    with db.reading() as session:
        return bool(session.scalar("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '__sync_trust'"))


def _entry(row: Row) -> TrustEntry:
    public_key, name, can, tables, added_at = row
    return TrustEntry(public_key, name, Grant(can), tuple(json.loads(tables)) if tables else (), added_at)


def trust_peer(
    db: Database, public_key: str | bytes, *, name: str, can: Grant | str, tables: Iterable[str] = ()
) -> TrustEntry:
    """Admit the peer holding `public_key` with grant `can`; trusting a known key again
    replaces its entry (that is how a grant is changed).

    `tables` (write grants): the tables it may write; empty for all.

    Raises:
        ValueError: a malformed key, an empty name, an unknown grant, a table that is not a
            CRR of this database, or an allow-list on a read-only grant.
    """
    key = format_public_key(public_key) if isinstance(public_key, bytes) else format_public_key(parse_public_key(public_key))
    if not name.strip():
        raise ValueError("a trusted peer needs a name (e.g. --name laptop)")
    try:
        grant = Grant(can)
    except ValueError:
        raise ValueError(f"unknown grant {can!r}: expected 'read' or 'write'") from None
    allowed = tuple(sorted(set(tables)))
    if allowed and grant is Grant.READ:
        raise ValueError("a table list limits writes; a read-only peer may write none (drop --tables or use --can write)")
    unknown = sorted(set(allowed) - set(db.crr_tables))
    if unknown:
        raise ValueError(f"no replicated table named {unknown[0]!r} (tables: {', '.join(db.crr_tables)})")
    _ensure_table(db)
    with db.transaction() as tx:
        tx.execute(
            "INSERT INTO __sync_trust (public_key, name, can, tables, added_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (public_key) DO UPDATE SET name = excluded.name, can = excluded.can, "
            "tables = excluded.tables, added_at = excluded.added_at",
            (key, name.strip(), grant.value, json.dumps(list(allowed)) if allowed else "", tx.now_ms()),
        )
    return TrustEntry(key, name.strip(), grant, allowed, db.clock.now_ms())


def untrust_peer(db: Database, public_key: str | bytes) -> int:
    """Remove a peer from the trust list; returns the number of entries removed (0: it was not
    trusted). Connections already open keep running until they close.

    Raises:
        ValueError: a malformed key.
    """
    key = format_public_key(public_key) if isinstance(public_key, bytes) else format_public_key(parse_public_key(public_key))
    if not _has_table(db):
        return 0
    with db.transaction() as tx:
        tx.execute("DELETE FROM __sync_trust WHERE public_key = ?", (key,))
        return tx.changes()


def trusted_peers(db: Database) -> list[TrustEntry]:
    """Every trusted peer, by name."""
    if not _has_table(db):
        return []
    with db.reading() as session:
        rows = session.execute("SELECT public_key, name, can, tables, added_at FROM __sync_trust ORDER BY name, public_key")
    return [_entry(row) for row in rows]


def find_trusted(db: Database, public_key: bytes) -> TrustEntry | None:
    """The entry of a raw 32-byte key, or None if it is not trusted."""
    if not _has_table(db):
        return None
    with db.reading() as session:
        row = session.one(
            "SELECT public_key, name, can, tables, added_at FROM __sync_trust WHERE public_key = ?",
            (format_public_key(public_key),),
        )
    return _entry(row) if row else None


def authorize_write(entry: TrustEntry, tables: Iterable[str]) -> None:
    """May the peer of `entry` write a page touching `tables`? The page is all or nothing.

    Raises:
        NotAuthorizedError: the peer is read-only, or one of the tables (the first in name
            order, named in the error) is not on its allow-list.
    """
    touched = sorted(set(tables))
    if entry.can is not Grant.WRITE:
        raise NotAuthorizedError(
            f"peer {entry.name!r} may only read; its page writing {', '.join(touched) or 'nothing'} "
            f"was refused whole (nothing applied)",
            table=touched[0] if touched else "",
            peer_name=entry.name,
        )
    if entry.tables:
        outside = [table for table in touched if table not in entry.tables]
        if outside:
            raise NotAuthorizedError(
                f"peer {entry.name!r} may not write table {outside[0]!r} (it may write "
                f"{', '.join(entry.tables)}); its page was refused whole (nothing applied)",
                table=outside[0],
                peer_name=entry.name,
            )
