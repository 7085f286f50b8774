"""Changesets: reading the pages a peer lacks, validating and applying received pages.

The facts this module is built on (DESIGN.md §8, measured on cr-sqlite 0.16.3):

- A merged change is re-stamped with the receiver's db_version but keeps its origin
  site_id, so a watermark is per *peer*: the peer's db_version up to which we applied its
  pages. `(db_version, seq)` pairs repeat after merges: never a cursor.
- An old db_version may be partly overwritten: a page is "every change the receiver lacks
  with sender db_version in (since, upto]", whatever is left of those versions.
- A page holds whole db_version groups (transaction atomicity survives sync). One group
  larger than a page is copied once into a temporary table (a stable snapshot, ordered
  by rowid) and sent as parts; the receiver stages parts in `__sync_staging` and merges
  the whole group in one transaction when the last part arrives.
- cr-sqlite trusts the packed `pk` blob: an empty or malformed blob aborts the process,
  a blob with the wrong column count writes garbage. Every pk is parsed here (exactly as
  `crsql_unpack_columns` reads it) before anything reaches `crsql_changes`.

Bookkeeping tables (plain tables, never CRRs, created on first use):
    __sync_peers(site_id, received, acked, updated_at)   per-peer watermarks
    __sync_staging(...)                                   parts of a split group in transit
"""

from __future__ import annotations

import itertools
import struct
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import msgspec

from engine.database import Database, Session as Tx
from engine.migrations import crr_tables

from .errors import ApplyError, InvalidChangeError, ProtocolError
from .protocol import MAX_MESSAGE_BYTES, Changes, site_bytes

__all__ = [
    "Limits",
    "PeerWatermark",
    "ApplyOutcome",
    "CrrSchema",
    "Outbox",
    "Inbox",
    "EchoRanges",
    "AfterApply",
    "add_after_apply",
    "after_apply_hooks",
    "ensure_tables",
    "received_watermark",
    "record_ack",
    "forget_received",
    "store_received",
    "run_after_apply",
    "watermarks",
    "unpack_pk",
    "CHANGE_COLUMNS",
]

CHANGE_COLUMNS = '"table", pk, cid, val, col_version, db_version, site_id, cl, seq'
INSERT_CHANGES = f"INSERT INTO crsql_changes ({CHANGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
_SELECT_PAGE = (
    f"SELECT {CHANGE_COLUMNS} FROM crsql_changes "
    "WHERE db_version > ? AND db_version <= ? AND {sites}{echo} ORDER BY db_version"
)
_SELECT_GROUP = f"SELECT {CHANGE_COLUMNS} FROM crsql_changes WHERE db_version = ? AND {{sites}}{{echo}}"
_ALL_BUT_RECEIVER = "site_id IS NOT ?"  # a peer gets everything but its own changes
_OWN_ONLY = "site_id = ?"  # a broadcast stream gets only the changes this replica originated
DELETE_SENTINEL = "-1"  # cid of a row's existence record: delete (even cl) / create or pk-only row (odd cl)
_VALUE_TYPES = frozenset({type(None), int, float, str, bytes})
_INT64 = (-(2**63), 2**63 - 1)

_TABLES = [
    """CREATE TABLE IF NOT EXISTS __sync_peers (
        site_id    TEXT    NOT NULL PRIMARY KEY,
        received   INTEGER NOT NULL DEFAULT 0,
        acked      INTEGER NOT NULL DEFAULT 0,
        updated_at INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS __sync_staging (
        id          INTEGER PRIMARY KEY,
        session     TEXT    NOT NULL,
        peer        TEXT    NOT NULL,
        upto        INTEGER NOT NULL,
        "table"     TEXT, pk BLOB, cid TEXT, val, col_version INTEGER,
        db_version  INTEGER, site_id BLOB, cl INTEGER, seq INTEGER
    )""",
]


class Limits(msgspec.Struct, frozen=True):
    """Page bounds. A page holds at most about `page_changes` changes and `page_bytes` bytes of
    keys and values (a soft bound: whole groups, parts for a larger group);
    `max_message_bytes` is the hard limit on any received message."""

    page_changes: int = 10_000
    page_bytes: int = 4 * 1024 * 1024
    max_message_bytes: int = MAX_MESSAGE_BYTES


class PeerWatermark(msgspec.Struct, frozen=True):
    """What this replica knows of one peer: `received` = the peer's db_version up to which its
    changes are applied here; `acked` = our db_version the peer last acknowledged."""

    site_id: str
    received: int
    acked: int
    updated_at: int


