"""One open WebSocket driven by one sync session, and the counters of its owner.

A reader thread moves received frames into a bounded inbox; the owner's thread runs the
session (the only thread touching it), sends what comes out, and on a wake (new commits,
from `db.on_commit` at once or `db.on_change` for any other writer) asks the session for
pages. Neither thread ever waits on the other side
of the network while the other one needs it, so two peers pushing at each other cannot
deadlock.
"""

from __future__ import annotations

import logging
import collections
import queue
import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

from websockets.exceptions import ConnectionClosed

from engine import Database

from .. import hops
from ..errors import TransportError
from ..session import Session, State, SyncResult

__all__ = ["Channel", "TransportStats", "Timeouts", "CLOSE_TIMEOUT", "INBOX_FRAMES", "closed_reason"]

log = logging.getLogger("sync.websocket")

CLOSE_TIMEOUT = 2.0
_CLOSE_TOO_BIG = 1009


class TransportStats:
    """Counters of one server or client, safe to read from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.connections = 0
        self.changes_sent = 0  # in pages the other side acknowledged
        self.changes_received = 0  # in pages applied here (including already-known changes)
        self.changes_applied = 0  # received changes that took effect here

    def add(self, *, connections: int = 0, sent: int = 0, received: int = 0, applied: int = 0) -> None:
        with self._lock:
            self.connections += connections
            self.changes_sent += sent
            self.changes_received += received
            self.changes_applied += applied

    def follow(self, result: SyncResult, counted: tuple[int, int, int]) -> tuple[int, int, int]:
        """Add what a session moved since `counted` (its pushed, pulled, applied when last
        counted); returns the new `counted`."""
        pushed, pulled, applied = counted
        self.add(sent=result.pushed - pushed, received=result.pulled - pulled, applied=result.applied - applied)
        return result.pushed, result.pulled, result.applied

    def __repr__(self) -> str:
        return (
            f"<TransportStats connections={self.connections} sent={self.changes_sent} "
            f"received={self.changes_received} applied={self.changes_applied}>"
        )


class Timeouts:
    """The waits of one channel: `idle_timeout` seconds between two frames, and one deadline
    `handshake_timeout` seconds after the start for the whole opening exchange (a silent or
    stalling peer must not hold a server thread or task). None: no limit. While the session
    holds a merge open (`Session.holding_merge`), `limits.merge_patience` seconds after the
    last frame: then the merge is released (`patience_over`)."""

    def __init__(self, label: str, idle_timeout: float | None, handshake_timeout: float | None):
        self.label = label
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.deadline = None if handshake_timeout is None else time.monotonic() + handshake_timeout
        self.last_frame = time.monotonic()

    def frame_received(self) -> None:
        self.last_frame = time.monotonic()

    def next_wait(self, session: Session) -> float | None:
        """How long the next wait for a frame may last: the idle timeout, cut short by the
        handshake deadline while the session is still in its handshake, and by the merge
        patience while it holds a merge open."""
        if self.deadline is not None and session.state is not State.HANDSHAKE:
            self.deadline = None
        wait = self.idle_timeout
        if self.deadline is not None:
            wait = _shorter(wait, max(0.0, self.deadline - time.monotonic()))
        if session.holding_merge:
            wait = _shorter(wait, max(0.0, self._patience_left(session)))
        return wait

    def patience_over(self, session: Session) -> bool:
        """The session holds a merge open and nothing arrived for `merge_patience` seconds."""
        return session.holding_merge and self._patience_left(session) <= 0

    def _patience_left(self, session: Session) -> float:
        return session.limits.merge_patience - (time.monotonic() - self.last_frame)

    def expired(self) -> TransportError:
        """The error for a wait that ran out."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return TransportError(f"{self.label}: handshake not complete after {self.handshake_timeout:g}s")
        return TransportError(f"{self.label}: nothing received for {self.idle_timeout:g}s")


def _shorter(wait: float | None, limit: float) -> float:
    return limit if wait is None else min(wait, limit)


def closed_reason(exc: ConnectionClosed | None) -> str:
    """Why a connection ended, in words (for errors and logs), from its close exception."""
    if exc is None:
        return "closed"
    frame = exc.rcvd or exc.sent
    if frame is not None and frame.code == _CLOSE_TOO_BIG:
        return "a message exceeded the size limit (WebSocket close 1009)"
    if frame is None:
        return "connection lost without a close frame"
    return f"closed with code {frame.code}" + (f" ({frame.reason})" if frame.reason else "")



class _Token(Enum):
    """Inbox tokens besides frames."""

    CLOSED = "the connection is gone"
    WAKE = "look at the wake flag"


INBOX_FRAMES = 64  # a well-behaved peer has one page and one ack in flight; this bounds a flood


