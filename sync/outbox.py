"""Sending: the pages one replica owes one peer, read lazily from `crsql_changes`.

A page holds whole db_version groups bounded by `Limits` (transaction atomicity survives
sync). The page query excludes the receiver's own site (never send a replica its own
changes) and the versions this session merged from the receiver (`EchoRanges`).

The pages of a backlog come off one read (`_Stream`): one query over everything the receiver
lacks up to the db_version at its start, kept open on a reader connection lent to the outbox
until the last row is sent. No row is read twice, and a group larger than a page is sent as
parts straight from that read, which the receiver merges at once (sync.inbox). Memory stays
O(page): the read is a cursor, not a copy.

Reads use the database's reader connections: building pages never waits for a merge
another session is applying.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import msgspec

from engine.database import Database, Row

from .changes import CHANGE_COLUMNS, Limits
from .protocol import Changes, site_bytes

__all__ = ["Outbox", "EchoRanges"]

_SELECT_PAGE = (
    f"SELECT {CHANGE_COLUMNS} FROM crsql_changes "
    "WHERE db_version > ? AND db_version <= ? AND {sites}{echo} ORDER BY db_version"
)
_ALL_BUT_RECEIVER = "site_id IS NOT ?"  # a peer gets everything but its own changes
_OWN_ONLY = "site_id = ?"  # a broadcast stream gets only the changes this replica originated

_temp_names = itertools.count(1)
_SNAPSHOT_COLUMNS = ('"table" TEXT, pk BLOB, cid TEXT, val, col_version INTEGER, db_version INTEGER, '
                     "site_id BLOB, cl INTEGER, seq INTEGER")


class EchoRanges:
    """db_version ranges of this replica made by merging pages from one peer in this session.

    Changes there came from that peer (their origin may be a third site, relayed), so
    sending them back would be an echo. Local writes made in the same transaction (an
    merge listener's) share the version and are still sent: only rows of other sites
    are skipped. Kept small: forgetting a range only costs an echo, never a gap.
    """

    LIMIT = 16

    def __init__(self) -> None:
        self.ranges: list[list[int]] = []

    def add(self, low: int, high: int) -> None:
        """Versions (low, high] came from the peer."""
        if self.ranges and self.ranges[-1][1] == low:
            self.ranges[-1][1] = high
            return
        self.ranges.append([low, high])
        del self.ranges[:-self.LIMIT]

    def clause(self, after: int, own: bytes) -> tuple[str, tuple[int | bytes, ...]]:
        """A WHERE clause (and its parameters) leaving out the echoes above version `after`."""
        sql = ""
        params: tuple[int | bytes, ...] = ()
        for low, high in self.ranges:
            if high > after:
                sql += " AND NOT (db_version > ? AND db_version <= ? AND site_id IS NOT ?)"
                params += (low, high, own)
        return sql, params


def _row_size(row: Row) -> int:
    value = row[3]
    size = len(value) if value.__class__ in (str, bytes) else 9
    return size + len(row[0]) + len(row[1]) + len(row[2]) + 48


class _Stream:
    """One read of the changes a receiver lacks in (after, snap], kept open across pages.

    Pages come off one query instead of one query per page: no row is read twice (a group cut
    off by a page bound stays in `buffer` for the next page) and a group larger than a page is
    sent in parts straight from the same read, with no copy. On a file database the read is a
    cursor in one read transaction on a reader connection lent to the stream for its life, so
    writers go on and the snapshot stays consistent; the stream ends (and gives the reader
    back) when the receiver has been sent everything up to `snap`. An in-memory database has
    only the writer's connection, which cannot keep a cursor open across calls: there the
    snapshot is copied once into a TEMP table and read back in chunks, under the writer's lock.
    """

    _CHUNK = 1000  # rows per read of the TEMP table (in-memory databases)

    def __init__(self, db: Database, lease: ExitStack, session: Any, snap: int):
        self.db, self.snap = db, snap
        self.buffer: list[tuple[Any, ...]] = []  # rows read and not yet sent, in order
        self.rows_read = 0
        self._lease, self._session = lease, session
        self._cursor: Any = None
        self._table: str | None = None
        self._last_rowid = 0
        self._rows: Iterator[tuple[Any, ...]] = iter(())  # set by open(): one iterator for the stream's life

    @classmethod
    def open(cls, db: Database, after: int, ceiling: int | None,
             query: Callable[[int, int], tuple[str, tuple[Any, ...]]]) -> tuple["_Stream | None", int]:
        """Start reading (after, snap] where snap is the database's db_version now (at most
        `ceiling`); `query(after, snap)` gives the SELECT and its parameters. Returns the stream,
        or None when there is nothing after `after`, and snap."""
        lease = ExitStack()
        session = lease.enter_context(db.borrow_reader())
        try:
            if db.in_memory:
                return cls._open_table(db, lease, session, after, ceiling, query)
            connection = session.connection
            lease.callback(_end_read, connection)  # before the reader goes back to the pool
            connection.execute("BEGIN DEFERRED")
            snap = cls._snapshot(connection, after, ceiling)
            if snap == after:
                lease.close()
                return None, snap
            stream = cls(db, lease, session, snap)
            stream._cursor = connection.execute(*query(after, snap))
            stream._rows = iter(stream._cursor)
            return stream, snap
        except BaseException:
            lease.close()
            raise

    @classmethod
    def _open_table(cls, db: Database, lease: ExitStack, session: Any, after: int, ceiling: int | None,
                    query: Callable[[int, int], tuple[str, tuple[Any, ...]]]) -> tuple["_Stream | None", int]:
        with db.reading(session) as s:
            snap = cls._snapshot(s.connection, after, ceiling)
            if snap == after:
                lease.close()
                return None, snap
            stream = cls(db, lease, session, snap)
            stream._table = f"__sync_out_{next(_temp_names)}"
            sql, params = query(after, snap)
            # Declared columns, `val` without a type (no affinity): `CREATE TABLE ... AS SELECT`
            # would give it NUMERIC affinity (crsql_changes declares it ANY), turning the text
            # '00' into the integer 0 — a different value on the receiver.
            s.execute(f'CREATE TEMP TABLE "{stream._table}" ({_SNAPSHOT_COLUMNS})')
            s.execute(f'INSERT INTO temp."{stream._table}" {sql}', params)
        stream._rows = stream._table_rows()
        return stream, snap

    @staticmethod
    def _snapshot(connection: Any, after: int, ceiling: int | None) -> int:
        snap: int = connection.execute("SELECT crsql_db_version()").fetchall()[0][0]
        if ceiling is not None:
            snap = min(snap, ceiling)
        return max(snap, after)

    def fill(self, max_rows: int, max_bytes: int, version: int | None = None) -> bool:
        """Read until `buffer` ends with a row past either bound (more than `max_rows` rows or
        `max_bytes` bytes) or, with `version`, with a row of another db_version: True, that row
        is a look-ahead. False when the read ended first (`buffer` then holds all that is left)."""
        buffer = self.buffer
        count, size = len(buffer), sum(map(_row_size, buffer))
        if count > max_rows or size > max_bytes or (version is not None and buffer and buffer[-1][5] != version):
            return True
        append, text, start = buffer.append, (str, bytes), count
        try:
            for row in self._rows:  # the hot loop of a bulk sync: _row_size inlined
                append(row)
                count += 1
                value = row[3]
                size += (len(value) if value.__class__ in text else 9) + len(row[0]) + len(row[1]) + len(row[2]) + 48
                if count > max_rows or size > max_bytes or (version is not None and row[5] != version):
                    return True
            return False
        finally:
            self.rows_read += count - start

    def _table_rows(self) -> Iterator[tuple[Any, ...]]:
        while True:
            with self.db.reading(self._session) as s:
                chunk = s.execute(f'SELECT rowid, {CHANGE_COLUMNS} FROM temp."{self._table}" '
                                  "WHERE rowid > ? ORDER BY rowid LIMIT ?", (self._last_rowid, self._CHUNK))
            if not chunk:
                return
            self._last_rowid = chunk[-1][0]
            for row in chunk:
                yield row[1:]

    def close(self) -> None:
        """End the read and give the reader back. Idempotent."""
        self.buffer = []
        try:
            if self._cursor is not None:
                self._cursor.close()
            elif self._table is not None:
                with self.db.reading(self._session) as s:
                    s.execute(f'DROP TABLE IF EXISTS temp."{self._table}"')
        finally:
            self._cursor = self._table = None
            self._lease.close()


def _end_read(connection: Any) -> None:
    """End a lent reader's read transaction: a reader still in one is closed, not pooled."""
    if connection.in_transaction:
        connection.execute("COMMIT")