class ApplyOutcome(msgspec.Struct, frozen=True):
    watermark: int   # our stored watermark for the sender after this page
    impacted: int    # changes that took effect (crsql_rows_impacted)
    fresh: bool      # False for a duplicate or stale page that was acknowledged without applying
    # Our db_versions (low, high] this merge produced when they hold only the sender's changes
    # (the after-apply hooks, if any, wrote nothing); None otherwise. See `Outbox.cover`.
    merged: tuple[int, int] | None = None


# -- bookkeeping -------------------------------------------------------------------------

def ensure_tables(db: Database) -> None:
    """Create the `__sync_` bookkeeping tables if they are missing."""
    with db.transaction() as tx:
        for sql in _TABLES:
            tx.execute(sql)


def received_watermark(db: Database, peer: str, tx: Tx | None = None) -> int:
    """The peer's db_version up to which its changes are applied here (0 if never synced)."""
    with db.reading(tx) as s:
        value = s.scalar("SELECT received FROM __sync_peers WHERE site_id = ?", (peer,))
    return value or 0


def store_received(tx: Tx, peer: str, watermark: int) -> None:
    tx.execute(
        "INSERT INTO __sync_peers (site_id, received, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT (site_id) DO UPDATE SET received = max(received, excluded.received), "
        "updated_at = excluded.updated_at",
        (peer, watermark, tx.now_ms()),
    )


def forget_received(db: Database, peer: str) -> None:
    """Reset the watermark held for `peer` to 0: it was restored from an older copy and its
    new db_versions reuse numbers we already passed (the next sync re-reads everything)."""
    with db.transaction() as tx:
        tx.execute("UPDATE __sync_peers SET received = 0, updated_at = ? WHERE site_id = ?", (tx.now_ms(), peer))


def record_ack(db: Database, peer: str, acked: int, covered: int = 0) -> None:
    """Remember that `peer` acknowledged our changes up to our db_version `acked` (for status);
    with `covered`, also that we hold everything of the peer's up to its db_version `covered`
    (one transaction for both)."""
    with db.transaction() as tx:
        tx.execute(
            "INSERT INTO __sync_peers (site_id, acked, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (site_id) DO UPDATE SET acked = max(acked, excluded.acked), "
            "updated_at = excluded.updated_at",
            (peer, acked, tx.now_ms()),
        )
        if covered:
            store_received(tx, peer, covered)


def watermarks(db: Database) -> list[PeerWatermark]:
    """Every peer this replica has exchanged changes with, by site id."""
    with db.reading() as s:
        rows = s.execute("SELECT site_id, received, acked, updated_at FROM __sync_peers ORDER BY site_id")
    return [PeerWatermark(*row) for row in rows]


# -- after-apply hooks -------------------------------------------------------------------

AfterApply = Callable[[Tx, Sequence[tuple[str, tuple]]], None]
_hooks: "weakref.WeakKeyDictionary[Database, list[AfterApply]]" = weakref.WeakKeyDictionary()


def add_after_apply(db: Database, hook: AfterApply) -> Callable[[], None]:
    """Call `hook(tx, merged)` inside every transaction that merges received changes into `db`.

    `merged` lists distinct `(table, pk values)` of the rows the merge touched; a large
    staged group is reported in several calls within the same transaction. The hook runs
    before COMMIT, so whatever it writes commits atomically with the merge, and an
    exception from it rolls the merge back. Returns a function that removes the hook.
    """
    hooks = _hooks.setdefault(db, [])
    hooks.append(hook)
    return lambda: hooks.remove(hook) if hook in hooks else None


def after_apply_hooks(db: Database) -> list[AfterApply]:
    return _hooks.get(db, [])


def run_after_apply(db: Database, tx: Tx, keys: Iterable[tuple[str, bytes]]) -> None:
    """Call the database's after-apply hooks with the distinct (table, pk values) of `keys`.

    Raises:
        ApplyError: a hook raised (the caller's transaction then rolls back).
    """
    hooks = after_apply_hooks(db)
    if not hooks:
        return
    merged = [(table, unpack_pk(pk)) for table, pk in dict.fromkeys(keys)]
    if merged:
        for hook in list(hooks):
            try:
                hook(tx, merged)
            except Exception as error:
                name = getattr(hook, "__qualname__", repr(hook))
                raise ApplyError(f"after-apply hook {name} failed: {error}") from error


# -- validation --------------------------------------------------------------------------