class Channel:
    """One open WebSocket driven by one session.

    Not a context manager on purpose: `run()` is its whole life and always closes the socket and
    joins the reader before returning. A reader thread moves received frames into a bounded
    inbox; `run()` (on the owner's thread) is the only caller of the session: it feeds frames in, sends what comes out, and on a wake
    (local commits) asks the session for pages. Neither thread ever waits on the other side of
    the network while the other one needs it.
    """

    def __init__(self, ws: Any, session: Session, *, label: str, stats: TransportStats | None = None):
        self.ws = ws
        self.session = session
        self.label = label
        self.stats = stats
        self.close_exc: ConnectionClosed | None = None
        self._inbox: queue.Queue[bytes | _Token] = queue.Queue(maxsize=INBOX_FRAMES)
        self._wake_pending = threading.Event()
        self._counted = (0, 0, 0)
        # sync.hops timing points (only with hops.ENABLED): when the last commit ended, when
        # wake() was called, and when each frame still in the inbox was received
        self._committed_ns = self._woken_ns = 0
        self._received_ns: collections.deque[int] = collections.deque()

    def wake(self) -> None:
        """Local commits may exist: callable from any thread, never blocks, never lost."""
        if not self._wake_pending.is_set():
            if hops.ENABLED:
                self._woken_ns = hops.now()
                if self._committed_ns:
                    hops.add("notify", self._woken_ns - self._committed_ns)
                    self._committed_ns = 0
            self._wake_pending.set()
            try:
                self._inbox.put_nowait(_Token.WAKE)
            except queue.Full:
                pass  # the loop checks the flag after every frame it takes out

    def run(
        self,
        *,
        db: Database | None = None,
        idle_timeout: float | None = None,
        handshake_timeout: float | None = None,
        on_progress: Callable[[Session], None] | None = None,
    ) -> None:
        """Drive the session until it finishes or the connection closes; always closes the socket.
        With `db`, the session is woken (`local_changes()`) after every commit to it.

        Raises:
            TransportError: nothing arrived for `idle_timeout` seconds, or the handshake was not
                complete after `handshake_timeout` seconds (a silent or stalling peer must not
                hold a server thread).
        """
        timeouts = Timeouts(self.label, idle_timeout, handshake_timeout)
        reader = threading.Thread(target=self._read, name=f"sync-ws-read {self.label}", daemon=True)
        reader.start()
        # on_change sees every commit to the file (its notifier thread wakes us); on_commit runs
        # on the committing thread right after a commit through this Database object, which
        # spares a local write or a relayed merge the hop through that thread
        unsubscribe = db.on_change(self.wake) if db is not None else None
        uncommit = db.on_commit(self._on_commit) if db is not None else None
        try:
            self._send(self.session.start())
            self.wake()
            while not self.session.finished:
                try:
                    item = self._inbox.get(timeout=timeouts.next_wait(self.session))
                except queue.Empty:
                    if self.session.holding_merge:  # the wait was the merge's patience
                        if timeouts.patience_over(self.session):
                            self._send(self.session.release_merge())  # a quiet peer mid-group
                        continue
                    raise timeouts.expired() from None
                if item is _Token.CLOSED:
                    break
                if item is not _Token.WAKE:
                    timeouts.frame_received()
                    if hops.ENABLED:
                        hops.since("handoff", self._received_ns.popleft())
                    self._send(self.session.receive(item))
                if self._wake_pending.is_set() and not self.session.finished:
                    self._wake_pending.clear()
                    if hops.ENABLED and self._woken_ns:
                        hops.since("loop", self._woken_ns)
                        self._woken_ns = 0
                    self._send(self.session.local_changes())
                self._count()
                if on_progress is not None:
                    on_progress(self.session)
        except ConnectionClosed as exc:
            self.close_exc = self.close_exc or exc
        finally:
            if unsubscribe is not None:
                unsubscribe()
            if uncommit is not None:
                uncommit()
            self.ws.close()
            self._drain_until_done(reader)
            self._count()

    def _drain_until_done(self, reader: threading.Thread) -> None:
        """Wait for the reader to end, emptying the inbox so a reader blocked on a full inbox
        (a flooding peer) can reach the closed socket and stop."""
        deadline = time.monotonic() + CLOSE_TIMEOUT + 1
        while reader.is_alive() and time.monotonic() < deadline:
            try:
                while True:
                    self._inbox.get_nowait()
            except queue.Empty:
                pass
            reader.join(0.05)
        if reader.is_alive():
            log.warning("%s: reader thread still running after close", self.label)

    def _send(self, frames: list[bytes]) -> None:
        for frame in frames:
            started = hops.now() if hops.ENABLED else 0
            self.ws.send(frame)
            if started:
                hops.since("send", started)

    def _on_commit(self) -> None:
        """A commit through this database just ended (on the committing thread)."""
        if hops.ENABLED:
            self._committed_ns = hops.now()
        self.wake()

    def _read(self) -> None:
        """Thread entry: frames into the inbox until the connection closes."""
        try:
            while True:
                frame = self.ws.recv(decode=False)
                if hops.ENABLED:
                    self._received_ns.append(hops.now())
                self._inbox.put(frame)
        except ConnectionClosed as exc:
            self.close_exc = exc
        except Exception:
            log.exception("%s: reading failed", self.label)
            self.ws.close()
        finally:
            self._inbox.put(_Token.CLOSED)

    def _count(self) -> None:
        """Add the session's progress since the last call to the owner's counters."""
        if self.stats is not None:
            self._counted = self.stats.follow(self.session.result, self._counted)

    def closed_reason(self) -> str:
        """Why the connection ended, in words (for errors and logs)."""
        return closed_reason(self.close_exc)
