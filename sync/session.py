"""The sync session: the protocol as a state machine that does no network I/O.

A `Session` is one side of one connection. It reads and writes its own database (pages
out, merges in) but never touches a socket: a transport feeds it the bytes it received
and sends the bytes it returns. The in-process transport (sync.peer), the WebSocket
transport (sync.websocket), its asyncio twin (sync.aio) and the tests' lossy channel all
drive the same machine.

Transport contract
------------------
Create:   `session = peer.session(Role.CLIENT, token=..., live=False)` on the connecting side,
          `session = peer.session(Role.SERVER)` per accepted connection (the server's token
          and key requirement come from `Peer(db, token=..., require_keys=...)`). A client
          that expects a server key passes `server_key=`; a TLS transport passes the
          connection's `binding=` (sync.tls.channel_binding) on both sides.
Start:    `out = session.start()` — the client gets `[hello]`, the server `[]`.
Receive:  for every message received (one binary frame = one message):
              `out = session.receive(data)`
Send:     send every `bytes` in `out`, in order, before feeding the next message.
          `receive()` never raises for anything the remote did: bad input produces an
          Error message in `out` and `session.failed` becomes true.
Close:    after sending `out`, close the connection when `session.finished` is true
          (round complete in one-shot mode, or failed). Always call `session.close()` at
          the end, from the same thread (idempotent; it ends the session's reads, drops a
          group still in parts and rolls back its open merge).
Streaming: `streaming=True` on creation is a promise of the transport, which lets the
          session pipeline: (1) messages arrive in the order they were sent, whole (a
          socket, or in-process delivery); (2) one thread drives the session and does
          nothing else between its messages; (3) while `session.holding_merge` is true, if
          no message arrived for `session.limits.merge_patience` seconds, the transport
          calls `out = session.release_merge()` and sends `out`. In return the session keeps
          up to `limits.window` pages in flight per direction (the sender reads page n+1
          while the receiver merges page n), and merges a group that arrives in parts part by
          part into one write transaction held open until its last part (instead of all at
          the last part): that transaction holds the database's write lock, hence (2) and
          (3) — a release rolls it back and the group is merged at its last part instead.
          Without the promise (e.g. the lossy simulated network of sync.testing), one page
          is in flight and parts are merged at the last one.
Outcome:  `session.result` (a `SyncResult`, updated live: pulled/pushed counts, bytes,
          remote site; `progress=fn` on creation calls fn(result) after every page) and
          `session.error` (a `SyncError` or None); `session.raise_for_error()` raises it.
          A refusal sent by the remote (wrong token, schema mismatch, bad page) arrives as
          an Error message; `receive()` returns [] and `session.error` is the
          matching `PeerRefusedError` subclass (e.g. both `PeerRefusedError` and `AuthError`).
          A connection that drops before `finished` is an incomplete round: nothing is lost,
          watermarks only move with applied pages, the next session resumes.

One round (what goes over the wire):
    client                                server
    Hello(site, schema, token, live[, key, nonce]) ──▶
                                     ◀──  Challenge(key, nonce, signature)   (key authentication only,
    Proof(signature) ──▶                                                      see sync.handshake)
                                     ◀──  Hello(site, schema, watermark for the client, grant)   (or Error)
    Pull(since = watermark for server) ─▶
                                     ◀──  Changes page 1 .. n (last has caught_up)         pull
    Ack(upto, part, watermark) per page ─▶
    Changes page 1 .. m (last caught_up) ─▶                                                push
                                     ◀──  Ack per page
    finished (one-shot): the client closes; the server's session is finished as well.

Flow control: at most `limits.window` pages (1 unless `streaming`) in flight per direction;
a page is read from the database only when the window has room, so memory holds
O(window x page) whatever the backlog. Each page says which versions it covers,
(since, upto], and each starts where the previous one ended, so a receiver notices a lost
page (a gap) instead of skipping it. Acks are cumulative: an ack of a page acknowledges
the pages sent before it (the receiver applies them in order, and refuses a gap). A page
holds whole db_version groups bounded by `Limits` (changes and bytes); a larger group goes
as parts that the receiver merges at once (sync.inbox).

Live mode (`live=True` on the client; the server follows the client's Hello): after the
initial round both sessions stay open (`session.state is State.LIVE`, `finished` false)
and push new local commits. The transport tells the session that local commits may
have happened by calling `out = session.local_changes()` and sends `out` — from a
`db.on_commit` listener (hand it over to the connection's thread) and/or a cheap poll
(e.g. every 50-200 ms, which also catches other processes' commits). `local_changes()`
is cheap when nothing changed (one `crsql_db_version()` read) and returns [] while the
window is full: the acknowledgements send whatever is pending, so no commit is missed. Merges applied by this session are committed too and relay to the other
connected peers' sessions through the same notification (a change never goes back to
the site it came from: the page query excludes the receiver's own site id, and rows this
session merged from the peer are not echoed back). A page may be empty: it only moves
the peer's watermark over versions that held nothing for it. In LIVE state the Ack of a
merged page says so instead when it can (`Ack.covered`: the merge only re-stamped the
peer's own changes), so a live write costs one page and one ack per link, not two of each.

Watermarks: each side stores, per peer, the peer's db_version up to which it applied the
peer's pages and the peer's incarnation they came from, in the same transaction as the
merge. Each side checks that its file continues the history the other side recorded
(engine.lineage): a copied file or restored backup is refused with `DuplicateSiteError`
before anything is read or applied. A peer of the recorded incarnation that announces a
db_version below the watermark (its file lost commits) has its changes read again from 0
(idempotent).

Threading: a Session is not thread-safe. Call its methods from one thread (one thread for
the session's life when `streaming`). Many sessions may share one Peer and one Database.
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING

import apsw
import msgspec

from engine.errors import EngineError

from . import hops
from .changes import Limits
from .errors import (
    ApplyError,
    DuplicateSiteError,
    MalformedChallengeError,
    ProtocolError,
    SchemaMismatchError,
    SyncError,
    refusal,
)
from .handshake import ClientHandshake, ServerHandshake
from .identity import format_public_key
from .inbox import Inbox
from .outbox import Outbox
from .watermarks import PeerRecord, peer_record, record_ack
from .protocol import Ack, Challenge, Changes, Error, Hello, Message, Proof, Pull, decode, encode
from .trust import Grant, authorize_write

if TYPE_CHECKING:
    from .peer import Peer

__all__ = ["Session", "SyncResult", "Role", "State", "ACKS_PER_RECORD"]

log = logging.getLogger("sync")

ACKS_PER_RECORD = 32
"""Live mode stores acknowledgements every this many acks, and at close (see `_record_ack`)."""


class Role(str, Enum):
    CLIENT = "client"
    SERVER = "server"


class State(str, Enum):
    HANDSHAKE = "handshake"  # waiting for the other side's Hello (client: and the server's pages)
    SYNCING = "syncing"      # initial round in progress
    LIVE = "live"            # initial round done, live mode: new commits keep flowing
    DONE = "done"            # one-shot round complete
    FAILED = "failed"        # an Error was sent or received; see `error`


class SyncResult(msgspec.Struct):
    """What a session moved. Counts are changes (rows of crsql_changes) in pages that were
    applied (pulled) or acknowledged by the other side (pushed)."""

    pulled: int = 0
    pushed: int = 0
    applied: int = 0  # pulled changes that took effect here (0 for already-known ones)
    pages_received: int = 0
    pages_sent: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    remote_site: str = ""
    remote_db_version: int = 0
    # The db_version spans of the round, for progress estimates (sync.progress): we pull the
    # remote's versions from pull_from up to remote_db_version, and push ours from push_from
    # up to push_to (our db_version when the push began); *_upto is how far each has got.
    pull_from: int = 0
    pulled_upto: int = 0
    push_from: int = 0
    push_to: int = 0
    pushed_upto: int = 0
    remote_key: str = ""   # the peer's public key when it proved one (key authentication)
    read_only: bool = False  # client: the server granted read only, so nothing was pushed


class Session:
    """One side of one sync connection; see the module docstring for the transport contract."""

    def __init__(self, peer: "Peer", role: Role, *, token: str | None = None, live: bool = False,
                 limits: Limits | None = None, progress: Callable[[SyncResult], None] | None = None,
                 server_key: bytes | None = None, binding: bytes = b"", streaming: bool = False):
        self.peer = peer
        self.db = peer.db
        self.role = Role(role)
        self.token = token
        self.live = live
        self.limits = limits or peer.limits
        self.progress = progress
        self.streaming = streaming
        self.window = max(1, self.limits.window) if streaming else 1
        self.state = State.HANDSHAKE
        self.error: SyncError | None = None
        self.result = SyncResult()
        self.remote: Hello | None = None
        self._outbox: Outbox | None = None
        self._inbox: Inbox | None = None
        self._push_since: int | None = None  # client: the server's watermark for us
        self._in_flight: collections.deque[Changes] = collections.deque()  # oldest first
        self._unrecorded: tuple[int, int] | None = None  # live: (acked, covered) not stored yet
        self._acks_unrecorded = 0
        self._may_send = False
        self._send_done = False
        self._recv_done = False
        self._closed = False
        self._pending_hello: Hello | None = None  # server: the client's hello, until its proof
        if self.role is Role.SERVER:
            self._admission = ServerHandshake(peer, binding=binding)
        else:
            self._verification = ClientHandshake(peer, server_key=server_key, binding=binding)

    # -- the transport's calls -------------------------------------------------------

    def start(self) -> list[bytes]:
        """The messages that open the connection: the client's Hello, nothing for the server."""
        if self.role is Role.CLIENT:
            return [self._encode(self._hello(token=self.token, live=self.live, **self._verification.hello_fields()))]
        return []

    def receive(self, data: bytes) -> list[bytes]:
        """Handle one received message; return the messages to send, in order.

        Never raises for the remote's doing: bad input fails the session with an Error reply.
        """
        if self.finished or self._closed:
            return []
        try:
            started = hops.now() if hops.ENABLED else 0
            message = decode(data, max_bytes=self.limits.max_message_bytes)
            if started:
                hops.since("decode", started)
            self.result.bytes_received += len(data)
            return self._dispatch(message)
        except SyncError as error:
            return self._fail(error)
        except apsw.Error as error:
            return self._fail(ApplyError(f"merging failed on this replica: {error}"), exc=error)
        except Exception as error:  # a bug must not kill the transport's thread
            log.exception("sync session %s: unexpected failure", self._name())
            return self._fail(SyncError(f"internal error: {error!r}"), exc=error)

    def local_changes(self) -> list[bytes]:
        """Live mode: local commits may have happened; the pages to send now (often [])."""
        if self.finished or self._closed or not self._sending_allowed():
            return []
        try:
            return self._pump()
        except SyncError as error:
            return self._fail(error)
        except apsw.Error as error:
            return self._fail(ApplyError(f"reading changes failed on this replica: {error}"), exc=error)

    @property
    def holding_merge(self) -> bool:
        """True while a group sent in parts is being merged in a transaction held open between
        messages (`streaming` sessions): the transport must call `release_merge()` when no message
        arrived for `limits.merge_patience` seconds."""
        return self._inbox is not None and self._inbox.holding_merge

    def release_merge(self) -> list[bytes]:
        """The peer went quiet in the middle of a group: let other writers in (the group goes on,
        merged when its last part arrives). Returns the messages to send (an Error, if the
        database failed)."""
        if self._inbox is None or self._closed:
            return []
        try:
            self._inbox.release()
        except apsw.Error as error:
            return self._fail(ApplyError(f"rolling back a merge failed on this replica: {error}"), exc=error)
        return []

    def close(self) -> None:
        """Release the session's reads, group parts and open merge. Idempotent; call it from the
        thread that drives the session (an open merge holds that thread's write lock)."""
        if self._closed:
            return
        self._closed = True
        if self._unrecorded is not None:
            try:
                record_ack(self.db, self._hello_in.site_id, *self._unrecorded, self._hello_in.incarnation)
            except (apsw.Error, EngineError) as error:  # a closed database: a re-read next time, no more
                log.debug("sync session %s: close: acks not recorded: %s", self._name(), error)
        for part in (self._outbox, self._inbox):
            if part is not None:
                try:
                    part.close()
                except (apsw.Error, EngineError) as error:  # a closed database: nothing left to release
                    log.debug("sync session %s: close: %s", self._name(), error)

    @property
    def finished(self) -> bool:
        """True when the transport should close the connection (after sending what it has)."""
        return self.state in (State.DONE, State.FAILED)

    @property
    def failed(self) -> bool:
        return self.state is State.FAILED

    @property
    def caught_up(self) -> bool:
        """The initial round is complete in both directions."""
        return self._send_done and self._recv_done

    def raise_for_error(self) -> None:
        """Raises:
            SyncError: the session failed (a local detection or a remote refusal)."""
        if self.error is not None:
            raise self.error

    # -- dispatch ----------------------------------------------------------------------

    def _dispatch(self, message: Message) -> list[bytes]:
        if isinstance(message, Error):
            self.state = State.FAILED
            self.error = refusal(message.code, message.message, peer=self.result.remote_site)
            log.warning("sync session %s: refused by peer: %s", self._name(), self.error)
            return []
        if self.remote is None:
            return self._opening(message)
        if isinstance(message, Changes):
            return self._on_changes(message)
        if isinstance(message, Ack):
            return self._on_ack(message)
        if isinstance(message, Pull) and self.role is Role.SERVER and self._outbox is None:
            return self._on_pull(message)
        raise ProtocolError(f"unexpected {type(message).__name__.lower()} message in state {self.state.value}")

    def _opening(self, message: Message) -> list[bytes]:
        """The messages before the round: hello, and with key authentication challenge/proof."""
        if self.role is Role.SERVER:
            if self._pending_hello is None:
                if not isinstance(message, Hello):
                    raise ProtocolError(f"expected hello first, got {type(message).__name__.lower()}")
                challenge = self._admission.on_hello(message)  # before anything of this database is read
                if challenge is None:
                    return self._on_hello(message)
                self._pending_hello = message
                return [self._encode(challenge)]
            if not isinstance(message, Proof):
                raise MalformedChallengeError(f"expected the proof of the client's key, got {type(message).__name__.lower()}")
            self._admission.on_proof(message)
            return self._on_hello(self._pending_hello)
        if isinstance(message, Challenge):
            return [self._encode(self._verification.on_challenge(message))]
        if not isinstance(message, Hello):
            raise ProtocolError(f"expected hello first, got {type(message).__name__.lower()}")
        self._verification.on_server_hello(message)
        return self._on_hello(message)

    def _on_hello(self, hello: Hello) -> list[bytes]:
        self._check_compatible(hello)
        self.remote = hello
        self.result.remote_site = hello.site_id
        self.result.remote_db_version = hello.db_version
        self._inbox = Inbox(self.db, hello.site_id, self.peer.schema, self.limits, hello.incarnation,
                            eager=self.streaming)
        held = self._held_record(hello)
        self.result.pull_from = self.result.pulled_upto = held.received
        if self.role is Role.SERVER:
            self.live = hello.live
            self.state = State.SYNCING
            grant = self._admission.grant
            if self._admission.client_key is not None:
                self.result.remote_key = format_public_key(self._admission.client_key)
            if grant is not None and grant.can is Grant.READ:
                self._recv_done = True  # a reader pushes nothing; its round ends with our stream
            can = grant.can.value if grant is not None else ""
            return [self._encode(self._hello(watermark=held.received, seen=held.incarnation, live=hello.live, can=can))]
        if self._verification.verified and self._verification.peer_key is not None:
            self.result.remote_key = format_public_key(self._verification.peer_key)
        self.result.read_only = hello.can == Grant.READ.value
        if hello.watermark is None:
            raise ProtocolError("the server's hello lacks the watermark it holds for this client")
        self._check_continues(hello.seen_incarnation, hello.watermark)
        self._push_since = hello.watermark
        self._push_span(hello.watermark)
        self.state = State.SYNCING
        return [self._encode(Pull(held.received, held.incarnation))]

    def _held_record(self, hello: Hello) -> PeerRecord:
        """Our record of the peer. If our watermark lies beyond the peer's db_version while the
        peer is the incarnation we recorded (its file lost commits, e.g. a deleted WAL), its
        new versions reuse numbers we passed: offer 0 so that everything it has is read again
        (merging is idempotent). A peer of another incarnation checks its lineage itself."""
        held = peer_record(self.db, hello.site_id)
        if held.received > hello.db_version and held.incarnation in ("", hello.incarnation):
            log.warning("sync session %s: peer is at db_version %d below our watermark %d for it; "
                        "re-reading all its changes", self._name(), hello.db_version, held.received)
            return PeerRecord(0, held.incarnation)
        return held

    def _check_continues(self, incarnation: str, version: int) -> None:
        """The peer holds our changes up to `version`, the last from our `incarnation`: refuse
        to go on unless this file continues that history (engine.lineage).

        Raises:
            DuplicateSiteError: this file is a copy that split from the one the peer knows.
        """
        if self.db.descends_from(incarnation, version):
            return
        raise DuplicateSiteError(
            f"replica {self.db.path} has site id {self.db.site_id}, which another copy of this database "
            f"file also uses: the peer holds this site's changes up to db_version {version} from "
            f"incarnation {incarnation}, which this file does not continue (a copied file or a restored "
            "backup). Nothing was exchanged. Give this copy a site id of its own with "
            "`crdt-sync clone SRC DST` (Database.clone_to) and sync the clone",
            site_id=self.db.site_id,
        )

    def _on_pull(self, pull: Pull) -> list[bytes]:
        self._check_continues(pull.seen_incarnation, pull.since)
        self._push_span(pull.since)
        self._outbox = self._new_outbox(pull.since)
        self._may_send = True
        return self._pump()

    def _on_changes(self, page: Changes) -> list[bytes]:
        if self.role is Role.CLIENT and self._outbox is None and self._recv_done:
            raise ProtocolError("changes after the server's stream ended")
        if self.role is Role.SERVER and self._admission.grant is not None:
            authorize_write(self._admission.grant, {row[0] for row in page.rows})  # before anything is applied
        outcome = self._inbox_ready.apply(page)
        if outcome.fresh:
            if not page.more_parts:
                self.result.pulled_upto = max(self.result.pulled_upto, page.upto)
            self.result.pulled += len(page.rows)
            self.result.applied += outcome.impacted
            self.result.pages_received += 1
            self._report()
        covered = self._covered(outcome.merged)
        out = [self._encode(Ack(page.upto, page.part, outcome.watermark, outcome.impacted, covered))]
        if page.caught_up and not page.more_parts and not self._recv_done:
            self._recv_done = True
            if self.role is Role.CLIENT and self.result.read_only:
                self._send_done = True  # the server would refuse our pages: nothing to push
            elif self.role is Role.CLIENT:
                self._outbox = self._new_outbox(self._push_since)
                self._may_send = True
                out += self._pump()
        self._update_state()
        return out

    def _on_ack(self, ack: Ack) -> list[bytes]:
        acked = self._acked_pages(ack)
        if not acked:
            if self._outbox is None or ack.upto > self._outbox.sent_upto:
                raise ProtocolError(f"ack for page (upto={ack.upto}, part={ack.part}) that was never sent")
            return []  # a duplicate or late ack of an earlier page
        page = acked[-1]
        if not page.more_parts and ack.watermark < page.upto:
            raise ProtocolError(
                f"ack of page upto={page.upto} reports watermark {ack.watermark}: the page was not applied"
            )
        for done in acked:
            del self._in_flight[0]
            if not done.more_parts:
                self.result.pushed_upto = max(self.result.pushed_upto, done.upto)
                self._send_done = self._send_done or done.caught_up
            self.result.pushed += len(done.rows)
        self._report()
        self._outbox_ready.acknowledged(ack.watermark)
        if not page.more_parts:
            self._record_ack(ack.watermark, ack.covered)
        out = self._pump() if self._sending_allowed() else []
        self._update_state()
        return out

    def _record_ack(self, acked: int, covered: int) -> None:
        """Store what the peer acknowledged (and, with `covered`, what we hold of it). In live mode
        every page is acked, and a write transaction per ack costs more than the page (and wakes
        every connection of the database): there the latest is kept here and stored every
        `ACKS_PER_RECORD` acks and when the session closes. Losing it in a crash costs a re-read
        of versions already held, never a gap: the watermark that guards merges is stored with
        each merge (sync.inbox)."""
        if self._unrecorded is not None:
            acked, covered = max(acked, self._unrecorded[0]), max(covered, self._unrecorded[1])
        if self.state is State.LIVE and self._acks_unrecorded + 1 < ACKS_PER_RECORD:
            self._unrecorded = (acked, covered)
            self._acks_unrecorded += 1
            return
        self._unrecorded, self._acks_unrecorded = None, 0
        record_ack(self.db, self._hello_in.site_id, acked, covered, self._hello_in.incarnation)

    def _acked_pages(self, ack: Ack) -> list[Changes]:
        """The pages in flight this ack acknowledges: the one it names and every one sent
        before it (cumulative); [] when it names none in flight."""
        for index, page in enumerate(self._in_flight):
            if (page.upto, page.part) == (ack.upto, ack.part):
                return list(itertools.islice(self._in_flight, index + 1))
        return []

    # -- parts that exist once the handshake is done (every later message needs them) ----

    @property
    def _hello_in(self) -> Hello:
        if self.remote is None:
            raise ProtocolError("no hello received yet")
        return self.remote

    @property
    def _inbox_ready(self) -> Inbox:
        if self._inbox is None:
            raise ProtocolError("no hello received yet")
        return self._inbox

    @property
    def _outbox_ready(self) -> Outbox:
        if self._outbox is None:
            raise ProtocolError(f"nothing was sent in state {self.state.value}")
        return self._outbox

    def _new_outbox(self, since: int | None) -> Outbox:
        if since is None:
            raise ProtocolError("the peer's watermark for this replica is unknown")
        return Outbox(self.db, self._hello_in.site_id, since, self.limits, self._inbox_ready.echo)

    # -- sending -------------------------------------------------------------------------

    def _covered(self, merged: tuple[int, int] | None) -> int:
        """Live mode: the db_version the Ack may tell the peer it holds all of ours up to.

        Merging its page moved our db_version over versions holding only its own changes;
        without this claim our next `local_changes()` would send an empty page back just to
        move its watermark (a message, an ack and two commits per live write). 0: no claim
        (one-shot rounds keep their exact page-by-page watermarks).
        """
        if merged is None or self.state is not State.LIVE or self._in_flight or self._outbox is None:
            return 0
        return self._outbox.cover(*merged)

    def _sending_allowed(self) -> bool:
        return self._may_send and (not self._send_done or self.live)

    def _pump(self) -> list[bytes]:
        """The next pages while the window has room and there is something to send. In the
        initial round nothing follows the page that ends it (`caught_up`) until it is acked."""
        out: list[bytes] = []
        while self._outbox is not None and len(self._in_flight) < self.window:
            if not self._send_done and self._in_flight and self._in_flight[-1].caught_up:
                break
            started = hops.now() if hops.ENABLED else 0
            page = self._outbox.next_page(marker=not self._send_done)
            if page is None:
                break
            if started:
                started = hops.since("read", started)
            data = self._encode(page)
            if started:
                hops.since("encode", started)
            if len(data) > self.limits.max_message_bytes:
                raise ProtocolError(
                    f"a page of {len(page.rows)} changes encodes to {len(data)} bytes, above the "
                    f"{self.limits.max_message_bytes}-byte message limit (a single change too large?)"
                )
            self._in_flight.append(page)
            self.result.pages_sent += 1
            out.append(data)
        return out

    # -- helpers -------------------------------------------------------------------------

    def _hello(self, *, token: str | None = None, live: bool = False, watermark: int | None = None,
               seen: str = "", key: bytes | None = None, nonce: bytes | None = None, can: str = "") -> Hello:
        return Hello(
            site_id=self.db.site_id,
            schema_version=self.peer.schema_version,
            fingerprint=self.peer.fingerprint,
            db_version=self.db.db_version,
            token=token,
            live=live,
            watermark=watermark,
            incarnation=self.db.incarnation,
            seen_incarnation=seen,
            key=key,
            nonce=nonce,
            can=can,
        )

    def _check_compatible(self, hello: Hello) -> None:
        if hello.site_id == self.db.site_id:
            raise DuplicateSiteError(
                f"the peer has this replica's own site id {hello.site_id}: one of the two database "
                "files is a copy of the other. Give the copy a site id of its own with "
                "`crdt-sync clone SRC DST` (Database.clone_to)",
                site_id=hello.site_id,
            )
        if hello.fingerprint != self.peer.fingerprint:
            raise SchemaMismatchError(
                f"schema mismatch: replica {self.db.site_id} has schema version {self.peer.schema_version} "
                f"(fingerprint {self.peer.fingerprint}), replica {hello.site_id} has schema version "
                f"{hello.schema_version} (fingerprint {hello.fingerprint}); migrate both to the same version",
                local_fingerprint=self.peer.fingerprint,
                remote_fingerprint=hello.fingerprint,
                local_version=self.peer.schema_version,
                remote_version=hello.schema_version,
            )

    def _push_span(self, since: int) -> None:
        """Record the versions this round pushes: from the remote's watermark for us to our
        current db_version (commits made meanwhile go too, past the estimate)."""
        self.result.push_from = self.result.pushed_upto = since
        self.result.push_to = max(since, self.db.db_version)

    def _update_state(self) -> None:
        if self.state is State.SYNCING and self.caught_up:
            self.state = State.LIVE if self.live else State.DONE

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.result)

    def _encode(self, message: Message) -> bytes:
        data = encode(message)
        self.result.bytes_sent += len(data)
        return data

    def _fail(self, error: SyncError, exc: BaseException | None = None) -> list[bytes]:
        self.state = State.FAILED
        self.error = error
        if exc is not None and error.__cause__ is None:
            error.__cause__ = exc
        log.warning("sync session %s: %s (%s); replying with an error", self._name(), error, error.code)
        return [self._encode(Error(error.code, str(error)[:4000]))]

    def _name(self) -> str:
        remote = self.result.remote_site[:8] or "?"
        return f"{self.role.value} {self.db.site_id[:8]}<->{remote}"
