"""Receiving: validating and merging the pages one sender sends us.

Everything of a page happens in one transaction: the merge (`INSERT INTO crsql_changes`), the
merge listeners (`db.on_merge`: the engine's conflict audit writes its findings there), and
the sender's new watermark. A crash at any point leaves either all of it or none.

A group too large for one page arrives in parts, and is merged in one transaction too:

- Every part is appended, encoded, to a spill file (an anonymous temporary file beside the
  database: it vanishes with the session, or with the process if it dies), so memory stays
  O(page) whatever the group's size.
- With `eager` (transports whose session thread does nothing else, see sync.session), the
  parts are also merged as they arrive into one write transaction held open until the last
  part commits it with the watermark: the group is written once, and on a network the
  receiver merges part n while the sender reads part n+1. That transaction holds the
  database's write lock, so when the sender stalls (the transport calls `release()` after
  `Limits.merge_patience` seconds without a part) it is rolled back and the group continues
  in the spill file only.
- Otherwise (or after a release) the last part merges the whole group from the spill file.

Measured on a 240,000-change group (bench/PROFILE.md): staging the parts in a table cost
+0.63 s over merging them directly, the spill file +0.17 s, the open transaction nothing.
"""

from __future__ import annotations

import logging
import struct
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import msgspec

from engine.database import Database, Session as Tx

from . import hops
from .changes import INSERT_CHANGES, CrrSchema, Limits, report_merge
from .outbox import EchoRanges
from .errors import ApplyError, ProtocolError
from .protocol import Changes
from .watermarks import peer_record, store_received

__all__ = ["Inbox", "ApplyOutcome"]

log = logging.getLogger("sync")

_LENGTH = struct.Struct("<I")
_rows_encoder = msgspec.msgpack.Encoder()
_rows_decoder = msgspec.msgpack.Decoder(list[tuple[Any, ...]])


class ApplyOutcome(msgspec.Struct, frozen=True):
    watermark: int   # our stored watermark for the sender after this page
    impacted: int    # changes that took effect (crsql_rows_impacted)
    fresh: bool      # False for a duplicate or stale page that was acknowledged without applying
    # Our db_versions (low, high] this merge produced when they hold only the sender's changes
    # (the merge listeners, if any, wrote nothing); None otherwise. See `Outbox.cover`.
    merged: tuple[int, int] | None = None


class _Group:
    """A group arriving in parts: its spill file, and its open merge while merging eagerly."""

    def __init__(self, upto: int, since: int, spill: IO[bytes]):
        self.upto, self.since = upto, since
        self.next_part = 0
        self.spill = spill
        self.merge: ExitStack | None = None  # holds the open write transaction
        self.tx: Tx | None = None
        self.before = 0  # our db_version before the merge began

    def spill_rows(self, rows: list[tuple[Any, ...]]) -> None:
        data = _rows_encoder.encode(rows)
        self.spill.write(_LENGTH.pack(len(data)))
        self.spill.write(data)

    def spilled(self) -> Iterator[list[tuple[Any, ...]]]:
        """The spilled parts' rows, a part at a time (bounded memory)."""
        self.spill.flush()
        self.spill.seek(0)
        while header := self.spill.read(_LENGTH.size):
            yield _rows_decoder.decode(self.spill.read(_LENGTH.unpack(header)[0]))


