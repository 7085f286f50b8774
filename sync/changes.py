"""A change: one row of `crsql_changes`, what a valid one is, and how a merge is reported.

cr-sqlite trusts what is inserted into `crsql_changes`. Measured on 0.16.3: an empty or
malformed `pk` blob aborts the process and one with the wrong column count writes garbage; a
`col_version` of 2**63-1 makes every later local UPDATE of that column fail ("unable to reset
cached trigger stmt"), a `cl` of 2**63-1 does the same to the row, and `cl = 0` is accepted
with no effect. A row carrying the receiver's own site id would be merged as a local write and
re-sent to everyone as ours. So every page is checked here, whole, before any row of it
reaches `crsql_changes`: a page is applied entirely or not at all.

Bounds: `col_version`, `cl`, `db_version` are 1..2**53 (also what a JavaScript peer holds
exactly; a legitimate replica would need 2**53 writes to one cell to get there), `seq` 0..2**53,
`site_id` 16 bytes and never the receiver's.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from engine.database import Database, Row, Session as Tx
from engine.errors import MergeListenerError
from engine.migrations import crr_tables

from .errors import ApplyError, InvalidChangeError, ProtocolError
from .protocol import MAX_MESSAGE_BYTES

__all__ = [
    "CHANGE_COLUMNS",
    "INSERT_CHANGES",
    "DELETE_SENTINEL",
    "MAX_CLOCK",
    "Limits",
    "CrrSchema",
    "unpack_pk",
    "report_merge",
]

CHANGE_COLUMNS = '"table", pk, cid, val, col_version, db_version, site_id, cl, seq'
INSERT_CHANGES = f"INSERT INTO crsql_changes ({CHANGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
DELETE_SENTINEL = "-1"  # cid of a row's existence record: delete (even cl) / create or pk-only row (odd cl)
MAX_CLOCK = 2**53
"""Largest col_version, cl, db_version or seq a received change may carry (see module doc)."""
_VALUE_TYPES = frozenset({type(None), int, float, str, bytes})
_INT64 = (-(2**63), 2**63 - 1)


class Limits(msgspec.Struct, frozen=True):
    """Page bounds. A page holds at most about `page_changes` changes and `page_bytes` bytes of
    keys and values (a soft bound: whole groups, parts for a larger group);
    `max_message_bytes` is the hard limit on any received message."""

    page_changes: int = 10_000
    page_bytes: int = 4 * 1024 * 1024
    max_message_bytes: int = MAX_MESSAGE_BYTES
    # pages in flight per direction on streaming transports (see sync.session): the sender
    # reads ahead while the receiver merges; memory O(window x page)
    window: int = 3
    # seconds a streaming transport lets a group's merge hold the write lock waiting for its
    # next part (see sync.session and sync.inbox)
    merge_patience: float = 0.5



def unpack_pk(blob: bytes) -> tuple[Any, ...]:
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

    def __init__(self, columns: dict[str, tuple[frozenset[str], int]], own_site: bytes = b""):
        self.columns = columns
        self.own_site = own_site
        self._pairs = frozenset((table, cid) for table, (cids, _) in columns.items() for cid in cids)

    @classmethod
    def load(cls, db: Database) -> "CrrSchema":
        columns = {}
        with db.reading() as s:
            for table in crr_tables(s.connection):
                info = s.execute(f'PRAGMA table_info("{table}")')
                cids = frozenset([name for _, name, _, _, _, pk in info if not pk] + [DELETE_SENTINEL])
                columns[table] = (cids, sum(1 for row in info if row[5]))
        return cls(columns, bytes.fromhex(db.site_id))

    def validate(self, rows: Sequence[Row], since: int = 0, upto: int | None = None) -> None:
        """Check every change of a page before any is applied.

        Raises:
            InvalidChangeError: an unknown table or column, a value of an unsupported type or
                out of int64 range, a malformed pk or one with the wrong column count, a site
                id that is ours or not 16 bytes, a clock value out of range.
            ProtocolError: a change's db_version outside the page's (since, upto] range.
        """
        if not rows:
            return
        # Sets of columns, not checks per row: a page is ~10,000 changes of a few tables. A
        # page of one table (the common case) needs no (table, column) pairs.
        tables = {r[0] for r in rows}
        one = next(iter(tables)) if len(tables) == 1 and tables <= self.columns.keys() else None
        if one is None or not {r[2] for r in rows} <= self.columns[one][0]:
            self._check_columns({(r[0], r[2]) for r in rows})
        kinds = {r[3].__class__ for r in rows}
        if not kinds <= _VALUE_TYPES:
            odd = sorted(k.__name__ for k in kinds - _VALUE_TYPES)
            raise InvalidChangeError(f"change value of unsupported type {', '.join(odd)}")
        if int in kinds:
            numbers = [r[3] for r in rows if r[3].__class__ is int]
            if min(numbers) < _INT64[0] or max(numbers) > _INT64[1]:
                raise InvalidChangeError("change value out of the 64-bit integer range")
        versions = self._check_clocks(rows)
        if upto is not None and (min(versions) <= since or max(versions) > upto):
            raise ProtocolError(f"page (since={since}, upto={upto}) holds changes of db_version "
                                f"{min(versions)}..{max(versions)}")
        keys = ((one, pk) for pk in {r[1] for r in rows}) if one is not None else {(r[0], r[1]) for r in rows}
        for table, pk in keys:
            self._check_pk(table, pk)

    def _check_columns(self, pairs: set[tuple[str, str]]) -> None:
        bad = pairs - self._pairs
        if bad:
            table, cid = min(bad, key=repr)
            if table not in self.columns:
                raise InvalidChangeError(f"change for unknown table {table!r} (not a CRR here)", table=table)
            raise InvalidChangeError(f"change for unknown column {table}.{cid}", table=table, column=cid)

    def _check_clocks(self, rows: Sequence[Row]) -> set[int]:
        """Site ids and clock values (see the module doc for why each bound); returns the
        page's db_versions."""
        sites = {r[6] for r in rows}
        if self.own_site in sites:
            raise InvalidChangeError(
                f"change carries this replica's own site id {self.own_site.hex()}: a peer never sends "
                "a replica its own changes (forged, or a copy of this database file)", column="site_id")
        if any(s.__class__ is not bytes or len(s) != 16 for s in sites):
            raise InvalidChangeError("change with a site id that is not 16 bytes", column="site_id")
        versions: set[int] = set()
        for index, name, low in ((4, "col_version", 1), (7, "cl", 1), (5, "db_version", 1), (8, "seq", 0)):
            values = {r[index] for r in rows}
            if any(v.__class__ is not int for v in values):
                raise InvalidChangeError(f"change with a non-integer {name}", column=name)
            if min(values) < low or max(values) > MAX_CLOCK:
                bad = min(values) if min(values) < low else max(values)
                raise InvalidChangeError(f"change with {name} {bad} outside {low}..2**53", column=name)
            if index == 5:
                versions = values
        return versions

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


def report_merge(db: Database, tx: Tx, keys: Iterable[tuple[str, bytes]]) -> None:
    """Tell the database's merge listeners (`db.on_merge`, e.g. the engine's conflict audit)
    which rows this merge touched: the distinct (table, primary-key values) of `keys`.

    Raises:
        ApplyError: a listener failed (the caller's transaction then rolls back).
    """
    if not db.merge_listeners:
        return
    merged = [(table, unpack_pk(pk)) for table, pk in dict.fromkeys(keys)]
    if merged:
        try:
            db.notify_merge(tx, merged)
        except MergeListenerError as error:
            raise ApplyError(str(error)) from error