def unpack_pk(blob: bytes) -> tuple:
    """The primary-key values packed in a change's `pk`, read exactly as cr-sqlite's
    `crsql_unpack_columns` does (a column count, then per column a type byte whose low 3
    bits are the type and high 5 bits the byte length of the following integer/length).

    Raises:
        ValueError: the blob is empty, truncated, has trailing bytes, an unknown type or
            a NULL (primary keys are NOT NULL) — cr-sqlite would crash or write garbage.
    """
    if not blob:
        raise ValueError("empty pk")
    count, pos, end, values = blob[0], 1, len(blob), []
    if count == 0:
        raise ValueError("pk with zero columns")
    for _ in range(count):
        if pos >= end:
            raise ValueError("truncated pk")
        kind, width = blob[pos] & 7, blob[pos] >> 3
        pos += 1
        if kind == 2:  # float: 8 bytes
            if width or pos + 8 > end:
                raise ValueError("malformed float in pk")
            values.append(struct.unpack_from(">d", blob, pos)[0])
            pos += 8
            continue
        if kind not in (1, 3, 4) or width > (8 if kind == 1 else 4) or pos + width > end:
            raise ValueError(f"bad column type byte {blob[pos - 1]:#04x} in pk")
        number = int.from_bytes(blob[pos:pos + width], "big")
        pos += width
        if kind == 1:
            values.append(number - (1 << 64) if width == 8 and number >= 1 << 63 else number)
            continue
        if pos + number > end:
            raise ValueError("truncated text/blob in pk")
        data = blob[pos:pos + number]
        pos += number
        values.append(data.decode("utf-8") if kind == 3 else data)  # UnicodeDecodeError is a ValueError
    if pos != end:
        raise ValueError("trailing bytes after pk")
    return tuple(values)


class CrrSchema:
    """The CRR tables of one replica: which (table, cid) pairs a change may carry and how many
    primary-key columns each table's pk blob must hold."""

    def __init__(self, columns: dict[str, tuple[frozenset[str], int]]):
        self.columns = columns
        self._pairs = frozenset((table, cid) for table, (cids, _) in columns.items() for cid in cids)

    @classmethod
    def load(cls, db: Database) -> "CrrSchema":
        columns = {}
        with db.reading() as s:
            for table in crr_tables(s.connection):
                info = s.execute(f'PRAGMA table_info("{table}")')
                cids = frozenset([name for _, name, _, _, _, pk in info if not pk] + [DELETE_SENTINEL])
                columns[table] = (cids, sum(1 for row in info if row[5]))
        return cls(columns)

    def validate(self, rows: Sequence[tuple], since: int = 0, upto: int | None = None) -> None:
        """Check every change of a page before any is applied.

        Raises:
            InvalidChangeError: an unknown table or column, a value of an unsupported type or
                out of int64 range, a malformed pk or one with the wrong column count.
            ProtocolError: a change's db_version outside the page's (since, upto] range.
        """
        if not rows:
            return
        bad = {(r[0], r[2]) for r in rows} - self._pairs
        if bad:
            table, cid = min(bad)
            if table not in self.columns:
                raise InvalidChangeError(f"change for unknown table {table!r} (not a CRR here)", table=table)
            raise InvalidChangeError(f"change for unknown column {table}.{cid}", table=table, column=cid)
        kinds = {r[3].__class__ for r in rows}
        if not kinds <= _VALUE_TYPES:
            odd = sorted(k.__name__ for k in kinds - _VALUE_TYPES)
            raise InvalidChangeError(f"change value of unsupported type {', '.join(odd)}")
        if int in kinds and any(r[3].__class__ is int and not _INT64[0] <= r[3] <= _INT64[1] for r in rows):
            raise InvalidChangeError("change value out of the 64-bit integer range")
        if upto is not None:
            versions = {r[5] for r in rows}
            if min(versions) <= since or max(versions) > upto:
                raise ProtocolError(f"page (since={since}, upto={upto}) holds changes of db_version "
                                    f"{min(versions)}..{max(versions)}")
        for table, pk in {(r[0], r[1]) for r in rows}:
            self._check_pk(table, pk)

    def _check_pk(self, table: str, pk: bytes) -> None:
        try:
            values = unpack_pk(pk)
        except ValueError as error:
            raise InvalidChangeError(f"malformed pk for table {table}: {error}", table=table) from error
        expected = self.columns[table][1]
        if len(values) != expected:
            raise InvalidChangeError(
                f"pk for table {table} has {len(values)} columns, the table has {expected}", table=table
            )


# -- sending -----------------------------------------------------------------------------

_temp_names = itertools.count(1)


