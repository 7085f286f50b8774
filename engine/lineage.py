"""Incarnations: telling a replica file from a copy of it that shares its site id.

cr-sqlite's site id lives inside the file, so a copied file (a restored backup, a copied app
folder, a VM snapshot) is a second replica with the *same* site id. Both number their new
writes from the same db_version on, and a peer that already holds versions 1..W of that site
skips the copy's own versions 1..W: writes lost with no error.

So every file records its *lineage*: a row per incarnation in `__engine_lineage` (a local
table, never replicated), with the db_version at which it began. A new incarnation begins
when the file is opened from another place on disk than the last incarnation's (another
device/inode: a copy, a restore, a move to another file system); reopening the same file
continues the current one, and so do several connections or processes sharing it.

A peer records, with its watermark for us, the incarnation whose pages it last applied:
"I hold your versions up to W, the last ones from incarnation X". This file continues that
history only if X is in our lineage and X's successor here (if any) began at or after W —
otherwise X wrote versions after this file split from it, and the peer holds changes this
file never had (or skipped ours). `descends_from` is that check; sync refuses a peer whose
record fails it with `DuplicateSiteError` and `Database.clone_to` (`give_new_site_id`) is
the fix.
"""

from __future__ import annotations

import os
import secrets
from typing import cast

import apsw

__all__ = ["ensure_incarnation", "descends_from", "reset", "give_new_site_id", "LINEAGE_TABLE"]

LINEAGE_TABLE = "__engine_lineage"

_CREATE = f"""CREATE TABLE IF NOT EXISTS {LINEAGE_TABLE} (
    incarnation   TEXT    NOT NULL PRIMARY KEY,
    file_key      TEXT    NOT NULL DEFAULT '',
    began_at      INTEGER NOT NULL DEFAULT 0,
    opened_at     INTEGER NOT NULL DEFAULT 0,
    seq           INTEGER NOT NULL DEFAULT 0
)"""


def _file_key(path: str) -> str:
    """Where the file lives: device and inode (a copy or restore gets another inode)."""
    stat = os.stat(path)
    return f"{stat.st_dev}:{stat.st_ino}"


def ensure_incarnation(connection: apsw.Connection, path: str | None, now_ms: int) -> str:
    """The current incarnation of the file at `path`, beginning a new one if the file was
    copied or moved since the last (or has none). `path` None: an in-memory database,
    always a new incarnation. Runs in its own IMMEDIATE transaction (two processes opening
    one file agree on one incarnation)."""
    key = _file_key(path) if path else f"memory:{secrets.token_hex(8)}"
    connection.execute(_CREATE)
    current = _current(connection, key)
    if current is not None:
        return current
    connection.execute("BEGIN IMMEDIATE")
    try:
        current = _current(connection, key)  # another process may have begun it meanwhile
        if current is None:
            current = secrets.token_hex(8)
            version = connection.execute("SELECT crsql_db_version()").fetchall()[0][0]
            connection.execute(
                f"INSERT INTO {LINEAGE_TABLE} (incarnation, file_key, began_at, opened_at, seq) "
                f"SELECT ?, ?, ?, ?, coalesce(max(seq), 0) + 1 FROM {LINEAGE_TABLE}",
                (current, key, version, now_ms),
            )
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    return current


def _current(connection: apsw.Connection, key: str) -> str | None:
    last = connection.execute(
        f"SELECT incarnation, file_key FROM {LINEAGE_TABLE} ORDER BY seq DESC LIMIT 1"
    ).fetchall()
    return cast(str, last[0][0]) if last and last[0][1] == key else None  # incarnation is TEXT


def descends_from(connection: apsw.Connection, incarnation: str, version: int) -> bool:
    """True when this file continues `incarnation` up to db_version `version` (see module doc).
    An empty `incarnation` (a peer that recorded none) is accepted."""
    if not incarnation:
        return True
    rows = connection.execute(
        f"SELECT seq FROM {LINEAGE_TABLE} WHERE incarnation = ?", (incarnation,)
    ).fetchall()
    if not rows:
        return False
    successor = connection.execute(
        f"SELECT began_at FROM {LINEAGE_TABLE} WHERE seq > ? ORDER BY seq LIMIT 1", (rows[0][0],)
    ).fetchall()
    return not successor or cast(int, successor[0][0]) >= version  # began_at is INTEGER


def reset(connection: apsw.Connection) -> None:
    """Forget the lineage (a clone with a new site id starts a history of its own)."""
    connection.execute(f"DELETE FROM {LINEAGE_TABLE}")


def give_new_site_id(path: str) -> str:
    """Make the database file at `path` (a fresh copy, not open anywhere) a replica of its own:
    a new random site id, its lineage forgotten. Returns the new site id (32 hex characters).

    cr-sqlite refers to sites by ordinal in its clock tables, ordinal 0 being this replica.
    The copy's existing changes were made by the *original* site, so they keep its id: ordinal 0
    gets the new id, the original's id a new ordinal, and the clock rows of ordinal 0 point there. Done on a plain connection (no extension loaded, so no
    cached site id), in one transaction.
    """
    new_site = secrets.token_bytes(16)
    connection = apsw.Connection(path)
    try:
        connection.execute("BEGIN IMMEDIATE")
        try:
            old_site = connection.execute("SELECT site_id FROM crsql_site_id WHERE ordinal = 0").fetchall()[0][0]
            ordinal = connection.execute("SELECT max(ordinal) + 1 FROM crsql_site_id").fetchall()[0][0]
            connection.execute("UPDATE crsql_site_id SET site_id = ? WHERE ordinal = 0", (new_site,))
            connection.execute("INSERT INTO crsql_site_id (site_id, ordinal) VALUES (?, ?)", (old_site, ordinal))
            clocks = [row[0] for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '%\\_\\_crsql\\_clock' ESCAPE '\\'")]
            for table in clocks:
                connection.execute(f'UPDATE "{table}" SET site_id = ? WHERE site_id = 0', (ordinal,))
            connection.execute(f"CREATE TABLE IF NOT EXISTS {LINEAGE_TABLE} (incarnation TEXT)")
            reset(connection)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
    finally:
        connection.close()
    return new_site.hex()
