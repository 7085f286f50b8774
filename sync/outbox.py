"""Sending: the pages one replica owes one peer, read lazily from `crsql_changes`.

A page holds whole db_version groups bounded by `Limits` (transaction atomicity survives
sync). The page query excludes the receiver's own site (never send a replica its own
changes) and the versions this session merged from the receiver (`EchoRanges`). One group
larger than a page is copied once into a TEMP table on a reader connection lent to the
outbox for the group's life (a stable snapshot, ordered by rowid) and sent as parts, which
the receiver stages and merges at once (sync.inbox).

Reads use the database's reader connections: building pages never waits for a merge
another session is applying.
"""

from __future__ import annotations

import itertools
from contextlib import ExitStack
from typing import Any


from engine.database import Database

from .changes import CHANGE_COLUMNS, Limits
from .protocol import Changes, site_bytes

__all__ = ["Outbox", "EchoRanges"]

_SELECT_PAGE = (
    f"SELECT {CHANGE_COLUMNS} FROM crsql_changes "
    "WHERE db_version > ? AND db_version <= ? AND site_id IS NOT ?{echo} ORDER BY db_version"
)
_SELECT_GROUP = f"SELECT {CHANGE_COLUMNS} FROM crsql_changes WHERE db_version = ? AND site_id IS NOT ?{{echo}}"

_temp_names = itertools.count(1)


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

    def clause(self, after: int, own: bytes) -> tuple[str, tuple]:
        """A WHERE clause (and its parameters) leaving out the echoes above version `after`."""
        sql, params = "", ()
        for low, high in self.ranges:
            if high > after:
                sql += " AND NOT (db_version > ? AND db_version <= ? AND site_id IS NOT ?)"
                params += (low, high, own)
        return sql, params


def _row_size(row: tuple) -> int:
    value = row[3]
    size = len(value) if value.__class__ in (str, bytes) else 9
    return size + len(row[0]) + len(row[1]) + len(row[2]) + 48


def _take(cursor: Any, max_rows: int, max_bytes: int, *, close: bool = True) -> tuple[list[tuple], bool]:
    """Rows from `cursor` until one passes a bound; (rows, exhausted). Closes the cursor
    unless `close` is false."""
    rows: list[tuple] = []
    size = 0
    try:
        for row in cursor:
            rows.append(row)
            size += _row_size(row)
            if len(rows) > max_rows or size > max_bytes:
                return rows, False
        return rows, True
    finally:
        if close:
            cursor.close()


class _Split:
    """A group being sent in parts: its TEMP table lives on the reader lent for its life."""

    def __init__(self, table: str, version: int, since: int, reader: ExitStack, session: Any):
        self.table, self.version, self.since = table, version, since
        self.reader, self.session = reader, session
        self.offset = self.part = 0