class EchoRanges:
    """db_version ranges of this replica made by merging pages from one peer in this session.

    Changes there came from that peer (their origin may be a third site, relayed), so
    sending them back would be an echo. Local writes made in the same transaction (an
    after-apply hook's) share the version and are still sent: only rows of other sites
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


class _Split(msgspec.Struct):
    table: str
    version: int
    since: int
    offset: int = 0
    part: int = 0


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
        self._sites, self._site_param = _ALL_BUT_RECEIVER, self.receiver
        self.acked = self.scanned = self.sent_upto = self.claimed = since
        self.ceiling: int | None = None  # read nothing newer than this db_version (file export)
        self.rows_read = 0  # rows read from crsql_changes (diagnostics, tests)
        self._split: _Split | None = None
        self._carry: list[tuple] = []  # the whole group `scanned` read past a page's bound, unsent

    @classmethod
    def own_changes(cls, db: Database, since: int, limits: Limits) -> "Outbox":
        """The pages of the changes this replica *originated* (site_id = its own) after our
        db_version `since`, for a medium where every replica publishes only its own changes
        (a broadcast stream: sync.nats). Relayed changes are left out, so nothing is sent
        twice and nothing loops. Versions holding only merged changes come out as empty
        pages; the sender skips them (the next page's range still starts at `acked`)."""
        outbox = cls(db, db.site_id, since, limits)
        outbox._sites, outbox._site_param = _OWN_ONLY, outbox._own
        return outbox

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
            cursor = s.connection.execute(_SELECT_PAGE.format(sites=self._sites, echo=echo),
                                          (self.scanned, snap, self._site_param) + params)
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

    def pass_over(self, low: int, high: int) -> None:
        """Versions (low, high] hold no change this outbox sends (a merge of another site's
        pages that wrote nothing of this replica's): if everything up to `low` was read, the
        next read starts after `high` instead of scanning them (an own-changes outbox on a
        busy stream would otherwise read every merged change again only to skip it)."""
        if self._split is None and not self._carry and self.scanned >= low:
            self.scanned = max(self.scanned, high)

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
        with self.db.reading() as s:
            s.execute(f'CREATE TEMP TABLE "{name}" AS ' + _SELECT_GROUP.format(sites=self._sites, echo=echo),
                      (version, self._site_param) + params)
        self._split = _Split(name, version, since=self.acked)
        return self._next_part()

    def _next_part(self) -> Changes:
        split = self._split
        with self.db.reading() as s:
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
        name, self._split = self._split.table, None
        with self.db.reading() as s:
            s.execute(f'DROP TABLE IF EXISTS temp."{name}"')


# -- receiving ---------------------------------------------------------------------------

class _Staging(msgspec.Struct):
    upto: int
    since: int
    next_part: int
    rows: int


class Inbox:
    """Applies the pages one sender sends us: validates, merges, stores the watermark — all of
    a page in one transaction — and stages the parts of a split group."""

    def __init__(self, db: Database, sender: str, schema: CrrSchema, limits: Limits):
        self.db = db
        self.sender = sender
        self.schema = schema
        self.limits = limits
        self.session = uuid.uuid4().hex
        self.echo = EchoRanges()
        self._staging: _Staging | None = None
        with db.reading() as s:
            leftover = s.scalar("SELECT 1 FROM __sync_staging WHERE peer = ? LIMIT 1", (sender,))
        if leftover:  # parts left by a crashed or dropped session: the sender restarts groups
            with db.transaction() as tx:
                tx.execute("DELETE FROM __sync_staging WHERE peer = ?", (sender,))

    def apply(self, page: Changes) -> ApplyOutcome:
        """Validate and merge one page (or stage one part).

        Raises:
            InvalidChangeError: a change this schema cannot hold (nothing applied).
            ProtocolError: a gap (the page starts after our watermark), parts out of order.
            ApplyError: the staged parts vanished before the last one arrived.
        """
        self.schema.validate(page.rows, page.since, page.upto)
        watermark = received_watermark(self.db, self.sender)
        if page.part or page.more_parts:
            return self._stage(page, watermark)
        if page.upto <= watermark:
            return ApplyOutcome(watermark, 0, False)
        if self._staging is not None:
            raise ProtocolError(f"a new page arrived while group {self._staging.upto} was still in parts")
        self._check_contiguous(page, watermark)
        with self.db.transaction() as tx:
            before = tx.scalar("SELECT crsql_db_version()")
            tx.executemany(INSERT_CHANGES, page.rows)
            impacted, high = self._impacted(tx, before)
            store_received(tx, self.sender, page.upto)
            writes = tx.connection.total_changes()  # a hook may write local changes at these versions
            run_after_apply(self.db, tx, ((r[0], r[1]) for r in page.rows))
            pure = tx.connection.total_changes() == writes
        merged = (before, high) if impacted and pure else None
        return ApplyOutcome(max(watermark, page.upto), impacted, True, merged)

    def close(self) -> None:
        if self._staging is not None:
            self._discard_staging()

    def _impacted(self, tx: Tx, before: int) -> tuple[int, int]:
        """Changes that took effect in this merge and the highest version they got; remembers
        the versions (echo).

        The transaction holds the write lock, so every version after `before` up to the
        pending one is this merge's.
        """
        impacted = tx.scalar("SELECT crsql_rows_impacted()")
        if not impacted:
            return 0, before
        high = tx.scalar("SELECT crsql_next_db_version()")
        self.echo.add(before, high)
        return impacted, high

    def _check_contiguous(self, page: Changes, watermark: int) -> None:
        if page.since > watermark:
            raise ProtocolError(
                f"page starts after db_version {page.since} of peer {self.sender} but this replica "
                f"holds its changes only up to {watermark}: a gap"
            )

    def _stage(self, page: Changes, watermark: int) -> ApplyOutcome:
        staging = self._staging
        if page.part == 0:
            if page.upto <= watermark or (staging is not None and staging.upto == page.upto):
                return ApplyOutcome(watermark, 0, False)  # a duplicate
            if staging is not None:
                raise ProtocolError(f"group {page.upto} started while group {staging.upto} was still in parts")
            self._check_contiguous(page, watermark)
            staging = self._staging = _Staging(page.upto, page.since, 0, 0)
        elif staging is None or staging.upto != page.upto or page.part < staging.next_part:
            if page.upto <= watermark or (staging is not None and staging.upto == page.upto):
                return ApplyOutcome(watermark, 0, False)  # a duplicate of a part already handled
            raise ProtocolError(f"part {page.part} of group {page.upto} arrived without its earlier parts")
        elif page.part > staging.next_part:
            raise ProtocolError(f"part {page.part} of group {page.upto} arrived, expected part {staging.next_part}")
        if page.more_parts:
            self._insert_staged(page)
            return ApplyOutcome(watermark, 0, True)
        impacted = self._merge_staged(page)
        return ApplyOutcome(max(watermark, page.upto), impacted, True)

    def _insert_staged(self, page: Changes) -> None:
        prefix = (self.session, self.sender, page.upto)
        with self.db.transaction() as tx:
            tx.executemany(
                f"INSERT INTO __sync_staging (session, peer, upto, {CHANGE_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (prefix + row for row in page.rows),
            )
        self._staging.next_part += 1
        self._staging.rows += len(page.rows)

    def _merge_staged(self, page: Changes) -> int:
        staging = self._staging
        with self.db.transaction() as tx:
            before = tx.scalar("SELECT crsql_db_version()")
            found = tx.scalar("SELECT count(*) FROM __sync_staging WHERE session = ?", (self.session,))
            if found != staging.rows:
                raise ApplyError(f"staged parts of group {page.upto} vanished ({found} of {staging.rows} rows)")
            for chunk in self._staged_chunks(tx):
                tx.executemany(INSERT_CHANGES, chunk)
            tx.executemany(INSERT_CHANGES, page.rows)
            impacted, _ = self._impacted(tx, before)
            store_received(tx, self.sender, page.upto)
            if after_apply_hooks(self.db):
                self._report_staged(tx)
                run_after_apply(self.db, tx, ((r[0], r[1]) for r in page.rows))
            tx.execute("DELETE FROM __sync_staging WHERE session = ?", (self.session,))
        self._staging = None
        return impacted

    def _staged_chunks(self, tx: Tx) -> Iterator[list[tuple]]:
        """The staged rows in arrival order, a page at a time (bounded memory; `INSERT INTO
        crsql_changes SELECT` would be simpler but measured ~1.6x slower than executemany).
        A range scan on the rowid: staging has no index to maintain (it rarely holds more than
        one session's rows)."""
        last = -1
        while True:
            chunk = tx.execute(
                f"SELECT id, {CHANGE_COLUMNS} FROM __sync_staging WHERE id > ? AND session = ? ORDER BY id LIMIT ?",
                (last, self.session, self.limits.page_changes),
            )
            if not chunk:
                return
            last = chunk[-1][0]
            yield [row[1:] for row in chunk]

    def _report_staged(self, tx: Tx) -> None:
        """Hand the staged rows to the hooks chunk by chunk (bounded memory)."""
        for chunk in self._staged_chunks(tx):
            run_after_apply(self.db, tx, ((r[0], r[1]) for r in chunk))

    def _discard_staging(self) -> None:
        self._staging = None
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM __sync_staging WHERE session = ?", (self.session,))