class Inbox:
    """Applies the pages one sender sends us: validates, merges, stores the watermark — all of
    a page (or of a group sent in parts) in one transaction."""

    def __init__(self, db: Database, sender: str, schema: CrrSchema, limits: Limits, incarnation: str = "",
                 *, eager: bool = False):
        self.db = db
        self.sender = sender
        self.incarnation = incarnation  # the sender's, recorded with its watermark
        self.schema = schema
        self.limits = limits
        # merging a group's parts in a transaction held across calls needs the calling thread
        # to do nothing else meanwhile; an in-memory database has only that one connection
        self.eager = eager and not db.in_memory
        self.echo = EchoRanges()
        self._group: _Group | None = None

    @property
    def holding_merge(self) -> bool:
        """True while a group's merge transaction is open between parts (see `release`)."""
        return self._group is not None and self._group.merge is not None

    def apply(self, page: Changes) -> ApplyOutcome:
        """Validate and merge one page (or one part of a group).

        Raises:
            InvalidChangeError: a change this schema cannot hold (nothing applied).
            ProtocolError: a gap (the page starts after our watermark), parts out of order.
        """
        started = hops.now() if hops.ENABLED else 0
        self.schema.validate(page.rows, page.since, page.upto)
        if page.part or page.more_parts:
            return self._part(page, peer_record(self.db, self.sender).received)
        with self.db.transaction() as tx:
            # the watermark is read in the merging transaction: it cannot move meanwhile, and a
            # live page costs no separate read on a pooled connection
            watermark = peer_record(self.db, self.sender, tx).received
            if page.upto <= watermark:
                return ApplyOutcome(watermark, 0, False)
            if self._group is not None:
                raise ProtocolError(f"a new page arrived while group {self._group.upto} was still in parts")
            self._check_contiguous(page, watermark)
            before = tx.scalar("SELECT crsql_db_version()")
            tx.executemany(INSERT_CHANGES, page.rows)
            impacted, high = self._impacted(tx, before)
            store_received(tx, self.sender, page.upto, self.incarnation)
            writes = tx.connection.total_changes()  # a listener may write local changes at these versions
            report_merge(self.db, tx, ((r[0], r[1]) for r in page.rows))
            pure = tx.connection.total_changes() == writes
            if started:
                started = hops.since("merge", started)
        if started:
            hops.since("commit", started)
        merged = (before, high) if impacted and pure else None
        return ApplyOutcome(max(watermark, page.upto), impacted, True, merged)

    def release(self) -> None:
        """The sender stalled: roll back the group's open merge (its parts stay spilled) so
        that other writers can go on; the last part will merge the group from the spill file."""
        group = self._group
        if group is not None and group.merge is not None:
            log.info("sync: peer %s went quiet in the middle of group %d; its merge is rolled back "
                     "and will be redone when the last part arrives", self.sender[:8], group.upto)
            self._roll_back(group)

    def close(self) -> None:
        """Drop a group still in parts (nothing of it was committed). Call from the thread that
        applied its parts: an open merge holds that thread's write lock."""
        group, self._group = self._group, None
        if group is not None:
            try:
                if group.merge is not None:
                    self._roll_back(group)
            finally:
                group.spill.close()

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

    # -- groups in parts -------------------------------------------------------------------

    def _part(self, page: Changes, watermark: int) -> ApplyOutcome:
        group = self._group
        if page.part == 0:
            if page.upto <= watermark or (group is not None and group.upto == page.upto):
                return ApplyOutcome(watermark, 0, False)  # a duplicate
            if group is not None:
                raise ProtocolError(f"group {page.upto} started while group {group.upto} was still in parts")
            self._check_contiguous(page, watermark)
            group = self._group = _Group(page.upto, page.since, self._spill_file())
        elif group is None or group.upto != page.upto or page.part < group.next_part:
            if page.upto <= watermark or (group is not None and group.upto == page.upto):
                return ApplyOutcome(watermark, 0, False)  # a duplicate of a part already handled
            raise ProtocolError(f"part {page.part} of group {page.upto} arrived without its earlier parts")
        elif page.part > group.next_part:
            raise ProtocolError(f"part {page.part} of group {page.upto} arrived, expected part {group.next_part}")
        try:
            if page.more_parts:
                self._take_part(group, page.rows)
                return ApplyOutcome(watermark, 0, True)
            impacted = self._finish(group, page.rows)
        except BaseException:
            self.close()  # nothing of the group is applied; the sender restarts it next session
            raise
        return ApplyOutcome(max(watermark, page.upto), impacted, True)

    def _spill_file(self) -> IO[bytes]:
        folder = None if self.db.in_memory else Path(self.db.path).resolve().parent
        return tempfile.TemporaryFile(prefix="crdt-sync-parts-", dir=folder)

    def _take_part(self, group: _Group, rows: list[tuple[Any, ...]]) -> None:
        group.spill_rows(rows)
        if group.next_part == 0 and self.eager:
            group.merge = ExitStack()
            group.tx = group.merge.enter_context(self.db.transaction())
            group.before = group.tx.scalar("SELECT crsql_db_version()")
        if group.tx is not None:
            self._merge_rows(group.tx, rows)
        group.next_part += 1

    def _finish(self, group: _Group, rows: list[tuple[Any, ...]]) -> int:
        """Merge the last part, and the earlier ones from the spill file unless they are merged
        already; store the watermark; commit."""
        if group.merge is None or group.tx is None:
            with self.db.transaction() as tx:
                before = tx.scalar("SELECT crsql_db_version()")
                for spilled in group.spilled():
                    self._merge_rows(tx, spilled)
                return self._complete(tx, group, rows, before)
        try:
            with group.merge:  # leaving it commits (or rolls back on an exception)
                impacted = self._complete(group.tx, group, rows, group.before)
        finally:
            group.merge = group.tx = None
        self._group = None
        group.spill.close()
        return impacted

    def _complete(self, tx: Tx, group: _Group, rows: list[tuple[Any, ...]], before: int) -> int:
        self._merge_rows(tx, rows)
        impacted, _ = self._impacted(tx, before)
        store_received(tx, self.sender, group.upto, self.incarnation)
        if group.merge is None:
            self._group = None
            group.spill.close()
        return impacted

    def _merge_rows(self, tx: Tx, rows: list[tuple[Any, ...]]) -> None:
        tx.executemany(INSERT_CHANGES, rows)
        report_merge(self.db, tx, ((r[0], r[1]) for r in rows))

    def _roll_back(self, group: _Group) -> None:
        merge, group.merge, group.tx = group.merge, None, None
        if merge is None:
            return
        rollback = ApplyError(f"merge of group {group.upto} in parts rolled back")
        merge.__exit__(type(rollback), rollback, None)  # the transaction's rollback path; no raise