class Outbox:
    """The stream of pages one sender owes one receiver, read lazily from the database.

    `since` is the receiver's watermark for us. `acked` only moves with acknowledgements;
    `scanned` may run ahead of it over versions holding nothing for the receiver (its own
    changes), which pages may cover without saying so: a page's range starts at `acked`.
    """

    def __init__(self, db: Database, receiver: str, since: int, limits: Limits,
                 echo: "EchoRanges | None" = None):
        self.db = db
        self.receiver = site_bytes(receiver)
        self.limits = limits
        self.echo = echo if echo is not None else EchoRanges()
        self._own = site_bytes(db.site_id)
        self.acked = self.scanned = self.sent_upto = self.claimed = since
        self.ceiling: int | None = None  # read nothing newer than this db_version (file export)
        self.rows_read = 0  # rows read from crsql_changes (diagnostics, tests)
        self._split: _Split | None = None
        self._carry: list[tuple] = []  # the whole group `scanned` read past a page's bound, unsent

    def next_page(self, *, marker: bool) -> Changes | None:
        """The next page, or None when the receiver is known to hold everything. With
        `marker`, an empty `caught_up` page is produced rather than None (ends an initial round)."""
        if self._split is not None:
            return self._next_part()
        carry, self._carry = self._carry, []
        with self.db.reading() as s:
            snap = s.scalar("SELECT crsql_db_version()")
            if self.ceiling is not None:
                snap = min(snap, self.ceiling)
            snap = max(snap, self.scanned)
            if snap == self.scanned:
                # Nothing new to read. An empty page still moves the receiver's watermark over
                # versions that held nothing for it (its own changes, echoes), so the next
                # session does not re-read them; and it ends an initial round (`marker`).
                # Versions the receiver was told it holds (`claimed`) need no page.
                if carry or marker or max(self.acked, self.claimed) < snap:
                    return self._page(carry, snap, caught_up=True)
                return None
            echo, params = self.echo.clause(self.scanned, self._own)
            cursor = s.connection.execute(_SELECT_PAGE.format(echo=echo), (self.scanned, snap, self.receiver) + params)
            try:
                rows, exhausted = _take(cursor, self.limits.page_changes - len(carry),
                                        self.limits.page_bytes - sum(map(_row_size, carry)), close=False)
                self.rows_read += len(rows)
                rows[:0] = carry
                if exhausted:
                    self.scanned = snap
                    return self._page(rows, snap, caught_up=True)
                last = rows[-1][5]
                cut = len(rows) - 1
                while cut > 0 and rows[cut - 1][5] == last:
                    cut -= 1
                if cut == 0:
                    pass  # one group past the bound: split below, outside this read
                elif self._finish_group(cursor, rows, cut):
                    self._carry = rows[cut:]
                    self.scanned = last  # read through `last`; the carried group starts the next page
                else:
                    self.scanned = last - 1  # versions between the kept rows and `last` hold nothing for the receiver
            finally:
                cursor.close()
        if cut == 0:
            return self._start_split(last)
        del rows[cut:]
        return self._page(rows, last - 1)

    def _finish_group(self, cursor: Any, rows: list[tuple], cut: int) -> bool:
        """Read the rest of the group `rows[cut:]` belongs to, appending it to `rows`, so the
        next page can start with it instead of reading it again. False when the group does
        not fit one page (then the next query reads it afresh and splits it into parts).
        Bounded: at most one page's worth of rows beyond `rows`."""
        last = rows[-1][5]
        count = len(rows) - cut
        size = sum(map(_row_size, rows[cut:]))
        for row in cursor:
            self.rows_read += 1
            if row[5] != last:
                return True  # that row starts the next group: the next query reads it again
            rows.append(row)
            count += 1
            size += _row_size(row)
            if count > self.limits.page_changes or size > self.limits.page_bytes:
                return False
        return True

    def cover(self, low: int, high: int) -> int:
        """The receiver merged a page of ours here as our versions (low, high], which hold only
        its changes: if it holds everything of ours up to `low`, it holds everything up to
        `high` too. Returns `high` to tell it so (the Ack's `covered`), or 0 when we cannot
        claim it (a group in parts, versions below `low` neither acknowledged nor claimed).
        A claim is a fact about what the receiver holds, so an earlier one counts like an ack."""
        if self._split is not None or self._carry or max(self.acked, self.claimed) < low:
            return 0
        self.scanned = max(self.scanned, high)
        self.claimed = max(self.claimed, high)
        return high

    def acknowledged(self, watermark: int) -> None:
        self.acked = max(self.acked, watermark)
        self.scanned = max(self.scanned, self.acked)

    def close(self) -> None:
        self._carry = []
        if self._split is not None:
            self._drop_split()

    def _page(self, rows: list[tuple], upto: int, *, caught_up: bool = False) -> Changes:
        self.sent_upto = max(self.sent_upto, upto)
        return Changes(since=self.acked, upto=upto, rows=rows, caught_up=caught_up)

    def _start_split(self, version: int) -> Changes:
        name = f"__sync_out_{next(_temp_names)}"
        echo, params = self.echo.clause(version - 1, self._own)
        reader = ExitStack()
        session = reader.enter_context(self.db.borrow_reader())
        try:
            with self.db.reading(session) as s:
                s.execute(f'CREATE TEMP TABLE "{name}" AS ' + _SELECT_GROUP.format(echo=echo),
                          (version, self.receiver) + params)
        except BaseException:
            reader.close()
            raise
        self._split = _Split(name, version, self.acked, reader, session)
        return self._next_part()

    def _next_part(self) -> Changes:
        split = self._split
        with self.db.reading(split.session) as s:
            cursor = s.connection.execute(
                f'SELECT {CHANGE_COLUMNS} FROM temp."{split.table}" WHERE rowid > ? ORDER BY rowid',
                (split.offset,),
            )
            rows, exhausted = _take(cursor, self.limits.page_changes, self.limits.page_bytes)
        if not exhausted and len(rows) > 1:
            rows.pop()  # the row past the bound starts the next part
        page = Changes(since=split.since, upto=split.version, rows=rows, part=split.part, more_parts=not exhausted)
        split.offset += len(rows)
        split.part += 1
        self.sent_upto = max(self.sent_upto, split.version)
        if exhausted:
            self._drop_split()
            self.scanned = max(self.scanned, split.version)
        return page

    def _drop_split(self) -> None:
        split, self._split = self._split, None
        try:
            with self.db.reading(split.session) as s:
                s.execute(f'DROP TABLE IF EXISTS temp."{split.table}"')
        finally:
            split.reader.close()
