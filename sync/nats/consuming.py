"""Reading the stream: the replica's durable push consumer, acks, re-pinning and gaps.

Deliveries are handled in order, in batches (the first one and whatever is already queued behind
it): check each one's origin and schema header, decode its page, merge the batch on the
database thread in one transaction (sync.nats.receiving), then ack each. The ack follows the
commit, so a message acked is a message merged; one merged but not acked (a crash, a dropped
connection) comes again and is a no-op.

The consumer's delivery sequence must have no holes: a hole means a delivery was lost (the
connection dropped with messages in flight) and the server would only redeliver it after the ack
wait. Then, and after every reconnect, the consumer is re-pinned at the replica's resume point
(`pin_consumer`): what was handled already is skipped by stream sequence.

A message that cannot be merged is refused: one line in the log, the typed error kept in
`refusals`, the message terminated (never redelivered) and nothing applied. A refused page of a
real origin leaves that origin's next page with a gap, which stops the replica rather than
skipping data. A page of another schema stops the replica at once (`SchemaMismatchError`):
migrate it and restart; it resumes where it stopped. So does a page on this replica's own
subject published by a file it does not continue (`DuplicateSiteError`, sync.nats.receiving),
and so does finding its consumer (named after its site id) pinned by another process: a copy
of the file, or a second replica on the same file.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from engine.database import Database

from ..errors import DuplicateSiteError, ProtocolError, SchemaMismatchError, StreamGapError, SyncError, TransportError
from ..inbox import ApplyOutcome
from ..protocol import Changes, decode
from .bootstrap import BootstrapSource, Checkpoints, bootstrap
from .layout import (
    RunDb,
    INCARNATION_HEADER,
    SCHEMA_HEADER,
    NatsOptions,
    TRANSIENT_ERRORS,
    consumer_name,
    origin_of,
    pin_consumer,
    retry_transient,
    stream_name,
)
from .receiving import Step, StreamInbox

__all__ = ["Consumer"]

log = logging.getLogger("sync.nats")
_BATCH_MESSAGES = 64  # deliveries merged in one transaction at most
_BATCH_BYTES = 8 * 1024 * 1024


class Consumer:
    """Drives this replica's durable consumer; see the module docstring."""

    def __init__(self, db: Database, nc: NatsClient, js: JetStreamContext, name: str, inbox: StreamInbox,
                 run_db: RunDb, options: NatsOptions, *, checkpoints: Checkpoints, source: BootstrapSource | None,
                 on_applied: Callable[[Changes, ApplyOutcome], None], refusals: deque[SyncError],
                 counts: Counter[str]):
        self.db = db
        self.nc = nc
        self.js = js
        self.name = name
        self.inbox = inbox
        self.run_db = run_db
        self.options = options
        self.checkpoints = checkpoints
        self.source = source
        self.on_applied = on_applied
        self.pinned = asyncio.Event()  # set once the consumer delivers to us
        self.refusals = refusals  # the replica's: the last refused messages' errors
        self.counts = counts  # the replica's: repins, bootstraps, refused
        self._repin = True
        self._sub: Any = None
        self._deliver_subject = ""  # where the consumer delivers to us (set when pinned)
        self._deliveries: asyncio.Queue[Msg] = asyncio.Queue()  # filled by the current subscription
        self._expected = 1  # the next consumer (delivery) sequence
        self._gap_attempts: dict[tuple[str, int], int] = {}
        self._schema = db.schema_fingerprint

    def repin(self) -> None:
        """Re-pin at the resume point before the next message (after a reconnect)."""
        self._repin = True

    async def run(self) -> None:
        """Read and merge until cancelled.

        Raises:
            SchemaMismatchError: a page of another schema (this replica must migrate).
            StreamGapError: pages this replica lacks left the stream and no bootstrap closed the gap.
            DuplicateSiteError: another file with this replica's site id publishes on its subject,
                or another process of this site took over its consumer.
            ApplyError: a merge failed here (a merge listener, `db.on_merge`, raised).
        """
        getter: asyncio.Future[Msg] | None = None
        try:
            while True:
                if self._repin:
                    if getter is not None:
                        getter.cancel()  # it waits on the queue of the pinning being replaced
                        getter = None
                    await retry_transient(self._pin, what=f"pinning the consumer of {self.db.site_id}")
                if getter is None:
                    getter = asyncio.ensure_future(self._deliveries.get())
                # asyncio.wait, not wait_for/timeout: it never cancels the getter, so no
                # delivery is lost to a timeout and no cancellation of this task is swallowed
                done, _ = await asyncio.wait({getter}, timeout=self.options.idle_check)
                if not done:
                    await self._check_delivering()
                    continue
                msg, getter = getter.result(), None
                await self._handle(self._with_queued(msg))
        finally:
            if getter is not None:
                getter.cancel()
            await self._unsubscribe()

    def _with_queued(self, first: Msg) -> list[Msg]:
        """`first` and the deliveries already queued behind it (bounded): merged as one batch,
        which is what keeps up with a busy stream."""
        batch, size = [first], len(first.data)
        while not self._deliveries.empty() and len(batch) < _BATCH_MESSAGES and size < _BATCH_BYTES:
            batch.append(self._deliveries.get_nowait())
            size += len(batch[-1].data)
        return batch

    async def _check_delivering(self) -> None:
        """Idle for a while: re-pin if the consumer is gone or holds messages it does not
        deliver (removed by an operator, a subscription dropped as a slow consumer, ...).

        Raises:
            DuplicateSiteError: another process pinned this site's consumer to itself.
        """
        try:
            info = await self.js.consumer_info(stream_name(self.name), consumer_name(self.db.site_id))
        except nats.js.errors.NotFoundError:
            info = None
        except TRANSIENT_ERRORS:
            return
        if info is not None and info.config.deliver_subject != self._deliver_subject:
            raise self._taken_over()
        if info is None or (info.num_pending and not info.num_ack_pending):
            log.info("consumer of %s is %s; re-pinning", self.db.site_id,
                     "gone" if info is None else f"not delivering {info.num_pending} pending messages")
            self._repin = True

    async def _pin(self) -> None:
        await self._unsubscribe()
        start = self.inbox.resume
        try:
            last = (await self.js.stream_info(stream_name(self.name))).state.last_seq
        except nats.js.errors.NotFoundError:  # deleted under us: reconnecting creates it again
            raise TransportError(f"stream {stream_name(self.name)} is gone") from None
        if start > last + 1:  # the stream is younger than our position: it was deleted and created anew
            log.warning("stream %s ends at sequence %d, before our resume point %d (recreated?); "
                        "reading it from the start", stream_name(self.name), last, start)
            await self.run_db(self.inbox.restart_at, 1)
            start = 1
        deliveries: asyncio.Queue[Msg] = asyncio.Queue()  # one per pinning: nothing of an earlier one gets in

        async def deliver(msg: Msg) -> None:  # the subscription's callback: never blocks
            deliveries.put_nowait(msg)

        self._deliveries = deliveries
        self._deliver_subject = self.nc.new_inbox()
        self._sub = await pin_consumer(self.js, self.name, self.db.site_id, start,
                                       deliver_subject=self._deliver_subject, ack_wait=self.options.ack_wait,
                                       max_ack_pending=self.options.max_ack_pending, deliver=deliver)
        self._expected = 1
        self._repin = False
        self.counts["repins"] += 1
        self.pinned.set()
        log.debug("consumer of %s pinned at stream sequence %d", self.db.site_id, start)

    def _taken_over(self) -> DuplicateSiteError:
        """The consumer is named after the site id, and only a replica of this site pins it."""
        return DuplicateSiteError(
            f"another process replicating site {self.db.site_id} took over its consumer "
            f"{consumer_name(self.db.site_id)} on stream {stream_name(self.name)}: a second replica on "
            f"{self.db.path}, or a copy of the file (a copy needs a site id of its own: `crdt-sync clone SRC DST`)",
            site_id=self.db.site_id,
        )

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except (nats.errors.Error, *TRANSIENT_ERRORS) as error:
                log.debug("unsubscribing: %s", error)

    async def _handle(self, batch: list[Msg]) -> None:
        """Merge a batch of deliveries, then ack (or terminate) each one handled.

        Raises:
            SchemaMismatchError: a page of another schema (the deliveries before it are handled).
            StreamGapError: see `_close_gap`.
        """
        steps: list[Step] = []
        msgs: list[Msg] = []
        refused: dict[int, SyncError] = {}
        mismatch: SchemaMismatchError | None = None
        for msg in batch:
            seq = self._delivery(msg)
            if self._repin:
                break  # deliveries were lost: the rest of the batch comes again after re-pinning
            if seq is None:
                continue
            try:
                steps.append(self._step(msg, seq))
            except SchemaMismatchError as error:
                mismatch = error
                break
            except ProtocolError as error:  # MessageTooLargeError too
                refused[len(steps)] = error
                steps.append(Step(seq))
            msgs.append(msg)
        if steps:
            applied = await self.run_db(self.inbox.apply_all, steps)
            refused.update(applied.refused)
            for index in range(applied.handled):
                if index in refused:
                    await self._refuse(msgs[index], steps[index].seq, refused[index])
                    continue
                outcome, page = applied.outcomes[index], steps[index].page
                if outcome is not None and page is not None:
                    self.on_applied(page, outcome)
                await self._ack(msgs[index])
            if applied.gap is not None:
                await self._close_gap(applied.gap)
                return
        if mismatch is not None:
            raise mismatch

    def _delivery(self, msg: Msg) -> int | None:
        """The stream sequence of `msg`, or None when it is no delivery in order (a status
        message, a delivery of an earlier pinning). A hole in the delivery sequence asks for a
        re-pin."""
        try:
            meta = msg.metadata
        except nats.errors.NotJSMessageError:
            return None
        if meta.sequence.consumer != self._expected:
            if meta.sequence.consumer > self._expected:  # deliveries were lost in flight
                log.info("consumer of %s: delivery %d arrived, expected %d; re-pinning",
                         self.db.site_id, meta.sequence.consumer, self._expected)
                self._repin = True
            return None
        self._expected += 1
        return meta.sequence.stream

    def _step(self, msg: Msg, seq: int) -> Step:
        """What the delivery at `seq` asks of the database.

        Raises:
            SchemaMismatchError: the page's schema header names another schema.
            ProtocolError: a bad subject, no schema header, an undecodable or oversized page.
        """
        if self.inbox.seen(seq):
            return Step(seq)
        origin = origin_of(self.name, msg.subject)
        headers = msg.headers or {}
        incarnation = headers.get(INCARNATION_HEADER, "")
        if origin == self.db.site_id and incarnation in ("", self.db.incarnation):
            return Step(seq)  # our own page (only another file's needs a look: receiving._check_own)
        if origin != self.db.site_id:
            self._check_schema(origin, headers)
        page = decode(msg.data, max_bytes=self.inbox.limits.max_message_bytes)
        if not isinstance(page, Changes):
            raise ProtocolError(f"expected a changes page on {msg.subject}, got {type(page).__name__.lower()}")
        return Step(seq, origin, page, incarnation)

    def _check_schema(self, origin: str, headers: dict[str, str]) -> None:
        value = headers.get(SCHEMA_HEADER)
        if value is None:
            raise ProtocolError(f"a message of site {origin} lacks the {SCHEMA_HEADER} header")
        version, _, fingerprint = value.partition(":")
        if fingerprint != self._schema:
            raise SchemaMismatchError(
                f"schema mismatch: site {origin} publishes schema version {version} (fingerprint "
                f"{fingerprint}), this replica {self.db.site_id} has schema version {self.db.schema_version} "
                f"(fingerprint {self._schema}); migrate both to the same version",
                local_fingerprint=self._schema, remote_fingerprint=fingerprint,
                local_version=self.db.schema_version, remote_version=int(version) if version.isdigit() else 0,
            )

    async def _refuse(self, msg: Msg, seq: int, error: SyncError) -> None:
        log.error("refused message %d on %s: %s", seq, msg.subject, error)
        self.refusals.append(error)
        self.counts["refused"] += 1
        try:
            await msg.term()
        except TRANSIENT_ERRORS as failure:
            log.debug("terminating message %d: %s", seq, failure)

    async def _ack(self, msg: Msg) -> None:
        try:
            await msg.ack()
        except TRANSIENT_ERRORS as error:  # not acked: redelivered later, then skipped
            log.debug("ack: %s", error)

    async def _close_gap(self, gap: StreamGapError) -> None:
        """Bootstrap from the configured peer and read the stream again, or stop.

        Raises:
            StreamGapError: no bootstrap peer, or bootstraps did not cover the origin.
        """
        if self.source is None:
            raise StreamGapError(gap.origin, gap.since, gap.held,
                                 "start this replica with a bootstrap peer (crdt-sync nats --bootstrap ws://HOST:PORT)")
        key = (gap.origin, gap.since)
        tried = self._gap_attempts.get(key, 0)
        if tried >= self.source.attempts:
            raise StreamGapError(gap.origin, gap.since, gap.held,
                                 f"{tried} bootstraps from {self.source.url} did not bring that origin's changes")
        self._gap_attempts[key] = tried + 1
        if tried:  # the peer's checkpoint may lag its merges by a checkpoint interval
            await asyncio.sleep(min(2.0, 0.25 * 2 ** tried))
        log.warning("%s; bootstrapping from %s", gap, self.source.url)
        await bootstrap(self.db, self.source, self.checkpoints, self.run_db)
        self.counts["bootstraps"] += 1
        await self.run_db(self.inbox.restart_at, 1)
        self._repin = True
