"""Publishing a replica's own committed changes to its subject of the stream.

Only the changes this replica originated are published (`Outbox.own_changes`): what it merged
from others was published by their origins, so nothing travels twice and nothing loops. Pages
are whole db_version groups (transaction atomicity crosses the stream); a group larger than a
message goes as parts that receivers hold and merge at once.

A page counts as published when the server acknowledges it (a JetStream publish ack: stored in
the stream). Then `published` moves, in the database, so a restart resumes after it; a crash
in between republishes the page, which receivers take as a duplicate. The `Nats-Msg-Id` of a
whole page is `<site>.<since>.<upto>.<incarnation>`: a republished page inside the stream's
duplicate window is dropped by the server itself. Parts carry a per-run nonce as well, because
a restarted run may split the same group differently: its parts must not be mistaken for the
earlier run's (receivers start a group over when its part 0 comes again, see
sync.nats.receiving).

Every message also names the publishing file's incarnation (`Crdt-Incarnation`, engine.lineage):
receivers record it with the origin's watermark, and a replica reading a page on its own
subject from an incarnation it does not continue knows that another file shares its site id.
The incarnation is part of the message id for that reason: a copied file's page for the same
versions as the original's is another message, which the server keeps and both files read.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import msgspec
from nats.js import JetStreamContext

from engine.database import Database

from ..changes import Limits
from ..errors import MessageTooLargeError
from ..outbox import Outbox
from ..protocol import Changes, encode
from .layout import (
    RunDb,
    INCARNATION_HEADER,
    MSG_ID_HEADER,
    SCHEMA_HEADER,
    NatsOptions,
    retry_transient,
    stream_name,
    subject_for,
)
from .positions import read_positions, store_published

__all__ = ["Publisher", "schema_header"]



def schema_header(db: Database) -> str:
    """The `Crdt-Schema` header value: `<schema version>:<fingerprint>`."""
    return f"{db.schema_version}:{db.schema_fingerprint}"


class Publisher:
    """Publishes new local commits as they happen; `wake` is set when there may be some."""

    def __init__(self, db: Database, js: JetStreamContext, name: str, limits: Limits, run_db: RunDb,
                 options: NatsOptions, *, on_published: Callable[[Changes], None]):
        self.db = db
        self.js = js
        self.limits = limits
        self.run_db = run_db
        self.subject = subject_for(name, db.site_id)
        self.stream = stream_name(name)
        self.publish_timeout = options.api_timeout
        self.on_published = on_published
        self.wake = asyncio.Event()
        self.wake.set()  # publish whatever is pending at start
        self._headers = {SCHEMA_HEADER: schema_header(db), INCARNATION_HEADER: db.incarnation}
        self._nonce = uuid.uuid4().hex[:12]
        self._outbox: Outbox | None = None
        self._published = 0  # our db_version up to which our pages are in the stream

    async def run(self) -> None:
        """Publish until cancelled.

        Raises:
            MessageTooLargeError: a page does not fit the server's max_payload (one change
                larger than half of it); nothing after it can be published.
        """
        self._published, _ = await self.run_db(read_positions, self.db, self.stream)
        self._outbox = await self.run_db(Outbox.own_changes, self.db, self._published, self.limits)
        while True:
            await self.wake.wait()
            self.wake.clear()
            await self._publish_pending()

    def pass_over(self, low: int, high: int) -> None:
        """Our versions (low, high] hold only merged changes (see `Outbox.pass_over`). Call on
        the database thread, like every use of the outbox."""
        if self._outbox is not None:
            self._outbox.pass_over(low, high)

    async def close(self) -> None:
        """End the outbox's read in progress (it holds a reader connection)."""
        if self._outbox is not None:
            await self.run_db(self._outbox.close)
            self._outbox = None

    async def _publish_pending(self) -> None:
        outbox = self._outbox
        assert outbox is not None, "run() creates the outbox before publishing"
        while True:
            page = await self.run_db(outbox.next_page, marker=False)
            if page is None or not (page.rows or page.more_parts or page.part):
                return  # nothing of ours after `acked` (versions of merged changes only)
            # Receivers hold our changes up to our last published page; the outbox's page may
            # start later, after an empty page skipped above: the range says it covers those.
            page = msgspec.structs.replace(page, since=self._published)
            data = encode(page)
            if len(data) > self.limits.max_message_bytes:
                raise MessageTooLargeError(
                    len(data), self.limits.max_message_bytes,
                    what=f"a page of {len(page.rows)} changes (our db_versions {page.since}..{page.upto}; "
                         f"a single change too large for the NATS server's max_payload?)",
                )
            await retry_transient(lambda: self._publish(page, data), what=f"publishing to {self.subject}")
            if not page.more_parts:
                await self.run_db(store_published, self.db, self.stream, page.upto)
                self._published = page.upto
                outbox.acknowledged(page.upto)
            self.on_published(page)

    async def _publish(self, page: Changes, data: bytes) -> None:
        msg_id = f"{self.db.site_id}.{page.since}.{page.upto}.{self.db.incarnation}"
        if page.part or page.more_parts:
            msg_id += f".{page.part}.{self._nonce}"
        headers = {**self._headers, MSG_ID_HEADER: msg_id}
        await self.js.publish(self.subject, data, timeout=self.publish_timeout, stream=self.stream, headers=headers)