class _Split(msgspec.Struct):
    """A group larger than a page, being sent in parts (all with the same since and upto)."""

    version: int
    since: int
    part: int = 0


class Outbox:
    """The stream of pages one sender owes one receiver, read lazily from the database.

    `since` is the receiver's watermark for us. `acked` only moves with acknowledgements;
    `scanned` may run ahead of it over versions holding nothing for the receiver (its own
    changes), which pages may cover without saying so. A page's range starts where the
    previous page's ended (`produced`; pages may be in flight unacknowledged, see
    sync.session), or at `acked` if that is further.
    """

    def __init__(self, db: Database, receiver: str, since: int, limits: Limits,
                 echo: "EchoRanges | None" = None):
        self.db = db
        self.receiver = site_bytes(receiver)
        self.limits = limits
        self.echo = echo if echo is not None else EchoRanges()
        self._own = site_bytes(db.site_id)
        self._sites, self._site_param = _ALL_BUT_RECEIVER, self.receiver
        self.acked = self.scanned = self.sent_upto = self.claimed = self.produced = since
        self.ceiling: int | None = None  # read nothing newer than this db_version (file export)
        self._read_before = 0  # rows read by streams already closed
        self._stream: _Stream | None = None
        self._split: _Split | None = None

    @classmethod
    def own_changes(cls, db: Database, since: int, limits: Limits) -> "Outbox":
        """The pages of the changes this replica *originated* (site_id = its own) after our
        db_version `since`, for a medium where every replica publishes only its own changes
        (a broadcast stream: sync.nats). Relayed changes are left out, so nothing is sent
        twice and nothing loops. Versions holding only merged changes come out as empty
        pages, which such a sender skips (so it starts its next page where its last sent
        page ended, not at the skipped page's `since`)."""
        outbox = cls(db, db.site_id, since, limits)
        outbox._sites, outbox._site_param = _OWN_ONLY, outbox._own
        return outbox

    @property
    def rows_read(self) -> int:
        """Rows read from crsql_changes so far (diagnostics, tests)."""
        return self._read_before + (self._stream.rows_read if self._stream is not None else 0)

    def next_page(self, *, marker: bool) -> Changes | None:
        """The next page, or None when the receiver is known to hold everything. With
        `marker`, an empty `caught_up` page is produced rather than None (ends an initial round)."""
        if self._stream is None:
            self._stream, snap = _Stream.open(self.db, self.scanned, self.ceiling, self._query)
            if self._stream is None:
                # Nothing new to read. An empty page still moves the receiver's watermark over
                # versions that held nothing for it (its own changes, echoes), so the next
                # session does not re-read them; and it ends an initial round (`marker`).
                # Versions the receiver was told it holds (`claimed`) or that a page in flight
                # covers (`produced`) need no page.
                if marker or max(self.acked, self.claimed, self.produced) < snap:
                    return self._page([], snap, caught_up=True)
                return None
        stream = self._stream
        if self._split is not None:
            return self._next_part(self._split, stream)
        if not stream.fill(self.limits.page_changes, self.limits.page_bytes):
            rows, snap = stream.buffer, stream.snap
            self._end_stream()
            self.scanned = snap
            return self._page(rows, snap, caught_up=True)
        rows = stream.buffer
        last = rows[-1][5]  # the look-ahead row's group is not complete in this page
        cut = len(rows) - 1
        while cut > 0 and rows[cut - 1][5] == last:
            cut -= 1
        if cut == 0:  # one group alone passes the bound: it goes in parts
            self._split = _Split(last, self._since())
            return self._next_part(self._split, stream)
        stream.buffer = rows[cut:]
        self.scanned = last - 1  # versions between the page's rows and `last` hold nothing for the receiver
        return self._page(rows[:cut], last - 1)

    def _query(self, after: int, snap: int) -> tuple[str, tuple[Any, ...]]:
        echo, params = self.echo.clause(after, self._own)
        return _SELECT_PAGE.format(sites=self._sites, echo=echo), (after, snap, self._site_param) + params

    def _next_part(self, split: _Split, stream: _Stream) -> Changes:
        more = stream.fill(self.limits.page_changes, self.limits.page_bytes, split.version)
        rows = stream.buffer
        if more and rows[-1][5] == split.version:  # the group goes on past the bound
            keep = max(1, len(rows) - 1)
        else:  # the group ends here (the look-ahead row, if any, starts the next one)
            keep = len(rows) - 1 if more else len(rows)
            more = False
        stream.buffer = rows[keep:]
        page = Changes(since=split.since, upto=split.version, rows=rows[:keep], part=split.part, more_parts=more)
        split.part += 1
        self.sent_upto = max(self.sent_upto, split.version)
        if not more:
            self._split = None
            self.scanned = max(self.scanned, split.version)
            self.produced = max(self.produced, split.version)
            if not stream.buffer and stream.fill(0, 0) is False:
                self._end_stream()
        return page

    def _end_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            self._read_before += stream.rows_read
            stream.close()

    def cover(self, low: int, high: int) -> int:
        """The receiver merged a page of ours here as our versions (low, high], which hold only
        its changes: if it holds everything of ours up to `low`, it holds everything up to
        `high` too. Returns `high` to tell it so (the Ack's `covered`), or 0 when we cannot
        claim it (a read in progress, versions below `low` neither acknowledged nor claimed).
        A claim is a fact about what the receiver holds, so an earlier one counts like an ack."""
        if self._stream is not None or max(self.acked, self.claimed) < low:
            return 0
        self.scanned = max(self.scanned, high)
        self.claimed = max(self.claimed, high)
        return high

    def pass_over(self, low: int, high: int) -> None:
        """Versions (low, high] hold no change this outbox sends (a merge of another site's
        pages that wrote nothing of this replica's): if everything up to `low` was read, the
        next read starts after `high` instead of scanning them (an own-changes outbox on a
        busy stream would otherwise read every merged change again only to skip it)."""
        if self._stream is None and self.scanned >= low:
            self.scanned = max(self.scanned, high)

    def acknowledged(self, watermark: int) -> None:
        self.acked = max(self.acked, watermark)
        self.scanned = max(self.scanned, self.acked)

    def close(self) -> None:
        self._split = None
        if self._stream is not None:
            self._end_stream()

    def _since(self) -> int:
        return max(self.acked, self.produced)

    def _page(self, rows: list[Row], upto: int, *, caught_up: bool = False) -> Changes:
        page = Changes(since=self._since(), upto=upto, rows=rows, caught_up=caught_up)
        self.sent_upto = max(self.sent_upto, upto)
        self.produced = max(self.produced, upto)
        return page
