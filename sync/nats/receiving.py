"""Merging what a replica reads from the stream: one Inbox per origin, parts, the resume point.

Runs on the replica's database thread; every method is synchronous and called one at a time.

Each origin publishes only its own changes, in order, as pages `(since, upto]` of its
db_versions (sync.protocol `Changes`). The Inbox of that origin (sync.inbox) validates and
merges a page and stores the origin's watermark (with the origin's incarnation the page
names) in the same transaction. The stream sequence to
resume from is stored after the merges it follows (it may lag them, never lead them), so a
crash at any point re-reads, never skips.

Rules on top of the Inbox, all decided by stream sequence (a message's place in the stream):

- A message at or below `done` was handled already (a redelivery, or a re-read after the
  consumer was re-pinned): it needs nothing.
- A page whose range starts after our watermark for its origin is a gap: the pages in between
  left the stream. `StreamGapError`, nothing applied (the caller bootstraps or stops).
- A group too large for one message comes as parts 0..n; the Inbox holds the parts (in its
  spill file, sync.inbox) and merges the group in one transaction with the last one. While
  parts are held, the resume point stays at part 0: held parts do not survive a restart or a
  reconnection, and reading resumes where the group starts.
- A whole page or a new part 0 of an origin whose parts are still held means the origin
  started over (its publisher restarted mid-group and re-read the group, perhaps split
  differently): the held parts are dropped and the new message is taken as it comes.
- A page on our own subject is never merged, but if it names an incarnation of our site that
  this file does not continue up to the page's versions (engine.lineage), another file shares
  our site id (a copy, a restored backup): `DuplicateSiteError`, the replica stops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec

from engine.database import Database

from ..changes import CrrSchema, Limits
from ..errors import DuplicateSiteError, InvalidChangeError, ProtocolError, StreamGapError
from ..inbox import ApplyOutcome, Inbox
from ..protocol import Changes, site_bytes
from .positions import origin_key, origin_watermark, promote_peers, store_resume

__all__ = ["StreamInbox", "Step", "Applied"]

log = logging.getLogger("sync.nats")


class Step(msgspec.Struct, frozen=True):
    """One delivery to handle: the page of `origin` found at stream sequence `seq`, published
    by the origin's `incarnation` ("" if the message does not say), or (`page` None) a message
    that needs nothing here (a refused message; our own page of our own incarnation)."""

    seq: int
    origin: str = ""
    page: Changes | None = None
    incarnation: str = ""


class Applied(msgspec.Struct):
    """What `apply_all` did: per step its outcome (None: nothing to merge, refused, or not
    handled), the refusals by step index, and a gap that ended the batch at step `handled`."""

    outcomes: list[ApplyOutcome | None]
    refused: dict[int, ProtocolError]
    handled: int = 0
    gap: StreamGapError | None = None


class StreamInbox:
    """What one replica has merged from one stream."""

    def __init__(self, db: Database, stream: str, schema: CrrSchema, limits: Limits, resume: int):
        self.db = db
        self.stream = stream
        self.schema = schema
        self.limits = limits
        self.done = resume - 1  # every stream sequence up to here is merged or needed nothing
        self.progressed = False  # a watermark moved since the last checkpoint was written
        # Called (on this thread) with our db_versions (low, high] of a merge that wrote nothing
        # of our own (no merge listener wrote): the publisher need not read them.
        self.on_merged: Callable[[int, int], None] | None = None
        self._stored_resume = resume
        self._inboxes: dict[str, Inbox] = {}
        self._parts_from: dict[str, int] = {}  # origin -> stream sequence of the part 0 of a group in parts

    @property
    def resume(self) -> int:
        """Where reading must restart for nothing to be missed."""
        return min([self.done + 1, *self._parts_from.values()])

    def seen(self, seq: int) -> bool:
        return seq <= self.done

    def apply_all(self, steps: list[Step]) -> Applied:
        """Handle `steps` (consecutive deliveries, in order): merge or hold each page in its
        own transaction (the Inbox's, which stores the origin's watermark with it), pass over
        what needs nothing. A refused page leaves the others alone; a gap ends the batch before
        that step (the steps after it are not handled).

        The resume point is stored by `flush` (every checkpoint interval, and at close): it may
        lag the merges, never lead them, and a restart reads again from it (duplicates change
        nothing). One transaction for the whole batch would be fewer commits, but nested in it
        each merge becomes a SAVEPOINT, measured ~60% slower per change (statement journal).

        Raises:
            DuplicateSiteError: a page on our own subject comes from another file with our
                site id (the steps before it are handled, their results lost: the replica stops).
            ApplyError: a merge listener (`db.on_merge`) failed (that page rolled back).
            apsw.Error: the database failed (that page rolled back).
        After an ApplyError or apsw.Error, this object is out of step with the database: the
        replica drops it and reconnects with a new one, which starts from the stored positions.
        """
        applied = Applied(outcomes=[None] * len(steps), refused={})
        for index, step in enumerate(steps):
            if step.page is not None and step.origin == self.db.site_id:
                self._check_own(step.page, step.incarnation)
            elif step.page is not None:
                try:
                    outcome = applied.outcomes[index] = self._apply(step.origin, step.page, step.incarnation)
                except StreamGapError as gap:
                    applied.gap = gap
                    break
                except ProtocolError as error:  # InvalidChangeError too: nothing of that page applied
                    applied.refused[index] = error
                else:
                    self._track_parts(step, outcome)
                    self._report(outcome)
            self.done = max(self.done, step.seq)
            applied.handled = index + 1
        return applied

    def _report(self, outcome: ApplyOutcome) -> None:
        self.progressed |= outcome.fresh
        if outcome.merged is not None and self.on_merged is not None:
            self.on_merged(*outcome.merged)

    def _check_own(self, page: Changes, incarnation: str) -> None:
        """A page on our own subject: ours, or another file's that shares our site id.

        Raises:
            DuplicateSiteError: this file does not continue `incarnation` up to `page.upto`.
        """
        if incarnation == self.db.incarnation or self.db.descends_from(incarnation, page.upto):
            return
        raise DuplicateSiteError(
            f"replica {self.db.path} has site id {self.db.site_id}, which another database file also "
            f"uses: the stream holds this site's changes up to db_version {page.upto} from incarnation "
            f"{incarnation}, which this file does not continue (a copied file or a restored backup). "
            "Give this copy a site id of its own with `crdt-sync clone SRC DST` and replicate the clone",
            site_id=self.db.site_id,
        )

    def _apply(self, origin: str, page: Changes, incarnation: str) -> ApplyOutcome:
        """Merge (or hold, a part) one page of `origin`, published by its `incarnation`.

        Raises:
            StreamGapError: the page starts after what we hold of the origin (nothing applied).
            InvalidChangeError: a change of another site than the subject's, or one this
                schema cannot hold (nothing applied).
            ProtocolError: parts out of order within a group.
        """
        expected = site_bytes(origin)
        if any(row[6] != expected for row in page.rows):
            raise InvalidChangeError(f"a page on the subject of site {origin} carries changes of another site")
        in_parts = origin in self._parts_from
        if in_parts and page.part == 0:
            log.info("site %s published anew while parts of a group were held here "
                     "(its publisher restarted?): dropping the held parts", origin)
            self._start_over(origin)
        elif not in_parts and page.part > 0:
            self._check_gap(origin, page, starts_group=False)
        if page.part == 0:
            self._check_gap(origin, page, starts_group=True)
        return self._inbox(origin, incarnation).apply(page)

    def _track_parts(self, step: Step, outcome: ApplyOutcome) -> None:
        """Remember where the group being received in parts started, so that reading resumes there."""
        page = step.page
        assert page is not None  # only pages are merged
        if page.more_parts and page.part == 0 and outcome.fresh:
            self._parts_from[step.origin] = step.seq
        elif not page.more_parts and outcome.fresh:
            self._parts_from.pop(step.origin, None)

    def flush(self) -> None:
        """Store the resume point if skipped messages moved it (they write nothing themselves)."""
        if self.resume != self._stored_resume:
            with self.db.transaction() as tx:
                store_resume(tx, self.stream, self.resume)
            self._stored_resume = self.resume

    def restart_at(self, seq: int) -> None:
        """Forget every held part and read the stream again from `seq` (after a bootstrap:
        pages dropped as gaps before it may apply now)."""
        for origin in list(self._inboxes):
            self._start_over(origin)
        self.done = seq - 1
        with self.db.transaction() as tx:
            store_resume(tx, self.stream, seq)
        self._stored_resume = seq

    def close(self) -> None:
        """Store the resume point (at the first part of a group still in parts) and drop the
        held parts."""
        try:
            self.flush()
        finally:
            for origin in list(self._inboxes):
                self._start_over(origin)

    def _inbox(self, origin: str, incarnation: str) -> Inbox:
        """The Inbox of `origin`, recording `incarnation` with the watermarks it stores."""
        inbox = self._inboxes.get(origin)
        if inbox is None:
            inbox = self._inboxes[origin] = Inbox(self.db, origin_key(origin), self.schema, self.limits, incarnation)
        inbox.incarnation = incarnation  # an origin moved to another disk publishes as a new incarnation
        return inbox

    def _start_over(self, origin: str) -> None:
        """Drop what is held of `origin` (parts of a group) and its Inbox."""
        inbox = self._inboxes.pop(origin, None)
        self._parts_from.pop(origin, None)
        if inbox is not None:
            inbox.close()

    def _check_gap(self, origin: str, page: Changes, *, starts_group: bool) -> None:
        """Raises StreamGapError when `page` cannot follow what we hold of `origin`."""
        held = origin_watermark(self.db, origin)
        if page.upto <= held:
            return  # a duplicate: the Inbox acknowledges it without applying
        if starts_group and page.since <= held:
            return
        promote_peers(self.db)  # changes synced from the origin directly count too
        held = origin_watermark(self.db, origin)
        if page.upto <= held or (starts_group and page.since <= held):
            return
        raise StreamGapError(origin, page.since, held)
