"""`watch`: the changes committed to a replica, as an async iterator of bounded batches.

    async for batch in sync.aio.watch(db):          # from now on; since=0 for everything
        for change in batch.changes:                # rows of crsql_changes, by db_version
            print(change.table, change.cid, change.val)
        resume_from = batch.upto

Every commit counts, whoever made it: this process's writes, merges from peers (they carry
the receiver's db_version and their origin's `site_id`), other processes' writes. Woken by
the database's change notifier (`db.on_change`), whose callback hands over to the loop.

A wake reads the span of db_versions from the last one delivered up to the current one, in
batches of at most `max_changes` rows (a transaction larger than that arrives in several
consecutive batches). The span is read by one statement on a reader connection borrowed for
the span's life, in a worker thread, so a huge transaction costs one pass, and nothing is
held between spans (a ":memory:" database has a single connection, which the feed then
shares with the writer: watch files). cr-sqlite keeps current state only: a change overwritten before it was
read arrives once, with its newer version.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import ExitStack
from typing import Any, NamedTuple

import msgspec

from engine import Database
from engine.aio import AsyncDatabase

from ..changes import CHANGE_COLUMNS
from .channel import Lane, loop_listener
from .peer import database_of

__all__ = ["watch", "Change", "ChangeBatch", "DEFAULT_BATCH"]

DEFAULT_BATCH = 1000

_SELECT_SPAN = f"SELECT {CHANGE_COLUMNS} FROM crsql_changes WHERE db_version > ? AND db_version <= ? ORDER BY db_version"


class Change(NamedTuple):
    """One row of `crsql_changes` (the columns, in order)."""

    table: str
    pk: bytes  # packed primary key (sync.changes.unpack_pk)
    cid: str  # column name, or "-1" for the row's existence (delete / create)
    val: Any
    col_version: int
    db_version: int
    site_id: bytes  # where the change was made (16 bytes)
    cl: int
    seq: int


class ChangeBatch(msgspec.Struct, frozen=True):
    """Changes in db_version order. `upto`: every change up to this db_version has been
    delivered once this batch is (pass it as `since=` to resume; the rest of a transaction
    split over batches may come again)."""

    changes: list[Change]
    upto: int


def _end_read(connection: Any) -> None:
    if connection.in_transaction:
        connection.execute("COMMIT")


class _SpanReader:
    """Reads spans of db_versions on a reader connection it borrows per span. Used through a
    `Lane`: one worker thread at a time."""

    def __init__(self, db: Database, max_changes: int):
        self.db = db
        self.max_changes = max_changes
        self._borrowed = ExitStack()
        self._cursor: Any = None
        self._since = self._until = 0

    def start_version(self) -> int:
        return self.db.db_version

    def read(self, since: int) -> ChangeBatch:
        """The next batch after `since`: opens a span up to the current db_version if none is
        open, and closes it once it is read through."""
        if self._cursor is None:
            self._open(since)
        rows = list(itertools.islice(self._cursor, self.max_changes))
        if len(rows) < self.max_changes:
            upto = self._until
            self.close()
        else:
            last = rows[-1][5]
            upto = max(self._since, last - 1)  # `last` may continue in the next batch
        return ChangeBatch([Change._make(row) for row in rows], upto)

    def _open(self, since: int) -> None:
        session = self._borrowed.enter_context(self.db.borrow_reader())
        connection = session.connection
        # One read transaction for the span: the bound and the rows come from one snapshot, and
        # another connection's schema change (a bookkeeping table created meanwhile) cannot
        # invalidate the open cursor (it did: SchemaChangeError mid-span).
        connection.execute("BEGIN DEFERRED")
        self._borrowed.callback(_end_read, connection)  # runs before the reader goes back
        try:
            self._until = session.scalar("SELECT crsql_db_version()")
            self._since = since
            self._cursor = session.connection.execute(_SELECT_SPAN, (since, self._until))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        cursor, self._cursor = self._cursor, None
        try:
            if cursor is not None:
                cursor.close()
        finally:
            self._borrowed.close()


async def watch(
    db: Database | AsyncDatabase,
    *,
    since: int | None = None,
    max_changes: int = DEFAULT_BATCH,
) -> AsyncIterator[ChangeBatch]:
    """Yield the changes committed to `db` after db_version `since` (None: from now on), in
    batches of at most `max_changes`, waiting for new commits between batches; never ends by
    itself. Leave it with `break` (or `aclose()`); it then unsubscribes and releases its reader.

    Raises:
        ValueError: `max_changes` is below 1 or `since` is negative.
        EngineError: the database was closed.
    """
    if max_changes < 1:
        raise ValueError(f"max_changes must be at least 1, not {max_changes}")
    if since is not None and since < 0:
        raise ValueError(f"since must be a db_version (>= 0), not {since}")
    database = database_of(db)
    reader, lane = _SpanReader(database, max_changes), Lane()
    woken = asyncio.Event()
    unsubscribe = database.on_change(loop_listener(asyncio.get_running_loop(), woken.set))
    try:
        cursor = since if since is not None else await lane.call(reader.start_version)
        while True:
            woken.clear()  # before reading: a commit from here on wakes the next read
            batch = await lane.call(reader.read, cursor)
            while True:
                cursor = batch.upto
                if batch.changes:
                    yield batch
                if len(batch.changes) < max_changes:
                    break
                batch = await lane.call(reader.read, cursor)
            await woken.wait()
    finally:
        unsubscribe()
        await lane.finish(reader.close)
